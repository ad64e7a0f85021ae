"""The pipe-mode replay rule: the replay cache's check and each box's durable mark.

This module owns rstash(7) PIPE MODE AND REPLAY steps 4 and 5 as rstash-recv
keeps them: the replay cache's rows in ``<state_dir>/rstash.db`` (opened by
rstash.state) and, in each box directory, the file ``.rstash-pipe-mark``, the
largest time of a pipe stream ever accepted into that box. The mark is what
outlives a lost state_dir: a new cache takes each box's floor from it, so a
stream delivered before the loss is refused for ever, even one dated up to
replay_window ahead of the server's clock.

It fails CLOSED: nothing here may let an error look like an accepted stream.
The nonce is committed and the mark is at least the stream's time, durably,
before :func:`check_replay` returns. It must never write anything in a box but
the mark (and its temp), and never read or list a stored file.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import stat
import time

from rstash.errors import ClockSkew, ReplayRefused, StateUnavailable
from rstash.state import StateDB, synchronous, transaction
from rstash.statedir import check_state_dir

#: Names beginning with "." can never be sent by a client (rstash(7) NAMES), so
#: no delivery can take, replace or be confused with these.
MARK_NAME = ".rstash-pipe-mark"
MARK_TEMP = ".rstash-pipe-mark.new"
_MARK_RE = re.compile(rb"([0-9]{1,19})\n\Z")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class BelowFloor(ReplayRefused):
    """A pipe stream's time is not above its box's floor: it may have been accepted before."""

    def __init__(self, t: int, floor: int) -> None:
        self.t = t
        self.floor = floor
        super().__init__(f"replayed session: time {t} not above the box's floor {floor}"
                         f" (streams made after {utc(floor)} are accepted)")


def utc(t: int) -> str:
    """``t`` as the time of day a log reader compares with a client's clock."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class BoxMark:
    """``<box>/.rstash-pipe-mark``: never lower than the time of any pipe stream the box accepted.

    One line, the Unix time in decimal. A missing mark reads as 0 (no pipe stream
    was ever accepted into this box); an unreadable or malformed one is an error,
    never 0.
    """

    def __init__(self, box_dir: str | os.PathLike[str]) -> None:
        self.box_dir = os.fspath(box_dir)
        self.path = os.path.join(self.box_dir, MARK_NAME)

    def read(self) -> int:
        dir_fd = self._open_dir()
        try:
            return self._read(dir_fd)
        finally:
            os.close(dir_fd)

    def raise_to(self, t: int) -> None:
        """Make the mark at least ``t``, durably (file and directory fsynced), or raise OSError."""
        dir_fd = self._open_dir()
        try:
            # The box directory's lock (rstash.store's): two sessions raising the mark
            # at once must not let the lower time land last.
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            if self._read(dir_fd) >= t:
                return
            # Never O_TRUNC a name someone else may have planted (a hard link to
            # another file): remove it and create a fresh one.
            try:
                os.unlink(MARK_TEMP, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            fd = os.open(MARK_TEMP, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            try:
                os.write(fd, b"%d\n" % t)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(MARK_TEMP, MARK_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)  # also releases the lock

    def _open_dir(self) -> int:
        return os.open(self.box_dir, _DIR_FLAGS)

    def _read(self, dir_fd: int) -> int:
        try:
            fd = os.open(MARK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            return 0
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(0, "not a regular file")
            data = os.read(fd, 64)
        finally:
            os.close(fd)
        match = _MARK_RE.match(data)
        if match is None:
            raise OSError(0, f"malformed (expected one line with a Unix time, got {data[:40]!r})")
        return int(match.group(1))


def check_replay(db: StateDB, box: str, nonce: bytes, t: int, window: int, max_rows: int, *,
                 mark: BoxMark | None) -> None:
    """Accept a pipe-mode HELLO's (box, nonce, t) once, or raise (rstash(7) PIPE MODE AND REPLAY).

    ``mark`` is the box's :class:`BoxMark` (None only for a cache without boxes, as in tests:
    floors then start at 0 and nothing outlives the cache). Returns only after the nonce is
    committed and the mark holds at least ``t``. Raises :class:`ClockSkew` (531),
    :class:`ReplayRefused` (532; :class:`BelowFloor` when the time is the reason) or
    :class:`StateUnavailable` (451); never anything else for a database, state_dir or mark problem.
    """
    problem = check_state_dir(db.state_dir)
    if problem is not None:
        raise StateUnavailable(f"replay cache refused: {problem}")
    now = int(db.now())
    if abs(now - t) > window:
        raise ClockSkew(t - now)
    try:
        conn = db.connection()
        synchronous(conn, "FULL")
        with transaction(conn):
            _prune(conn, now - window)
            floor = box_floor(conn, box, mark)
            if t <= floor:
                raise BelowFloor(t, floor)
            row = conn.execute("SELECT count(*) FROM replay WHERE box = ?", (box,)).fetchone()
            if row[0] >= max_rows:
                raise StateUnavailable(f"replay cache full: {row[0]} live nonces for box {box!r}")
            try:
                conn.execute("INSERT INTO replay (box, nonce, t) VALUES (?, ?, ?)", (box, nonce, t))
            except sqlite3.IntegrityError:
                raise ReplayRefused("replayed session: nonce already seen") from None
            if mark is not None:
                # Inside the transaction: a mark that cannot be raised rolls the nonce back.
                # A mark raised for a stream whose commit then fails is only higher than needed.
                try:
                    mark.raise_to(t)
                except OSError as exc:
                    raise StateUnavailable(f"pipe mark {mark.path}: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:
        raise StateUnavailable(f"replay cache {db.path}: {exc}") from exc
    except (ValueError, OverflowError) as exc:
        raise StateUnavailable(f"replay cache {db.path}: {exc}") from exc


def box_floor(conn: sqlite3.Connection, box: str, mark: BoxMark | None) -> int:
    """The box's floor; the first time this cache judges the box, seeded from its mark."""
    row = conn.execute("SELECT floor FROM floors WHERE box = ?", (box,)).fetchone()
    if row is not None:
        return int(row[0])
    # Every stream this cache accepts passes here first, so a box without a row was
    # never judged by this cache: whatever was accepted before it is <= the mark.
    try:
        floor = 0 if mark is None else mark.read()
    except OSError as exc:
        raise StateUnavailable(f"pipe mark {mark.path if mark else '?'}: {exc.strerror or exc}") \
            from exc
    conn.execute("INSERT INTO floors (box, floor) VALUES (?, ?)", (box, floor))
    return floor


def _prune(conn: sqlite3.Connection, before: int) -> None:
    # Raise each floor before deleting, so a pruned nonce can never come back.
    pruned = conn.execute(
        "SELECT box, max(t) FROM replay WHERE t < ? GROUP BY box", (before,)).fetchall()
    for box, top in pruned:
        conn.execute(
            "INSERT INTO floors (box, floor) VALUES (?, ?)"
            " ON CONFLICT (box) DO UPDATE SET floor = max(floor, excluded.floor)",
            (box, int(top)))
    if pruned:
        conn.execute("DELETE FROM replay WHERE t < ?", (before,))
