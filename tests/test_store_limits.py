"""rstash.store: quota and min_free sums, the directory lock, and the sweep's guards.

Each test plants what the box may hold in real life (several files and temps, a
directory, a symlink, a FIFO, an entry swapped mid-sweep) on a real directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rstash import boxlock
from rstash.errors import Reply, StoreError
from rstash.store import UNKNOWN_RESERVE, BoxStore, Refused

MiB = 2**20


@pytest.fixture
def box(tmp_path: Path) -> Path:
    path = tmp_path / "box"
    path.mkdir()
    return path


def store_file(box: Path, name: str, data: bytes, **opts: Any) -> str:
    with BoxStore(box, **opts) as s:
        up = s.begin(name, len(data))
        up.write(data)
        return up.commit()


def temp_name(size: str) -> str:
    return f".rstash-tmp-{os.urandom(16).hex()}.{size}"


def plant_temp(box: Path, size: str, content: bytes = b"partial", age: float = 0) -> str:
    name = temp_name(size)
    (box / name).write_bytes(content)
    if age:
        past = time.time() - age
        os.utime(box / name, (past, past))
    return name


def fake_statvfs(free: Callable[[], int]) -> Callable[[object], SimpleNamespace]:
    return lambda _fd: SimpleNamespace(f_bavail=free() // 4096, f_frsize=4096)


# -- quota: every file and every temp is summed -------------------------------------


def test_quota_counts_every_other_file_and_temp(box: Path) -> None:
    for i, size in enumerate((100, 200, 300)):
        (box / f"f{i}").write_bytes(b"x" * size)
    plant_temp(box, "400", b"y" * 10)  # announced 400: claims 400
    plant_temp(box, "5", b"z" * 50)  # wrote more than announced: claims what is on disk
    used = 100 + 200 + 300 + 400 + 50
    with BoxStore(box, quota=used + 1000) as s:
        with pytest.raises(Refused) as ei:
            s.begin("new", 1001)
        assert ei.value.reply == Reply.TOO_LARGE
        s.begin("new", 1000).abort()


def test_quota_counts_two_live_uploads_of_other_sessions(box: Path) -> None:
    with BoxStore(box, quota=1000) as a, BoxStore(box, quota=1000) as b, BoxStore(box, quota=1000) as c:
        up1 = a.begin("one", 300)
        up2 = b.begin("two", 300)
        with pytest.raises(Refused):
            c.begin("three", 401)
        c.begin("three", 400).abort()
        up1.abort()
        up2.abort()


def test_quota_counts_an_unknown_size_temp_as_written_plus_the_reserve(box: Path) -> None:
    plant_temp(box, "u", b"w" * 7)
    (box / "stored").write_bytes(b"s" * 3)
    with BoxStore(box, quota=UNKNOWN_RESERVE + 7 + 3 + 20) as s:
        with pytest.raises(Refused):
            s.begin("a", 21)
        s.begin("a", 20).abort()


def test_directories_symlinks_and_fifos_do_not_end_the_quota_scan(tmp_path: Path, box: Path) -> None:
    outside = tmp_path / "big"
    outside.write_bytes(b"o" * 5000)
    total = 0
    # Interleaved, so whatever order the directory lists them in, files follow other entries.
    for i in range(8):
        (box / f"file{i}").write_bytes(b"x" * (10 + i))
        total += 10 + i
        (box / f"dir{i}").mkdir()
        (box / f"link{i}").symlink_to(outside)
        os.mkfifo(box / f"fifo{i}")
        (box / f"z{i}").write_bytes(b"x" * 5)
        total += 5
    with BoxStore(box, quota=total + 100) as s:
        with pytest.raises(Refused):
            s.begin("a", 101)
        s.begin("a", 100).abort()


def test_replace_quota_for_a_name_that_does_not_exist_yet_counts_the_whole_file(box: Path) -> None:
    (box / "other").write_bytes(b"x" * 600)
    with BoxStore(box, quota=1000, overwrite="replace") as s:
        with pytest.raises(Refused):
            s.begin("new", 401)
        s.begin("new", 400).abort()


def test_replace_over_a_symlink_frees_nothing(tmp_path: Path, box: Path) -> None:
    outside = tmp_path / "big"
    outside.write_bytes(b"o" * 900)
    (box / "other").write_bytes(b"x" * 600)
    (box / "name").symlink_to(outside)
    with BoxStore(box, quota=1000, overwrite="replace") as s:
        with pytest.raises(Refused):
            s.begin("name", 401)  # the symlink's target is not the box's to free
        s.begin("name", 400).abort()


def test_no_quota_and_no_min_free_never_scans(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_scan(*_a: object) -> None:
        raise AssertionError("scanned a box without limits")

    monkeypatch.setattr(os, "scandir", no_scan)
    monkeypatch.setattr(os, "statvfs", no_scan)
    with BoxStore(box) as s:
        s.begin("a", 10**15).abort()


def test_quota_without_min_free_never_asks_the_file_system(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_statvfs(*_a: object) -> None:
        raise AssertionError("statvfs without min_free")

    monkeypatch.setattr(os, "statvfs", no_statvfs)
    with BoxStore(box, quota=100) as s:
        s.begin("a", 100).abort()


# -- min_free -----------------------------------------------------------------------


def test_min_free_sums_every_outstanding_reservation(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "statvfs", fake_statvfs(lambda: 100 * MiB))
    plant_temp(box, str(10 * MiB), b"")  # 10 MiB promised
    plant_temp(box, str(20 * MiB), b"")  # 20 MiB promised
    plant_temp(box, "u", b"")  # the unknown-size reserve promised
    promised = 30 * MiB + UNKNOWN_RESERVE
    with BoxStore(box, min_free=MiB) as s:
        room = 100 * MiB - promised - MiB
        with pytest.raises(Refused) as ei:
            s.begin("a", room + 1)
        assert ei.value.reply == Reply.INSUFFICIENT_STORAGE
        s.begin("a", room).abort()


def test_min_free_is_rechecked_when_an_unknown_size_upload_crosses_64_mib(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = {"now": 200 * MiB}
    monkeypatch.setattr(os, "statvfs", fake_statvfs(lambda: free["now"]))
    chunk = b"x" * MiB
    with BoxStore(box, min_free=10 * MiB) as s:
        up = s.begin("a", None)
        for _ in range(UNKNOWN_RESERVE // MiB - 1):
            up.write(chunk)
        # Another writer filled the disk meanwhile: 63 MiB of ours are on it, and
        # the next 64 MiB promised no longer fit above min_free.
        free["now"] = UNKNOWN_RESERVE + 9 * MiB
        with pytest.raises(Refused) as ei:
            up.write(chunk)
        assert ei.value.reply == Reply.INSUFFICIENT_STORAGE
    assert os.listdir(box) == []


def test_an_unknown_size_upload_is_not_rechecked_before_64_mib(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = {"now": 200 * MiB}
    monkeypatch.setattr(os, "statvfs", fake_statvfs(lambda: free["now"]))
    with BoxStore(box, min_free=10 * MiB) as s:
        up = s.begin("a", None)
        free["now"] = 0  # a re-check now would refuse
        up.write(b"x" * (UNKNOWN_RESERVE - 1))
        assert up.commit() == "a"
    assert (box / "a").stat().st_size == UNKNOWN_RESERVE - 1


def test_statvfs_failure_is_451(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_fd: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "statvfs", broken)
    with BoxStore(box, min_free=1) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert os.listdir(box) == []


# -- the directory lock -------------------------------------------------------------


def _other_process_could_lock(box: Path) -> bool:
    """Whether another process could flock the box directory right now."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            code = 0
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_limits_are_checked_and_the_temp_created_under_the_box_lock(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, bool]] = []
    real_statvfs, real_open = os.statvfs, os.open

    def statvfs(fd: Any) -> Any:
        seen.append(("check", _other_process_could_lock(box)))
        return real_statvfs(fd)

    def opener(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(".rstash-tmp-"):
            seen.append(("temp", _other_process_could_lock(box)))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(os, "open", opener)
    with BoxStore(box, min_free=1) as s:
        s.begin("a", 1).abort()
    assert seen == [("check", False), ("temp", False)]
    assert _other_process_could_lock(box)


def test_the_64_mib_recheck_holds_the_box_lock(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    real_statvfs = os.statvfs

    def statvfs(fd: Any) -> Any:
        seen.append(_other_process_could_lock(box))
        return real_statvfs(fd)

    monkeypatch.setattr(os, "statvfs", statvfs)
    with BoxStore(box, min_free=1) as s:
        up = s.begin("a", None)
        up.write(b"x" * UNKNOWN_RESERVE)
        up.abort()
    assert seen == [False, False]


def test_a_failing_box_lock_is_451(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_flock = fcntl.flock

    def flock(fd: int, op: int) -> None:
        if os.path.samestat(os.fstat(fd), os.stat(box)):
            raise OSError(errno.ENOLCK, "No locks available")
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with BoxStore(box, quota=10) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert os.listdir(box) == []


def test_a_failing_temp_lock_is_451_and_leaves_no_temp(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def try_lock(fd: int, *, shared: bool = False) -> bool:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(boxlock, "try_lock", try_lock)  # the temp's own lock (rstash.boxlock)
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert os.listdir(box) == []


def stat_is_reg(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


# -- the sweep ------------------------------------------------------------------------


def test_sweep_goes_on_past_every_entry_it_leaves_alone(tmp_path: Path, box: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    old: list[str] = []
    kept: list[str] = []
    for _ in range(6):
        old.append(plant_temp(box, "100", age=3600))
        kept.append(plant_temp(box, "100", age=0))  # young
        link = temp_name("5")
        (box / link).symlink_to(outside)
        kept.append(link)
        directory = temp_name("6")
        (box / directory).mkdir()
        os.utime(box / directory, (0, 0))
        kept.append(directory)
    with BoxStore(box) as s:
        assert sorted(s.sweep(older_than=60)) == sorted(old)
    assert sorted(os.listdir(box)) == sorted(kept)


def test_sweep_leaves_a_planted_fifo_alone_without_blocking(box: Path) -> None:
    fifo = temp_name("7")
    os.mkfifo(box / fifo)
    os.utime(box / fifo, (0, 0))
    old = plant_temp(box, "1", age=3600)
    # A sweep that opened the FIFO for reading without O_NONBLOCK would wait for a writer forever.
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the sweep blocked on a FIFO"))
    signal.alarm(20)
    try:
        with BoxStore(box) as s:
            assert s.sweep(older_than=60) == [old]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert os.listdir(box) == [fifo]


@pytest.fixture
def swap_after_lock(box: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Callable[[int], None]]]:
    """Run ``hook["swap"](fd)`` once, right after the sweep has locked the temp open as
    ``fd`` (a race made certain)."""
    hook: dict[str, Callable[[int], None]] = {"swap": lambda fd: None}
    real_try_lock = boxlock.try_lock

    def try_lock(fd: int, *, shared: bool = False) -> bool:
        got = real_try_lock(fd, shared=shared)
        if shared:  # the sweep's lock on a temp it found
            swap, hook["swap"] = hook["swap"], lambda fd: None
            swap(fd)
        return got

    monkeypatch.setattr(boxlock, "try_lock", try_lock)
    yield hook


def test_sweep_never_removes_an_entry_swapped_in_after_it_looked(
    box: Path, swap_after_lock: dict[str, Callable[[int], None]]
) -> None:
    name = plant_temp(box, "100", age=3600)
    newcomer = box / "newcomer"
    newcomer.write_bytes(b"someone else's file")

    def swap(_fd: int) -> None:
        os.rename(newcomer, box / name)

    swap_after_lock["swap"] = swap
    with BoxStore(box) as s:
        assert s.sweep(older_than=60) == []
    assert (box / name).read_bytes() == b"someone else's file"


def test_sweep_never_removes_a_symlink_swapped_in_for_the_temp(
    box: Path, tmp_path: Path, swap_after_lock: dict[str, Callable[[int], None]]
) -> None:
    name = plant_temp(box, "100", age=3600)
    moved = tmp_path / "moved"

    def swap(_fd: int) -> None:
        # The same inode, now reached through a symlink at the temp's name.
        os.rename(box / name, moved)
        (box / name).symlink_to(moved)

    swap_after_lock["swap"] = swap
    with BoxStore(box) as s:
        assert s.sweep(older_than=60) == []
    assert (box / name).is_symlink()
    assert moved.read_bytes() == b"partial"


def test_sweep_survives_a_temp_removed_after_it_looked(
    box: Path, swap_after_lock: dict[str, Callable[[int], None]]
) -> None:
    names = [plant_temp(box, "100", age=3600) for _ in range(5)]
    vanished: list[str] = []

    def remove(fd: int) -> None:
        locked = os.fstat(fd)
        [name] = [n for n in names if os.path.samestat(os.stat(box / n), locked)]
        os.unlink(box / name)
        vanished.append(name)

    swap_after_lock["swap"] = remove
    with BoxStore(box) as s:
        removed = s.sweep(older_than=60)
    assert sorted(removed) == sorted(set(names) - set(vanished))
    assert os.listdir(box) == []


def test_sweep_fsyncs_the_box_only_when_it_removed_something(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    plant_temp(box, "1", age=0)
    with BoxStore(box) as s:
        assert s.sweep(older_than=60) == []
        assert synced == []
        plant_temp(box, "1", age=3600)
        assert len(s.sweep(older_than=60)) == 1
        assert synced == [s.dir_fd]


def test_stale_temps_skips_what_is_not_a_regular_temp(box: Path) -> None:
    name = plant_temp(box, "100", age=120)
    (box / temp_name("1")).mkdir()
    (box / temp_name("2")).symlink_to(box / name)
    with BoxStore(box) as s:
        assert [found for found, _size, _age in s.stale_temps()] == [name]


def test_sweep_goes_on_after_an_entry_swapped_in_after_it_looked(
    box: Path, swap_after_lock: dict[str, Callable[[int], None]]
) -> None:
    names = [plant_temp(box, "100", age=3600) for _ in range(5)]
    newcomer = box / "newcomer"
    newcomer.write_bytes(b"someone else's file")
    swapped: list[str] = []

    def swap(fd: int) -> None:
        locked = os.fstat(fd)
        [name] = [n for n in names if os.path.samestat(os.stat(box / n), locked)]
        os.rename(newcomer, box / name)
        swapped.append(name)

    swap_after_lock["swap"] = swap
    with BoxStore(box) as s:
        removed = s.sweep(older_than=60)
    assert len(swapped) == 1
    assert sorted(removed) == sorted(set(names) - set(swapped))
    assert os.listdir(box) == swapped


def test_sweep_goes_on_after_a_temp_it_cannot_unlink(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [plant_temp(box, "100", age=3600) for _ in range(5)]
    real_unlink = os.unlink
    refused: list[str] = []

    def unlink(name: Any, *args: Any, **kwargs: Any) -> None:
        if not refused:
            refused.append(str(name))
            raise OSError(errno.EACCES, "Permission denied")
        real_unlink(name, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    with BoxStore(box) as s:
        removed = s.sweep(older_than=60)
    assert sorted(removed) == sorted(set(names) - set(refused))
    assert os.listdir(box) == refused


def test_sweep_keeps_a_temp_exactly_as_old_as_the_limit(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = 2_000_000_000
    at_limit = plant_temp(box, "1")
    older = plant_temp(box, "1")
    os.utime(box / at_limit, ns=((now - 60) * 10**9, (now - 60) * 10**9))
    os.utime(box / older, ns=((now - 61) * 10**9, (now - 61) * 10**9))
    monkeypatch.setattr(time, "time", lambda: float(now))
    with BoxStore(box) as s:
        assert s.sweep(older_than=60) == [older]
    assert os.listdir(box) == [at_limit]


def test_stale_temps_reports_a_temp_from_the_future_as_age_zero(box: Path) -> None:
    name = plant_temp(box, "1")
    future = time.time() + 3600
    os.utime(box / name, (future, future))
    with BoxStore(box) as s:
        assert s.stale_temps() == [(name, len(b"partial"), 0.0)]


def test_stale_temps_goes_on_past_a_temp_that_vanished(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [plant_temp(box, "1", age=60) for _ in range(5)]
    real_stat = os.stat
    gone: list[str] = []

    def stat_(name: Any, *args: Any, **kwargs: Any) -> Any:
        if str(name) in names and not gone:
            gone.append(str(name))
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_stat(name, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_)
    with BoxStore(box) as s:
        found = [n for n, _size, _age in s.stale_temps()]
    assert sorted(found) == sorted(set(names) - set(gone))


def test_quota_scan_goes_on_past_an_entry_that_vanished(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(6):
        (box / f"f{i}").write_bytes(b"x" * 100)
    real_scandir = os.scandir
    gone: list[str] = []

    class Entry:
        def __init__(self, entry: os.DirEntry[str], vanish: bool) -> None:
            self.entry, self.name, self.vanish = entry, entry.name, vanish

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            if self.vanish:
                gone.append(self.name)
                raise FileNotFoundError(errno.ENOENT, "No such file or directory")
            return self.entry.stat(follow_symlinks=follow_symlinks)

    class Scan:
        """The first entry of each scan vanishes between readdir and stat."""

        def __init__(self, fd: int) -> None:
            self.it = real_scandir(fd)

        def __enter__(self) -> Iterator[Entry]:
            return (Entry(e, i == 0) for i, e in enumerate(self.it))

        def __exit__(self, *_exc: object) -> None:
            self.it.close()

    monkeypatch.setattr(os, "scandir", Scan)
    with BoxStore(box, quota=500 + 100) as s:  # the five files left are counted
        with pytest.raises(Refused):
            s.begin("a", 101)
        s.begin("a", 100).abort()
    assert len(gone) == 2


def test_a_fully_written_temp_promises_no_more_free_space(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "statvfs", fake_statvfs(lambda: 100 * MiB))
    plant_temp(box, "100", b"x" * 100)  # written whole: on disk already, nothing outstanding
    with BoxStore(box, min_free=MiB) as s:
        with pytest.raises(Refused):
            s.begin("a", 99 * MiB + 1)
        s.begin("a", 99 * MiB).abort()


@pytest.mark.parametrize(("call", "what"), [("scandir", "scan box"), ("listdir", "list box")])
def test_a_box_that_cannot_be_read_is_451_naming_what_failed(
    box: Path, monkeypatch: pytest.MonkeyPatch, call: str, what: str
) -> None:
    def broken(*_a: object, **_k: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with BoxStore(box, quota=10) as s:
        monkeypatch.setattr(os, call, broken)
        with pytest.raises(Refused) as ei:
            s.begin("a", 1) if call == "scandir" else s.sweep(older_than=0)
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert ei.value.detail == f"{what}: Input/output error"


def test_a_name_that_cannot_be_looked_up_is_451_naming_it(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_stat = os.stat

    def stat_(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "a":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_stat(name, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_)
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert ei.value.reply == Reply.LOCAL_ERROR
    assert ei.value.detail == "stat 'a': Permission denied"


def test_a_served_box_takes_its_policy_and_shares_min_free_with_its_siblings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rstash.config import BoxConfig

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    cfg_one = BoxConfig(name="one", path=one, keys=(), min_free=MiB, quota=100 * MiB,
                        on_receive=("true",))
    cfg_two = BoxConfig(name="two", path=two, keys=(), min_free=MiB)
    monkeypatch.setattr(os, "statvfs", fake_statvfs(lambda: 50 * MiB))
    plant_temp(two, str(10 * MiB), b"")  # another box on this file system promised 10 MiB
    with BoxStore.serving(cfg_one, [cfg_one, cfg_two]) as s:
        assert s.path == os.fspath(one)
        assert (s.quota, s.min_free, s.keep_readers) == (100 * MiB, MiB, True)
        with pytest.raises(Refused) as ei:
            s.begin("a", 39 * MiB + 1)
        assert ei.value.reply == Reply.INSUFFICIENT_STORAGE
        s.begin("a", 39 * MiB).abort()
    with BoxStore.serving(cfg_two, [cfg_one, cfg_two]) as s:
        assert s.keep_readers is False


def test_refusal_details_say_which_limit_and_by_how_much(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (box / "old").write_bytes(b"x" * 600)
    with BoxStore(box, quota=1000) as s, pytest.raises(Refused) as ei:
        s.begin("a", 401)
    assert ei.value.detail == "usage 600 + 401 > quota 1000"
    monkeypatch.setattr(os, "statvfs", fake_statvfs(lambda: 10 * MiB))
    with BoxStore(box, min_free=4 * MiB) as s, pytest.raises(Refused) as ei:
        s.begin("a", 7 * MiB)
    assert ei.value.detail == f"free {10 * MiB} (after reservations 0) - {7 * MiB} < min_free {4 * MiB}"
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("../a", 1)
    assert (ei.value.reply, ei.value.detail) == (Reply.NAME_NOT_ALLOWED, "contains '/'")


def test_failing_statvfs_and_box_lock_are_named(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "statvfs", broken)
    with BoxStore(box, min_free=1) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert ei.value.detail == "statvfs: Input/output error"
    monkeypatch.undo()
    real_flock = fcntl.flock

    def flock(fd: int, op: int) -> None:
        if os.path.samestat(os.fstat(fd), os.stat(box)):
            raise OSError(errno.ENOLCK, "No locks available")
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert ei.value.detail == "lock box: No locks available"


def test_min_free_locks_every_box_of_the_file_system_while_it_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rstash.config import BoxConfig

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    cfg_one = BoxConfig(name="one", path=one, keys=(), min_free=1)
    cfg_two = BoxConfig(name="two", path=two, keys=(), min_free=1)
    seen: list[tuple[bool, bool]] = []
    real_statvfs = os.statvfs

    def statvfs(fd: Any) -> Any:
        seen.append((_other_process_could_lock(one), _other_process_could_lock(two)))
        return real_statvfs(fd)

    monkeypatch.setattr(os, "statvfs", statvfs)
    with BoxStore.serving(cfg_one, [cfg_one, cfg_two]) as s:
        s.begin("a", 1).abort()
    assert seen == [(False, False)]


def test_the_64_mib_recheck_of_a_replace_counts_the_file_it_replaces(box: Path) -> None:
    (box / "a").write_bytes(b"o" * MiB)
    # begin: 1 MiB stored + 64 MiB claimed - 1 MiB replaced; at 64 MiB written the
    # claim is 128 MiB, and the old file still frees its 1 MiB: exactly the quota.
    with BoxStore(box, quota=2 * UNKNOWN_RESERVE, overwrite="replace") as s:
        up = s.begin("a", None)
        up.write(b"x" * UNKNOWN_RESERVE)
        assert up.commit() == "a"
    assert (box / "a").stat().st_size == UNKNOWN_RESERVE


def test_the_64_mib_recheck_needs_only_min_free_itself(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    free = {"now": 200 * MiB}
    monkeypatch.setattr(os, "statvfs", fake_statvfs(lambda: free["now"]))
    with BoxStore(box, min_free=10 * MiB) as s:
        up = s.begin("a", None)
        free["now"] = UNKNOWN_RESERVE + 10 * MiB  # after the next 64 MiB promised: min_free exactly
        up.write(b"x" * UNKNOWN_RESERVE)
        assert up.commit() == "a"


def test_begin_details_say_why(box: Path) -> None:
    (box / "taken").write_bytes(b"0")
    with BoxStore(box, max_file_size=10) as s:
        with pytest.raises(Refused) as ei:
            s.begin("taken", 1)
        assert (ei.value.reply, ei.value.detail) == (Reply.EXISTS, "name taken at begin")
        with pytest.raises(Refused) as ei:
            s.begin("big", 11)
        assert (ei.value.reply, ei.value.detail) == (Reply.TOO_LARGE, "11 > max_file_size 10")
        with pytest.raises(ValueError, match=r"^negative size -1$"):
            s.begin("neg", -1)
    assert sorted(os.listdir(box)) == ["taken"]


@pytest.mark.parametrize(("err", "reply"), [(errno.EIO, Reply.LOCAL_ERROR), (errno.ENOSPC, Reply.INSUFFICIENT_STORAGE)])
def test_a_temp_that_cannot_be_created_is_refused_naming_it(
    box: Path, monkeypatch: pytest.MonkeyPatch, err: int, reply: int
) -> None:
    real_open = os.open

    def opener(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(".rstash-tmp-"):
            raise OSError(err, os.strerror(err))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", opener)
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert (ei.value.reply, ei.value.detail) == (reply, f"create temp: {os.strerror(err)}")
    assert os.listdir(box) == []


def test_an_unnamed_temp_that_fails_for_another_reason_than_support_is_refused(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def opener(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == ".":
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", opener)
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert (ei.value.reply, ei.value.detail) == (Reply.LOCAL_ERROR, "create temp: Input/output error")
    assert os.listdir(box) == []


def test_a_failing_temp_lock_is_named(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def try_lock(fd: int, *, shared: bool = False) -> bool:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(boxlock, "try_lock", try_lock)  # the temp's own lock (rstash.boxlock)
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    assert ei.value.detail == "lock temp: No locks available"


def test_sweep_goes_on_past_a_temp_a_live_session_holds(box: Path) -> None:
    old = [plant_temp(box, "100", age=3600) for _ in range(5)]
    with BoxStore(box) as s:
        live = s.begin("a", 1)
        os.utime(live.temp_name, (0, 0), dir_fd=s.dir_fd)
        assert sorted(s.sweep(older_than=60)) == sorted(old)
        assert os.listdir(box) == [live.temp_name]
        live.abort()


def test_a_box_opened_for_reading_only_needs_no_ownership_walk(tmp_path: Path, box: Path) -> None:
    name = plant_temp(box, "3", age=10)
    with BoxStore(box, check_path=False) as s:
        assert [found for found, _size, _age in s.stale_temps()] == [name]
    with pytest.raises(StoreError, match=rf"^cannot open box directory {tmp_path}/nowhere: No such file or directory$"):
        BoxStore(tmp_path / "nowhere", check_path=False)


def test_closing_a_box_twice_is_harmless(box: Path) -> None:
    s = BoxStore(box)
    s.close()
    assert s.dir_fd < 0
    s.close()
    assert s.dir_fd < 0


def test_a_box_path_that_is_a_symlink_is_not_opened_even_for_reading(tmp_path: Path, box: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(box)
    with pytest.raises(StoreError, match="cannot open box directory"):
        BoxStore(link, check_path=False)


def test_only_names_of_the_exact_temp_shape_are_swept(box: Path) -> None:
    lookalikes = [".rstash-tmp-abc.5", f".rstash-tmp-{'z' * 32}.5", f".rstash-tmp-{'0' * 31}.5"]
    for name in lookalikes:
        (box / name).write_bytes(b"not ours")
        os.utime(box / name, (0, 0))
    real = plant_temp(box, "5", age=3600)
    with BoxStore(box) as s:
        assert s.sweep(older_than=60) == [real]
    assert sorted(os.listdir(box)) == sorted(lookalikes)
