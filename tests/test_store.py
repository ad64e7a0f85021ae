"""rstash.store against real files: policies, symlinks, limits, races, sweep."""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rstash import boxlock
from rstash import store as store_mod
from rstash.errors import Reply, StoreError
from rstash.store import UNKNOWN_RESERVE, BoxStore, Refused, SizeMismatch

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


def temps(box: Path) -> list[str]:
    return [n for n in os.listdir(box) if n.startswith(".rstash-tmp-")]


def refused(excinfo: pytest.ExceptionInfo[Refused], code: int, reason: str) -> None:
    assert excinfo.value.reply == code
    assert excinfo.value.reason == reason


@pytest.fixture
def restore_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- storing -----------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o077, 0o000])
def test_stored_file_is_whole_with_file_mode_whatever_the_umask(
    box: Path, restore_umask: None, mask: int
) -> None:
    os.umask(mask)
    data = os.urandom(3 * MiB + 17)
    assert store_file(box, "db.sql.gz", data, file_mode=0o640) == "db.sql.gz"
    assert (box / "db.sql.gz").read_bytes() == data
    assert stat.S_IMODE((box / "db.sql.gz").stat().st_mode) == 0o640
    assert temps(box) == []


def test_temp_stays_private_until_commit(box: Path) -> None:
    with BoxStore(box, file_mode=0o644) as s:
        up = s.begin("a", 3)
        up.write(b"abc")
        st = os.stat(up.temp_name, dir_fd=s.dir_fd)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert not (box / "a").exists()
        up.commit()
    assert stat.S_IMODE((box / "a").stat().st_mode) == 0o644


def test_temp_name_carries_the_announced_size_or_u(box: Path) -> None:
    with BoxStore(box) as s:
        known = s.begin("a", 1234)
        unknown = s.begin("b", None)
        assert store_mod.TEMP_RE.match(known.temp_name)
        assert known.temp_name.endswith(".1234")
        assert unknown.temp_name.endswith(".u")
        assert sorted(temps(box)) == sorted([known.temp_name, unknown.temp_name])


def test_stored_file_mtime_is_arrival_time(box: Path) -> None:
    before = time.time()
    store_file(box, "a", b"x")
    assert (box / "a").stat().st_mtime >= before - 1


