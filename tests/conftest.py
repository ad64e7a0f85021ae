"""Shared pytest set-up: hypothesis profiles, and the e2e plugin loaded only when e2e tests may run.

- Hypothesis: profile ``ci`` (10,000 examples, no deadline) is loaded when CI=true, ``default``
  otherwise; ``HYPOTHESIS_PROFILE`` picks one explicitly (``dev`` runs 50 examples).
- tests/e2e_plugin.py holds the e2e fixtures and the CI rule (under CI=true a skipped e2e test
  fails). It is registered in ``pytest_configure``, before any collection, unless the ``-m``
  expression deselects every ``e2e`` test; a unit run therefore never imports it.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from e2e_select import e2e_may_run


def is_ci() -> bool:
    """CI=true (1/true/yes), as e2e_support.is_ci says; repeated so a unit run needs no e2e code."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


settings.register_profile(
    "ci",
    max_examples=10_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=50)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if is_ci() else "default")
settings.load_profile(HYPOTHESIS_PROFILE)


def pytest_configure(config: pytest.Config) -> None:
    if e2e_may_run(config.getoption("markexpr", "") or ""):
        config.pluginmanager.import_plugin("e2e_plugin")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"rstash e2e: CI={'true' if is_ci() else 'false'} (skipped e2e tests "
        f"{'fail' if is_ci() else 'skip'}), e2e plugin "
        f"{'loaded' if config.pluginmanager.has_plugin('e2e_plugin') else 'not loaded'}, "
        f"euid={os.geteuid()}, hypothesis profile={HYPOTHESIS_PROFILE}"
    ]
