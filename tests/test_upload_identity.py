"""The name in a 250 is always the verified inode (rstash/upload.py, rstash/store.py).

A member of a group-writable box may swap the temp between verification and
link(); the verified descriptor is what gets linked (O_TMPFILE), or, where the
file system lacks O_TMPFILE, the linked name's device and inode are checked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rstash import store as store_mod
from rstash.errors import Outcome, Reply
from rstash.store import UNKNOWN_RESERVE, BoxStore, Refused, scan_usage

MiB = 2**20


@pytest.fixture
def box(tmp_path: Path) -> Path:
    path = tmp_path / "box"
    path.mkdir(mode=0o770)
    return path


@pytest.fixture
def no_tmpfile(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel without O_TMPFILE sees only its O_DIRECTORY part: open(".", O_RDWR|O_DIRECTORY)
    # of the box fails with EISDIR, and the store falls back to the named temp.
    monkeypatch.setattr(store_mod, "_TMPFILE_FLAGS", os.O_DIRECTORY | os.O_RDWR | os.O_CLOEXEC)


def swap_temp(box: Path, temp_name: str) -> None:
    """What a group member does: her own file renamed over the live temp."""
    evil = box / "evil"
    evil.write_bytes(b"EVIL")
    os.rename(evil, box / temp_name)


@pytest.mark.parametrize("policy", ["refuse", "rename", "replace"])
def test_a_temp_swapped_before_commit_is_not_what_gets_stored(box: Path, policy: str) -> None:
    with BoxStore(box, overwrite=policy) as s:
        up = s.begin("a", 4)
        assert up.unnamed  # this file system has O_TMPFILE
        up.write(b"good")
        swap_temp(box, up.temp_name)
        final = up.commit()
        st = os.stat(box / final)
        assert (st.st_dev, st.st_ino) == up.identity
    assert (box / "a").read_bytes() == b"good"


@pytest.mark.parametrize("policy", ["refuse", "rename", "replace"])
def test_without_o_tmpfile_a_swapped_temp_is_unlinked_and_refused(
        box: Path, no_tmpfile: None, policy: str) -> None:
    with BoxStore(box, overwrite=policy) as s:
        up = s.begin("a", 4)
        assert not up.unnamed
        up.write(b"good")
        swap_temp(box, up.temp_name)
        with pytest.raises(Refused) as e:
            up.commit()
    assert e.value.reply == Reply.LOCAL_ERROR
    assert "no longer holds the verified file" in (e.value.detail or "")
    assert not (box / "a").exists()
    assert [n for n in os.listdir(box) if not n.startswith(".rstash-tmp-")] == []


def test_without_o_tmpfile_an_untouched_upload_is_stored(box: Path, no_tmpfile: None) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 4)
        up.write(b"good")
        assert up.commit() == "a"
    assert (box / "a").read_bytes() == b"good"
    assert os.listdir(box) == ["a"]


def test_an_unnamed_upload_still_reserves_for_quota_and_min_free(box: Path) -> None:
    with BoxStore(box, quota=1500) as s:
        up = s.begin("a", 1000)
        assert up.unnamed
        up.write(b"x" * 400)
        assert scan_usage(s.dir_fd) == (1000, 600)  # the named temp carries the claim
        with pytest.raises(Refused) as e:
            s.begin("b", 600)
        assert e.value.outcome is Outcome.QUOTA


def test_an_unnamed_upload_of_unknown_size_counts_its_bytes_for_quota(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", None)
        up.write(b"x" * 12345)
        usage, reserved = scan_usage(s.dir_fd)
        assert (usage, reserved) == (12345 + UNKNOWN_RESERVE, UNKNOWN_RESERVE)
        # The claim is sparse: it occupies no blocks of its own.
        assert os.stat(box / up.temp_name).st_blocks == 0


def test_a_commit_keeps_a_reader_of_the_verified_inode_for_hooks(box: Path) -> None:
    with BoxStore(box, keep_readers=True) as s:
        up = s.begin("a", 4)
        up.write(b"good")
        up.commit()
        assert up.reader_fd is not None
        try:
            os.rename(box / "a", box / "moved")
            (box / "a").symlink_to("/etc/passwd")
            assert os.read(up.reader_fd, 100) == b"good"
        finally:
            up.close_reader()
