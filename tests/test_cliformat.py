"""rstash.cliformat: the help width from COLUMNS or the terminal, and no costly imports."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from rstash.cliformat import HelpFormatter

WORDS = " ".join(f"word{i}" for i in range(80))


def _help_lines(monkeypatch: pytest.MonkeyPatch, columns: str) -> list[str]:
    monkeypatch.setenv("COLUMNS", columns)
    parser = argparse.ArgumentParser(prog="rstash-send", formatter_class=HelpFormatter, description=WORDS)
    parser.add_argument("--dest", help=WORDS)
    return parser.format_help().splitlines()


@pytest.mark.parametrize(("columns", "width"), [("100", 98), ("60", 58), ("10", 40)])
def test_help_is_wrapped_two_columns_short_of_columns_never_under_40(
        monkeypatch: pytest.MonkeyPatch, columns: str, width: int) -> None:
    lines = _help_lines(monkeypatch, columns)
    assert max(len(line) for line in lines) <= width
    assert max(len(line) for line in lines) > width - 12  # it fills the width, not a narrower one


def test_unusable_columns_and_no_terminal_mean_80(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under pytest stdout is captured, so there is no terminal to ask either.
    lines = _help_lines(monkeypatch, "wide")
    assert 66 < max(len(line) for line in lines) <= 78


def test_importing_it_pulls_in_neither_shutil_nor_compression() -> None:
    code = ("import sys, rstash.cliformat; "
            "print(sorted(m for m in ('shutil', 'bz2', 'lzma') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, env={"PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip() == "[]"
