"""The replay cache fails closed, the delivery log fails open (rstash(7) rule 2, rstash-recv(8) FILES).

Every test uses a real SQLite file under tmp_path; time is injected.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rstash import replay, state, statedir
from rstash.errors import ClockSkew, ReplayRefused, Reply, StateUnavailable
from rstash.state import StateDB
from rstash.statedir import check_state_dir, fstype_of, parse_mountinfo

NOBODY = 65534
T0 = 1_000_000
WINDOW = 300
IS_ROOT = os.geteuid() == 0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.t = now

    def __call__(self) -> float:
        return self.t


def make_state_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    return make_state_dir(tmp_path / "state")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(sdir: Path, clock: Clock) -> Iterator[StateDB]:
    with StateDB(sdir, now=clock) as d:
        yield d


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is 0700 root when run as root)."""
    base = Path(tempfile.mkdtemp(prefix="rstash-state-"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def nonce(n: int) -> bytes:
    return n.to_bytes(32, "big")


def run_as_nobody(fn: Callable[[], bool]) -> bool:
    """fn() in a forked child with uid/gid nobody when we are root, else in this process."""
    if not IS_ROOT:
        return fn()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = 0 if fn() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)
    for p in path.iterdir():
        os.chown(p, uid, uid)


# --- replay cache ------------------------------------------------------------------------


def test_fresh_nonce_is_accepted_and_committed_before_returning(db: StateDB, sdir: Path,
                                                               clock: Clock) -> None:
    db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    # A second, independent connection sees the row while the first is still open.
    with StateDB(sdir, now=clock) as other, pytest.raises(ReplayRefused):
        other.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)


def test_replayed_nonce_is_refused(db: StateDB) -> None:
    db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    with pytest.raises(ReplayRefused) as info:
        db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    assert info.value.reply == Reply.REPLAYED


def test_replayed_nonce_is_refused_after_reopening(sdir: Path, clock: Clock) -> None:
    with StateDB(sdir, now=clock) as first:
        first.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    with StateDB(sdir, now=clock) as second, pytest.raises(ReplayRefused):
        second.check_replay("vm1", nonce(1), T0 + 20, WINDOW, mark=None)


def test_same_nonce_on_another_box_is_accepted(db: StateDB) -> None:
    db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    db.check_replay("vm2", nonce(1), T0 + 10, WINDOW, mark=None)


@pytest.mark.parametrize(("offset", "skew"), [(WINDOW + 1, WINDOW + 1), (-WINDOW - 1, -WINDOW - 1)])
def test_time_outside_window_is_clock_skew_with_its_sign(db: StateDB, clock: Clock, offset: int,
                                                         skew: int) -> None:
    clock.t = T0 + 1000
    with pytest.raises(ClockSkew) as info:
        db.check_replay("vm1", nonce(1), T0 + 1000 + offset, WINDOW, mark=None)
    assert info.value.skew == skew
    assert info.value.reply == Reply.CLOCK_SKEW
    assert info.value.message == f"clock skew {skew:+d} s"


def test_time_at_the_edge_of_the_window_is_accepted(db: StateDB, clock: Clock) -> None:
    db.status()  # creates the cache at T0
    clock.t = T0 + 1000
    db.check_replay("vm1", nonce(1), T0 + 1000 + WINDOW, WINDOW, mark=None)
    db.check_replay("vm1", nonce(2), T0 + 1000 - WINDOW, WINDOW, mark=None)


def test_pruning_raises_the_floor_so_a_pruned_nonce_stays_refused(db: StateDB,
                                                                  clock: Clock) -> None:
    db.check_replay("vm1", nonce(1), T0 + 50, WINDOW, mark=None)
    clock.t = T0 + 1000
    # This call prunes nonce 1 (t < now - window) and must raise vm1's floor to T0 + 50.
    db.check_replay("vm1", nonce(2), T0 + 1000, WINDOW, mark=None)
    # A wider window (config reload, or a clock stepped back) brings T0 + 50 back in range:
    # the nonce row is gone, only the floor remembers it.
    with pytest.raises(ReplayRefused, match="floor"):
        db.check_replay("vm1", nonce(1), T0 + 50, 2000, mark=None)
    with pytest.raises(ReplayRefused, match="floor"):
        db.check_replay("vm1", nonce(3), T0 + 49, 2000, mark=None)
    db.check_replay("vm1", nonce(4), T0 + 51, 2000, mark=None)
    # The floor is per box.
    db.check_replay("vm2", nonce(1), T0 + 50, 2000, mark=None)


