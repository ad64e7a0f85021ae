"""rstash.names: the one name checker (rstash(7) NAMES)."""

from __future__ import annotations

import ast
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rstash.names as names_module
from rstash.names import (
    BLANKS,
    DEFAULT_IGNORABLE,
    MAX_NAME_BYTES,
    PATH_LOOKALIKES,
    check_name,
    is_box_name,
    name_problem,
    pattern_problem,
    rename_candidate,
)

PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", [
    "db.tar.zst", "README", "a", "a.", "a..b", "x~1.tar", "Backup 2026-01-01.sql.gz",
    "a b", "name-with-dash", "under_score", "trailing-dot.", "_leading_underscore",
    "~tilde", "café.txt", "日本語.txt", "emoji-\U0001F4BE.bin", "a" * 255, "é" * 127 + "a",
    "100%.txt", "#hash", "a:b", "a\\b",
])
def test_acceptable_names(name: str) -> None:
    assert name_problem(name) is None
    assert name_problem(name.encode("utf-8")) is None
    assert check_name(name) is None


# --- each rule, with what breaks it -------------------------------------------------


def test_nfc_names_are_accepted_and_nfd_names_refused_never_normalised() -> None:
    nfc = unicodedata.normalize("NFC", "café.txt")
    nfd = unicodedata.normalize("NFD", "café.txt")
    assert nfc != nfd
    assert name_problem(nfc) is None
    assert name_problem(nfd) == "not in Unicode NFC"
    assert name_problem(nfd.encode("utf-8")) == "not in Unicode NFC"
    # Hangul, and a singleton that NFC maps elsewhere (U+212B ANGSTROM SIGN -> U+00C5)
    assert name_problem(unicodedata.normalize("NFD", "한국어")) == "not in Unicode NFC"
    assert name_problem("\u212b") == "not in Unicode NFC"
    assert name_problem("\u00c5") is None


@pytest.mark.parametrize(("char", "category"), [
    ("\u202e", "Cf"),  # RIGHT-TO-LEFT OVERRIDE: "gpj.exe" shown as "exe.jpg"
    ("\u200b", "Cf"),  # ZERO WIDTH SPACE
    ("\u200d", "Cf"),  # ZERO WIDTH JOINER
    ("\ufeff", "Cf"),  # BYTE ORDER MARK
    ("\u00ad", "Cf"),  # SOFT HYPHEN
    ("\u2028", "Zl"),  # LINE SEPARATOR
    ("\u2029", "Zp"),  # PARAGRAPH SEPARATOR
    ("\ue000", "Co"),  # private use
    ("\U000f0000", "Co"),  # supplementary private use
    ("\x00", "Cc"),
    ("\x01", "Cc"),
    ("\t", "Cc"),
    ("\n", "Cc"),
    ("\r", "Cc"),
    ("\x1b", "Cc"),
    ("\x7f", "Cc"),
    ("\x85", "Cc"),
    ("\x9b", "Cc"),
])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_names_with_forbidden_code_points_are_refused(char: str, category: str,
                                                       where: str) -> None:
    assert unicodedata.category(char) == category
    name = {"start": char + "a.txt", "middle": "a" + char + ".txt", "end": "a.txt" + char}[where]
    problem = name_problem(name)
    assert problem is not None
    assert f"U+{ord(char):04X}" in problem and category in problem


@pytest.mark.parametrize("name", [".hidden", ".", "..", "...", ".rstash-tmp-0.14", "-rf",
                                  "--help", "-"])
def test_names_starting_with_dot_or_dash_are_refused(name: str) -> None:
    assert name_problem(name) is not None


def test_dot_and_dotdot_are_refused_as_such() -> None:
    assert name_problem(".") == "is . or .."
    assert name_problem("..") == "is . or .."
    assert name_problem(b"..") == "is . or .."


def test_a_dot_or_dash_inside_a_name_is_fine() -> None:
    assert name_problem("a.b") is None
    assert name_problem("a-b") is None
    assert name_problem("a.") is None
    assert name_problem("a-") is None


@pytest.mark.parametrize("name", [" a", "a ", " ", "  a  ", "\u00a0a", "a\u00a0", "a\u3000",
                                  "\u2003a", "a\u2009"])
def test_names_with_leading_or_trailing_whitespace_are_refused(name: str) -> None:
    assert name_problem(name) == "begins or ends with white space"


def test_whitespace_inside_a_name_is_fine() -> None:
    assert name_problem("a b") is None
    assert name_problem("a\u00a0b") is None
    assert name_problem("a\u3000b") is None


