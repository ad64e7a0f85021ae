"""A TOML file read for rstash-recv.toml(5), and its problems as one-line messages.

This module owns reading one TOML file (UTF-8 checked, tomllib's errors
rewritten) and the one format of every configuration problem,
``FILE: field.path: message`` on one line, with field paths quoted the way
TOML would need them. It must never validate a setting (rstash.settings
and rstash.config do) and never import pydantic.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

__all__ = ["field_path", "problem_line", "read_toml"]

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(part: str | int) -> str:
    """One component of a field path, quoted the way TOML would need it."""
    if isinstance(part, int):
        return f"[{part}]"
    if _BARE_KEY_RE.match(part):
        return part
    escaped = "".join(
        "\\" + c if c in '"\\' else c if c.isprintable() else f"\\u{ord(c):04X}" for c in part
    )
    return f'"{escaped}"'


def field_path(*parts: str | int) -> str:
    out = ""
    for p in parts:
        k = _key(p)
        out += k if k.startswith("[") or not out else "." + k
    return out


def problem_line(file: str, where: str, message: str) -> str:
    """One problem: ``FILE: field.path: message``, folded onto one line."""
    message = " ".join(message.split())
    return f"{file}: {where}: {message}" if where else f"{file}: {message}"


def read_toml(file: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        with open(file, "rb") as fp:
            raw = fp.read()
    except OSError as e:
        problems.append(problem_line(file, "", f"cannot read: {e.strerror or e}"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        problems.append(problem_line(file, f"line {line}", "not valid UTF-8"))
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problems.append(_toml_error(file, str(e), text))
        return None


_UNQUOTED_MODE_RE = re.compile(r"\s*(file_mode)\s*=\s*([0-9]+)\s*(?:#.*)?\Z")
_TOML_POS_RE = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)\Z", re.S)


def _toml_error(file: str, message: str, text: str) -> str:
    """tomllib's "Msg (at line N, column C)" as ``FILE: line N: msg (column C)``."""
    m = _TOML_POS_RE.match(message)
    if m is None:
        return problem_line(file, "", f"invalid TOML: {message}")
    msg, line, col = m.groups()
    msg = msg[:1].lower() + msg[1:]
    if line is not None:
        unquoted = _UNQUOTED_MODE_RE.match(text.splitlines()[int(line) - 1])
        if unquoted is not None:
            # TOML has no leading-zero integers: say what to write, not what the parser saw.
            key, digits = unquoted.groups()
            return problem_line(file, f"line {line}", f"{key} must be a quoted octal string, "
                                                      f"e.g. {key} = \"{digits}\"")
    if line is None:
        last = max(1, len(text.splitlines()))
        return problem_line(file, f"line {last}", f"{msg} (at end of file)")
    return problem_line(file, f"line {line}", f"{msg} (column {col})")
