"""rstash.upload: one file into a box, under faults injected into the calls it makes.

Each fault is an OSError from the real call (fsync, fchmod, link, rename, write)
raised at the moment it matters; what must hold afterwards is the product's
promise: a clear refusal code, no temp left, nothing under a final name that was
not fully written and fsynced.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from rstash import store as store_mod
from rstash.errors import Reply
from rstash.store import BoxStore, Refused
from rstash.upload import MAX_RENAME, UNKNOWN_RESERVE, from_oserror


@pytest.fixture
def box(tmp_path: Path) -> Path:
    path = tmp_path / "box"
    path.mkdir()
    return path


@pytest.fixture(params=["unnamed", "named"])
def temp_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the bytes reach a box: an unnamed O_TMPFILE, or (a kernel or file system
    without it: open(O_TMPFILE) seen as O_DIRECTORY fails with EISDIR) the named temp."""
    if request.param == "named":
        monkeypatch.setattr(store_mod, "_TMPFILE_FLAGS", os.O_DIRECTORY | os.O_RDWR | os.O_CLOEXEC)
    return str(request.param)


def store_file(box: Path, name: str, data: bytes, **opts: Any) -> str:
    with BoxStore(box, **opts) as s:
        up = s.begin(name, len(data))
        up.write(data)
        return up.commit()


def fail_with(err: int) -> Any:
    def fail(*_a: object, **_k: object) -> None:
        raise OSError(err, os.strerror(err))

    return fail


def test_the_unknown_size_reserve_and_rename_limit_are_the_documented_ones() -> None:
    # rstash-recv.toml(5): 64 MiB reserved per unknown-size upload; NAME~1 … NAME~999.
    assert UNKNOWN_RESERVE == 64 * 2**20
    assert MAX_RENAME == 999


# -- sizes ----------------------------------------------------------------------------


def test_a_zero_byte_file_is_stored(box: Path, temp_mode: str) -> None:
    assert store_file(box, "empty", b"") == "empty"
    with BoxStore(box) as s:
        up = s.begin("empty-streamed", None)
        assert up.commit() == "empty-streamed"
    assert (box / "empty").read_bytes() == b""
    assert (box / "empty-streamed").read_bytes() == b""
    assert sorted(os.listdir(box)) == ["empty", "empty-streamed"]


def test_an_empty_write_changes_nothing(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 2)
        up.write(b"")
        up.write(b"ab")
        up.write(memoryview(b""))
        assert up.written == 2
        assert up.commit() == "a"
    assert (box / "a").read_bytes() == b"ab"


def test_an_upload_of_unknown_size_stops_at_max_file_size(box: Path) -> None:
    with BoxStore(box, max_file_size=10) as s:
        up = s.begin("a", None)
        up.write(b"x" * 10)
        with pytest.raises(Refused) as ei:
            up.write(b"x")
        assert ei.value.reply == Reply.TOO_LARGE
    assert os.listdir(box) == []


def test_a_write_after_commit_is_refused(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 1)
        up.write(b"x")
        up.commit()
        assert up.done
        with pytest.raises(Exception, match="already finished"):
            up.write(b"y")
        up.abort()  # a no-op after commit
    assert (box / "a").read_bytes() == b"x"


# -- overwrite = "rename" ---------------------------------------------------------------


def test_rename_goes_up_to_the_999th_name_and_no_further(box: Path) -> None:
    (box / "log.txt").write_bytes(b"0")
    for n in range(1, 999):
        (box / f"log~{n}.txt").write_bytes(b"0")
    assert store_file(box, "log.txt", b"new", overwrite="rename") == "log~999.txt"
    assert (box / "log~999.txt").read_bytes() == b"new"
    with pytest.raises(Refused) as ei:
        store_file(box, "log.txt", b"newer", overwrite="rename")
    assert ei.value.reply == Reply.EXISTS
    assert not (box / "log~1000.txt").exists()
    assert not [n for n in os.listdir(box) if n.startswith(".rstash-tmp-")]


