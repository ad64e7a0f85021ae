"""Fixtures of the adversarial suite (helpers live in adv_support, the protocol in adv_wire)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adversarial.adv_support import Site
from e2e_support import ProcGroup, ServiceUser


@pytest.fixture
def site(e2e_dir: Path, e2e_venv: Path, spawn: ProcGroup, service_user: ServiceUser
         ) -> Iterator[Site]:
    """The installed rstash-recv and rstash-send, run in ``e2e_dir``; pipe sessions killed after."""
    s = Site(e2e_dir, e2e_venv, spawn, service_user)
    try:
        yield s
    finally:
        s.close()