def test_255_bytes_are_accepted_and_256_refused() -> None:
    assert MAX_NAME_BYTES == 255
    assert name_problem("a" * 255) is None
    assert name_problem("a" * 256) == "longer than 255 bytes"
    # counted in UTF-8 bytes, not code points
    assert name_problem("é" * 127 + "a") is None  # 255 bytes
    assert name_problem("é" * 128) == "longer than 255 bytes"  # 256 bytes, 128 characters
    assert name_problem("\U0001F4BE" * 63 + "abc") is None  # 255 bytes
    assert name_problem("\U0001F4BE" * 64) == "longer than 255 bytes"
    assert name_problem(b"a" * 256) == "longer than 255 bytes"


@pytest.mark.parametrize("name", ["a/b", "/etc/passwd", "../etc/passwd", "a/", "/", "a//b"])
def test_names_with_a_slash_are_refused(name: str) -> None:
    assert name_problem(name) is not None
    if not name.startswith("."):
        assert name_problem(name) == "contains '/'"


# --- invisible and look-alike code points (rstash(7) NAMES) --------------------------


@pytest.mark.parametrize("name", ["\u3164", "\u2800", "a\ufffe", "\u0301a",
                                  "\u2024\u2024\u2215x"],
                         ids=["hangul-filler", "braille-blank", "noncharacter",
                              "leading-combining", "dot-leaders-division-slash"])
def test_invisible_and_look_alike_names_are_refused(name: str) -> None:
    assert name_problem(name) is not None
    assert name_problem(name.encode("utf-8")) is not None
    assert check_name(name, ["*"]) is not None


NONCHARACTERS = [*range(0xFDD0, 0xFDF0),
                 *(plane << 16 | low for plane in range(17) for low in (0xFFFE, 0xFFFF))]


@pytest.mark.parametrize("cp", NONCHARACTERS, ids=[f"U+{cp:04X}" for cp in NONCHARACTERS])
def test_noncharacters_are_refused(cp: int) -> None:
    assert name_problem(f"a{chr(cp)}b") == f"contains U+{cp:04X} (noncharacter)"


def test_the_neighbours_of_noncharacters_are_accepted() -> None:
    assert len(NONCHARACTERS) == 66
    for cp in (0xFDCF, 0xFDF0, 0xFFFD, 0x1FFFD, 0x20000):
        assert name_problem(f"a{chr(cp)}b") is None, f"U+{cp:04X}"


IGNORABLE_ENDS = sorted({cp for lo, hi in DEFAULT_IGNORABLE for cp in (lo, hi)})


@pytest.mark.parametrize("cp", IGNORABLE_ENDS, ids=[f"U+{cp:04X}" for cp in IGNORABLE_ENDS])
def test_default_ignorable_code_points_are_refused(cp: int) -> None:
    problem = name_problem(f"a{chr(cp)}b")
    assert problem is not None and f"U+{cp:04X}" in problem


@pytest.mark.parametrize("cp", [0x034F, 0x115F, 0x3164, 0xFE0F, 0xFFA0, 0xE0100,
                                0x17B4, 0x2065, 0xFFF0, 0xE0000])
def test_ignorable_code_points_of_any_category_are_refused_as_invisible(cp: int) -> None:
    # Letters (Lo), marks (Mn) and reserved code points (Cn) that render as nothing.
    assert name_problem(f"a{chr(cp)}b") == f"contains U+{cp:04X} (invisible)"


def test_the_neighbours_of_ignorable_ranges_are_accepted() -> None:
    for cp in (0x00AC, 0x00AE, 0x034E, 0x0350, 0x061B, 0x061D, 0x115E, 0x1161, 0x17B3,
               0x17B6, 0x180A, 0x1810, 0x2010, 0x205F, 0x2070, 0x3163, 0x3165, 0xFDFF,
               0xFE10, 0xFF9F, 0xFFA1, 0x1BC9F, 0x1D172, 0x1D17B, 0xE1000):
        assert name_problem(f"a{chr(cp)}b") is None, f"U+{cp:04X}"


def test_the_ignorable_table_is_the_unicode_14_list() -> None:
    assert DEFAULT_IGNORABLE == tuple(sorted(DEFAULT_IGNORABLE))
    assert sum(hi - lo + 1 for lo, hi in DEFAULT_IGNORABLE) == 4174


def test_a_braille_blank_is_refused_as_invisible() -> None:
    assert BLANKS == frozenset({"\u2800"})
    assert name_problem("a\u2800b") == "contains U+2800 (invisible)"
    assert name_problem("a\u2801b") is None  # a visible braille pattern


@pytest.mark.parametrize("mark", ["\u0301", "\u0903", "\u20dd", "\U0001d165"],
                         ids=["Mn", "Mc", "Me", "Mc-musical"])
def test_a_leading_combining_mark_is_refused(mark: str) -> None:
    assert unicodedata.category(mark).startswith("M")
    assert name_problem(mark + "x") == f"begins with combining mark U+{ord(mark):04X}"
    assert name_problem("x" + mark) is None  # it combines with the x before it


