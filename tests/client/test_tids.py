"""Transfer ids and the client state file (rstash-send(1), RESUME)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from rstash.client.tids import file_sha256, hash_prefix, state_dir, transfer_id


def tid(path: Path, state: Path, **kw: str) -> bytes | None:
    args = {"box": "vm1", "fingerprint": "SHA256:x", "name": path.name, **kw}
    return transfer_id(str(path), directory=state, **args)


def test_the_same_file_gets_the_same_id_and_a_changed_one_another(tmp_path: Path) -> None:
    f = tmp_path / "db.dump"
    f.write_bytes(b"a" * 100)
    state = tmp_path / "state"
    first = tid(f, state)
    assert first is not None and len(first) == 16 and any(first)
    assert tid(f, state) == first
    assert (state / "tids.json").stat().st_mode & 0o777 == 0o600
    assert tid(f, state, name="other") != first
    assert tid(f, state, box="vm2") != first
    assert tid(f, state, fingerprint="SHA256:y") != first
    os.utime(f, ns=(0, 10**9))
    assert tid(f, state) != first
    f.unlink()
    f.write_bytes(b"a" * 100)  # a new inode
    assert tid(f, state) not in (first, None)


def test_another_state_file_gives_unrelated_ids(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"x")
    assert tid(f, tmp_path / "s1") != tid(f, tmp_path / "s2")


def test_no_id_without_a_usable_state_file_or_for_a_non_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"x")
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    assert tid(f, blocked / "rstash") is None
    assert transfer_id("/dev/null", box="b", fingerprint="f", name="n",
                       directory=tmp_path / "s") is None


def test_state_dir_follows_xdg_and_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert state_dir({"XDG_STATE_HOME": "/x/state", "HOME": "/h"}) == Path("/x/state/rstash")
    assert state_dir({"HOME": "/h"}) == Path("/h/.local/state/rstash")
    assert state_dir({"XDG_STATE_HOME": "relative", "HOME": "/h"}) == Path("/h/.local/state/rstash")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert state_dir({"HOME": "/root"}) == Path("/var/lib/rstash-send")


def test_prefix_and_whole_file_digests(tmp_path: Path) -> None:
    f = tmp_path / "x"
    data = os.urandom(3 * 2**20 + 5)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        h = hash_prefix(fd, 2**20 + 1)
        assert h is not None and h.digest() == hashlib.sha256(data[:2**20 + 1]).digest()
        assert hash_prefix(fd, len(data) + 1) is None
    finally:
        os.close(fd)
    assert file_sha256(str(f)) == hashlib.sha256(data).hexdigest()
