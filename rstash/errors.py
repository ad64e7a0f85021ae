"""Exit statuses, reply codes, the outcome table and the exception tree.

:class:`Outcome` is the one table of what can happen to a file or a session:
each member carries its reply code and text, its word in the log and the
delivery log, its ``--json`` status and rstash-send's exit status. The store
raises :class:`Refused` naming an outcome; the session turns it into a reply
line and a log line through this table, and nothing else picks a code or a word.

Every error rstash raises carries its exit status and, where it reaches the
wire, its reply code. One handler in each command line (``recv.main``,
``send.main``) turns these into one line on stderr or in the log and an exit
status. The exception classes live here, except those that belong to one
module's interface, each a subclass of one here: ``wire.IntegrityError``
(:class:`RemoteProtocolError`), ``upload.SizeMismatch`` (:class:`StoreError`),
``listen.ListenError`` (:class:`RstashError`), ``transport.PeerClosed``
(:class:`TransportError`), and rstash-send's own in send.py.

This module must never import another rstash module.
"""

from __future__ import annotations

import errno
from enum import Enum, IntEnum


class Exit(IntEnum):
    """Exit statuses of rstash-send (rstash-send(1)) and rstash-recv (rstash-recv(8))."""

    #: every file stored (or exists, with --ignore-existing); admin command found nothing wrong
    OK = 0
    #: rstash-send: a file refused for good; rstash-recv: the peer broke the protocol,
    #: or an admin command found a problem
    REFUSED = 1
    #: usage or local error (bad option, unreadable file or key, config, I/O, root)
    LOCAL = 2
    #: rstash-send: authentication failed
    AUTH = 3
    #: rstash-send: network or transport failure, timeout, ssh failed
    TRANSPORT = 4
    #: rstash-send: the peer spoke nonsense, or a MAC failed
    PROTOCOL = 5
    #: rstash-send: temporary refusal, try later (EX_TEMPFAIL)
    TEMPFAIL = 75


#: When several outcomes happen in one rstash-send run, the highest rank wins.
EXIT_PRECEDENCE: dict[int, int] = {
    Exit.OK: 0,
    Exit.TEMPFAIL: 1,
    Exit.REFUSED: 2,
    Exit.LOCAL: 3,
    Exit.PROTOCOL: 4,
    Exit.TRANSPORT: 5,
    Exit.AUTH: 6,
}


def worst_exit(*statuses: int) -> int:
    """The exit status that wins by the precedence of rstash-send(1)."""
    return max(statuses, key=lambda s: EXIT_PRECEDENCE.get(s, 3), default=Exit.OK)


class Reply(IntEnum):
    """Server reply codes (rstash(7)). 2xx done, 4xx try later, 5xx refused."""

    #: interactive greeting
    GREETING = 220
    #: session over; carries the count of stored files
    BYE = 221
    #: proof verified; carries the server's own proof of the key
    AUTH_OK = 235
    #: file stored (or, for a dry run, would be stored)
    STORED = 250
    #: the transfer id was stored before: a re-run, answered without data
    ALREADY_STORED = 251
    #: a waited FILE: the server holds a prefix of this transfer
    RESUME = 350
    #: a waited FILE: send it from its first byte
    GO = 354
    #: too many sessions; the client retries later; also sent on idle timeout
    BUSY = 421
    #: the client's ABORT of the current file was honoured
    ABORTED = 426
    #: the server's own failure (I/O, state database)
    LOCAL_ERROR = 451
    #: disk full, quota of the file system, or min_free
    INSUFFICIENT_STORAGE = 452
    #: the peer broke the framing or the state machine after authentication
    PROTOCOL_ERROR = 500
    #: method not supported (pre-authentication)
    METHOD_NOT_SUPPORTED = 504
    #: protocol version not supported (pre-authentication)
    VERSION_NOT_SUPPORTED = 505
    #: pipe-mode session to a box without pipe_mode
    PIPE_MODE_OFF = 530
    #: pipe-mode timestamp outside replay_window
    CLOCK_SKEW = 531
    #: pipe-mode nonce already seen, or older than the box's floor
    REPLAYED = 532
    #: every pre-authentication failure, uniformly
    AUTH_FAILED = 535
    #: a file of that name exists and overwrite = "refuse"
    EXISTS = 550
    #: larger than max_file_size, or would exceed the quota
    TOO_LARGE = 552
    #: the name breaks a name rule, allow_names or deny_names
    NAME_NOT_ALLOWED = 553
    #: a tag failed to verify; ends the session
    INTEGRITY = 554