@pytest.mark.parametrize("char", sorted(c for c, v in PATH_LOOKALIKES.items() if v == "/"))
def test_slash_look_alikes_are_refused(char: str) -> None:
    assert name_problem(f"a{char}b") == f"contains U+{ord(char):04X} (looks like '/')"


@pytest.mark.parametrize("char", sorted(c for c, v in PATH_LOOKALIKES.items() if v == "\\"))
def test_backslash_look_alikes_are_refused(char: str) -> None:
    assert name_problem(f"a{char}b") == f"contains U+{ord(char):04X} (looks like '\\\\')"


@pytest.mark.parametrize("char", sorted(c for c, v in PATH_LOOKALIKES.items() if v == "."))
def test_dot_look_alikes_are_refused(char: str) -> None:
    assert name_problem(f"a{char}b") == f"contains U+{ord(char):04X} (looks like '.')"


def test_the_look_alike_list_is_the_documented_one() -> None:
    documented = {
        "/": {0x1735, 0x2041, 0x2044, 0x2215, 0x2571, 0x27CB, 0x29F8, 0x2F03, 0x31D3, 0xFF0F,
              0x1D23A},
        "\\": {0x2216, 0x27CD, 0x29F5, 0x29F9, 0x2F02, 0x31D4, 0xFE68, 0xFF3C, 0x1D20F,
               0x1D23B},
        ".": {0x0701, 0x0702, 0x2024, 0x2025, 0x2026, 0xA60E, 0xFE19, 0xFE30, 0xFE52, 0xFF0E,
              0x10A50, 0x1D16D},
    }
    assert {v: {ord(c) for c, w in PATH_LOOKALIKES.items() if w == v} for v in documented} \
        == documented
    assert set(PATH_LOOKALIKES.values()) == set(documented)


def test_every_compatibility_form_of_a_path_character_is_refused() -> None:
    forms = [chr(cp) for cp in range(sys.maxunicode + 1)
             if not 0xD800 <= cp <= 0xDFFF
             and unicodedata.normalize("NFKC", chr(cp)) in ("/", "\\", ".", "..", "...")
             and chr(cp) not in "/\\."]
    assert len(forms) >= 10
    assert [c for c in forms if name_problem(f"a{c}b") is None] == []


@pytest.mark.parametrize("name", ["\u30ce\u30fc\u30c8.txt", "\u4e3f", "\u4e36", "\u0660\u0661.txt",
                                  "\u06f0.txt", "\u2cc6", "a\u3033", "\ua4f8a", "a\\b", "a.b"],
                         ids=["katakana-no", "cjk-slash", "cjk-dot", "arabic-indic-zero",
                              "extended-arabic-indic-zero", "coptic-esh", "kana-repeat",
                              "lisu-tone", "ascii-backslash", "ascii-dot"])
def test_letters_and_digits_that_resemble_path_characters_are_kept(name: str) -> None:
    # Ordinary words in these scripts use them; refusing them would refuse real names.
    assert name_problem(name) is None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.update(f"{base}:{alias.name}" for alias in node.names)
    return found


def test_client_and_server_judge_names_with_the_one_checker() -> None:
    package = Path(names_module.__file__ or "").parent
    modules = {p.relative_to(package).as_posix(): _imports(p) for p in package.rglob("*.py")}
    # Only names.py looks at Unicode properties; everyone else asks it.
    assert [m for m, imp in modules.items() if "unicodedata" in imp] == ["names.py"]
    users = {m for m, imp in modules.items()
             if any(i.endswith(("names:name_problem", "names:check_name")) for i in imp)}
    assert any(m == "session.py" or m.startswith("server/") for m in users), users
    assert any(m == "send.py" or m.startswith("client/") for m in users), users


@pytest.mark.parametrize("raw", [
    b"\xff", b"a\xfeb", b"\xc3", b"a\xc3", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80", b"\x80abc", b"caf\xe9.txt",
], ids=["ff", "fe", "truncated", "truncated-end", "overlong-slash", "overlong-3",
        "surrogate", "beyond-10ffff", "continuation", "latin1"])
def test_invalid_utf8_bytes_are_refused(raw: bytes) -> None:
    assert name_problem(raw) == "not valid UTF-8"


def test_a_lone_surrogate_in_a_str_is_refused() -> None:
    assert name_problem("a\udc80b") == "not valid UTF-8"


def test_the_empty_name_is_refused() -> None:
    assert name_problem("") == "empty"
    assert name_problem(b"") == "empty"


def test_the_first_rule_broken_is_named() -> None:
    assert name_problem(b"/" * 300) == "longer than 255 bytes"
    assert name_problem("\u202e/") == "contains '/'"
    assert "U+202E" in (name_problem(".\u202e") or "")