def test_rename_candidates_must_match_allow_names(box: Path, temp_mode: str) -> None:
    (box / "db.tar").write_bytes(b"0")
    allow = ["db.tar", "db~2.tar", "db~3.tar"]
    assert store_file(box, "db.tar", b"1", overwrite="rename", allow_names=allow) == "db~2.tar"
    assert not (box / "db~1.tar").exists()
    assert store_file(box, "db.tar", b"2", overwrite="rename", allow_names=allow) == "db~3.tar"


def test_refuse_and_replace_never_try_another_name(box: Path, temp_mode: str) -> None:
    (box / "a.txt").write_bytes(b"old")
    with pytest.raises(Refused) as ei:
        store_file(box, "a.txt", b"new", overwrite="refuse")
    assert ei.value.reply == Reply.EXISTS
    assert store_file(box, "a.txt", b"new", overwrite="replace") == "a.txt"
    assert sorted(os.listdir(box)) == ["a.txt"]


def test_a_temp_swapped_for_a_symlink_never_links_its_target(box: Path, tmp_path: Path, temp_mode: str) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"not for the box")
    with BoxStore(box) as s:
        up = s.begin("a", 4)
        up.write(b"data")
        os.unlink(box / up.temp_name)
        (box / up.temp_name).symlink_to(outside)
        try:
            up.commit()
        except Refused:
            pass
    # Whatever the store did, the outside file never got a second name in the box.
    assert os.stat(outside).st_nlink == 1
    assert outside.read_bytes() == b"not for the box"


# -- faults ---------------------------------------------------------------------------


def test_fsync_failure_is_451_and_stores_nothing(box: Path, monkeypatch: pytest.MonkeyPatch, temp_mode: str) -> None:
    monkeypatch.setattr(os, "fsync", fail_with(errno.EIO))
    with pytest.raises(Refused) as ei:
        store_file(box, "a", b"data")
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert os.listdir(box) == []