class Outcome(Enum):
    """What happened to one file or one session (rstash(7) REPLIES, rstash-recv(8) LOGGING).

    Each member is (reply code or None, reply text, log outcome, JSON status,
    rstash-send's exit status). The log outcome is the word in the log and the
    delivery log; the JSON status is rstash-send's word per file.
    """

    #: the file is durable under its final name
    STORED = (Reply.STORED, "stored", "stored", "stored", Exit.OK)
    #: a re-run of a transfer stored before (251): counted stored, nothing sent
    ALREADY_STORED = (Reply.ALREADY_STORED, "already stored", "already", "stored", Exit.OK)
    #: a dry run: the file would have been stored
    WOULD_STORE = (Reply.STORED, "would store", "would_store", "would_store", Exit.OK)
    #: a file of that name exists and overwrite = "refuse" (or no rename was free)
    EXISTS = (Reply.EXISTS, "exists", "exists", "exists", Exit.REFUSED)
    #: larger than max_file_size
    TOO_LARGE = (Reply.TOO_LARGE, "too large", "refused", "refused", Exit.REFUSED)
    #: storing it would exceed the box's quota
    QUOTA = (Reply.TOO_LARGE, "quota", "refused", "refused", Exit.REFUSED)
    #: the name breaks a name rule, allow_names or deny_names
    NAME_NOT_ALLOWED = (Reply.NAME_NOT_ALLOWED, "name not allowed", "refused", "refused",
                        Exit.REFUSED)
    #: disk full, the file system's quota, or min_free
    INSUFFICIENT_STORAGE = (Reply.INSUFFICIENT_STORAGE, "insufficient storage", "temporary",
                            "temporary", Exit.TEMPFAIL)
    #: the server's own failure with one file (I/O)
    LOCAL_ERROR = (Reply.LOCAL_ERROR, "local error", "temporary", "temporary", Exit.TEMPFAIL)
    #: the client gave the file up (ABORT)
    ABORTED = (Reply.ABORTED, "aborted", "aborted", "error", Exit.LOCAL)
    #: a file's transfer ended with the session, before its END
    UNFINISHED = (None, "", "error", "error", Exit.LOCAL)
    #: removed by the box's retention rules after a newer file of its group was stored
    REMOVED = (None, "", "removed", "removed", Exit.OK)

    #: BYE answered: the session ended as the protocol defines
    COMPLETE = (Reply.BYE, "bye", "complete", "stored", Exit.OK)
    #: the connection ended without BYE
    TRUNCATED = (None, "", "truncated", "error", Exit.TRANSPORT)
    #: too many sessions: the client retries later
    BUSY = (Reply.BUSY, "busy", "busy", "temporary", Exit.TEMPFAIL)
    #: the peer was silent for longer than its timeout
    TIMEOUT = (Reply.BUSY, "timeout", "timeout", "temporary", Exit.TEMPFAIL)
    #: the peer never sent a byte: timed out, or closed, before a HELLO began
    SILENT = (None, "", "silent", "error", Exit.TRANSPORT)
    #: any pre-authentication failure, uniformly
    AUTH_FAILED = (Reply.AUTH_FAILED, "authentication failed", "auth_failed", "refused",
                   Exit.AUTH)
    #: the peer broke the protocol before authenticating (told like an auth failure)
    PREAUTH_PROTOCOL_ERROR = (Reply.AUTH_FAILED, "authentication failed", "protocol_error",
                              "refused", Exit.AUTH)
    #: the peer broke the framing or the state machine after authentication
    PROTOCOL_ERROR = (Reply.PROTOCOL_ERROR, "protocol error", "protocol_error", "error",
                      Exit.PROTOCOL)
    #: protocol version not supported
    VERSION_NOT_SUPPORTED = (Reply.VERSION_NOT_SUPPORTED, "version not supported",
                             "protocol_error", "error", Exit.PROTOCOL)
    #: method not supported
    METHOD_NOT_SUPPORTED = (Reply.METHOD_NOT_SUPPORTED, "method not supported",
                            "protocol_error", "error", Exit.PROTOCOL)
    #: a tag failed to verify; ends the session
    INTEGRITY = (Reply.INTEGRITY, "integrity check failed", "integrity", "error", Exit.PROTOCOL)
    #: pipe-mode session to a box without pipe_mode
    PIPE_MODE_OFF = (Reply.PIPE_MODE_OFF, "pipe mode off", "refused", "refused", Exit.REFUSED)
    #: pipe-mode timestamp outside replay_window
    CLOCK_SKEW = (Reply.CLOCK_SKEW, "clock skew", "refused", "refused", Exit.REFUSED)
    #: pipe-mode nonce already seen, or not above the box's floor
    REPLAYED = (Reply.REPLAYED, "replayed session", "refused", "refused", Exit.REFUSED)
    #: the server's own failure before any file (box directory, replay cache)
    SESSION_ERROR = (Reply.LOCAL_ERROR, "local error", "error", "temporary", Exit.TEMPFAIL)

    #: the reply code, or None when nothing is said on the wire
    code: int | None
    #: the reply text after the code
    text: str
    #: the word in the log and the delivery log
    log: str
    #: rstash-send's --json status
    status: str
    #: rstash-send's exit status
    exit: int

    def __init__(self, code: int | None, text: str, log: str, status: str, exit: int) -> None:
        self.code, self.text, self.log, self.status, self.exit = code, text, log, status, exit

    @property
    def line(self) -> str:
        """The reply line without a MAC: ``CODE TEXT``."""
        return f"{self.code} {self.text}"

    @classmethod
    def of_protocol_error(cls, reply: int | None, *, authenticated: bool) -> Outcome:
        """How a session the peer broke ends: before authentication, only an unsupported
        version or method is told apart from ``535`` (rstash(7) RULES, rule 1)."""
        for early in (cls.VERSION_NOT_SUPPORTED, cls.METHOD_NOT_SUPPORTED):
            if reply == early.code:
                return early
        return cls.PROTOCOL_ERROR if authenticated else cls.PREAUTH_PROTOCOL_ERROR

    @property
    def refusal(self) -> bool:
        """Counted as a refusal by --status (an abort is the client's choice, a dry run none)."""
        return self.log in REFUSAL_LOG_OUTCOMES