# --- allow_names and deny_names -----------------------------------------------------


def test_no_patterns_allow_any_valid_name() -> None:
    assert pattern_problem("anything.bin", [], []) is None
    assert check_name("anything.bin") is None


def test_allow_names_admits_only_matching_names() -> None:
    allow = ["*.tar.zst", "db-*.sql.gz"]
    assert check_name("vm1.tar.zst", allow) is None
    assert check_name("db-2026.sql.gz", allow) is None
    assert check_name("notes.txt", allow) == "matches no allow_names pattern"
    assert check_name("db.sql.gz", allow) == "matches no allow_names pattern"


def test_deny_names_refuses_matching_names() -> None:
    assert check_name("x.tmp", (), ["*.tmp"]) == "matches deny_names '*.tmp'"
    assert check_name("x.tar", (), ["*.tmp"]) is None


def test_deny_wins_over_allow() -> None:
    assert check_name("a.tmp", ["*"], ["*.tmp"]) == "matches deny_names '*.tmp'"
    assert check_name("db-x.tar.zst", ["*.tar.zst"], ["db-*"]) == "matches deny_names 'db-*'"
    assert check_name("vm-x.tar.zst", ["*.tar.zst"], ["db-*"]) is None


def test_patterns_are_case_sensitive() -> None:
    assert check_name("X.TAR.ZST", ["*.tar.zst"]) == "matches no allow_names pattern"
    assert check_name("x.TMP", (), ["*.tmp"]) is None
    assert check_name("x.tmp", (), ["*.TMP"]) is None


def test_patterns_use_fnmatch_classes_and_wildcards() -> None:
    assert check_name("db-1.sql", ["db-[0-9].sql"]) is None
    assert check_name("db-a.sql", ["db-[0-9].sql"]) is not None
    assert check_name("db-1.sql", ["db-?.sql"]) is None
    assert check_name("db-12.sql", ["db-?.sql"]) is not None


def test_patterns_never_admit_an_invalid_name() -> None:
    assert check_name("../x", ["*"]) is not None
    assert check_name(".hidden", ["*", ".*"]) is not None
    assert check_name(b"\xff", ["*"]) == "not valid UTF-8"


def test_check_name_accepts_bytes_with_patterns() -> None:
    assert check_name("café.tar.zst".encode(), ["*.tar.zst"]) is None
    assert check_name("café.txt".encode(), ["*.tar.zst"]) is not None


# --- rename candidates and box names -----------------------------------------------


@pytest.mark.parametrize(("name", "n", "expected"), [
    ("db.tar.zst", 1, "db~1.tar.zst"),
    ("db.tar.zst", 2, "db~2.tar.zst"),
    ("db.tar.zst", 999, "db~999.tar.zst"),
    ("README", 1, "README~1"),
    ("README", 12, "README~12"),
    ("a.", 1, "a~1."),
    ("x.y", 3, "x~3.y"),
    ("café.txt", 1, "café~1.txt"),
])
def test_rename_candidate_puts_the_suffix_before_the_first_dot(name: str, n: int,
                                                              expected: str) -> None:
    assert rename_candidate(name, n) == expected


def test_rename_candidates_of_valid_names_are_distinct() -> None:
    cands = {rename_candidate("db.tar.zst", n) for n in range(1, 1000)}
    assert len(cands) == 999
    assert "db.tar.zst" not in cands


@pytest.mark.parametrize("name", ["vm1", "a", "A", "0", "vm1.example", "a-b_c.d", "a" * 64,
                                  "1" + "." * 63])
def test_valid_box_names(name: str) -> None:
    assert is_box_name(name)


@pytest.mark.parametrize("name", ["", "a" * 65, ".a", "-a", "_a", "a/b", "a b", "vm1\n", "vm1\r",
                                  "é", "vm1\u0660", "a:b", "a@b", "a*", "..", "\u0661"])
def test_invalid_box_names(name: str) -> None:
    assert not is_box_name(name)


# --- properties --------------------------------------------------------------------


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
@PROPERTY
def test_an_accepted_name_is_one_safe_path_component(raw: str | bytes) -> None:
    if name_problem(raw) is not None:
        return
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    assert b"/" not in data
    assert b"\x00" not in data
    assert 1 <= len(data) <= MAX_NAME_BYTES
    name = data.decode("utf-8", errors="strict")
    assert name.encode("utf-8") == data
    assert name not in (".", "..")
    assert name == unicodedata.normalize("NFC", name)
    assert name == name.strip()
    assert not name.startswith((".", "-"))
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Co") for c in name)
    assert name_problem(data) is None


@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=60))
@PROPERTY
def test_str_and_bytes_get_the_same_verdict(name: str) -> None:
    assert name_problem(name) == name_problem(name.encode("utf-8"))
