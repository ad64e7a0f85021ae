"""One session's writer of the delivery log (the rows ``--status`` reads).

This module owns the session side of the delivery log: opening the state
database at the first row (not at all when state_dir is unfit for it),
writing one row per file, and, when a row cannot be written, one warning
line per session that names the state dir and the error, so that an empty
``--status`` is never a silent one.

A session prunes its box's rows to the per-box cap of :mod:`rstash.logbound`
every few hundred rows of its own and when it closes.

The delivery log fails open: this module must never raise, never change a
reply, and never be written to for an authentication failure (a peer
without a key must not be able to grow the database).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rstash.errors import Outcome
from rstash.logbound import PRUNE_EVERY, Repeats, prune_box

if TYPE_CHECKING:
    from rstash.log import Logger
    from rstash.state import StateDB


class DeliveryLog:
    """The delivery log of one session under ``state_dir``."""

    def __init__(self, state_dir: Path, log: Logger, *, peer: str | None) -> None:
        self.state_dir = state_dir
        self.log = log
        self.peer = peer
        #: opened at the first row
        self._db: StateDB | None = None
        #: state_dir is unfit for the database: no rows this session
        self._off = False
        #: a failing database is reported once per session, not once per file
        self.warned = False
        #: per-outcome counts of the session's files: past a few of one outcome, neither
        #: a row nor a log line each (rstash-recv(8) SECURITY; the session asks first)
        self.repeats = Repeats()
        #: rows written by this session since its last pruning, per box
        self._unpruned: dict[str, int] = {}

    def record(self, *, box: str, name: str | None, outcome: Outcome, key: str | None,
               bytes_: int = 0, sha256: str | None = None) -> bool:
        """Write one row; False (and, the first time, a warning line) when it was not written."""
        from rstash import state
        from rstash.statedir import check_state_dir

        error: str | None = None
        try:
            if self._off:
                return False
            db = self._db
            if db is None:
                # Judged once per session: a state_dir unfit for the replay cache
                # keeps the delivery log off too.
                if check_state_dir(self.state_dir) is not None:
                    self._off = True
                    return False
                db = self._db = state.StateDB(self.state_dir)
            if not db.log_event(box=box, name=name, outcome=outcome.log, code=outcome.code or 0,
                                bytes=bytes_, sha256=sha256, peer=self.peer, key=key):
                error = db.last_error or "row not written"
        except Exception as e:
            error = f"delivery log: {e}"
        if error is None:
            self._unpruned[box] = self._unpruned.get(box, 0) + 1
            if self._unpruned[box] >= PRUNE_EVERY:
                self._prune(box)
            return True
        if not self.warned:
            # --status misses this session's rows from here on: say so where the admin looks.
            self.warned = True
            self.log.warning(event="state", box=box or None, outcome="error",
                             detail=f"{error} (state_dir {self.state_dir}); "
                                    "--status will not show this delivery")
        return False

    def log_repeats(self, *, box: str | None, key: str | None) -> None:
        """One line per outcome that went past the per-session limit: how many were not logged."""
        self.repeats.log_summary(self.log, box=box, peer=self.peer, key=key)

    def _prune(self, box: str) -> None:
        import sqlite3  # not before the greeting: only a session that writes rows needs it

        from rstash.state import transaction

        self._unpruned[box] = 0
        if self._db is None:
            return
        try:
            conn = self._db.connection()
            with transaction(conn):
                prune_box(conn, box)
        except (sqlite3.Error, OSError) as e:
            self.log.debug(event="state", box=box, outcome="error", detail=f"pruning: {e}")

    def close(self) -> None:
        for box, n in list(self._unpruned.items()):
            if n:
                self._prune(box)
        if self._db is not None:
            self._db.close()