#: The outcomes the delivery log records, one word each (--status, --metrics).
DELIVERY_OUTCOMES = frozenset(o.log for o in (
    Outcome.STORED, Outcome.ALREADY_STORED, Outcome.WOULD_STORE, Outcome.EXISTS,
    Outcome.TOO_LARGE, Outcome.INSUFFICIENT_STORAGE, Outcome.ABORTED, Outcome.UNFINISHED,
    Outcome.AUTH_FAILED, Outcome.REMOVED))
#: Log outcomes that --status counts as refusals.
REFUSAL_LOG_OUTCOMES = frozenset({"exists", "refused", "temporary", "error", "auth_failed"})

#: The per-file outcome of each reply code a client can receive in a receipt.
_FILE_OUTCOMES: dict[int, Outcome] = {}
for _o in (Outcome.STORED, Outcome.ALREADY_STORED, Outcome.EXISTS, Outcome.TOO_LARGE, Outcome.NAME_NOT_ALLOWED,
           Outcome.INSUFFICIENT_STORAGE, Outcome.LOCAL_ERROR, Outcome.ABORTED, Outcome.BUSY):
    assert _o.code is not None
    _FILE_OUTCOMES[_o.code] = _o
del _o


def file_outcome(code: int, *, dry_run: bool = False) -> Outcome:
    """The outcome of a per-file reply code as the client sees it; an unknown code
    counts as temporary (4xx) or refused (5xx)."""
    if code == Reply.STORED and dry_run:
        return Outcome.WOULD_STORE
    known = _FILE_OUTCOMES.get(code)
    if known is not None:
        return known
    return Outcome.LOCAL_ERROR if 400 <= code < 500 else Outcome.NAME_NOT_ALLOWED


def outcome_of(code: int, *, dry_run: bool = False) -> str:
    """The --json status of a per-file reply code: stored, would_store, exists,
    refused (for good), temporary (4xx) or error (426: the client gave the file up)."""
    return file_outcome(code, dry_run=dry_run).status


class RstashError(Exception):
    """Base of every error rstash reports to a user. Its message is one line."""

    exit_status: int = Exit.LOCAL
    #: the reply code when this error must be told to the peer, else None
    reply: int | None = None

    def __init__(self, message: str = "", *, exit_status: int | None = None,
                 reply: int | None = None) -> None:
        super().__init__(message)
        if exit_status is not None:
            self.exit_status = exit_status
        if reply is not None:
            self.reply = reply

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


