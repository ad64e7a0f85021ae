"""Fixtures for tests against a real GlusterFS volume (tests/gluster_support.py).

``gluster`` is one started two-brick volume with two FUSE mounts, made once per test module and
per layout (``distribute`` and ``replica``: a test using it runs on both). Set-up and tear-down
times are printed in the terminal summary. Every test here is ``e2e``: under CI=true a missing
GlusterFS or root is a failure, not a skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gluster_support import LAYOUTS, GlusterVolume, gluster_volume

HERE = Path(__file__).resolve().parent

#: (layout, set-up seconds, tear-down seconds) of every volume made in this run.
_TIMINGS: list[tuple[str, float, float, dict[str, float]]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # Below this directory, not any path with a "cluster" component (a checkout's own name).
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="module", params=LAYOUTS)
def gluster(request: pytest.FixtureRequest) -> Iterator[GlusterVolume]:
    """A started two-brick volume of each layout, mounted twice (``mounts[0]``, ``mounts[1]``)."""
    vol: GlusterVolume | None = None
    try:
        with gluster_volume(layout=request.param) as vol:
            yield vol
    finally:
        if vol is not None:
            _TIMINGS.append((vol.layout, vol.setup_seconds, vol.teardown_seconds,
                             vol.teardown_steps))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for layout, setup, teardown, steps in _TIMINGS:
        detail = ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
        terminalreporter.write_line(
            f"GlusterFS {layout} volume: set-up {setup:.2f} s, tear-down {teardown:.2f} s ({detail})")
