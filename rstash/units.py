"""Sizes and durations: the one parser of each, and the one size formatter.

Free of pydantic and every other heavy import, so that rstash-send (--bwlimit)
and the admin commands can use them without paying for the config models.
"""

from __future__ import annotations

import re

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
_SIZE_RE = re.compile(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([A-Za-z]*)\s*\Z")
#: Sizes travel as u64 on the wire but land in off_t on disk: stay below 2**63.
MAX_SIZE = (1 << 63) - 1

_DURATION_UNITS: dict[str, int] = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*\Z")


def _match(pattern: re.Pattern[str], units: dict[str, int], value: str, problem: str) -> re.Match[str]:
    """``value`` matched by ``pattern`` with a known unit in its last group, else ValueError(problem)."""
    m = pattern.match(value)
    if m is None or m.group(pattern.groups) not in units:
        raise ValueError(problem)
    return m


def parse_size(value: str | int) -> int:
    """Bytes in ``value``: an integer, or a number with a unit.

    Units: B, KiB/MiB/GiB/TiB (powers of 1024), KB/MB/GB/TB (powers of 1000),
    spelled exactly so; a bare integer is bytes. A fraction is allowed with a
    unit (``1.5GiB``) and rounds down to whole bytes. Raises ValueError with a
    message fit for a user.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f"a size must be an integer or a string like \"50GiB\", not {type(value).__name__}"
        )
    if isinstance(value, int):
        number = value
    else:
        whole, frac, unit = _match(_SIZE_RE, _SIZE_UNITS, value, (
            f"{value!r} is not a size: write bytes or a number with "
            "B, KiB, MiB, GiB, TiB, KB, MB, GB or TB (e.g. \"50GiB\")")).groups()
        if frac and not unit:
            raise ValueError(f"{value!r} is not a size: a bare number of bytes must be whole")
        scale = 10 ** len(frac or "")
        number = int(whole + (frac or "")) * _SIZE_UNITS[unit] // scale
    if number < 0:
        raise ValueError(f"a size cannot be negative ({value!r})")
    if number > MAX_SIZE:
        raise ValueError(f"{value!r} is too large (at most {MAX_SIZE} bytes)")
    return number


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a number of seconds, or a number with s, m, h or d.

    Raises ValueError with a message fit for a user.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(
            f"a duration must be a number of seconds or a string like \"90s\", \"5m\", "
            f"not {type(value).__name__}"
        )
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        number, unit = _match(_DURATION_RE, _DURATION_UNITS, value, (
            f"{value!r} is not a duration: write seconds or a number with s, m, h or d "
            "(e.g. \"90s\", \"5m\")")).groups()
        seconds = float(number) * _DURATION_UNITS[unit]
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"{value!r} is not a duration")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative ({value!r})")
    return seconds


def human_size(n: int) -> str:
    """``1.0 MiB``: binary units with one decimal, whole bytes below 1 KiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_age(seconds: float) -> str:
    """``5 min``: an age in the largest unit that keeps it at two or more (s, min, h, d)."""
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"
