"""Key files on disk (rstash/keys.py): reading with its checks, --gen-key writing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rstash.errors import KeyFileError
from rstash.keys import load_key_file, write_key_file


def test_a_written_key_is_0600_and_reads_back(tmp_path: Path) -> None:
    target = tmp_path / "k"
    text, desc = write_key_file(str(target), "vm1")
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert target.read_bytes() == text
    assert load_key_file(target).describe() == desc


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "k"
    target.write_text("keep")
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(str(target))
    assert target.read_text() == "keep"


def test_a_symlinked_key_is_refused(tmp_path: Path) -> None:
    write_key_file(str(tmp_path / "real"))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(KeyFileError, match="symlink"):
        load_key_file(tmp_path / "link")
