"""tests/conftest.py: the e2e plugin is loaded only by runs that may select an e2e test.

Each case runs pytest in a child process on one unit test file, with a probe plugin that prints,
at session finish, whether e2e_plugin was registered and which e2e modules were imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_select import e2e_may_run

TESTS = Path(__file__).parent

PROBE = r"""
import sys
def pytest_sessionfinish(session):
    loaded = session.config.pluginmanager.has_plugin("e2e_plugin")
    imported = sorted(m for m in ("e2e_plugin", "e2e_support") if m in sys.modules)
    print(f"\nPROBE plugin={loaded} imported={','.join(imported) or '-'}")
"""


def _probe(tmp_path: Path, *args: str) -> str:
    (tmp_path / "rstash_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "-p", "rstash_probe", *args, str(TESTS / "test_units.py")],
                         capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    [line] = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")]
    return line


def test_a_unit_run_imports_no_e2e_code(tmp_path: Path) -> None:
    assert _probe(tmp_path, "-m", "not e2e") == "PROBE plugin=False imported=-"


def test_a_run_without_a_mark_expression_loads_the_e2e_plugin(tmp_path: Path) -> None:
    assert _probe(tmp_path) == "PROBE plugin=True imported=e2e_plugin,e2e_support"


@pytest.mark.parametrize(("markexpr", "may_run"), [
    ("", True), ("e2e", True), ("not e2e", False), ("e2e and slow", True),
    ("not e2e and not slow", False), ("slow or e2e", True), ("not (e2e or slow)", False),
])
def test_e2e_may_run_unless_the_expression_excludes_every_e2e_test(markexpr: str, may_run: bool) -> None:
    assert e2e_may_run(markexpr) is may_run