def test_pruning_keeps_live_nonces(db: StateDB, clock: Clock) -> None:
    db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    clock.t = T0 + 200
    db.check_replay("vm1", nonce(2), T0 + 200, WINDOW, mark=None)
    with pytest.raises(ReplayRefused):
        db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)


def test_too_many_live_rows_fails_closed_and_stores_nothing(db: StateDB) -> None:
    for i in range(3):
        db.check_replay("vm1", nonce(i), T0 + 10, WINDOW, max_rows=3, mark=None)
    with pytest.raises(StateUnavailable, match="full") as info:
        db.check_replay("vm1", nonce(3), T0 + 10, WINDOW, max_rows=3, mark=None)
    assert info.value.reply == Reply.LOCAL_ERROR
    db.check_replay("vm2", nonce(3), T0 + 10, WINDOW, max_rows=3, mark=None)  # per box
    db.check_replay("vm1", nonce(3), T0 + 10, WINDOW, max_rows=4, mark=None)  # it was not inserted


def test_corrupt_database_fails_closed_for_replay_and_open_for_log(sdir: Path,
                                                                   clock: Clock) -> None:
    (sdir / state.DB_NAME).write_bytes(b"this is not an SQLite database\n" * 200)
    with StateDB(sdir, now=clock) as d:
        with pytest.raises(StateUnavailable):
            d.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
        assert d.log_event(box="vm1", name="a", outcome="stored", code=250) is False
        assert d.last_error is not None
        with pytest.raises(StateUnavailable):
            d.status()
    with StateDB(sdir, readonly=True, now=clock) as ro, pytest.raises(StateUnavailable):
        ro.status()


def test_sqlite_error_in_the_replay_path_is_never_success(db: StateDB,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)

    def boom(conn: sqlite3.Connection, box: str, mark: object) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(replay, "box_floor", boom)
    with pytest.raises(StateUnavailable, match="disk I/O error"):
        db.check_replay("vm1", nonce(2), T0 + 10, WINDOW, mark=None)
    monkeypatch.undo()
    db.check_replay("vm1", nonce(2), T0 + 10, WINDOW, mark=None)  # rolled back, connection still usable


def test_read_only_state_dir_mode_fails_closed(sdir: Path, clock: Clock) -> None:
    sdir.chmod(0o500)
    with StateDB(sdir, now=clock) as d, pytest.raises(StateUnavailable, match="0500"):
        d.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)


