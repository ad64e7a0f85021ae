"""The box lock and temp liveness of rstash-recv(8) SCALING, on a local file system.

The same locks are proven across two mounts of a real GlusterFS volume in tests/cluster/.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from rstash import boxlock, statedir
from rstash import store as store_mod
from rstash.store import BoxStore, scan_usage

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
    "40 22 0:50 / /srv/vol rw,relatime - fuse.glusterfs host:/vol rw\n"
    "41 22 0:51 / /srv/ceph rw - ceph 10.0.0.1:/ rw\n"
    "42 22 0:52 / /srv/fuse rw - fuse.other x rw\n"
)


@pytest.mark.parametrize(("path", "shared"), [
    ("/srv/boxes/a", False), ("/srv/vol/boxes/a", True), ("/srv/ceph/a", True),
    ("/srv/fuse/a", True), ("/srv/volume", False),
])
def test_a_box_may_be_shared_on_network_cluster_and_fuse_file_systems(path: str, shared: bool) -> None:
    assert statedir.may_be_shared(path, MOUNTINFO) is shared


def test_unknown_mounts_count_as_shared() -> None:
    assert statedir.may_be_shared("/srv/a", "garbage\n") is True


@pytest.mark.parametrize("fstype", ["fuse.glusterfs", "glusterfs", "ceph", "fuse.ceph", "lustre",
                                    "gpfs", "beegfs"])
def test_cluster_file_systems_never_hold_the_replay_cache(fstype: str) -> None:
    assert fstype in statedir.NETWORK_FSTYPES


def test_an_ofd_lock_excludes_another_description_in_the_same_process(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        a = boxlock.open_lock_file(dir_fd)
        b = boxlock.open_lock_file(dir_fd)  # exists now: opened, not created
        st = os.stat(tmp_path / boxlock.LOCK_NAME)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert boxlock.try_lock(a)
        assert not boxlock.try_lock(b)
        assert not boxlock.try_lock(b, shared=True)
        boxlock.unlock(a)
        assert boxlock.try_lock(b, shared=True)
        assert boxlock.try_lock(a, shared=True)  # shared locks share
        os.close(a)
        os.close(b)
    finally:
        os.close(dir_fd)


def test_a_symlink_or_fifo_at_the_lock_name_is_never_used(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tmp_path / "target").write_bytes(b"")
        (tmp_path / boxlock.LOCK_NAME).symlink_to(tmp_path / "target")
        with pytest.raises(OSError):
            boxlock.open_lock_file(dir_fd)
        (tmp_path / boxlock.LOCK_NAME).unlink()
        os.mkfifo(tmp_path / boxlock.LOCK_NAME)
        with pytest.raises(OSError):
            boxlock.open_lock_file(dir_fd)
    finally:
        os.close(dir_fd)


@pytest.fixture
def shared_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A box the store treats as mounted by other hosts too (its lock is .rstash-lock)."""
    monkeypatch.setattr(store_mod, "may_be_shared", lambda path: True)
    box = tmp_path / "box"
    box.mkdir()
    return box


def test_on_a_shared_box_the_lock_file_is_made_and_never_counted(shared_box: Path) -> None:
    with BoxStore(shared_box, quota=10) as s:
        up = s.begin("a", 4)
        up.write(b"abcd")
        assert up.commit() == "a"
        assert sorted(os.listdir(shared_box)) == sorted(["a", boxlock.LOCK_NAME])
        assert scan_usage(s.dir_fd) == (4, 0)
        # The lock file is never a temp: no sweep touches it, however old.
        os.utime(shared_box / boxlock.LOCK_NAME, (0, 0))
        assert s.sweep(0) == []
        assert (shared_box / boxlock.LOCK_NAME).exists()


def test_a_claim_waits_for_the_box_lock_held_elsewhere(shared_box: Path) -> None:
    with BoxStore(shared_box) as s:
        up = s.begin("a", 1)
        up.write(b"x")
        other = boxlock.open_lock_file(s.dir_fd)
        try:
            assert boxlock.try_lock(other)
            # Held by another description (another receiver's session): begin would wait;
            # here we only prove the store's own lock description is refused meanwhile.
            assert not boxlock.try_lock(s._lock_fd(s.dir_fd))
        finally:
            os.close(other)
        assert up.commit() == "a"


def test_an_unlocked_temp_with_a_live_lease_is_not_swept(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    name = f".rstash-tmp-{'a' * 32}.9"
    (box / name).write_bytes(b"partial")  # nobody locks it: the lock alone says dead
    with BoxStore(box) as s:
        assert s.sweep(60) == []
        past = time.time() - 120
        os.utime(box / name, (past, past))
        assert s.sweep(60) == [name]


def test_writes_renew_the_lease_of_every_open_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "box"
    box.mkdir()
    monkeypatch.setattr(store_mod, "LEASE_RENEW", 0.0)
    with BoxStore(box) as s:
        waiting = s.begin("first", 1)
        waiting.write(b"x")  # whole, waiting for its batch's commit
        past = time.time() - 3600
        os.utime(box / waiting.temp_name, (past, past))
        streaming = s.begin("second", None)
        streaming.write(b"more")
        assert time.time() - os.stat(box / waiting.temp_name).st_mtime < 60
        assert s.sweep(60) == []
        waiting.abort()
        streaming.abort()


def test_pipe_mode_is_refused_for_a_box_on_a_shared_volume(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from rstash import hello as hello_mod
    from rstash.config import load_config
    from rstash.errors import Outcome
    from rstash.hello import HelloJudge
    from rstash.wire import Hello

    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    (tmp_path / "box").mkdir()
    (tmp_path / "recv.toml").write_text(
        f'state_dir = "{state_dir}"\n[box.vm1]\npath = "{tmp_path / "box"}"\n'
        f'keys = ["{tmp_path / "vm1.key"}"]\npipe_mode = true\n')
    judge = HelloJudge(load_config(tmp_path / "recv.toml"), {"vm1": []})
    monkeypatch.setattr(statedir, "may_be_shared", lambda path: True)
    hello = Hello.__new__(Hello)  # never read: the refusal comes before the replay cache
    verdict = judge.judge_pipe(judge.cfg.boxes["vm1"], hello)
    assert verdict is not None and verdict.outcome is Outcome.SESSION_ERROR
    assert verdict.detail == hello_mod.SHARED_PIPE
    assert not any(state_dir.iterdir())  # no replay cache made for it


def test_check_config_warns_what_a_box_on_a_shared_volume_does_not_share(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rstash import boxpath, checks

    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    box = tmp_path / "box"
    box.mkdir()
    (tmp_path / "recv.toml").write_text(
        f'state_dir = "{state_dir}"\n[box.vm1]\npath = "{box}"\n'
        f'keys = ["{tmp_path / "vm1.key"}"]\npipe_mode = true\n')
    _cfg, local = checks._run_checks(str(tmp_path / "recv.toml"), None)
    assert not any("network or cluster" in line for line in local.problem_lines())
    monkeypatch.setattr(boxpath, "may_be_shared", lambda path: True)
    _cfg, shared = checks._run_checks(str(tmp_path / "recv.toml"), None)
    found = [line for line in shared.problem_lines() if "network or cluster" in line]
    assert len(found) == 1 and "--status" in found[0] and "pipe mode is refused" in found[0]
