"""The client's transition tables in rstash/1 (rstash(7) STATE MACHINES).

The states of the two sides of a ``ClientConnection`` (what it sent, what it
read), the steps that move them, and the record of a FILE awaiting its reply.
It must never hold a connection's state: only the literal tables live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .frames import NO_TID


class ClientState(Enum):
    """What the client has sent; CLOSED and ERROR end the whole connection."""

    AWAIT_GREETING = "await-greeting"  # interactive: nothing is sent before the greeting
    AWAIT_HELLO = "await-hello"  # greeting read (or pipe mode), HELLO not yet made
    READY = "ready"  # HELLO sent; between files
    WAITING = "waiting"  # a waited FILE sent: nothing more until its first line
    OFFERED = "offered"  # its 350 read: resume() or abort()
    IN_FILE = "in-file"
    BYE_SENT = "bye-sent"
    DONE = "done"  # the verified 221 was read
    CLOSED = "closed"  # the server's stream ended
    ERROR = "error"


class ReplyState(Enum):
    """Which server line the client expects next."""

    GREETING = "greeting"  # 220, or 421 busy
    BEFORE_HELLO = "before-hello"  # none (pipe mode: a 220 it never needed)
    AUTH = "auth"  # 235, or a refusal of the session
    AUTHENTICATED = "authenticated"  # receipts in FILE order, then 221; or a line ending the session
    DONE = "done"  # the verified 221 was read: a receipt or 221 now matches nothing


class Step(Enum):
    """What moves the client: a frame it makes, or a line it reads."""

    HELLO = "HELLO"
    FILE = "FILE"
    DRY_RUN_FILE = "dry-run FILE"
    WAITED_FILE = "waited FILE"
    RESUME = "DATA from the offered offset"
    END = "END"
    ABORT = "ABORT"
    BYE = "BYE"
    GREETING = "220"
    AUTH_OK = "235"
    GO = "354"
    OFFER = "350"
    FINISHED = "251 or a refusal of a waited FILE"
    BYE_OK = "221"


# Theory of operation
# -------------------
# The client has two sides, each with its own table, as in h11: what it sends
# (ClientState) and what it has read (ReplyState). A Step is looked up under each
# side's current state. It must be listed for the side it belongs to (a frame it
# makes: ClientState; a line it reads: ReplyState), else the call or the line is
# refused; where the other table lists it too, that side moves with it.
#
# Interactive: the greeting moves both sides (HELLO may be made; no line may come
# until it is). Pipe mode starts at AWAIT_HELLO / BEFORE_HELLO: its HELLO binds
# an empty greeting, and a 220 that arrives anyway is reported and ignored.
# HELLO opens the AUTH side. The client may send FILEs before the 235 arrives
# (so a pipe-mode session is written without waiting): the 235 moves only the
# reply side, and receipts are believed only after it. BYE closes the sending
# side; the verified 221, once every FILE has its receipt, moves it to DONE.
#
# A waited FILE (rstash(7) RESUME AND RE-RUNS) moves the sending side to WAITING,
# which only lines leave: 354 to IN_FILE, 350 to OFFERED (where the caller
# either resumes from the offset or aborts), 251 or a refusal back to READY.
# These lines are listed on both sides' tables so that they move both.
#
# Refusals (421, 535, 530…, 554, 500, 451) are reported as SessionRefused and
# move nothing: the server closes next. End of stream moves the connection to
# CLOSED. ERROR is entered from any state the moment a call raises (a MAC that
# fails, a line that is not rstash, a frame the state does not allow); every
# later call is refused with a LocalProtocolError.
SEND_TRANSITIONS: dict[ClientState, dict[Step, ClientState]] = {
    ClientState.AWAIT_GREETING: {Step.GREETING: ClientState.AWAIT_HELLO},
    ClientState.AWAIT_HELLO: {Step.HELLO: ClientState.READY},
    ClientState.READY: {Step.FILE: ClientState.IN_FILE, Step.DRY_RUN_FILE: ClientState.READY,
                        Step.WAITED_FILE: ClientState.WAITING, Step.BYE: ClientState.BYE_SENT},
    ClientState.WAITING: {Step.GO: ClientState.IN_FILE, Step.OFFER: ClientState.OFFERED,
                          Step.FINISHED: ClientState.READY},
    ClientState.OFFERED: {Step.RESUME: ClientState.IN_FILE, Step.ABORT: ClientState.READY},
    ClientState.IN_FILE: {Step.END: ClientState.READY, Step.ABORT: ClientState.READY},
    ClientState.BYE_SENT: {Step.BYE_OK: ClientState.DONE},
}
REPLY_TRANSITIONS: dict[ReplyState, dict[Step, ReplyState]] = {
    ReplyState.GREETING: {Step.GREETING: ReplyState.BEFORE_HELLO},
    ReplyState.BEFORE_HELLO: {Step.HELLO: ReplyState.AUTH},
    ReplyState.AUTH: {Step.AUTH_OK: ReplyState.AUTHENTICATED},
    ReplyState.AUTHENTICATED: {Step.BYE_OK: ReplyState.DONE, Step.GO: ReplyState.AUTHENTICATED,
                               Step.OFFER: ReplyState.AUTHENTICATED,
                               Step.FINISHED: ReplyState.AUTHENTICATED},
}


@dataclass
class Pending:
    """A FILE sent and not yet answered; ``n`` and ``digest`` once its END is made."""

    index: int
    name: bytes
    hdr: bytes
    dry_run: bool
    n: int | None = None
    digest: bytes | None = None
    #: waits for its first line; ``answered`` once a 354 or 350 came
    waited: bool = False
    answered: bool = False
    size: int | None = None
    tid: bytes = NO_TID