def box_write_failure(path: object, e: OSError) -> str:
    """A box the service user cannot write into: the path, the errno and the command to run."""
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return f"cannot write into {path}: {e.strerror or e} ({name}); run rstash-recv --check-config"


class UsageError(RstashError):
    """A bad option or argument."""

    exit_status = Exit.LOCAL


class ConfigError(RstashError):
    """The configuration is unusable. ``problems`` holds one line per error."""

    exit_status = Exit.LOCAL

    def __init__(self, problems: list[str] | str) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = problems
        super().__init__("\n".join(problems))


class KeyFileError(RstashError):
    """A key file is missing, unsafe or malformed. ``path`` and ``why``: which, and why."""

    exit_status = Exit.LOCAL
    path: str | None = None
    why: str | None = None

    @classmethod
    def at(cls, path: str, why: str) -> KeyFileError:
        """``PATH: why``, with both kept for the log."""
        err = cls(f"{path}: {why}")
        err.path, err.why = path, why
        return err


class ProtocolError(RstashError):
    """The protocol was broken. Carries the reply code the server sends for it."""

    reply = Reply.PROTOCOL_ERROR


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug in the caller."""

    exit_status = Exit.LOCAL


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: garbage, truncation, a bad tag or MAC."""

    exit_status = Exit.PROTOCOL


class IntegrityError(RemoteProtocolError):
    """A tag failed: ``554 integrity check failed NAME``; ends the session.

    ``name`` is the file's name when the failing frame belongs to a known file
    (empty for a FILE whose own tag failed: none of its fields is believed), and
    ``sha256`` the server's digest of what it received, for the log.
    """

    reply = Reply.INTEGRITY

    def __init__(self, message: str, name: bytes = b"", sha256: bytes | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.sha256 = sha256


class AuthenticationFailed(RstashError):
    """The proof (or the server's 235 MAC) did not verify."""

    exit_status = Exit.AUTH
    reply = Reply.AUTH_FAILED


class TransportError(RstashError):
    """Moving bytes failed: connect, reset, ssh died, a timeout."""

    exit_status = Exit.TRANSPORT


class PeerTimeout(TransportError):
    """A read or write waited longer than its deadline."""

    reply = Reply.BUSY


class StoreError(RstashError):
    """Delivering a file into a box failed for a reason that has a reply code."""

    exit_status = Exit.LOCAL
    reply = Reply.LOCAL_ERROR


class Refused(StoreError):
    """A per-file refusal that says what happened: the session goes on with the next file.

    ``outcome`` gives the reply code and text (``Refused(Outcome.QUOTA)`` is
    ``552 quota``); ``detail`` is for the log only.
    """

    def __init__(self, outcome: Outcome, detail: str = "") -> None:
        super().__init__(f"{outcome.text}: {detail}" if detail else outcome.text,
                         reply=outcome.code)
        self.outcome = outcome
        self.detail = detail

    @property
    def reason(self) -> str:
        """The reply text (``exists``, ``quota``, …)."""
        return self.outcome.text


class ReplayRefused(RstashError):
    """A pipe-mode nonce was seen before, or its time is not above the box's floor."""

    reply = Reply.REPLAYED


class ClockSkew(RstashError):
    """A pipe-mode time outside replay_window. ``skew`` = client time - server time."""

    reply = Reply.CLOCK_SKEW

    def __init__(self, skew: int) -> None:
        self.skew = skew
        super().__init__(f"clock skew {skew:+d} s")


class StateUnavailable(RstashError):
    """The replay cache cannot answer: SQLite failed, or state_dir is unfit. Fails closed."""

    reply = Reply.LOCAL_ERROR


def box_refusal(path: object, e: Refused | OSError) -> Refused:
    """A file's refusal as the log must tell it: an I/O failure in the box names the box,
    the errno and the command that finds the cause (``--check-config``)."""
    if isinstance(e, OSError):
        return Refused(Outcome.LOCAL_ERROR, box_write_failure(path, e))
    cause = e.__cause__
    if e.outcome is Outcome.LOCAL_ERROR and isinstance(cause, OSError):
        what = e.detail.split(":", 1)[0]  # "create temp: strerror": the step, then the rest
        return Refused(Outcome.LOCAL_ERROR, f"{what}: {box_write_failure(path, cause)}")
    return e