def test_fchmod_failure_at_commit_is_451_and_stores_nothing(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fchmod = os.fchmod
    with BoxStore(box) as s:
        up = s.begin("a", 4)  # its own fchmod to 0600 runs here
        up.write(b"data")
        monkeypatch.setattr(os, "fchmod", fail_with(errno.EIO))
        with pytest.raises(Refused) as ei:
            up.commit()
        monkeypatch.setattr(os, "fchmod", real_fchmod)
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert os.listdir(box) == []


def test_fchmod_failure_at_begin_is_451_and_leaves_no_temp(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fchmod", fail_with(errno.EPERM))
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("a", 4)
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert os.listdir(box) == []


def test_the_stored_file_gets_file_mode(box: Path) -> None:
    store_file(box, "a", b"x", file_mode=0o604)
    assert stat.S_IMODE((box / "a").stat().st_mode) == 0o604


@pytest.mark.parametrize("mode", [0o755, 0o4644, 0o2644, 0o1644, 0o645, 0o654])
def test_a_file_mode_with_an_execute_setuid_setgid_or_sticky_bit_is_refused(box: Path, mode: int) -> None:
    with pytest.raises(ValueError, match="07111"):
        BoxStore(box, file_mode=mode)


@pytest.mark.parametrize("policy", ["refuse", "rename"])
def test_link_failure_is_451_and_stores_nothing(
    box: Path, monkeypatch: pytest.MonkeyPatch, policy: str, temp_mode: str
) -> None:
    monkeypatch.setattr(os, "link", fail_with(errno.EMLINK))
    with pytest.raises(Refused) as ei:
        store_file(box, "a", b"data", overwrite=policy)
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert os.listdir(box) == []


def test_rename_failure_under_replace_keeps_the_old_file(
    box: Path, monkeypatch: pytest.MonkeyPatch, temp_mode: str
) -> None:
    (box / "a").write_bytes(b"old")
    monkeypatch.setattr(os, "rename", fail_with(errno.EIO))
    with pytest.raises(Refused) as ei:
        store_file(box, "a", b"new", overwrite="replace")
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert os.listdir(box) == ["a"]
    assert (box / "a").read_bytes() == b"old"


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_out_of_space_or_disk_quota_while_writing_is_452(
    box: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 4)
        monkeypatch.setattr(os, "write", fail_with(err))
        with pytest.raises(Refused) as ei:
            up.write(b"data")
        monkeypatch.undo()
    assert ei.value.reply == Reply.INSUFFICIENT_STORAGE
    assert os.listdir(box) == []


@pytest.mark.parametrize(("err", "reply"), [
    (errno.ENOSPC, Reply.INSUFFICIENT_STORAGE), (errno.EDQUOT, Reply.INSUFFICIENT_STORAGE),
    (errno.EIO, Reply.LOCAL_ERROR), (errno.EROFS, Reply.LOCAL_ERROR), (errno.EACCES, Reply.LOCAL_ERROR),
])
def test_every_os_error_maps_to_452_for_space_and_451_otherwise(err: int, reply: int) -> None:
    refusal = from_oserror("write", OSError(err, os.strerror(err)))
    assert refusal.reply == reply
    assert refusal.detail == f"write: {os.strerror(err)}"


def test_fsync_out_of_space_is_452(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", fail_with(errno.EDQUOT))
    with pytest.raises(Refused) as ei:
        store_file(box, "a", b"data")
    assert ei.value.reply == Reply.INSUFFICIENT_STORAGE
    assert os.listdir(box) == []


def test_a_write_interrupted_by_a_signal_is_retried(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return real_write(fd, data[:2])  # and a short write

    with BoxStore(box) as s:
        up = s.begin("a", 5)
        monkeypatch.setattr(os, "write", write)
        up.write(b"hello")
        monkeypatch.undo()
        assert up.commit() == "a"
    assert (box / "a").read_bytes() == b"hello"


def test_a_directory_fsync_failure_refuses_every_file_of_the_batch(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with BoxStore(box) as s:
        ups = []
        for name in ("a", "b"):
            up = s.begin(name, 1)
            up.write(b"x")
            ups.append(up)
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if fd == s.dir_fd:
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        results = s.commit_batch(ups)
    assert [getattr(r, "reply", r) for r in results] == [Reply.LOCAL_ERROR, Reply.LOCAL_ERROR]


def test_a_batch_reports_each_files_own_outcome_under_one_directory_fsync(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (box / "taken").write_bytes(b"0")
    synced: list[int] = []
    with BoxStore(box) as s:
        ups = []
        for name in ("a", "taken", "b"):
            up = s.begin(name, 1) if name != "taken" else None
            ups.append(up)
        real = [u for u in ups if u is not None]
        for up in real:
            up.write(b"x")
        (box / "b").write_bytes(b"raced")  # a racing key holder takes "b" first
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(fd)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        results = s.commit_batch(real)
        assert synced.count(s.dir_fd) == 1
    assert results[0] == "a"
    assert getattr(results[1], "reply", None) == Reply.EXISTS
    assert (box / "b").read_bytes() == b"raced"


def test_a_directory_fsync_failure_keeps_each_earlier_refusal(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (box / "taken").write_bytes(b"0")
    with BoxStore(box) as s:
        ups = []
        for name in ("a", "taken"):
            up = s.begin(name, 1) if name == "a" else None
            ups.append(up)
        first = ups[0]
        assert first is not None
        first.write(b"x")
        second = BoxStore(box).begin("b", 1)  # another session's upload raced to "b" below
        second.write(b"y")
        late = s.begin("b", 1)
        late.write(b"z")
        assert second.commit() == "b"
        second.store.close()
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if fd == s.dir_fd:
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        results = s.commit_batch([first, late])
    assert getattr(results[0], "reply", None) == Reply.LOCAL_ERROR
    assert getattr(results[0], "detail", None) == "fsync box: Input/output error"
    assert getattr(results[1], "reply", None) == Reply.EXISTS


def test_an_os_error_closing_one_file_of_a_batch_is_451_for_that_file(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with BoxStore(box) as s:
        a = s.begin("a", 1)
        a.write(b"x")
        b = s.begin("b", 1)
        b.write(b"y")
        real_close = os.close
        failed: list[int] = []

        def close(fd: int) -> None:
            # The stored file "a" is closed once the name is claimed: an NFS close can fail then.
            is_a = (box / "a").exists() and os.path.samestat(os.fstat(fd), os.stat(box / "a"))
            real_close(fd)
            if is_a and not failed:
                failed.append(fd)
                raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "close", close)
        results = s.commit_batch([a, b])
        monkeypatch.undo()
    assert failed
    assert isinstance(results[0], Refused)
    assert (results[0].reply, results[0].detail) == (Reply.LOCAL_ERROR, "Input/output error")
    assert results[1] == "b"


def test_a_failed_replace_names_the_file_in_its_detail(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "rename", fail_with(errno.EIO))
    with pytest.raises(Refused) as ei:
        store_file(box, "a", b"new", overwrite="replace")
    assert ei.value.detail == "rename to 'a': Input/output error"


# -- what the log is told ----------------------------------------------------------------


def _refusal(box: Path, monkeypatch: pytest.MonkeyPatch, call: str, policy: str = "refuse") -> Refused:
    with BoxStore(box, overwrite=policy) as s:
        up = s.begin("a", 4)
        if call in ("write", "ftruncate"):
            monkeypatch.setattr(os, call, fail_with(errno.EIO))
            with pytest.raises(Refused) as ei:
                up.write(b"data")
        else:
            up.write(b"data")
            monkeypatch.setattr(os, call, fail_with(errno.EIO))
            with pytest.raises(Refused) as ei:
                up.commit()
        monkeypatch.undo()
    return ei.value


@pytest.mark.parametrize(("call", "policy", "detail"), [
    ("write", "refuse", "write: Input/output error"),
    ("ftruncate", "refuse", "reserve: Input/output error"),
    ("fsync", "refuse", "fsync: Input/output error"),
    ("fchmod", "refuse", "fchmod: Input/output error"),
    ("link", "refuse", "link 'a': Input/output error"),
    ("link", "replace", "link temp: Input/output error"),
    ("rename", "replace", "rename to 'a': Input/output error"),
])
def test_each_failing_call_is_named_in_the_refusals_detail(
    box: Path, monkeypatch: pytest.MonkeyPatch, call: str, policy: str, detail: str
) -> None:
    refusal = _refusal(box, monkeypatch, call, policy)
    assert (refusal.reply, refusal.detail) == (Reply.LOCAL_ERROR, detail)
    assert os.listdir(box) == []


def test_size_refusals_say_how_many_bytes(box: Path) -> None:
    with BoxStore(box, max_file_size=10) as s:
        up = s.begin("a", 4)
        with pytest.raises(Exception, match=r"^5 bytes > announced 4$"):
            up.write(b"12345")
        up = s.begin("b", 4)
        up.write(b"123")
        with pytest.raises(Exception, match=r"^3 bytes, announced 4$"):
            up.commit()
        up = s.begin("c", None)
        with pytest.raises(Refused) as ei:
            up.write(b"x" * 11)
        assert ei.value.detail == "> max_file_size 10"


def test_no_free_name_is_told_with_the_name(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("x", 1)
        up.write(b"1")
        (box / "x").write_bytes(b"0")  # a racing key holder took the name meanwhile
        with pytest.raises(Refused) as ei:
            up.commit()
    assert ei.value.detail == "no free name for 'x'"


def test_a_final_name_that_vanished_before_the_identity_check_is_refused(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_stat = os.stat

    def stat_(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "a":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_stat(name, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_)
    with pytest.raises(Refused) as ei:
        store_file(box, "a", b"data")
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert ei.value.detail == \
        "'a' no longer holds the verified file (swapped by someone with write access to the box)"


def test_a_committed_upload_knows_its_final_name(box: Path) -> None:
    (box / "r.txt").write_bytes(b"0")
    with BoxStore(box, overwrite="rename") as s:
        up = s.begin("r.txt", 1)
        up.write(b"1")
        assert up.final_name is None
        up.commit()
        assert up.final_name == "r~1.txt"


def test_the_reader_kept_for_hooks_is_read_only_and_not_inherited(box: Path) -> None:
    with BoxStore(box, keep_readers=True) as s:
        up = s.begin("a", 4)
        up.write(b"data")
        up.commit()
        fd = up.reader_fd
        assert fd is not None
        try:
            assert not os.get_inheritable(fd)
            assert os.pread(fd, 4, 0) == b"data"
            with pytest.raises(OSError):
                os.write(fd, b"x")
        finally:
            up.close_reader()


def test_a_replace_carries_the_announced_size_in_its_temp_name(
    box: Path, monkeypatch: pytest.MonkeyPatch, temp_mode: str
) -> None:
    renamed: list[str] = []
    real_rename = os.rename

    def rename(src: Any, dst: Any, **kwargs: Any) -> None:
        renamed.append(str(src))
        real_rename(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    store_file(box, "a", b"data", overwrite="replace")
    [temp] = renamed
    assert temp.startswith(".rstash-tmp-") and temp.endswith(".4")


def test_an_os_error_without_a_message_is_told_as_the_error(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with BoxStore(box) as s:
        a = s.begin("a", 1)
        a.write(b"x")
        real_close = os.close
        failed: list[int] = []

        def close(fd: int) -> None:
            is_a = (box / "a").exists() and os.path.samestat(os.fstat(fd), os.stat(box / "a"))
            real_close(fd)
            if is_a and not failed:
                failed.append(fd)
                raise OSError("close failed")

        monkeypatch.setattr(os, "close", close)
        [result] = s.commit_batch([a])
        monkeypatch.undo()
    assert isinstance(result, Refused)
    assert result.detail == "close failed"


def test_an_upload_has_no_identity_until_it_is_committed(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 1)
        assert up.identity is None
        up.write(b"x")
        up.commit()
        st = os.stat(box / "a")
        assert up.identity == (st.st_dev, st.st_ino)


def _fsyncs_of_a_batch(box: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> tuple[int, int]:
    """(file fsyncs, directory fsyncs) of one batch of ``n`` files."""
    calls: list[int] = []
    real_fsync = os.fsync
    with BoxStore(box) as s:
        ups = []
        for i in range(n):
            up = s.begin(f"f{i}", 1)
            up.write(b"x")
            ups.append(up)
        def fsync(fd: int) -> None:
            calls.append(fd)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        assert s.commit_batch(ups) == [f"f{i}" for i in range(n)]
        monkeypatch.undo()
        return len([fd for fd in calls if fd != s.dir_fd]), calls.count(s.dir_fd)


def test_a_batch_of_several_files_is_made_durable_by_one_syncfs(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rstash.durable import syncfs

    fd = os.open(box, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not syncfs(fd):
            pytest.skip("this file system or kernel has no syncfs()")  # each file is fsynced instead
    finally:
        os.close(fd)
    # rstash-recv(8) DURABILITY: one syncfs() for the data of the batch, one fsync for the names.
    assert _fsyncs_of_a_batch(box, monkeypatch, 2) == (0, 1)


def test_a_batch_of_one_file_fsyncs_that_file(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _fsyncs_of_a_batch(box, monkeypatch, 1) == (1, 1)
