"""What one server session says about itself: its result, its file lines and its session line.

This module owns the shape of rstash-recv(8)'s ``event=file`` and
``event=session`` log lines and their delivery-log rows. The session line of a
completed session carries the counts of its ``221`` line (``stored``) and of
the client's BYE (``files``), never a number of its own. It must never write
to the connection or decide an outcome: rstash.session does that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import Exit, Outcome

if TYPE_CHECKING:
    from . import wire
    from .config import BoxConfig
    from .delivery import DeliveryLog
    from .log import Logger
    from .transport import FdStream


@dataclass
class SessionResult:
    status: int = Exit.OK
    files: int = 0
    stored: int = 0
    box: str | None = None
    outcome: str = "truncated"
    #: final names of the files stored: their groups get the box's retention at close
    finals: list[str] = field(default_factory=list)


@dataclass
class FileState:
    header: wire.FileHeader
    name: str
    upload: Any = None  # store.Upload while receiving
    replied: bool = False
    started: float = field(default_factory=time.monotonic)


class SessionLogging:
    """The log and delivery-log lines of a session (mixed into rstash.session.ServerSession)."""

    log: Logger
    deliveries: DeliveryLog
    box: BoxConfig | None
    #: what authorised the session (the box key, or the SSH key of method ssh)
    key_name: str | None
    peer: str | None
    mode: str
    result: SessionResult
    started: float
    stream: FdStream

    def _log_file(self, st: FileState, outcome: Outcome, *, bytes_: int = 0,
                  sha256: str | None = None, final: str | None = None, reason: str | None = None,
                  detail: str | None = None) -> None:
        if not self.deliveries.repeats.admit(outcome):
            return  # counted, and summed up in one line when the session ends (rstash-recv(8))
        box = self.box
        fields: dict[str, Any] = {
            "event": "file", "box": box.name if box else None, "name": st.header.name,
            "final": final if final != st.name else None, "bytes": bytes_, "sha256": sha256,
            "peer": self.peer, "key": self.key_name,
            "outcome": outcome.log, "code": outcome.code, "reason": reason, "detail": detail,
            "dur": time.monotonic() - st.started,
        }
        if st.header.dry_run:
            fields["mode"] = "dry-run"
        good = outcome in (Outcome.STORED, Outcome.WOULD_STORE)
        (self.log.info if good else self.log.warning)(**fields)
        self.deliveries.record(box=box.name if box else "",
                               name=st.name if final is None else final, outcome=outcome,
                               key=self.key_name, bytes_=bytes_,
                               sha256=sha256)

    def _log_session(self, outcome: Outcome, *, files: int | None = None, **extra: Any) -> None:
        """The session line; ``files`` is the count of a verified BYE (``complete`` only)."""
        if outcome in (Outcome.TIMEOUT, Outcome.TRUNCATED) and self.stream.bytes_in == 0:
            outcome = Outcome.SILENT  # never a byte: fail2ban counts these apart (rstash-recv(8))
        self.result.outcome = outcome.log
        word = outcome.log
        if outcome is Outcome.TRUNCATED:
            word = f"truncated after {self.result.files}"
        fields: dict[str, Any] = {
            "event": "session", "box": self.box.name if self.box else None, "peer": self.peer,
            "key": self.key_name, "mode": self.mode,
            "outcome": word, "code": outcome.code, "dur": time.monotonic() - self.started,
            "files": files, "stored": self.result.stored, **extra,
        }
        (self.log.info if outcome is Outcome.COMPLETE else self.log.warning)(**fields)
