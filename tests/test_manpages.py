"""The man pages render cleanly, and rstash(7) carries the test vectors.

rstash(7) is the protocol specification; tests/vectors/vectors.json is made
from it by an independent script.  These tests keep the page, the JSON and the
script from drifting apart.  They never import the rstash package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAN_DIR = ROOT / "man"
VECTORS_DIR = ROOT / "tests" / "vectors"
SPEC = MAN_DIR / "rstash.7"
PAGES = sorted(MAN_DIR.glob("*.[1-8]"))
HEX = re.compile(r"^(?:[0-9a-f]{2})+$")


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def _vectors() -> Any:
    return json.loads((VECTORS_DIR / "vectors.json").read_text(encoding="ascii"))


def _hex_blobs(source: str) -> list[str]:
    """Every hex run in the page; consecutive all-hex lines are joined,
    because the page wraps long values inside .nf blocks."""
    blobs: list[str] = []
    run: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped and re.fullmatch(r"[0-9a-f]+", stripped):
            run.append(stripped)
            continue
        if run:
            blobs.append("".join(run))
            run = []
        blobs.extend(re.findall(r"[0-9a-f]{2,}", line))
    if run:
        blobs.append("".join(run))
    return blobs


def _plain(source: str) -> str:
    """The page's text with the roff escapes it uses undone."""
    text = re.sub(r"\\f[BIRP]", "", source)
    for escape, char in (("\\-", "-"), ("\\e", "\\"), ("\\&", ""), ("\\ ", " ")):
        text = text.replace(escape, char)
    return text


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s():,=]+", text) if w]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_man_page_renders_without_warnings(page: Path) -> None:
    if shutil.which("man") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("man is not installed (apt-get install man-db groff-base)")
        pytest.skip("man is not installed")
    result = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": ""},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_spec_page_exists() -> None:
    assert SPEC in PAGES


def test_every_hex_vector_appears_in_the_spec() -> None:
    blobs = _hex_blobs(SPEC.read_text(encoding="utf-8"))
    missing = [
        path
        for path, value in _strings(_vectors())
        if HEX.fullmatch(value) and not any(value in blob for blob in blobs)
    ]
    assert missing == []


def test_every_vector_line_appears_in_the_spec() -> None:
    # Lines are shown wrapped at spaces, so compare word by word.
    words = set(_words(_plain(SPEC.read_text(encoding="utf-8"))))
    missing = [
        (path, word)
        for path, value in _strings(_vectors())
        if not HEX.fullmatch(value)
        and not path.startswith("inputs.")
        and path != "percent_encoding.input"
        for word in _words(value)
        if word not in words
    ]
    assert missing == []


def test_vector_script_reproduces_vectors_json(tmp_path: Path) -> None:
    script = tmp_path / "make_vectors.py"
    shutil.copy(VECTORS_DIR / "make_vectors.py", script)
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
    fresh = (tmp_path / "vectors.json").read_text(encoding="ascii")
    assert fresh == (VECTORS_DIR / "vectors.json").read_text(encoding="ascii")


def test_vector_script_uses_only_the_standard_library() -> None:
    source = (VECTORS_DIR / "make_vectors.py").read_text(encoding="utf-8")
    imported = set(re.findall(r"^(?:import|from)\s+(\w+)", source, re.MULTILINE))
    # sys for --check; typing and __future__ only for annotations.
    allowed = {"base64", "hashlib", "hmac", "json", "struct", "sys", "typing", "__future__"}
    assert imported <= allowed


def test_every_further_and_negative_vector_is_checked_against_the_implementation() -> None:
    # tests/test_vectors.py feeds each of these to rstash; a case added to the
    # script without a check there would document behaviour nobody verifies.
    checks = (ROOT / "tests" / "test_vectors.py").read_text(encoding="utf-8")
    vectors = _vectors()
    cases = [*vectors["more"], *vectors["negative"]]
    assert len(cases) >= 9
    missing = [case for case in cases if f'"{case}"' not in checks]
    assert missing == []
