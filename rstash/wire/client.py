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

from .. import auth
from ..errors import LocalProtocolError, RemoteProtocolError, Reply
from . import frames
from .client_table import REPLY_TRANSITIONS, SEND_TRANSITIONS, ClientState, Pending, ReplyState, Step
from .events import (
    AuthOk,
    ClientEvent,
    ConnectionClosed,
    Done,
    Go,
    Greeting,
    Receipt,
    ResumeOffer,
    SessionRefused,
    encode_file_header,
    hello_without_proof,
)
from .frames import (
    EXT_SERVER_ID,
    FLAG_DRY_RUN,
    MAX_DATA,
    NEED_DATA,
    NO_TID,
    FrameType,
    Sentinel,
    data_header,
    frame,
    is_waited,
    refused_after_error,
)
from .replies import (
    GO_LINE,
    ReceiptFields,
    ReplyLine,
    decode_name,
    greeting_methods,
    offers_resume,
    parse_already,
    parse_auth_ok,
    parse_bye,
    parse_greeting,
    parse_line,
    parse_plain_receipt,
    parse_receipt,
    parse_resume,
    parse_stored,
    quote,
    take_line,
)


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
        self._pending: deque[Pending] = deque()
        self._current: Pending | None = None
        self._hash: hashlib._Hash | None = None
        self._sent = 0
        #: (offset, prefix digest) of the 350 being considered
        self._offer: tuple[int, bytes] | None = None
        self._size: int | None = None
        self._next_index = 0
        self.greeting: str = ""
        #: the greeting carried ``resume``: FILEs may carry a tid
        self.resume = False
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
        signed = hello_without_proof(mode=frames.MODE_PIPE if self.pipe else frames.MODE_INTERACTIVE,
                                     box=self.box, key_id=bytes(auth.KEY_ID_LEN) if key is None else key.key_id,
                                     nonce=nonce, time=time, ext=ext,
                                     method=frames.METHOD_SSH if key is None else frames.METHOD_HMAC_SHA256)
        g = b"" if self.pipe else self.greeting.encode("ascii")
        self.keys = auth.ssh_session_keys(g, signed) if key is None else auth.session_keys(key, g, signed)
        return frame(FrameType.HELLO, signed + self.keys.proof)

    def _session_keys(self) -> auth.SessionKeys:
        assert self.keys is not None  # every state after HELLO has them
        return self.keys

    @refused_after_error
    def file(self, name: bytes, size: int | None, mtime: int, *, dry_run: bool = False,
             tid: bytes = NO_TID) -> bytes:
        """A FILE frame; ``tid`` only when the greeting offered resume. A waited FILE
        (see :attr:`waits`) is followed by nothing until its first line is read."""
        if tid != NO_TID and (not self.resume or dry_run or len(tid) != len(NO_TID)):
            raise LocalProtocolError("a tid needs a 16-byte id, a real file and a server offering resume")
        waited = is_waited(resume=self.resume, tid=tid, size=size, dry_run=dry_run)
        self._step(Step.DRY_RUN_FILE if dry_run else Step.WAITED_FILE if waited else Step.FILE,
                   ours=True)
        keys = self._session_keys()
        index = self._next_index
        self._next_index += 1
        hdr = encode_file_header(index, name, size, mtime, FLAG_DRY_RUN if dry_run else 0, tid)
        pending = Pending(index, name, hdr, dry_run, waited=waited, size=size, tid=tid)
        self._pending.append(pending)
        if not dry_run:
            self._current = pending
            self._hash = hashlib.sha256()
            self._sent = 0
            self._size = size
        return frame(FrameType.FILE, hdr + auth.file_tag(keys.k_c2s, hdr))

    @property
    def waits(self) -> bool:
        """The last FILE waits for its first line: send nothing until it is read."""
        return self.state is ClientState.WAITING

    @refused_after_error
    def resume_from(self, offset: int, prefix: hashlib._Hash) -> None:
        """Accept the 350 offer: ``prefix`` is the SHA-256 state of this file's first
        ``offset`` bytes, which must equal what the server holds. DATA then carries
        the rest only, and END covers the whole content."""
        offer = self._offer
        if self.state is not ClientState.OFFERED or offer is None:
            raise LocalProtocolError(f"resume_from() in state {self.state.value}")
        if offset != offer[0] or prefix.digest() != offer[1]:
            raise LocalProtocolError("resume_from() with another prefix than the server holds")
        self._step(Step.RESUME, ours=True)
        self._hash = prefix
        self._sent = offset
        self._offer = None

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
        self._offer = None
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
            self.resume = offers_resume(r.text)
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
        if r.code in (Reply.GO, Reply.RESUME):
            return self._interim(r)
        fields = self._fields(r)
        if r.code == Reply.BYE and self.state is ClientState.BYE_SENT and not self._pending:
            return self._bye_ok(r)
        if r.code == Reply.BYE or (fields is not None and not self._pending):
            raise RemoteProtocolError(f"reply matches no FILE sent: {quote(r.text.encode())}")
        if fields is None:
            # 554, 500, 421 timeout, 451 local error: the session ends here.
            return SessionRefused(r.code, r.text)
        head = self._pending[0]
        finished = head.waited and not head.answered
        pending = self._pending.popleft()
        if r.code == Reply.STORED and not pending.dry_run:
            receipt = self._stored(r, fields, pending)
        elif r.code == Reply.ALREADY_STORED and pending.tid != NO_TID:
            receipt = self._already(r, fields, pending)
        else:
            receipt = self._verdict(r, fields, pending)
        if finished and receipt.code != Reply.STORED:
            self._step(Step.FINISHED, ours=False)
            self._current = None
            self._hash = None
        return receipt

    def _fields(self, r: ReplyLine) -> ReceiptFields | None:
        # Lines without a MAC are receipts only under method ssh, which only a
        # client without a key speaks; with a key they end nothing but the session.
        return parse_receipt(r.rest) if self.key is not None else parse_plain_receipt(r)

    def _interim(self, r: ReplyLine) -> ClientEvent:
        """354 or 350: the first line of the waited FILE at the head of the queue."""
        head = self._pending[0] if self._pending else None
        if head is None or not head.waited or head.answered or self.state is not ClientState.WAITING:
            raise RemoteProtocolError(f"{r.code} line for a FILE that does not wait: {quote(r.text.encode())}")
        head.answered = True
        if r.code == Reply.GO:
            if r.text != GO_LINE:
                raise RemoteProtocolError(f"malformed 354 line: {quote(r.text.encode())}")
            self._step(Step.GO, ours=False)
            return Go(head.index)
        fields = self._fields(r)
        if fields is None:
            raise RemoteProtocolError(f"malformed 350 line: {quote(r.text.encode())}")
        offset, prefix = parse_resume(r, fields)
        if head.size is None or not 0 < offset < head.size:
            raise RemoteProtocolError(f"350 offers {offset} bytes of a {head.size}-byte file")
        expected = auth.resume_mac(self._session_keys().k_s2c, head.index, offset, prefix, head.name)
        if self.key is not None and not auth.verify_line_mac(expected, fields.mac):
            raise RemoteProtocolError(f"350 for file {head.index} failed its MAC")
        self._step(Step.OFFER, ours=False)
        self._offer = (offset, prefix)
        return ResumeOffer(head.index, offset, prefix)

    def _already(self, r: ReplyLine, fields: ReceiptFields, pending: Pending) -> Receipt:
        """251: MACed over the line's own SIZE and HEX, which the caller compares with its file."""
        n, hex_digest, name = parse_already(r, fields)
        if pending.size is None or n != str(pending.size):
            raise RemoteProtocolError(f"251 for file {pending.index} states another size")
        final = decode_name(r, name)
        expected = auth.already_mac(self._session_keys().k_s2c, pending.index, final, pending.size,
                                    bytes.fromhex(hex_digest))
        if self.key is not None and not auth.verify_line_mac(expected, fields.mac):
            raise RemoteProtocolError(f"251 for file {pending.index} failed its MAC")
        return Receipt(pending.index, r.code, "already stored", pending.name, final, pending.size,
                       hex_digest, False, already=True)

    def _bye_ok(self, r: ReplyLine) -> Done:
        stored, mac = parse_bye(r, macs=self.key is not None)
        if stored != self.stored:
            raise RemoteProtocolError(f"221 says {stored} stored, {self.stored} receipts were verified")
        expected = auth.done_mac(self._session_keys().k_s2c, self._next_index, stored)
        if self.key is not None and not auth.verify_line_mac(expected, mac):
            raise RemoteProtocolError("the server's 221 failed its MAC")
        self._step(Step.BYE_OK, ours=False)
        return Done(stored)

    def _stored(self, r: ReplyLine, fields: ReceiptFields, pending: Pending) -> Receipt:
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

    def _verdict(self, r: ReplyLine, fields: ReceiptFields, pending: Pending) -> Receipt:
        """A refusal, or a dry run's ``250 would store``: MACed over the requested name."""
        expected = auth.receipt_mac(self._session_keys().k_s2c, pending.index, r.code, pending.name)
        if self.key is not None and not auth.verify_line_mac(expected, fields.mac):
            raise RemoteProtocolError(f"receipt for file {pending.index} failed its MAC")
        reason = "would store" if r.code == Reply.STORED else fields.text
        return Receipt(pending.index, r.code, reason, pending.name, pending.name, 0, "", pending.dry_run)
