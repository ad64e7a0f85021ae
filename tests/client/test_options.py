"""rstash-send's options (rstash/client/options.py): built once from the command line, frozen."""

from __future__ import annotations

import dataclasses

import pytest

from rstash import send
from rstash.client.options import Options
from rstash.errors import UsageError


def options(*argv: str, command: list[str] | None = None) -> Options:
    return Options.from_namespace(send._parser().parse_args(list(argv)), command)


def test_defaults_are_the_documented_ones() -> None:
    opts = options("rstash://h/vm1", "a")
    assert opts == Options(dest="rstash://h/vm1", files=("a",))
    assert (opts.connect_timeout, opts.timeout, opts.busy_wait) == (30.0, 120.0, 120.0)
    assert opts.remote_path == "rstash-recv" and opts.progress is None and opts.bwlimit is None


def test_options_are_frozen() -> None:
    opts = options("rstash://h/vm1", "a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.quiet = True  # type: ignore[misc]


def test_the_command_after_the_separator_follows_the_operands() -> None:
    opts = options("--from-command", "--name", "d", "rstash://h/vm1", command=["sh", "-c", "x --y"])
    assert opts.files == ("sh", "-c", "x --y") and opts.from_command and opts.name == "d"


@pytest.mark.parametrize(("text", "want"), [("20MiB", 20 * 1024 * 1024), ("1000", 1000), ("2KB", 2000)])
def test_bwlimit_is_parsed_once(text: str, want: int) -> None:
    assert options("--bwlimit", text, "rstash://h/vm1", "a").bwlimit == want


@pytest.mark.parametrize("text", ["fast", "-1", "1 furlong"])
def test_a_bad_bwlimit_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--bwlimit"):
        options(f"--bwlimit={text}", "rstash://h/vm1", "a")


def test_progress_is_three_valued() -> None:
    assert options("--progress", "v", "a").progress is True
    assert options("--no-progress", "v", "a").progress is False
    assert options("v", "a").progress is None
