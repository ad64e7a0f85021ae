"""Sizes and durations (rstash/units.py): the one parser of each, rstash-recv.toml(5) VALUES."""

from __future__ import annotations

import pytest

from rstash.units import MAX_SIZE, human_size, parse_duration, parse_size


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), (5, 5), ("1KiB", 1024), ("1KB", 1000), ("1.5GiB", 3 * 2**29),
    ("50GiB", 50 * 2**30), ("2TB", 2 * 10**12), ("7B", 7),
])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["1K", "1kib", "1.5", "-1", "", True, 1.0, MAX_SIZE + 1])
def test_bad_sizes_are_one_line_errors(bad: object) -> None:
    with pytest.raises(ValueError) as ei:
        parse_size(bad)  # type: ignore[arg-type]
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize(("text", "seconds"), [
    (90, 90.0), ("90s", 90.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("0.5s", 0.5),
])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "-1", "nan", True, [], "1w"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


def test_human_size() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 3 * 2**29, 2**40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 GiB", "1.0 TiB"]