def test_unwritable_database_fails_closed_even_past_the_dir_check(
        shared_tmp: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    sdir = make_state_dir(shared_tmp / "state")
    with StateDB(sdir, now=clock) as d:
        d.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    if IS_ROOT:
        chown_tree(sdir, NOBODY)
    sdir.chmod(0o500)
    # Isolate the SQLite failure: pretend the directory passed check_state_dir.
    monkeypatch.setattr(replay, "check_state_dir", lambda *a, **k: None)

    def attempt() -> bool:
        with StateDB(sdir, now=clock) as d:
            try:
                d.check_replay("vm1", nonce(2), T0 + 10, WINDOW, mark=None)
            except StateUnavailable:
                return d.log_event(box="vm1", name="a", outcome="stored", code=250) is False
            return False

    assert run_as_nobody(attempt)


def test_unsafe_state_dir_fails_closed(tmp_path: Path, clock: Clock) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    with StateDB(loose, now=clock) as d, pytest.raises(StateUnavailable, match="0755"):
        d.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    assert not (loose / state.DB_NAME).exists()


def test_wal_synchronous_full_and_busy_timeout_are_set(db: StateDB, sdir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    statements: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)  # type: ignore[call-overload]
        conn.set_trace_callback(statements.append)
        return conn  # type: ignore[no-any-return]

    monkeypatch.setattr(sqlite3, "connect", traced)
    db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    # Many builds already default to FULL, so also check that it is asked for.
    assert any(re.fullmatch(r"PRAGMA synchronous\s*=\s*(FULL|2)", s, re.I) for s in statements)
    conn = db._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    other = sqlite3.connect(sdir / state.DB_NAME)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
    finally:
        other.close()


def _race(sdir: str, start: float, barrier: multiprocessing.synchronize.Barrier,
          results: multiprocessing.queues.Queue[str]) -> None:
    with StateDB(sdir) as d:  # made after fork, as the server does
        barrier.wait()
        try:
            d.check_replay("vm1", b"\x42" * 32, int(start) + 5, WINDOW, mark=None)
            results.put("accepted")
        except ReplayRefused:
            results.put("replayed")
        except StateUnavailable as exc:
            results.put(f"unavailable: {exc}")


def test_concurrent_checks_of_one_nonce_accept_exactly_one(sdir: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    results: multiprocessing.queues.Queue[str] = ctx.Queue()
    start = time.time()
    procs = [ctx.Process(target=_race, args=(str(sdir), start, barrier, results))
             for _ in range(8)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert outcomes == ["accepted"] + ["replayed"] * 7


def test_connection_inherited_across_fork_is_replaced(db: StateDB) -> None:
    db.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    parent_conn = db._conn
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = False
        try:
            db.check_replay("vm1", nonce(2), T0 + 10, WINDOW, mark=None)
            ok = db._conn is not parent_conn
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(ReplayRefused):  # the child's commit is visible to the parent
        db.check_replay("vm1", nonce(2), T0 + 10, WINDOW, mark=None)


def test_read_only_handle_refuses_replay_checks(sdir: Path, clock: Clock) -> None:
    with StateDB(sdir, now=clock) as d:
        d.log_event(box="vm1", name="a", outcome="stored", code=250)
    with StateDB(sdir, readonly=True, now=clock) as ro:
        with pytest.raises(StateUnavailable):
            ro.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
        assert ro.log_event(box="vm1", name="b", outcome="stored", code=250) is False


# --- check_state_dir ---------------------------------------------------------------------


def test_private_local_state_dir_is_fit(sdir: Path) -> None:
    assert check_state_dir(sdir) is None


def test_state_dir_0755_is_refused(sdir: Path) -> None:
    sdir.chmod(0o755)
    problem = check_state_dir(sdir)
    assert problem is not None and "0755" in problem


def test_state_dir_symlink_is_refused(sdir: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(sdir)
    problem = check_state_dir(link)
    assert problem is not None and "symbolic link" in problem


def test_missing_or_non_directory_state_dir_is_refused(tmp_path: Path) -> None:
    assert check_state_dir(tmp_path / "absent") is not None
    f = tmp_path / "file"
    f.write_text("")
    f.chmod(0o700)
    problem = check_state_dir(f)
    assert problem is not None and "not a directory" in problem


def test_state_dir_not_owned_by_the_service_user_is_refused(
        sdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if IS_ROOT:
        os.chown(sdir, NOBODY, NOBODY)
    elif os.environ.get("CI") == "true":
        # No chown without root: become someone else instead, so CI never skips this rule.
        uid = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    else:
        pytest.skip("needs root to chown (runs in CI)")
    problem = check_state_dir(sdir)
    assert problem is not None and "owned by" in problem


MOUNTINFO = (
    "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n"
    "80 27 0:50 / /srv/backup\\040state rw,relatime shared:40 master:2 - nfs4 nas:/export rw\n"
    "81 80 0:51 / /srv/backup\\040state/local rw - tmpfs tmpfs rw\n"
    "garbage line without separator\n"
    "90 27 0:52 / /srv/tab\\011back\\134slash rw - 9p share rw\n"
)


def test_mountinfo_parser_unescapes_mount_points_and_reads_fstype() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert ("/srv/backup state", "nfs4") in mounts
    assert ("/srv/tab\tback\\slash", "9p") in mounts
    assert ("/proc", "proc") in mounts
    assert len(mounts) == 5


def test_mount_lookup_takes_the_longest_mount_point_prefix() -> None:
    assert fstype_of("/srv/backup state", MOUNTINFO) == "nfs4"
    assert fstype_of("/srv/backup state/rstash", MOUNTINFO) == "nfs4"
    assert fstype_of("/srv/backup state/local/rstash", MOUNTINFO) == "tmpfs"
    assert fstype_of("/srv/backup statement", MOUNTINFO) == "ext4"  # not a path prefix
    assert fstype_of("/srv/tab\tback\\slash/x", MOUNTINFO) == "9p"
    assert fstype_of("/var/lib/rstash", MOUNTINFO) == "ext4"
    # A later mount on the same point hides the earlier one.
    assert fstype_of("/x", MOUNTINFO + "99 27 0:60 / / rw - nfs nas:/ rw\n") == "nfs"


@pytest.mark.parametrize("fstype", sorted(statedir.NETWORK_FSTYPES))
def test_state_dir_on_a_network_file_system_is_refused(tmp_path: Path, fstype: str) -> None:
    sdir = make_state_dir(tmp_path / "state dir")
    real = os.path.realpath(sdir).replace("\\", "\\134").replace(" ", "\\040")
    text = MOUNTINFO + f"100 27 0:70 / {real} rw,relatime - {fstype} nas:/x rw\n"
    problem = check_state_dir(sdir, mountinfo=text)
    assert problem is not None and fstype in problem
    local = MOUNTINFO + f"100 27 0:70 / {real} rw,relatime - xfs /dev/sdb rw\n"
    assert check_state_dir(sdir, mountinfo=local) is None


# --- delivery log and --status -----------------------------------------------------------


K1 = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA vm1-2024"
K2 = "SHA256:BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB attacker-guess"


def fill_log(d: StateDB) -> None:
    def log(when: float, **kw: object) -> None:
        assert d.log_event(when=T0 - when, **kw) is True  # type: ignore[arg-type]

    log(90_000, box="vm1", name="old.tar", outcome="stored", code=250, bytes=1, key=K1)
    log(100, box="vm1", name="b.tar", outcome="stored", code=250, bytes=10, sha256="ab" * 32,
        peer="192.0.2.1", key=K1)
    log(50, box="vm1", name="c.tar", outcome="exists", code=550, peer="192.0.2.1", key=K1)
    log(40, box="vm1", name="d\x1b[2J", outcome="refused", code=553, peer="192.0.2.1", key=K1)
    log(30, box="vm1", name="e.tar", outcome="aborted", code=426, key=K1)
    log(20, box="vm1", name="f.tar", outcome="would_store", code=250, key=K1)
    log(10, box="vm2", name=None, outcome="auth_failed", code=535, peer="198.51.100.7", key=K2)


def test_status_reports_last_stored_last_refusal_and_24h_counts(db: StateDB) -> None:
    fill_log(db)
    st = db.status()
    json.dumps(st)  # JSON-ready
    assert st["now"] == T0 and st["since"] == T0 - 86400
    vm1, vm2 = st["boxes"]
    assert vm1["box"] == "vm1"
    assert vm1["last_stored"] == {"name": "b.tar", "time": T0 - 100, "bytes": 10,
                                  "sha256": "ab" * 32, "peer": "192.0.2.1", "key": K1}
    assert vm1["last_refused"] == {"name": "d\x1b[2J", "time": T0 - 40, "code": 553,
                                   "outcome": "refused", "peer": "192.0.2.1", "key": K1}
    assert vm1["stored_count"] == 1  # old.tar is older than 24 h
    assert vm1["refused_count"] == 2  # exists + refused; aborted and would_store are not
    assert vm1["last_activity"] == T0 - 20
    assert vm2["box"] == "vm2" and vm2["last_stored"] is None
    assert vm2["refused_count"] == 1 and vm2["last_refused"]["outcome"] == "auth_failed"
    # A failed proof is not a use of the key.
    assert st["keys"] == [{"key": K1, "box": "vm1", "last_used": T0 - 20}]


def test_status_of_one_box_and_a_custom_window(db: StateDB) -> None:
    fill_log(db)
    st = db.status("vm2", since=0)
    assert [b["box"] for b in st["boxes"]] == ["vm2"]
    assert st["keys"] == []
    assert db.status("vm1", since=0)["boxes"][0]["stored_count"] == 2


def test_read_only_status_matches_the_writer(db: StateDB, sdir: Path, clock: Clock) -> None:
    fill_log(db)
    with StateDB(sdir, readonly=True, now=clock) as ro:
        assert ro.status() == db.status()


def test_log_event_stores_hostile_strings_without_raising(db: StateDB) -> None:
    bad = "x\udcff" + "é" * 400  # a lone surrogate (undecodable wire bytes), and too long
    assert db.log_event(box="vm1", name=bad, outcome="refused", code=553, peer=bad) is True
    row = db.status()["boxes"][0]["last_refused"]
    assert len(row["name"].encode()) <= state.MAX_FIELD_BYTES
    assert row["name"].startswith("x\\udcff")


def test_log_event_fails_open_when_the_state_dir_is_missing(tmp_path: Path) -> None:
    with StateDB(tmp_path / "absent") as d:
        assert d.log_event(box="vm1", name="a", outcome="stored", code=250) is False
        assert d.last_error


def test_read_only_status_of_a_missing_database_creates_nothing(sdir: Path, clock: Clock) -> None:
    with StateDB(sdir, readonly=True, now=clock) as ro:
        st = ro.status()
        assert st["boxes"] == [] and st["keys"] == []
        assert ro.log_event(box="vm1", name="a", outcome="stored", code=250) is False
        with pytest.raises(StateUnavailable):
            ro.check_replay("vm1", nonce(1), T0 + 10, WINDOW, mark=None)
    assert list(sdir.iterdir()) == []


def test_read_only_handle_opens_the_database_read_only(db: StateDB, sdir: Path,
                                                      clock: Clock) -> None:
    fill_log(db)
    with StateDB(sdir, readonly=True, now=clock) as ro, ro._readonly_connection() as conn:
        assert conn is not None
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM events")


@pytest.mark.skipif(not IS_ROOT, reason="only root can leave files the service user cannot write")
def test_read_only_status_as_root_leaves_no_root_owned_files(shared_tmp: Path,
                                                            clock: Clock) -> None:
    sdir = make_state_dir(shared_tmp / "state")
    with StateDB(sdir, now=clock) as d:
        d.log_event(box="vm1", name="a", outcome="stored", code=250, key=K1)
    chown_tree(sdir, NOBODY)
    with StateDB(sdir, readonly=True, now=clock) as ro:
        assert ro.status()["boxes"][0]["last_stored"]["name"] == "a"
    assert os.geteuid() == 0 and os.getegid() == 0
    owners = {p.name: p.stat().st_uid for p in sdir.iterdir()}
    assert all(uid == NOBODY for uid in owners.values()), owners
    # ... so the service user can still write.
    assert run_as_nobody(lambda: StateDB(sdir, now=clock).log_event(
        box="vm1", name="b", outcome="stored", code=250))


def test_replay_commits_are_full_even_after_delivery_log_rows(db: StateDB,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The delivery log may relax durability (it fails open); the replay cache never does.
    assert db.log_event(box="vm1", name="a", outcome="stored", code=250)
    conn = db._conn
    assert conn is not None
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL for the log
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    db.check_replay("vm1", nonce(7), T0 + 10, WINDOW, mark=None)
    conn.set_trace_callback(None)
    pragmas = [s for s in statements if re.match(r"PRAGMA synchronous", s, re.I)]
    begin = next(i for i, s in enumerate(statements) if s.upper().startswith("BEGIN"))
    assert pragmas and re.search(r"FULL", pragmas[-1], re.I)
    assert statements.index(pragmas[-1]) < begin
