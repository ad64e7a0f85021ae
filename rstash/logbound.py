"""Bounds on what a key holder can make rstash-recv write about files.

Every FILE gets a log line and a delivery-log row, refusals and dry runs
included, and none of it counts against quota or min_free. This module owns
the two bounds of rstash-recv(8) SECURITY:

- per session, the first :data:`PER_SESSION` files of one outcome other than
  ``stored`` are logged and recorded one by one; the rest of that outcome are
  counted and said in one summary line when the session ends
  (:class:`Repeats`);
- per box, the delivery log keeps at most :data:`MAX_BOX_ROWS` rows, pruned
  oldest first, except that the newest ``stored`` row of each key of the box
  (what ``--status`` and ``--metrics`` show) is never pruned
  (:func:`prune_box`).

A stored file is always logged and recorded: this module must never hide a
``250``, and never raise into a session (the delivery log fails open).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from rstash.errors import Outcome

if TYPE_CHECKING:
    import sqlite3  # a serving process imports it only once it writes a row

    from rstash.log import Logger

#: Files of one non-stored outcome logged one by one per session.
PER_SESSION = 20
#: Delivery-log rows kept per box (about 200 bytes each).
MAX_BOX_ROWS = 10_000
#: A session prunes its box's rows after this many rows of its own, and at its end.
PRUNE_EVERY = 500


class Repeats:
    """Counts of each outcome in one session; which ones are still logged one by one."""

    def __init__(self, limit: int = PER_SESSION) -> None:
        self.limit = limit
        self.seen: Counter[Outcome] = Counter()

    def admit(self, outcome: Outcome) -> bool:
        """Whether this file's line and row are written (True for every stored file)."""
        if outcome is Outcome.STORED:
            return True
        self.seen[outcome] += 1
        return self.seen[outcome] <= self.limit

    def unlogged(self) -> list[tuple[Outcome, int]]:
        """(outcome, files not logged one by one) for the session's summary lines."""
        return [(o, n - self.limit) for o, n in self.seen.items() if n > self.limit]

    def log_summary(self, log: Logger, **fields: Any) -> None:
        """One line per outcome that went over the limit: how many files were not logged."""
        for outcome, n in self.unlogged():
            log.warning(event="file", outcome=outcome.log, code=outcome.code, repeated=n,
                        detail=f"{n} more files of this session with this outcome", **fields)


def prune_box(conn: sqlite3.Connection, box: str, keep: int | None = None) -> int:
    """Delete the box's rows beyond the newest ``keep`` (:data:`MAX_BOX_ROWS`); how many went.

    The newest ``stored`` row of every key of the box stays whatever its age:
    a flood of refusals must not make ``--status`` forget when a key last
    delivered.
    """
    cutoff = conn.execute(
        "SELECT id FROM events WHERE box = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
        (box, MAX_BOX_ROWS if keep is None else keep)).fetchone()
    if cutoff is None:
        return 0
    cur = conn.execute(
        "DELETE FROM events WHERE box = ? AND id <= ? AND id NOT IN"
        " (SELECT max(id) FROM events WHERE box = ? AND outcome = 'stored' GROUP BY key)",
        (box, cutoff[0], box))
    return cur.rowcount
