"""The e2e fixtures and report hooks, loaded by tests/conftest.py only when e2e tests may run.

A unit run (``-m "not e2e"``) never imports this module, so it never imports e2e_support either.

- Under CI=true a skipped ``e2e`` test is reported as a failure: CI installs every daemon and
  runs as root, so a skip there hides a broken pipeline. Use ``need(condition, why)`` from
  e2e_support to say what a test needs.
- A failed e2e test shows the tails of the logs in its ``e2e_dir``.
- Fixtures: ``service_user``, ``e2e_venv``, ``e2e_dir``, ``spawn`` (documented below and in
  tests/e2e_support.py, which e2e tests import helpers from).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import e2e_support
from e2e_support import ProcGroup, ServiceUser, is_ci, need

#: Log files of an e2e test whose tails are shown when it fails.
_LOG_SUFFIXES = (".log", ".out", ".err")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report: pytest.TestReport = yield
    if report.skipped and not hasattr(report, "wasxfail") and is_ci() \
            and item.get_closest_marker("e2e") is not None:
        # A skip of any origin (pytest.skip, importorskip, a fixture) fails under CI.
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"e2e test skipped under CI=true, which counts as a failure: {reason}"
    elif report.failed and report.when == "call":
        e2e_dir = getattr(item, "funcargs", {}).get("e2e_dir")
        if isinstance(e2e_dir, Path) and e2e_dir.is_dir():
            for path in sorted(e2e_dir.rglob("*")):
                if path.suffix in _LOG_SUFFIXES and path.is_file():
                    text = path.read_text(errors="replace")
                    if text:
                        report.sections.append((f"e2e {path.relative_to(e2e_dir)}",
                                                text[-4000:]))
    return report


@pytest.fixture(scope="session")
def service_user() -> ServiceUser:
    """The account rstash-recv runs as: ``rstash-e2e`` when root, else the current user."""
    if os.geteuid() == 0:
        need(e2e_support.find_program("setpriv"), "setpriv (util-linux) is needed as root")
        need(e2e_support.find_program("useradd"), "useradd (passwd) is needed as root")
    try:
        return e2e_support.service_user()
    except RuntimeError as e:
        need(False, f"no service user: {e}")
        raise


@pytest.fixture(scope="session")
def e2e_venv(service_user: ServiceUser) -> Path:
    """A venv with this checkout installed (non-editable); its bin/ has rstash-recv/-send."""
    if os.geteuid() == 0:
        need(e2e_support.SYSTEM_PYTHON.exists(), f"{e2e_support.SYSTEM_PYTHON} is needed as root")
    try:
        venv, what = e2e_support.ensure_e2e_venv()
    except (RuntimeError, OSError) as e:
        need(False, f"cannot build the e2e venv: {e}")
        raise
    sys.stderr.write(f"\n[e2e venv {venv}: {what}]\n")
    return venv


@pytest.fixture
def e2e_dir(service_user: ServiceUser) -> Iterator[Path]:
    """A fresh directory owned by the service user, reachable by it, removed afterwards."""
    d = e2e_support.make_e2e_dir(service_user)
    yield d
    if os.environ.get("RSTASH_E2E_KEEP") != "1":
        e2e_support.remove_tree(d)


@pytest.fixture
def spawn(e2e_dir: Path) -> Iterator[ProcGroup]:
    """``spawn(argv, name=..., env=..., stdin=...)`` -> Proc, logs in e2e_dir; all killed at end."""
    group = ProcGroup(e2e_dir)
    try:
        yield group
    finally:
        group.close()
