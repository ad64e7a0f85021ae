"""Which file system primitives hold cluster-wide on GlusterFS, proven through two FUSE mounts.

Each mount is a separate GlusterFS client, as on two receiver hosts; processes on both race for
the same names. A test asserts what the design of several receivers on one volume relies on
(docs/scaling-design.md), so it fails the day the primitive stops holding; where a primitive does
*not* hold, the test asserts that too, so the design cannot quietly start relying on it.

Findings these tests pin (GlusterFS 10.3, FUSE, both layouts):

- ``link()`` and ``O_CREAT|O_EXCL`` onto one name: exactly one winner, the others EEXIST.
- ``rename()`` over an existing name: readers on the other mount see the old or the new file, whole.
- ``fcntl`` byte-range locks (classic and OFD) and ``flock()`` on a regular file conflict across
  mounts, are released when the holder dies, and (unlike local Linux) ``flock`` and ``fcntl``
  locks conflict with each other.
- ``flock()`` on a *directory* is node-local: it excludes processes on the same mount only. The
  single-host store serialises reservations exactly that way, which is not enough on a volume.
- ``O_TMPFILE`` is not supported (EOPNOTSUPP); ``linkat`` of /proc/self/fd/N fails (EXDEV).
- An open through B of a name just replaced through A may fail with ESTALE; a retry succeeds.
- Another mount sees a new mtime only after the attribute cache times out (1 s by default).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import multiprocessing
import os
import signal
import struct
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gluster_support import GlusterVolume

#: Processes racing per round, alternating between the two mounts.
RACERS = 6
#: Rounds of each race: each uses fresh names, so they hash to either brick (distribute).
ROUNDS = 40
#: FUSE attribute and entry timeout of glusterfs mounts (mount.glusterfs default), in seconds.
ATTR_TIMEOUT = 1.0
#: Bound on every wait for another mount or a lock holder.
WAIT = 10.0

F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)


@pytest.fixture
def area(gluster: GlusterVolume, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """One fresh directory of the volume, as seen through mount A and through mount B."""
    sub = request.node.name.replace("[", "-").replace("]", "")
    a = gluster.mounts[0] / sub
    a.mkdir()
    b = gluster.mounts[1] / sub
    assert _eventually(b.is_dir), f"{b}: a directory made through mount A is not seen through B"
    return a, b


def _reads_one_of(path: Path, valid: set[bytes]) -> bool:
    return _read_whole(path) in valid


def _has_no_temps(side: Path) -> bool:
    return not list(side.glob("tmp-*"))


def _eventually(check: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return True
        except OSError:
            pass  # ENOENT or ESTALE through a mount whose caches have not expired yet
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _race(dirs: tuple[Path, Path], attempt: Callable[[Path, int, int], str],
          prepare: Callable[[Path, int, int], None] | None = None) -> list[list[tuple[int, str]]]:
    """Run ``attempt(dir, round, racer)`` in RACERS processes at once, ROUNDS times.

    Racer i works through mount i % 2. ``prepare`` runs before the barrier (not timed against the
    others). Returns, per round, the (racer, outcome) of each.
    """
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(RACERS)
    results: Any = ctx.Queue()

    def racer(i: int) -> None:
        d = dirs[i % 2]
        out = []
        for r in range(ROUNDS):
            if prepare is not None:
                prepare(d, r, i)
            barrier.wait(WAIT)
            try:
                outcome = attempt(d, r, i)
            except OSError as exc:
                outcome = f"error {errno.errorcode.get(exc.errno or 0, exc.errno)}"
            out.append((r, outcome))
        results.put((i, out))

    procs = [ctx.Process(target=racer, args=(i,)) for i in range(RACERS)]
    for p in procs:
        p.start()
    rounds: list[list[tuple[int, str]]] = [[] for _ in range(ROUNDS)]
    try:
        for _ in procs:
            i, out = results.get(timeout=120)
            for r, outcome in out:
                rounds[r].append((i, outcome))
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return rounds


def _payload(r: int, i: int) -> bytes:
    # Big enough to span several FUSE writes, so a torn file would show.
    return (f"round {r} racer {i}\n".encode()) * 20000


def _read_whole(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _whose(content: bytes) -> str:
    """Which payload ``content`` is, for short failure messages."""
    first = content.split(b"\n", 1)[0].decode(errors="replace")
    whole = content == first.encode() + b"\n" + (first.encode() + b"\n") * 19999
    return f"{first!r}{'' if whole else f' torn ({len(content)} bytes)'}"


# --------------------------------------------------------------------------- atomic claims


def _check_one_winner(area: tuple[Path, Path], rounds: list[list[tuple[int, str]]],
                      name: str) -> None:
    for r, outcomes in enumerate(rounds):
        winners = [i for i, o in outcomes if o == "won"]
        assert len(winners) == 1, f"round {r}: {outcomes}"
        assert all(o in ("won", "exists") for _, o in outcomes), f"round {r}: {outcomes}"
        for side in area:
            # Through the other client the size may be stale for ATTR_TIMEOUT (a loser's lookup
            # cached it), so the winner's bytes are awaited, not expected at once.
            path = side / name.format(r=r)
            expected = _payload(r, winners[0])
            assert _eventually(partial(_reads_one_of, path, {expected})), \
                f"round {r}: {side.name} reads {_whose(_read_whole(path))}, not racer {winners[0]}'s"


def test_link_onto_a_name_has_exactly_one_winner_across_mounts(area: tuple[Path, Path]) -> None:
    """rstash's refuse and rename policies claim a name with link() (store.py).

    The temps are named ``.NAME.RANDOM``: DHT's default ``cluster.rsync-hash-regex`` hashes such
    a name as NAME, so temp and final name live on one brick and the brick's own link() decides.
    With temps hashed elsewhere, DHT links across bricks through a link file, and that is not
    atomic across clients: measured on the distribute layout, 1 round in 200 had two winners and
    some attempts failed with ENODATA. The test below (a lock around link) is what the design uses.
    """

    def prepare(d: Path, r: int, i: int) -> None:
        (d / f".name-{r}.{i:02x}").write_bytes(_payload(r, i))

    def attempt(d: Path, r: int, i: int) -> str:
        try:
            os.link(d / f".name-{r}.{i:02x}", d / f"name-{r}")
        except FileExistsError:
            return "exists"
        return "won"

    _check_one_winner(area, _race(area, attempt, prepare), "name-{r}")


def test_link_under_a_lock_has_exactly_one_winner_whatever_the_temp_name(
        area: tuple[Path, Path]) -> None:
    """The commit lock of the design: an OFD lock on one regular file of the box around link().

    Temps with random names (the single-host store's ``.rstash-tmp-HEX.SIZE``) hash to any brick.
    """

    def prepare(d: Path, r: int, i: int) -> None:
        (d / f".rstash-tmp-{secrets_hex(r, i)}.1").write_bytes(_payload(r, i))
        (d / ".rstash-lock").touch()

    def attempt(d: Path, r: int, i: int) -> str:
        fd = os.open(d / ".rstash-lock", os.O_RDWR)
        try:
            fcntl.fcntl(fd, F_OFD_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
            try:
                os.link(d / f".rstash-tmp-{secrets_hex(r, i)}.1", d / f"name-{r}")
            except FileExistsError:
                return "exists"
            return "won"
        finally:
            os.close(fd)  # releases the OFD lock

    _check_one_winner(area, _race(area, attempt, prepare), "name-{r}")


def secrets_hex(r: int, i: int) -> str:
    """A temp-like hex name, distinct per round and racer, spread over the bricks by hash."""
    return hashlib.sha256(f"{r}/{i}".encode()).hexdigest()[:32]


def test_exclusive_create_has_exactly_one_winner_across_mounts(area: tuple[Path, Path]) -> None:
    """The replay cache in cluster_dir claims a nonce with O_CREAT|O_EXCL."""

    def attempt(d: Path, r: int, i: int) -> str:
        try:
            fd = os.open(d / f"nonce-{r}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return "exists"
        try:
            os.write(fd, _payload(r, i))
            os.fsync(fd)
        finally:
            os.close(fd)
        return "won"

    _check_one_winner(area, _race(area, attempt), "nonce-{r}")


def test_concurrent_renames_onto_one_name_under_a_lock_leave_one_whole_file(
        area: tuple[Path, Path]) -> None:
    """Replace policy: rename() from both mounts, under the commit lock; one whole upload remains.

    Without the lock, on the distribute layout, six processes renaming onto one name from two
    mounts hung in the kernel waiting for GlusterFS (FUSE requests unanswered for over 14 minutes,
    then killed): DHT turns a rename into link + unlink under locks that can deadlock between
    clients (gluster/glusterfs#3089, open). Renames in a box are therefore serialised cluster-wide.
    """

    def prepare(d: Path, r: int, i: int) -> None:
        (d / f"tmp-{r}-{i}").write_bytes(_payload(r, i))
        (d / ".rstash-lock").touch()

    def attempt(d: Path, r: int, i: int) -> str:
        fd = os.open(d / ".rstash-lock", os.O_RDWR)
        try:
            fcntl.fcntl(fd, F_OFD_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
            os.rename(d / f"tmp-{r}-{i}", d / f"target-{r}")
        finally:
            os.close(fd)  # releases the OFD lock
        return "renamed"

    rounds = _race(area, attempt, prepare)
    for r, outcomes in enumerate(rounds):
        assert all(o == "renamed" for _, o in outcomes), f"round {r}: {outcomes}"
        for side in area:
            path = side / f"target-{r}"
            valid = {_payload(r, i) for i in range(RACERS)}
            assert _eventually(partial(_reads_one_of, path, valid)), \
                f"round {r}: {side.name} reads {_whose(_read_whole(path))}"
    for side in area:
        assert _eventually(partial(_has_no_temps, side)), "a renamed temp is still there"
        names = sorted(p.name for p in side.iterdir() if p.name != ".rstash-lock")
        assert names == sorted(f"target-{r}" for r in range(ROUNDS))


def test_rename_replace_is_atomic_for_a_reader_on_the_other_mount(area: tuple[Path, Path]) -> None:
    """Replace policy: a reader through B never reads a mix of versions, and sees the last one.

    Recorded, not relied on by rstash (it never reads a box): while A keeps replacing the name,
    most opens through B fail with ESTALE, and on the distribute layout also ENOENT, until B's
    entry cache (1 s) expires. Consumers of a replace box on another host must retry both.
    """
    a, b = area
    versions = 100
    (a / "target").write_bytes(_payload(0, 0))
    assert _eventually((b / "target").exists)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    seen: Any = ctx.Queue()
    valid = {_payload(v, 0) for v in range(versions)}

    def reader() -> None:
        reads, stale, bad = 0, 0, []
        while not stop.is_set():
            try:
                content = _read_whole(b / "target")
            except OSError as exc:
                if exc.errno in (errno.ESTALE, errno.ENOENT):
                    stale += 1
                else:
                    bad.append(f"open/read: {errno.errorcode.get(exc.errno or 0)}")
                continue
            reads += 1
            if content not in valid:
                bad.append(f"torn: {_whose(content)}")
        seen.put((reads, stale, bad[:5], len(bad)))

    readers = [ctx.Process(target=reader) for _ in range(2)]
    for p in readers:
        p.start()
    try:
        for v in range(1, versions):
            tmp = a / f"tmp-{v}"
            tmp.write_bytes(_payload(v, 0))
            os.rename(tmp, a / "target")
    finally:
        stop.set()
        reports = [seen.get(timeout=60) for _ in readers]
        for p in readers:
            p.join(5)
    for reads, stale, sample, nbad in reports:
        assert reads > 0, f"the reader never read the file ({stale} ESTALE/ENOENT)"
        assert nbad == 0, f"{nbad} bad reads of {reads + nbad}, e.g. {sample}"
    last = _payload(versions - 1, 0)
    assert _read_whole(a / "target") == last, _whose(_read_whole(a / "target"))
    assert _eventually(lambda: _read_whole(b / "target") == last), _whose(_read_whole(b / "target"))


# --------------------------------------------------------------------------- locks


def _holder(path: Path, lock: Callable[[int], None], flags: int = os.O_RDWR) -> tuple[int, int]:
    """A child process that opens ``path``, takes ``lock`` and sleeps; (pid, read end of a pipe).

    The child writes one byte once it holds the lock (or "E" if it could not take it).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            fd = os.open(path, flags)
            lock(fd)
            os.write(w, b"L")
        except OSError:
            os.write(w, b"E")
            os._exit(1)
        time.sleep(60)
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    if got != b"L":
        os.waitpid(pid, 0)
        raise AssertionError(f"{path}: the holder could not take its lock")
    return pid, -1


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _conflicts(path: Path, lock: Callable[[int], None], flags: int = os.O_RDWR) -> bool:
    """Whether taking ``lock`` on ``path`` fails with EAGAIN/EACCES right now (never waits)."""
    fd = os.open(path, flags)
    try:
        lock(fd)
    except OSError as exc:
        assert exc.errno in (errno.EAGAIN, errno.EACCES), exc
        return True
    finally:
        os.close(fd)  # releases what we took: close drops our fcntl and flock locks
    return False


def _posix(start: int = 0, length: int = 0) -> Callable[[int], None]:
    return lambda fd: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)


def _ofd(start: int = 0, length: int = 0) -> Callable[[int], None]:
    def take(fd: int) -> None:
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
    return take


def _flock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


LOCKS = {"posix": _posix(), "ofd": _ofd(), "flock": _flock}


@pytest.mark.parametrize("kind", sorted(LOCKS))
def test_a_lock_taken_through_one_mount_excludes_the_other_until_its_holder_dies(
        area: tuple[Path, Path], kind: str) -> None:
    """Temp liveness: a sweeping receiver must see another receiver's live temp as locked."""
    a, b = area
    (a / "temp").write_bytes(b"x" * 100)
    lock = LOCKS[kind]
    pid, _ = _holder(a / "temp", lock)
    try:
        assert _conflicts(b / "temp", lock), f"{kind} lock through A does not exclude B"
        assert _conflicts(a / "temp", lock), f"{kind} lock does not exclude another process on A"
    finally:
        _kill(pid)
    # A receiver killed mid-file: its lock goes with it, so a later sweep anywhere can proceed.
    assert _eventually(lambda: not _conflicts(b / "temp", lock), timeout=5.0), \
        f"{kind} lock of a killed process still held"


def test_byte_range_locks_are_honoured_per_range_across_mounts(area: tuple[Path, Path]) -> None:
    a, b = area
    (a / "ranges").write_bytes(b"x" * 100)
    pid, _ = _holder(a / "ranges", _posix(0, 10))
    try:
        assert _conflicts(b / "ranges", _posix(5, 10)), "overlapping range not excluded"
        assert not _conflicts(b / "ranges", _posix(10, 10)), "disjoint range excluded"
        assert _conflicts(b / "ranges", _ofd(0, 1)), "OFD lock not excluded by a POSIX lock"
    finally:
        _kill(pid)


def test_flock_and_fcntl_locks_conflict_on_glusterfs_unlike_local_linux(
        area: tuple[Path, Path]) -> None:
    """Recorded, not relied on: Linux keeps the two lock kinds apart, GlusterFS does not."""
    a, b = area
    (a / "mixed").write_bytes(b"x")
    pid, _ = _holder(a / "mixed", _flock)
    try:
        assert _conflicts(b / "mixed", _posix()), "flock through A did not exclude fcntl through B"
    finally:
        _kill(pid)


def test_flock_on_a_directory_is_node_local(area: tuple[Path, Path]) -> None:
    """Not cluster-wide: FUSE keeps directory flocks in the local kernel.

    The single-host store serialises quota and min_free reservations with flock on the box
    directory; on a shared volume two receivers would both pass the check. The reservation lock
    must be a lock on a regular file (proven above) instead.
    """
    a, b = area
    flags = os.O_RDONLY | os.O_DIRECTORY
    pid, _ = _holder(a, _flock, flags)
    try:
        assert _conflicts(a, _flock, flags), "directory flock does not even exclude the same mount"
        assert not _conflicts(b, _flock, flags), \
            "directory flock now excludes the other mount: revisit the reservation design"
    finally:
        _kill(pid)


def test_a_lock_is_released_when_the_holding_client_dies(gluster: GlusterVolume,
                                                         area: tuple[Path, Path]) -> None:
    """A receiver host that dies (its GlusterFS client gone) must not keep its temps locked."""
    a, b = area
    (a / "orphan").write_bytes(b"x")
    third = gluster.mount(gluster.root / "mnt" / f"c-{gluster.layout}")
    client = gluster.client_pid(third)
    assert client is not None
    sub = a.name
    assert _eventually((third / sub / "orphan").exists)
    pid, _ = _holder(third / sub / "orphan", _posix())
    try:
        assert _conflicts(b / "orphan", _posix())
        os.kill(client, signal.SIGKILL)
        # The bricks drop the locks of a client whose connection closed.
        assert _eventually(lambda: not _conflicts(b / "orphan", _posix()), timeout=WAIT), \
            "the lock of a dead client is still held"
    finally:
        _kill(pid)


# --------------------------------------------------------------------------- the rest


def test_o_tmpfile_is_not_supported(area: tuple[Path, Path]) -> None:
    """Temps must be named files (swept by name); an unnamed temp + linkat is not available."""
    a, _ = area
    with pytest.raises(OSError) as caught:
        fd = os.open(a, os.O_TMPFILE | os.O_WRONLY, 0o600)
        os.close(fd)
    assert caught.value.errno == errno.EOPNOTSUPP


def test_link_through_proc_fd_of_an_open_temp_fails_with_exdev(area: tuple[Path, Path]) -> None:
    """linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: refused on a GlusterFS FUSE mount.

    With O_TMPFILE unsupported too, a temp cannot be born unnamed and named at commit: temps are
    named files, claimed with link() by name (as today) and swept by name.
    """
    a, b = area
    fd = os.open(a / "named-temp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"payload")
        os.fsync(fd)
        with pytest.raises(OSError) as caught:
            os.link(f"/proc/self/fd/{fd}", a / "final", follow_symlinks=True)
        assert caught.value.errno == errno.EXDEV
        os.link(a / "named-temp", a / "final")  # by name it works
    finally:
        os.close(fd)
    assert _eventually((b / "final").exists)
    assert _read_whole(b / "final") == b"payload"


def test_fsynced_data_and_names_are_visible_through_the_other_mount(area: tuple[Path, Path]) -> None:
    a, b = area
    data = os.urandom(1 << 20)
    fd = os.open(a / "durable", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(a, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # a directory fsync must succeed: store.sync_dir relies on it
        libc_syncfs = _syncfs()
        assert libc_syncfs(dfd) == 0
    finally:
        os.close(dfd)
    assert _read_whole(b / "durable") == data
    # In-place rewrite through A (rstash never does one: stored files are never rewritten): B's
    # page cache may serve the old bytes until its attribute cache expires, not longer.
    fd = os.open(a / "durable", os.O_WRONLY)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _eventually(lambda: _read_whole(b / "durable")[:4096] == b"\0" * 4096), \
        "B still reads the old bytes after the attribute timeout"


def _syncfs() -> Callable[[int], int]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return lambda fd: int(libc.syncfs(fd))


def test_times_agree_between_mounts_after_the_attribute_timeout(area: tuple[Path, Path]) -> None:
    """A lease renewed by mtime is seen by another receiver within ATTR_TIMEOUT, not at once."""
    a, b = area
    (a / "lease").write_bytes(b"x")
    assert _eventually((b / "lease").exists)
    os.stat(b / "lease")  # B caches the attributes now
    os.utime(a / "lease", (1_000_000_000, 1_000_000_000))
    started = time.monotonic()
    assert _eventually(lambda: os.stat(b / "lease").st_mtime == 1_000_000_000, timeout=WAIT)
    lag = time.monotonic() - started
    assert lag <= ATTR_TIMEOUT + 1.0, f"B saw the new mtime after {lag:.2f} s"
    # Once caches expire both mounts agree on mtime and ctime to the nanosecond.
    time.sleep(ATTR_TIMEOUT + 0.2)
    sa, sb = os.stat(a / "lease"), os.stat(b / "lease")
    assert (sa.st_mtime_ns, sa.st_ctime_ns) == (sb.st_mtime_ns, sb.st_ctime_ns)
    # A write stamps the writer's current time (ctime feature: the client's clock).
    before = time.time()
    with open(a / "lease", "ab") as f:
        f.write(b"y")
    assert before - 1 <= os.stat(a / "lease").st_mtime <= time.time() + 1


def test_free_space_is_the_same_from_both_mounts_and_follows_writes(
        gluster: GlusterVolume, area: tuple[Path, Path]) -> None:
    """min_free is checked with statvfs: both receivers must see the same, current figure."""
    a, b = area

    def free(p: Path) -> int:
        st = os.statvfs(p)
        return st.f_bavail * st.f_frsize

    slack = 32 * 2**20  # other processes on this machine write to the same disk
    brick_fs = free(gluster.bricks[0])
    assert abs(free(a) - free(b)) < slack
    if gluster.layout == "distribute":
        # Both bricks share one file system here: DHT counts it once (it compares f_fsid). On
        # separate disks it reports the sum of the bricks, while a file lands on one of them.
        assert abs(free(b) - brick_fs) < slack
    before = free(b)
    size = 256 * 2**20
    with open(a / "big", "wb") as f:
        chunk = b"\xa5" * (1 << 20)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    # At least one copy's worth: the replica's second copy lands on the same disk here, but which
    # brick's statvfs a replica reports is GlusterFS's choice.
    assert _eventually(lambda: before - free(b) >= size - slack, timeout=WAIT), \
        f"B's free space dropped by {before - free(b)}, not {size}, after a write through A"
