"""SQLite under ``state_dir``: the pipe-mode replay cache and the delivery log.

This module owns the file ``<state_dir>/rstash.db`` and the rules of rstash(7)
rule 2 (replay cache) and section "Logs and status" (delivery log, ``--status``);
whether a state_dir may hold it is rstash.statedir's. It never touches sockets
or boxes.

Two halves with opposite failure policies:

* The **replay cache** (:meth:`StateDB.check_replay`, whose rule is rstash.replay's) fails CLOSED. Any SQLite
  error, an unsafe ``state_dir`` or too many live rows raises
  :class:`StateUnavailable` (``451``); a replay raises :class:`ReplayRefused`
  (``532``). Nothing here may ever let an error look like an accepted nonce:
  the caller reads no FILE frame until ``check_replay`` has *returned*, and it
  returns only after its transaction committed.
* The **delivery log** (:meth:`StateDB.log_event`) fails OPEN: it returns False
  and never raises, so a broken log never changes a reply.

It must never store a secret: nonces and fingerprints are fine, keys, proofs and
tags are not.

Fork safety: a SQLite connection must not cross ``fork()``. Make the
:class:`StateDB` in the process that uses it (per connection, after the accept
loop forks). As a guard, a connection inherited across fork is abandoned
without being closed (closing it could checkpoint or unlock on the parent's
behalf) and a fresh one is opened.

Schema (version 1)::

    meta(key TEXT PRIMARY KEY, value)            created = creation time, schema = 1
    floors(box TEXT PRIMARY KEY, floor INTEGER)  absent row: never judged; seeded from the box's mark
    replay(box, nonce BLOB, t INTEGER, PRIMARY KEY(box, nonce))
    events(id, at REAL, box, name, outcome, code, bytes, sha256, peer, key)
    keys(key, box, last_used REAL, PRIMARY KEY(key, box))
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from rstash.errors import StateUnavailable

if TYPE_CHECKING:
    from rstash.replay import BoxMark

DB_NAME = "rstash.db"
SCHEMA_VERSION = 1
#: rstash(7) rule 2: more live nonces than this for one box is a 451.
MAX_LIVE_ROWS = 100_000
#: Delivery-log rows older than this are pruned as new rows arrive, so that the
#: database does not grow without bound (auth failures come from anyone).
LOG_KEEP_SECONDS = 90 * 86400
#: Peer-supplied strings are cut to this many UTF-8 bytes, as in the text log.
MAX_FIELD_BYTES = 300

_BUSY_TIMEOUT_MS = 5000
_R = TypeVar("_R")
# Connections inherited across fork(): kept referenced so that they are never
# closed (and so never checkpoint, unlock or delete WAL files) in the child.
_ABANDONED: list[sqlite3.Connection] = []

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    "CREATE TABLE IF NOT EXISTS floors (box TEXT PRIMARY KEY, floor INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS replay (box TEXT NOT NULL, nonce BLOB NOT NULL,"
    " t INTEGER NOT NULL, PRIMARY KEY (box, nonce)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS replay_t ON replay (t)",
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at REAL NOT NULL,"
    " box TEXT NOT NULL, name TEXT, outcome TEXT NOT NULL, code INTEGER NOT NULL,"
    " bytes INTEGER NOT NULL DEFAULT 0, sha256 TEXT, peer TEXT, key TEXT)",
    "CREATE INDEX IF NOT EXISTS events_box_outcome_at ON events (box, outcome, at)",
    "CREATE INDEX IF NOT EXISTS events_at ON events (at)",
    "CREATE TABLE IF NOT EXISTS keys (key TEXT NOT NULL, box TEXT NOT NULL,"
    " last_used REAL NOT NULL, PRIMARY KEY (key, box))",
)


def _clip(value: str | None) -> str | None:
    """A peer-supplied string made storable: lone surrogates escaped, cut at MAX_FIELD_BYTES."""
    if value is None:
        return None
    data = value.encode("utf-8", "backslashreplace")
    if len(data) > MAX_FIELD_BYTES:
        data = data[:MAX_FIELD_BYTES]
    return data.decode("utf-8", "ignore")


class StateDB:
    """``<state_dir>/rstash.db``: one per process, made after fork (see the module docstring).

    The connection is opened on first use, so constructing never fails: the
    replay cache reports an unusable database as :class:`StateUnavailable`, the
    delivery log as a False return. ``readonly=True`` (``--status``) never creates
    or changes anything, and a missing database reads as an empty status.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, readonly: bool = False,
                 now: Callable[[], float] = time.time) -> None:
        self.state_dir = os.fspath(state_dir)
        self.path = os.path.join(self.state_dir, DB_NAME)
        self.readonly = readonly
        self.now = now
        #: why the last log_event returned False (for the caller's log line)
        self.last_error: str | None = None
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._created = 0

    # -- connection --

    def connection(self) -> sqlite3.Connection:
        """The writable connection of this process, opened (and the schema made) on demand."""
        if self.readonly:
            raise sqlite3.OperationalError("the state database was opened read-only")
        if self._conn is not None and self._pid != os.getpid():
            _ABANDONED.append(self._conn)
            self._conn = None
        if self._conn is None:
            # Switching a new database to WAL, or WAL recovery by another process, can
            # answer SQLITE_BUSY without waiting in the busy handler: retry for as long
            # as busy_timeout would have waited, then fail (closed) as any error does.
            deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
            while True:
                conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000,
                                       isolation_level=None)
                try:
                    self._created = self._setup(conn)
                    break
                except sqlite3.OperationalError as exc:
                    conn.close()
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
                except BaseException:
                    conn.close()
                    raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _setup(self, conn: sqlite3.Connection) -> int:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, not wal")
        conn.execute("PRAGMA synchronous = FULL")
        with transaction(conn):
            for statement in _SCHEMA:
                conn.execute(statement)
            # "created" is for the record only: floors come from the boxes' marks
            # (rstash.replay), not from the cache's age.
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created', ?)",
                         (int(self.now()),))
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                         (SCHEMA_VERSION,))
            return _read_meta(conn)

    @contextlib.contextmanager
    def _readonly_connection(self) -> Iterator[sqlite3.Connection | None]:
        """A read-only connection, or None when there is no database (nothing is created)."""
        try:
            os.stat(self.path)
        except FileNotFoundError:
            yield None
            return
        except OSError as exc:  # e.g. an admin who cannot enter state_dir: say so
            raise sqlite3.OperationalError(f"cannot open: {exc.strerror}") from exc
        # mode=ro still creates -wal and -shm when they are missing and leaves them
        # behind; SQLite's unix VFS, run as root, fchowns them to the database's owner,
        # so the service user can still write (pinned by a test).
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            _read_meta(conn)
            yield conn
        finally:
            conn.close()

    def close(self) -> None:
        if self._conn is not None:
            if self._pid == os.getpid():
                self._conn.close()
            else:
                _ABANDONED.append(self._conn)
            self._conn = None

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- replay cache (fails closed) --

    def check_replay(self, box: str, nonce: bytes, t: int, window: int,
                     max_rows: int = MAX_LIVE_ROWS, *, mark: BoxMark | None) -> None:
        """Accept a pipe-mode HELLO's (box, nonce, t) once, or raise: see :func:`rstash.replay.check_replay`."""
        from rstash.replay import check_replay

        check_replay(self, box, nonce, t, window, max_rows, mark=mark)

    # -- delivery log (fails open) --

    def log_event(self, *, box: str, name: str | None, outcome: str, code: int, bytes: int = 0,
                  sha256: str | None = None, peer: str | None = None, key: str | None = None,
                  when: float | None = None) -> bool:
        """Record one delivery-log row; True when it was written.

        ``key`` is the fingerprint and comment of the key used; it also updates the
        key's last use unless the outcome is ``auth_failed``. Never raises: the
        reason of a False return is in :attr:`last_error`. An unknown ``outcome``
        is stored as given (the caller's log line is the record of truth).
        """
        try:
            at = float(self.now() if when is None else when)
            conn = self.connection()
            # The delivery log fails open: it needs no fsync per row (WAL with NORMAL
            # stays consistent; a power cut may lose its last rows, never a file).
            synchronous(conn, "NORMAL")
            with transaction(conn):
                conn.execute(
                    "INSERT INTO events (at, box, name, outcome, code, bytes, sha256, peer, key)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (at, _clip(box) or "", _clip(name), _clip(outcome) or "", int(code),
                     int(bytes), _clip(sha256), _clip(peer), _clip(key)))
                if key is not None and outcome != "auth_failed":
                    conn.execute(
                        "INSERT INTO keys (key, box, last_used) VALUES (?, ?, ?)"
                        " ON CONFLICT (key, box) DO UPDATE"
                        " SET last_used = max(last_used, excluded.last_used)",
                        (_clip(key), _clip(box) or "", at))
                conn.execute("DELETE FROM events WHERE at < ?", (at - LOG_KEEP_SECONDS,))
        except Exception as exc:  # fails open: a broken log must never change a reply
            self.last_error = f"delivery log {self.path}: {exc}"
            return False
        self.last_error = None
        return True

    # -- --status --

    def status(self, box: str | None = None, *, since: float | None = None) -> dict[str, Any]:
        """Recent deliveries and refusals per box and the last use of each key.

        ``since`` starts the counting window (default: 24 h before ``now()``).
        Returns (JSON-ready; times are Unix seconds, floats)::

            {"now": float, "since": float,
             "boxes": [{"box": str, "last_activity": float,
                        "stored_count": int, "refused_count": int,   # at or after `since`
                        "last_stored": {"name", "time", "bytes", "sha256", "peer", "key"} | None,
                        "last_refused": {"name", "time", "code", "outcome", "peer", "key"}
                                        | None}],
             "keys": [{"key": str, "box": str, "last_used": float}]}

        Boxes are sorted by name, keys by box then key; ``box`` limits both to one
        box. A missing database is an empty status. Names and peers are raw
        (peer-supplied, possibly with control characters): escape them to print.
        Raises :class:`StateUnavailable` when the database cannot be read.
        """
        now = float(self.now())
        start = now - 86400 if since is None else float(since)
        result: dict[str, Any] = {"now": now, "since": start, "boxes": [], "keys": []}
        try:
            if self.readonly:
                with self._readonly_connection() as conn:
                    if conn is not None:
                        self._fill_status(conn, result, box, start)
            else:
                self._fill_status(self.connection(), result, box, start)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state database {self.path}: {exc}") from exc
        return result

    @staticmethod
    def _fill_status(conn: sqlite3.Connection, result: dict[str, Any], box: str | None,
                     start: float) -> None:
        # The IN lists spell out errors.REFUSAL_LOG_OUTCOMES (literal SQL, no string
        # building; tests/test_errors.py holds them equal).
        with transaction(conn, "BEGIN"):  # one snapshot for every query
            rows = conn.execute(
                "SELECT box, max(at), sum(outcome = 'stored' AND at >= ?),"
                " sum(outcome IN ('auth_failed', 'error', 'exists', 'refused', 'temporary')"
                " AND at >= ?)"
                " FROM events WHERE ? IS NULL OR box = ? GROUP BY box ORDER BY box",
                (start, start, box, box)).fetchall()
            for name, last, stored, refused in rows:
                s = conn.execute(
                    "SELECT name, at, bytes, sha256, peer, key FROM events"
                    " WHERE box = ? AND outcome = 'stored' ORDER BY at DESC, id DESC LIMIT 1",
                    (name,)).fetchone()
                r = conn.execute(
                    "SELECT name, at, code, outcome, peer, key FROM events WHERE box = ?"
                    " AND outcome IN ('auth_failed', 'error', 'exists', 'refused', 'temporary')"
                    " ORDER BY at DESC, id DESC LIMIT 1",
                    (name,)).fetchone()
                result["boxes"].append({
                    "box": name,
                    "last_activity": last,
                    "stored_count": int(stored or 0),
                    "refused_count": int(refused or 0),
                    "last_stored": None if s is None else dict(zip(
                        ("name", "time", "bytes", "sha256", "peer", "key"), s, strict=True)),
                    "last_refused": None if r is None else dict(zip(
                        ("name", "time", "code", "outcome", "peer", "key"), r, strict=True)),
                })
            result["keys"] = [
                {"key": k, "box": b, "last_used": used}
                for k, b, used in conn.execute(
                    "SELECT key, box, last_used FROM keys WHERE ? IS NULL OR box = ?"
                    " ORDER BY box, key", (box, box))
            ]

    # -- monitoring (rstash/monitor.py): read-only queries --

    def log_exists(self) -> bool:
        """Whether the database file exists (no server session has made it yet if not).

        Raises :class:`StateUnavailable` when that cannot be told (e.g. state_dir unsearchable).
        """
        try:
            os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StateUnavailable(f"state database {self.path}: {exc.strerror}") from exc
        return True

    def outcome_counts(self, since: float) -> list[tuple[str, str, int]]:
        """(box, outcome, rows) of every delivery-log row at or after ``since``."""
        rows = self._read(lambda conn: [
            (str(b), str(o), int(n)) for b, o, n in conn.execute(
                "SELECT box, outcome, count(*) FROM events WHERE at >= ?"
                " GROUP BY box, outcome ORDER BY box, outcome", (since,))])
        return rows or []

    def newest_stored(self, box: str, accept: Callable[[str, int], bool]) -> dict[str, Any] | None:
        """The newest ``stored`` row of ``box`` whose (name, bytes) ``accept`` takes, or None.

        Rows are read newest first and the scan stops at the first accepted one.
        """
        def scan(conn: sqlite3.Connection) -> dict[str, Any] | None:
            rows = conn.execute(
                "SELECT name, at, bytes, sha256, peer, key FROM events"
                " WHERE box = ? AND outcome = 'stored' ORDER BY at DESC, id DESC", (box,))
            for row in rows:
                if accept(row[0] or "", int(row[2])):
                    return dict(zip(("name", "time", "bytes", "sha256", "peer", "key"), row,
                                    strict=True))
            return None
        return self._read(scan)

    def _read(self, query: Callable[[sqlite3.Connection], _R]) -> _R | None:
        """``query`` run on one snapshot; None when there is no database (read-only)."""
        try:
            if not self.readonly:
                conn = self.connection()
                with transaction(conn, "BEGIN"):
                    return query(conn)
            with self._readonly_connection() as ro:
                if ro is None:
                    return None
                with transaction(ro, "BEGIN"):
                    return query(ro)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"state database {self.path}: {exc}") from exc


def synchronous(conn: sqlite3.Connection, level: str) -> None:
    """Set PRAGMA synchronous (outside a transaction): FULL for the replay cache."""
    conn.execute(f"PRAGMA synchronous = {level}")


def _read_meta(conn: sqlite3.Connection) -> int:
    """The cache's creation time; refuses a database of another schema version."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("schema") != SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"unknown schema version {meta.get('schema')!r}")
    return int(meta["created"])


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
    """One explicit transaction: COMMIT when the block ends, ROLLBACK on any exception.

    IMMEDIATE takes the write lock up front (waiting busy_timeout), so two
    sessions checking the same nonce serialise instead of both reading "absent".
    """
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # Also after a failed COMMIT (SQLITE_BUSY leaves the transaction open).
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
