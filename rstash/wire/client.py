"""The client's role in rstash/1: frames out, verified reply lines in (rstash(7)).

The client computes every tag it sends and verifies every MAC the server
sends (235, each receipt, 221): a receipt counts only when its MAC covers the
client's own count and digest of what it sent. Without a key it speaks method
ssh (rstash(7) CONSTRUCTION 11): only then are lines without a MAC believed,
and only after the greeting offered ssh; the caller must create such a client
only for a stream it carries over its own SSH channel, never in pipe mode.
It must never do I/O, read a clock or draw random bytes: nonces and times are
arguments.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .. import auth
from ..errors import LocalProtocolError, RemoteProtocolError, Reply
from .events import (
    AuthOk,
    ClientEvent,
    ConnectionClosed,
    Done,
    Greeting,
    Receipt,
    SessionRefused,
    encode_file_header,
    hello_without_proof,
)
from .frames import (
    EXT_SERVER_ID,
    FLAG_DRY_RUN,
    MAX_DATA,
    METHOD_HMAC_SHA256,
    METHOD_SSH,
    MODE_INTERACTIVE,
    MODE_PIPE,
    NEED_DATA,
    FrameType,
    Sentinel,
    data_header,
    frame,
    refused_after_error,
)
from .replies import (
    ReceiptFields,
    ReplyLine,
    decode_name,
    greeting_methods,
    parse_auth_ok,
    parse_bye,
    parse_greeting,
    parse_line,
    parse_plain_receipt,
    parse_receipt,
    parse_stored,
    quote,
    take_line,
)


class ClientState(Enum):
    """What the client has sent; CLOSED and ERROR end the whole connection."""

    AWAIT_GREETING = "await-greeting"  # interactive: nothing is sent before the greeting
    AWAIT_HELLO = "await-hello"  # greeting read (or pipe mode), HELLO not yet made
    READY = "ready"  # HELLO sent; between files
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
    END = "END"
    ABORT = "ABORT"
    BYE = "BYE"
    GREETING = "220"
    AUTH_OK = "235"
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
# Refusals (421, 535, 530…, 554, 500, 451) are reported as SessionRefused and
# move nothing: the server closes next. End of stream moves the connection to
# CLOSED. ERROR is entered from any state the moment a call raises (a MAC that
# fails, a line that is not rstash, a frame the state does not allow); every
# later call is refused with a LocalProtocolError.
SEND_TRANSITIONS: dict[ClientState, dict[Step, ClientState]] = {
    ClientState.AWAIT_GREETING: {Step.GREETING: ClientState.AWAIT_HELLO},
    ClientState.AWAIT_HELLO: {Step.HELLO: ClientState.READY},
    ClientState.READY: {Step.FILE: ClientState.IN_FILE, Step.DRY_RUN_FILE: ClientState.READY,
                        Step.BYE: ClientState.BYE_SENT},
    ClientState.IN_FILE: {Step.END: ClientState.READY, Step.ABORT: ClientState.READY},
    ClientState.BYE_SENT: {Step.BYE_OK: ClientState.DONE},
}
REPLY_TRANSITIONS: dict[ReplyState, dict[Step, ReplyState]] = {
    ReplyState.GREETING: {Step.GREETING: ReplyState.BEFORE_HELLO},
    ReplyState.BEFORE_HELLO: {Step.HELLO: ReplyState.AUTH},
    ReplyState.AUTH: {Step.AUTH_OK: ReplyState.AUTHENTICATED},
    ReplyState.AUTHENTICATED: {Step.BYE_OK: ReplyState.DONE},
}


@dataclass
class _Pending:
    """A FILE sent and not yet answered; ``n`` and ``digest`` once its END is made."""

    index: int
    name: bytes
    hdr: bytes
    dry_run: bool
    n: int | None = None
    digest: bytes | None = None


class ClientConnection:
    """The client's half: frames out, verified replies in.

    Pipe mode (``pipe=True``) never reads a greeting: its HELLO binds an empty G.
    ``key=None`` is method ssh, for a stream over the caller's own SSH channel.
    """

    def __init__(self, key: auth.Key | None, box: str, *, pipe: bool = False,
                 server_id: str | None = None) -> None:
        if key is None and pipe:
            raise LocalProtocolError("pipe mode needs a key: method ssh needs an SSH channel")
        self.key = key
        self.box = box.encode("utf-8")
        self.pipe = pipe
        self.server_id = server_id
        self.state = ClientState.AWAIT_HELLO if pipe else ClientState.AWAIT_GREETING
        self.reply_state = ReplyState.BEFORE_HELLO if pipe else ReplyState.GREETING
        self.keys: auth.SessionKeys | None = None
        self._buf = bytearray()
        self._eof = False
        self._pending: deque[_Pending] = deque()
        self._current: _Pending | None = None
        self._hash: hashlib._Hash | None = None
        self._sent = 0
        self._size: int | None = None
        self._next_index = 0
        self.greeting: str = ""
        self.stored = 0
        self._on_line: dict[ReplyState, Callable[[ReplyLine], ClientEvent]] = {
            ReplyState.GREETING: self._line_greeting,
            ReplyState.BEFORE_HELLO: self._line_before_hello,
            ReplyState.AUTH: self._line_auth,
            ReplyState.AUTHENTICATED: self._line_authenticated,
            ReplyState.DONE: self._line_authenticated,
        }

    @property
    def failed(self) -> bool:
        return self.state is ClientState.ERROR

    def _fail(self) -> None:
        self.state = ClientState.ERROR

    def _step(self, step: Step, *, ours: bool) -> None:
        """Move both sides by ``step``; it must be allowed on the side it belongs to."""
        sent = SEND_TRANSITIONS.get(self.state, {})
        read = REPLY_TRANSITIONS.get(self.reply_state, {})
        if ours and step not in sent:
            raise LocalProtocolError(f"{step.value} in state {self.state.value}")
        if not ours and step not in read:
            raise RemoteProtocolError(f"{step.value} line while expecting {self.reply_state.value}")
        self.state = sent.get(step, self.state)
        self.reply_state = read.get(step, self.reply_state)

    @property
    def authenticated(self) -> bool:
        """The server's 235 verified: it holds the key."""
        return self.reply_state in (ReplyState.AUTHENTICATED, ReplyState.DONE)

    @property
    def files_sent(self) -> int:
        return self._next_index

    @property
    def current_index(self) -> int | None:
        return None if self._current is None else self._current.index

    # -- frames out --

    @refused_after_error
    def hello(self, nonce: bytes, time: int) -> bytes:
        self._step(Step.HELLO, ours=True)
        ext = {} if self.server_id is None else {EXT_SERVER_ID: self.server_id.encode("utf-8")}
        key = self.key
        signed = hello_without_proof(mode=MODE_PIPE if self.pipe else MODE_INTERACTIVE,
                                     box=self.box, key_id=bytes(auth.KEY_ID_LEN) if key is None else key.key_id,
                                     nonce=nonce, time=time, ext=ext,
                                     method=METHOD_SSH if key is None else METHOD_HMAC_SHA256)
        g = b"" if self.pipe else self.greeting.encode("ascii")
        self.keys = auth.ssh_session_keys(g, signed) if key is None else auth.session_keys(key, g, signed)
        return frame(FrameType.HELLO, signed + self.keys.proof)

    def _session_keys(self) -> auth.SessionKeys:
        assert self.keys is not None  # every state after HELLO has them
        return self.keys

    @refused_after_error
    def file(self, name: bytes, size: int | None, mtime: int, *, dry_run: bool = False) -> bytes:
        self._step(Step.DRY_RUN_FILE if dry_run else Step.FILE, ours=True)
        keys = self._session_keys()
        index = self._next_index
        self._next_index += 1
        hdr = encode_file_header(index, name, size, mtime, FLAG_DRY_RUN if dry_run else 0)
        pending = _Pending(index, name, hdr, dry_run)
        self._pending.append(pending)
        if not dry_run:
            self._current = pending
            self._hash = hashlib.sha256()
            self._sent = 0
            self._size = size
        return frame(FrameType.FILE, hdr + auth.file_tag(keys.k_c2s, hdr))

    @refused_after_error
    def data_header(self, chunk_len: int) -> bytes:
        """Header of a DATA frame; the caller writes it and then the chunk itself,
        after passing the chunk to :meth:`data_sent` (no copy of the content)."""
        if self.state is not ClientState.IN_FILE:
            raise LocalProtocolError("DATA outside a file")
        return data_header(chunk_len)

    @refused_after_error
    def data_sent(self, chunk: bytes | memoryview) -> None:
        if self.state is not ClientState.IN_FILE or self._hash is None:
            raise LocalProtocolError("DATA outside a file")
        self._sent += len(chunk)
        if self._size is not None and self._sent > self._size:
            raise LocalProtocolError("more data than the announced size")
        self._hash.update(chunk)

    def data(self, chunk: bytes) -> bytes:
        """DATA frame(s) for ``chunk`` in one buffer (convenient for small data)."""
        out = bytearray()
        view = memoryview(chunk)
        for pos in range(0, len(chunk), MAX_DATA):
            part = view[pos:pos + MAX_DATA]
            out += self.data_header(len(part))
            self.data_sent(part)
            out += part
        return bytes(out)

    @refused_after_error
    def end(self) -> bytes:
        cur = self._current
        if self.state is ClientState.IN_FILE and self._size is not None and self._sent != self._size:
            raise LocalProtocolError(f"END after {self._sent} of {self._size} bytes")
        self._step(Step.END, ours=True)
        assert cur is not None and self._hash is not None
        cur.n, cur.digest = self._sent, self._hash.digest()
        payload = auth.u64(cur.n) + auth.end_tag(self._session_keys().k_c2s, cur.hdr, cur.n, cur.digest)
        self._current = None
        self._hash = None
        return frame(FrameType.END, payload)

    @refused_after_error
    def abort(self) -> bytes:
        cur = self._current
        self._step(Step.ABORT, ours=True)
        assert cur is not None
        self._current = None
        self._hash = None
        return frame(FrameType.ABORT, auth.abort_tag(self._session_keys().k_c2s, cur.index))

    @refused_after_error
    def bye(self) -> bytes:
        self._step(Step.BYE, ours=True)
        count = self._next_index
        return frame(FrameType.BYE, auth.u64(count) + auth.bye_tag(self._session_keys().k_c2s, count))

    # -- lines in --

    @refused_after_error
    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("data after end of stream")
        if data:
            self._buf += data
        else:
            self._eof = True

    @refused_after_error
    def next_event(self) -> ClientEvent | Sentinel:
        if self.state is ClientState.CLOSED:
            raise LocalProtocolError("next_event() after end of stream")
        raw = take_line(self._buf)
        if raw is None:
            if self._eof:
                self.state = ClientState.CLOSED
                return ConnectionClosed(clean=False)
            return NEED_DATA
        return self._on_line[self.reply_state](parse_line(raw))

    def _line_greeting(self, r: ReplyLine) -> ClientEvent:
        if r.code == Reply.GREETING:
            challenge = parse_greeting(r.text)
            if self.key is None and "ssh" not in greeting_methods(r.text):
                raise RemoteProtocolError("the server does not offer method ssh for this box: "
                                          "give its key (-k) or see rstash-recv(8) SSH")
            self.greeting = r.text
            self._step(Step.GREETING, ours=False)
            return Greeting(r.text, challenge)
        if r.code == Reply.BUSY:
            return SessionRefused(r.code, r.text)
        raise RemoteProtocolError(f"not an rstash greeting: {quote(r.text.encode())}")

    def _line_before_hello(self, r: ReplyLine) -> ClientEvent:
        if self.pipe and r.code == Reply.GREETING:
            return Greeting(r.text, b"")  # pipe mode: the unread greeting binds nothing
        raise RemoteProtocolError(f"reply before HELLO: {quote(r.text.encode())}")

    def _line_auth(self, r: ReplyLine) -> ClientEvent:
        if self.pipe and r.code == Reply.GREETING:
            return Greeting(r.text, b"")
        if r.code != Reply.AUTH_OK:
            return SessionRefused(r.code, r.text)
        if self.key is None:
            if r.rest != "ok":
                raise RemoteProtocolError(f"malformed 235 line for method ssh: {quote(r.text.encode())}")
        elif not auth.verify_line_mac(auth.auth_mac(self._session_keys().k_s2c), parse_auth_ok(r.rest)):
            raise RemoteProtocolError("the server's 235 failed its MAC: it does not hold the key")
        self._step(Step.AUTH_OK, ours=False)
        return AuthOk()

    def _line_authenticated(self, r: ReplyLine) -> ClientEvent:
        # Lines without a MAC are receipts only under method ssh, which only a
        # client without a key speaks; with a key they end nothing but the session.
        fields = parse_receipt(r.rest) if self.key is not None else parse_plain_receipt(r)
        if r.code == Reply.BYE and self.state is ClientState.BYE_SENT and not self._pending:
            return self._bye_ok(r)
        if r.code == Reply.BYE or (fields is not None and not self._pending):
            raise RemoteProtocolError(f"reply matches no FILE sent: {quote(r.text.encode())}")
        if fields is None:
            # 554, 500, 421 timeout, 451 local error: the session ends here.
            return SessionRefused(r.code, r.text)
        pending = self._pending.popleft()
        if r.code == Reply.STORED and not pending.dry_run:
            return self._stored(r, fields, pending)
        return self._verdict(r, fields, pending)

    def _bye_ok(self, r: ReplyLine) -> Done:
        stored, mac = parse_bye(r, macs=self.key is not None)
        if stored != self.stored:
            raise RemoteProtocolError(f"221 says {stored} stored, {self.stored} receipts were verified")
        expected = auth.done_mac(self._session_keys().k_s2c, self._next_index, stored)
        if self.key is not None and not auth.verify_line_mac(expected, mac):
            raise RemoteProtocolError("the server's 221 failed its MAC")
        self._step(Step.BYE_OK, ours=False)
        return Done(stored)

    def _stored(self, r: ReplyLine, fields: ReceiptFields, pending: _Pending) -> Receipt:
        n, hex_digest, name = parse_stored(r, fields)
        if pending.n is None or pending.digest is None:
            raise RemoteProtocolError(f"malformed receipt: {quote(r.text.encode())}")
        # The MAC covers our own n and D; the text must say the same.
        if n != str(pending.n) or hex_digest != pending.digest.hex():
            raise RemoteProtocolError(f"receipt for file {pending.index} states another size or digest")
        final = decode_name(r, name)
        expected = auth.receipt_mac(self._session_keys().k_s2c, pending.index, r.code, final,
                                    pending.n, pending.digest)
        if self.key is not None and not auth.verify_line_mac(expected, fields.mac):
            raise RemoteProtocolError(f"receipt for file {pending.index} failed its MAC")
        self.stored += 1
        return Receipt(pending.index, r.code, "stored", pending.name, final, pending.n,
                       pending.digest.hex(), False)

    def _verdict(self, r: ReplyLine, fields: ReceiptFields, pending: _Pending) -> Receipt:
        """A refusal, or a dry run's ``250 would store``: MACed over the requested name."""
        expected = auth.receipt_mac(self._session_keys().k_s2c, pending.index, r.code, pending.name)
        if self.key is not None and not auth.verify_line_mac(expected, fields.mac):
            raise RemoteProtocolError(f"receipt for file {pending.index} failed its MAC")
        reason = "would store" if r.code == Reply.STORED else fields.text
        return Receipt(pending.index, r.code, reason, pending.name, pending.name, 0, "", pending.dry_run)
