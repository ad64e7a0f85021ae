"""The one file-name checker, shared by rstash-recv and rstash-send.

A name is a single path component the box will hold. The rules are in
rstash(7) NAMES; this module owns them and nothing else. It never touches the
file system.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from fnmatch import fnmatchcase

MAX_NAME_BYTES = 255
#: Unicode categories refused anywhere in a name: controls, format characters
#: (bidi overrides, zero-width joiners), line and paragraph separators, private use.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co"})
BOX_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def name_problem(raw: bytes | str) -> str | None:
    """Why ``raw`` is not an acceptable file name, or None when it is.

    The checks run in a fixed order so that a refusal always names the first
    rule broken.
    """
    if isinstance(raw, str):
        try:
            data = raw.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid UTF-8"
    else:
        data = raw
    if not data:
        return "empty"
    if len(data) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    try:
        name = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    if "/" in name:
        return "contains '/'"
    if name in (".", ".."):
        return "is . or .."
    for ch in name:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            return f"contains U+{ord(ch):04X} ({unicodedata.category(ch)})"
    if name[0] in ".-":
        return f"begins with {name[0]!r}"
    if name != name.strip():
        return "begins or ends with white space"
    if unicodedata.normalize("NFC", name) != name:
        return "not in Unicode NFC"
    return None


def pattern_problem(name: str, allow: Sequence[str], deny: Sequence[str]) -> str | None:
    """Why a valid ``name`` is refused by a box's patterns (deny wins), or None."""
    for pat in deny:
        if fnmatchcase(name, pat):
            return f"matches deny_names {pat!r}"
    if allow and not any(fnmatchcase(name, pat) for pat in allow):
        return "matches no allow_names pattern"
    return None


def check_name(raw: bytes | str, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> str | None:
    """Every name rule and then the box's patterns; None when the name is accepted."""
    problem = name_problem(raw)
    if problem is not None:
        return problem
    name = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return pattern_problem(name, allow, deny)


def is_box_name(name: str) -> bool:
    """True when ``name`` is a valid box name: [A-Za-z0-9][A-Za-z0-9._-]{0,63}."""
    return BOX_NAME_RE.match(name) is not None


def rename_candidate(name: str, n: int) -> str:
    """The n-th alternative of ``name`` under overwrite = "rename".

    The suffix goes before the extension, which starts at the first dot:
    ``db.tar.zst`` → ``db~1.tar.zst``; ``README`` → ``README~1``.
    """
    stem, dot, ext = name.partition(".")
    return f"{stem}~{n}{dot}{ext}"