@pytest.mark.parametrize("policy", ["refuse", "rename", "replace"])
def test_commit_orders_fsync_file_then_claim_name_then_fsync_dir(
    box: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    calls: list[str] = []
    real_fsync, real_fchmod, real_link, real_rename = os.fsync, os.fchmod, os.link, os.rename

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def fchmod(fd: int, mode: int) -> None:
        calls.append(f"fchmod {mode:o}")
        real_fchmod(fd, mode)

    def link(*args: Any, **kwargs: Any) -> None:
        calls.append("claim")
        real_link(*args, **kwargs)

    def rename(*args: Any, **kwargs: Any) -> None:
        calls.append("rename")
        real_rename(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fchmod", fchmod)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)
    with BoxStore(box, overwrite=policy, file_mode=0o640) as s:
        up = s.begin("a", 4)
        up.write(b"data")
        calls.clear()
        up.commit()
    # replace gives the unnamed verified file a temp name (link), then renames it over.
    claims = ["claim", "rename"] if policy == "replace" else ["claim"]
    assert calls == ["fsync file", "fchmod 640", *claims, "fsync dir"]


def test_abort_removes_the_temp(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 10)
        up.write(b"12345")
        assert temps(box) == [up.temp_name]
        up.abort()
        up.abort()  # idempotent
    assert os.listdir(box) == []


def test_closing_the_store_aborts_unfinished_uploads(box: Path) -> None:
    with BoxStore(box) as s:
        s.begin("a", 10).write(b"1")
    assert os.listdir(box) == []


def test_writing_beyond_the_announced_size_is_refused_and_removes_the_temp(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 4)
        up.write(b"abc")
        with pytest.raises(SizeMismatch):
            up.write(b"de")
        assert os.listdir(box) == []


def test_short_file_is_never_committed(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 4)
        up.write(b"abc")
        with pytest.raises(SizeMismatch):
            up.commit()
    assert os.listdir(box) == []


def test_store_refuses_a_path_as_name(box: Path) -> None:
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("../escape", 1)
    refused(ei, Reply.NAME_NOT_ALLOWED, "name not allowed")
    assert os.listdir(box) == []


def test_box_path_that_is_a_symlink_is_not_opened(tmp_path: Path, box: Path) -> None:
    link = tmp_path / "boxlink"
    link.symlink_to(box)
    with pytest.raises(StoreError):
        BoxStore(link)


# -- policies ----------------------------------------------------------------


def test_refuse_twice_gives_550_the_second_time(box: Path) -> None:
    store_file(box, "a", b"first")
    with pytest.raises(Refused) as ei:
        store_file(box, "a", b"second")
    refused(ei, Reply.EXISTS, "exists")
    assert (box / "a").read_bytes() == b"first"
    assert temps(box) == []


def test_refuse_loses_a_race_at_commit_with_550(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 3)
        up.write(b"new")
        (box / "a").write_bytes(b"racer")
        with pytest.raises(Refused) as ei:
            up.commit()
    refused(ei, Reply.EXISTS, "exists")
    assert (box / "a").read_bytes() == b"racer"
    assert temps(box) == []


def test_replace_overwrites(box: Path) -> None:
    store_file(box, "a", b"old", overwrite="replace")
    store_file(box, "a", b"newer", overwrite="replace")
    assert (box / "a").read_bytes() == b"newer"
    assert sorted(os.listdir(box)) == ["a"]


def test_rename_sequence_puts_the_number_before_the_extension(box: Path) -> None:
    names = [store_file(box, "db.tar.zst", bytes([i]), overwrite="rename") for i in range(3)]
    assert names == ["db.tar.zst", "db~1.tar.zst", "db~2.tar.zst"]
    for i, name in enumerate(names):
        assert (box / name).read_bytes() == bytes([i])


def test_rename_skips_candidates_longer_than_255_bytes(box: Path) -> None:
    name = "a" * 250 + ".zst"  # 254 bytes: every "~N" candidate is too long
    store_file(box, name, b"1", overwrite="rename")
    with pytest.raises(Refused) as ei:  # 550, not 451 ENAMETOOLONG from link()
        store_file(box, name, b"2", overwrite="rename")
    refused(ei, Reply.EXISTS, "exists")
    assert temps(box) == []


def test_rename_uses_every_candidate_that_fits_then_refuses(box: Path) -> None:
    name = "b" * 249 + ".zst"  # 253 bytes: ~1..~9 fit, ~10 is 256 bytes
    stored = [store_file(box, name, b"x", overwrite="rename") for _ in range(10)]
    assert stored[-1] == "b" * 249 + "~9.zst"
    with pytest.raises(Refused) as ei:
        store_file(box, name, b"x", overwrite="rename")
    refused(ei, Reply.EXISTS, "exists")


def test_rename_skips_candidates_the_box_patterns_refuse(box: Path) -> None:
    store_file(box, "db.gz", b"1", overwrite="rename")
    assert store_file(box, "db.gz", b"2", overwrite="rename", deny_names=["*~1.*"]) == "db~2.gz"


def test_link_error_other_than_eexist_is_451_without_rename_fallback(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    for policy in ("refuse", "rename"):
        with pytest.raises(Refused) as ei:
            store_file(box, "a", b"data", overwrite=policy)
        refused(ei, Reply.LOCAL_ERROR, "local error")
        assert os.listdir(box) == []


# -- planted symlinks ----------------------------------------------------------


@pytest.fixture
def planted(tmp_path: Path, box: Path) -> Path:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (box / "a").symlink_to(target)
    return target


def test_refuse_treats_a_planted_symlink_as_existing(box: Path, planted: Path) -> None:
    with pytest.raises(Refused) as ei:
        store_file(box, "a", b"evil")
    refused(ei, Reply.EXISTS, "exists")
    assert planted.read_bytes() == b"precious"
    assert (box / "a").is_symlink()


def test_refuse_treats_a_dangling_symlink_as_existing(tmp_path: Path, box: Path) -> None:
    (box / "a").symlink_to(tmp_path / "nowhere")
    with BoxStore(box) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    refused(ei, Reply.EXISTS, "exists")
    assert not (tmp_path / "nowhere").exists()


def test_refuse_symlink_planted_after_begin_is_not_followed(tmp_path: Path, box: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    with BoxStore(box) as s:
        up = s.begin("b", 4)
        up.write(b"evil")
        (box / "b").symlink_to(target)
        with pytest.raises(Refused) as ei:
            up.commit()
    refused(ei, Reply.EXISTS, "exists")
    assert target.read_bytes() == b"precious"


def test_rename_stores_beside_a_planted_symlink(box: Path, planted: Path) -> None:
    assert store_file(box, "a", b"data", overwrite="rename") == "a~1"
    assert (box / "a~1").read_bytes() == b"data"
    assert (box / "a").is_symlink()
    assert planted.read_bytes() == b"precious"


def test_replace_replaces_the_symlink_entry_not_its_target(box: Path, planted: Path) -> None:
    assert store_file(box, "a", b"data", overwrite="replace") == "a"
    assert not (box / "a").is_symlink()
    assert stat.S_ISREG((box / "a").lstat().st_mode)
    assert (box / "a").read_bytes() == b"data"
    assert planted.read_bytes() == b"precious"


# -- concurrency ---------------------------------------------------------------


def _racer(box: str, policy: str, i: int, barrier: Any, results: Any) -> None:
    data = bytes([i]) * (256 * 1024 + i)
    with BoxStore(box, overwrite=policy) as s:
        # Every process passes begin() before anyone commits, so all ten race
        # for the name at link() time, the moment that must be atomic.
        up = s.begin("race.bin", len(data))
        up.write(data)
        barrier.wait(timeout=30)
        try:
            results.put((i, up.commit()))
        except Refused as exc:
            results.put((i, exc.reply))


def _race(box: Path, policy: str, n: int = 10) -> list[tuple[int, object]]:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(box), policy, i, barrier, results))
             for i in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return got


def test_concurrent_refuse_uploads_of_one_name_store_exactly_one_whole_file(box: Path) -> None:
    got = _race(box, "refuse")
    winners = [(i, r) for i, r in got if r == "race.bin"]
    assert len(winners) == 1
    assert [r for _, r in got if r != "race.bin"] == [Reply.EXISTS] * 9
    i = winners[0][0]
    assert (box / "race.bin").read_bytes() == bytes([i]) * (256 * 1024 + i)
    assert os.listdir(box) == ["race.bin"]


def test_concurrent_rename_uploads_of_one_name_store_ten_distinct_whole_files(
    box: Path,
) -> None:
    got = _race(box, "rename")
    finals = {r for _, r in got}
    assert finals == {"race.bin"} | {f"race~{n}.bin" for n in range(1, 10)}
    for i, final in got:
        assert isinstance(final, str)
        assert (box / final).read_bytes() == bytes([i]) * (256 * 1024 + i)
    assert temps(box) == []


# -- limits --------------------------------------------------------------------


def test_max_file_size_refuses_a_larger_announced_size(box: Path) -> None:
    with BoxStore(box, max_file_size=100) as s:
        with pytest.raises(Refused) as ei:
            s.begin("a", 101)
        refused(ei, Reply.TOO_LARGE, "too large")
        s.begin("b", 100).abort()
    assert os.listdir(box) == []


def test_max_file_size_stops_an_unknown_size_upload(box: Path) -> None:
    with BoxStore(box, max_file_size=100) as s:
        up = s.begin("a", None)
        up.write(b"x" * 100)
        with pytest.raises(Refused) as ei:
            up.write(b"x")
    refused(ei, Reply.TOO_LARGE, "too large")
    assert os.listdir(box) == []


def test_quota_counts_stored_files(box: Path) -> None:
    store_file(box, "a", b"x" * 600)
    with BoxStore(box, quota=1000) as s:
        with pytest.raises(Refused) as ei:
            s.begin("b", 401)
        refused(ei, Reply.TOO_LARGE, "quota")
        s.begin("b", 400).abort()


def test_concurrent_upload_reservation_counts_against_quota(box: Path) -> None:
    with BoxStore(box, quota=1000) as first, BoxStore(box, quota=1000) as second:
        up = first.begin("a", 600)
        up.write(b"x" * 10)  # reserved at 600, not at the 10 bytes written
        with pytest.raises(Refused) as ei:
            second.begin("b", 500)
        refused(ei, Reply.TOO_LARGE, "quota")
        up.abort()
        second.begin("b", 500).abort()


def test_quota_counts_a_replace_as_its_net_change(box: Path) -> None:
    store_file(box, "a", b"x" * 600)
    with BoxStore(box, quota=1000, overwrite="replace") as s:
        s.begin("a", 700).abort()  # 600 - 600 + 700 <= 1000
        with pytest.raises(Refused):
            s.begin("a", 1001)
    with BoxStore(box, quota=1000, overwrite="rename") as s, pytest.raises(Refused) as ei:
        s.begin("a", 700)  # rename keeps the old file: 600 + 700 > 1000
    refused(ei, Reply.TOO_LARGE, "quota")


def test_unknown_size_reserves_written_plus_64_mib(box: Path) -> None:
    with BoxStore(box, quota=UNKNOWN_RESERVE - 1) as s, pytest.raises(Refused) as ei:
        s.begin("a", None)
    refused(ei, Reply.TOO_LARGE, "quota")
    with BoxStore(box, quota=UNKNOWN_RESERVE + 10) as s:
        up = s.begin("a", None)
        up.write(b"x" * 5)
        with pytest.raises(Refused) as ei:
            s.begin("b", 6)  # 5 written + 64 MiB reserved + 6 > quota
        refused(ei, Reply.TOO_LARGE, "quota")
        s.begin("b", 5).abort()
        up.abort()


def test_unknown_size_rechecks_quota_at_each_64_mib(box: Path) -> None:
    chunk = b"x" * MiB
    with BoxStore(box, quota=UNKNOWN_RESERVE + 2 * MiB) as s:
        up = s.begin("a", None)
        for _ in range(UNKNOWN_RESERVE // MiB - 1):
            up.write(chunk)
        with pytest.raises(Refused) as ei:
            up.write(chunk)  # 64 MiB written: the claim becomes 128 MiB
    refused(ei, Reply.TOO_LARGE, "quota")
    assert os.listdir(box) == []


def _fake_statvfs(free: int) -> Callable[[object], SimpleNamespace]:
    return lambda _fd: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096)


def test_min_free_refuses_with_452(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "statvfs", _fake_statvfs(10 * MiB))
    with BoxStore(box, min_free=4 * MiB) as s:
        with pytest.raises(Refused) as ei:
            s.begin("a", 6 * MiB + 1)
        refused(ei, Reply.INSUFFICIENT_STORAGE, "insufficient storage")
        s.begin("a", 6 * MiB).abort()
    assert os.listdir(box) == []


def test_min_free_subtracts_other_uploads_reservations(
    box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "statvfs", _fake_statvfs(10 * MiB))
    with BoxStore(box, min_free=4 * MiB) as first, BoxStore(box, min_free=4 * MiB) as second:
        up = first.begin("a", 5 * MiB)
        up.write(b"x" * MiB)  # 4 MiB still promised
        with pytest.raises(Refused) as ei:
            second.begin("b", 3 * MiB)
        refused(ei, Reply.INSUFFICIENT_STORAGE, "insufficient storage")
        second.begin("b", 2 * MiB).abort()
        up.abort()


def test_min_free_larger_than_the_disk_refuses_for_real(box: Path) -> None:
    free = os.statvfs(box).f_bavail * os.statvfs(box).f_frsize
    with BoxStore(box, min_free=free + 2**40) as s, pytest.raises(Refused) as ei:
        s.begin("a", 1)
    refused(ei, Reply.INSUFFICIENT_STORAGE, "insufficient storage")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: the disk-full test must run")
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_disk_full_is_452_and_leaves_no_temp(tiny_fs: Path) -> None:
    with BoxStore(tiny_fs) as s:
        up = s.begin("big", 2 * MiB)
        with pytest.raises(Refused) as ei:
            for _ in range(32):
                up.write(b"x" * (64 * 1024))
            up.commit()
        refused(ei, Reply.INSUFFICIENT_STORAGE, "insufficient storage")
        assert os.listdir(tiny_fs) == []
        up2 = s.begin("small", 5)
        up2.write(b"hello")
        assert up2.commit() == "small"
    assert (tiny_fs / "small").read_bytes() == b"hello"


# -- sweep and stale temps -----------------------------------------------------


def _temp(box: Path, size: str, age: float) -> str:
    name = f".rstash-tmp-{os.urandom(16).hex()}.{size}"
    (box / name).write_bytes(b"partial")
    past = time.time() - age
    os.utime(box / name, (past, past))
    return name


def _hold_lock(path: str, ready: Any, release: Any) -> None:
    # What a live session holds on its temp, on any receiver: an exclusive OFD lock.
    fd = os.open(path, os.O_RDWR)
    assert boxlock.try_lock(fd)
    ready.set()
    release.wait(timeout=60)


def test_sweep_removes_only_old_unlocked_temps(tmp_path: Path, box: Path) -> None:
    old = _temp(box, "100", age=3600)
    young = _temp(box, "100", age=0)
    locked = _temp(box, "u", age=3600)
    lookalike = ".rstash-tmp-notatemp"
    (box / lookalike).write_bytes(b"")
    (box / "stored.tar").write_bytes(b"keep")
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    symlinked = f".rstash-tmp-{'0' * 32}.5"
    (box / symlinked).symlink_to(outside)
    for name in (lookalike, "stored.tar"):
        os.utime(box / name, (0, 0))
    os.utime(box / symlinked, (0, 0), follow_symlinks=False)

    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(box / locked), ready, release))
    holder.start()
    try:
        assert ready.wait(timeout=30)
        with BoxStore(box) as s:
            assert s.sweep(older_than=60) == [old]
    finally:
        release.set()
        holder.join(timeout=30)
    assert sorted(os.listdir(box)) == sorted([young, locked, lookalike, "stored.tar", symlinked])
    assert outside.read_bytes() == b"keep"


def test_sweep_never_removes_a_live_uploads_temp(box: Path) -> None:
    with BoxStore(box) as s:
        up = s.begin("a", 10)
        os.utime(up.temp_name, (0, 0), dir_fd=s.dir_fd)
        assert s.sweep(older_than=0) == []
        up.write(b"x" * 10)
        assert up.commit() == "a"


def test_stale_temps_reports_size_and_age(box: Path) -> None:
    name = _temp(box, "100", age=120)
    (box / "stored").write_bytes(b"x")
    with BoxStore(box) as s:
        [(found, size, age)] = s.stale_temps()
    assert found == name
    assert size == len(b"partial")
    assert 119 <= age <= 180


def test_world_writable_box_is_refused(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    box.chmod(0o777)
    with pytest.raises(StoreError, match="world-writable"):
        BoxStore(box)
