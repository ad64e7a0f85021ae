"""The exception tree: every error rstash raises carries its exit status and,
where it reaches the wire, its reply code.

One handler in each command line (``recv.main``, ``send.main``) turns these into
one line on stderr or in the log and an exit status; nothing else maps errors
to numbers. This module must never import another rstash module.
"""

from __future__ import annotations

from enum import IntEnum


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


def outcome_of(code: int, *, dry_run: bool = False) -> str:
    """The word for a per-file reply code, shared by the log, --status and --json:
    stored, would_store, exists, refused (for good), temporary (4xx) or error (426:
    the client itself gave the file up)."""
    if code == Reply.STORED:
        return "would_store" if dry_run else "stored"
    if code == Reply.EXISTS:
        return "exists"
    if code == Reply.ABORTED:
        return "error"
    return "temporary" if 400 <= code < 500 else "refused"


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
    """A key file is missing, unsafe or malformed."""

    exit_status = Exit.LOCAL



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
