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

#: Default_Ignorable_Code_Point (Unicode 14.0 DerivedCoreProperties.txt), as
#: inclusive ranges: these render as nothing, so two names that differ only by
#: them look identical. unicodedata does not expose the property; the reserved
#: ranges are listed too because Unicode keeps them ignorable when assigned.
DEFAULT_IGNORABLE: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
#: Visible-as-blank characters that are neither white space nor ignorable.
BLANKS = frozenset({"\u2800"})  # BRAILLE PATTERN BLANK
#: Characters a reader takes for "/", "\\" or "." (so "\u2024\u2024\u2215x" reads
#: "../x"): the Unicode 14.0 confusables.txt classes of those three characters
#: and every character whose NFKC form is "/", "\\", ".", ".." or "...", minus
#: letters and digits (KATAKANA LETTER NO, ARABIC-INDIC DIGIT ZERO, …), which
#: ordinary names in their scripts need. rstash(7) NAMES lists them.
PATH_LOOKALIKES: dict[str, str] = {
    **dict.fromkeys("\u1735\u2041\u2044\u2215\u2571\u27cb\u29f8\u2f03\u31d3\uff0f"
                    "\U0001d23a", "/"),
    **dict.fromkeys("\u2216\u27cd\u29f5\u29f9\u2f02\u31d4\ufe68\uff3c"
                    "\U0001d20f\U0001d23b", "\\"),
    **dict.fromkeys("\u0701\u0702\u2024\u2025\u2026\ua60e\ufe19\ufe30\ufe52\uff0e"
                    "\U00010a50\U0001d16d", "."),
}


def is_noncharacter(cp: int) -> bool:
    """U+FDD0..U+FDEF and the last two code points of every plane (U+FFFE, U+1FFFF, …)."""
    return 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE


def is_default_ignorable(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in DEFAULT_IGNORABLE)


def _char_problem(ch: str) -> str | None:
    cp = ord(ch)
    category = unicodedata.category(ch)
    if category in _FORBIDDEN_CATEGORIES:
        return f"contains U+{cp:04X} ({category})"
    if is_noncharacter(cp):
        return f"contains U+{cp:04X} (noncharacter)"
    if is_default_ignorable(cp) or ch in BLANKS:
        return f"contains U+{cp:04X} (invisible)"
    if ch in PATH_LOOKALIKES:
        return f"contains U+{cp:04X} (looks like {PATH_LOOKALIKES[ch]!r})"
    return None


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
        problem = _char_problem(ch)
        if problem is not None:
            return problem
    if name[0] in ".-":
        return f"begins with {name[0]!r}"
    if unicodedata.category(name[0]).startswith("M"):
        # It would combine with whatever a listing prints before the name.
        return f"begins with combining mark U+{ord(name[0]):04X}"
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
