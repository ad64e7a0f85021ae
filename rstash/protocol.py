"""The rstash/1 wire protocol, sans I/O (rstash(7) is its specification).

Theory of operation
-------------------
Each side owns a connection object that is *fed* the bytes its peer sent
(``receive_data``; ``b""`` means end of stream) and *asked* for what they
mean (``next_event()`` returns an event or ``NEED_DATA``). What a side wants
to say comes back from a method as bytes for the caller to write. The caller
owns every socket, pipe, file and clock; nothing here blocks, sleeps or reads
the time, so every test runs without a socket.

Client → server is a stream of frames ``type:u8 | length:u32 BE | payload``.
A frame's length is checked against its type's limits the moment the five
header bytes are in, before any of the body is buffered: a hostile peer can
make the server hold at most one legal frame. Server → client is a stream of
printable-ASCII lines ``NNN text`` of at most 1024 bytes.

The server side verifies every tag (FILE, END, ABORT, BYE) itself once the
application has handed it the session keys of a verified HELLO, and hashes
the content of each file exactly once as it passes, so that an END is judged
by the server's own byte count and SHA-256, never by values from the wire.
The client side computes the same tags and verifies every MAC the server
sends (235, each receipt, 221).

This module must never open a file or socket, read a clock or draw random
bytes: nonces, times and greetings are arguments.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from . import auth
from .errors import LocalProtocolError, RemoteProtocolError, Reply

PROTOCOL_VERSION = 1
METHOD_HMAC_SHA256 = 1
MODE_INTERACTIVE = 1
MODE_PIPE = 2
FLAG_DRY_RUN = 1
EXT_SERVER_ID = 1
MAX_LINE = 1024
#: What a reply line may hold: printable ASCII.
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
MAX_DATA = 1 << 20
#: The greeting's fixed prefix; the challenge follows it.
GREETING_PREFIX = "220 rstash/1 methods=hmac-sha256 challenge="


class FrameType(IntEnum):
    HELLO = 1
    FILE = 2
    DATA = 3
    END = 4
    ABORT = 5
    BYE = 6


#: (minimum, maximum) payload length of each frame type, checked on the header.
FRAME_LIMITS: dict[int, tuple[int, int]] = {
    FrameType.HELLO: (1, 4096),
    FrameType.FILE: (1, 4096),
    FrameType.DATA: (1, MAX_DATA),
    FrameType.END: (40, 40),
    FrameType.ABORT: (32, 32),
    FrameType.BYE: (40, 40),
}

_HEADER = struct.Struct(">BI")


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA


def frame(ftype: int, payload: bytes) -> bytes:
    lo, hi = FRAME_LIMITS[ftype]
    if not lo <= len(payload) <= hi:
        raise LocalProtocolError(f"{FrameType(ftype).name} payload of {len(payload)} bytes")
    return _HEADER.pack(ftype, len(payload)) + payload


# --- names in reply lines ------------------------------------------------------

_PCT_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}


def pct_encode(raw: bytes) -> str:
    """Percent-encode a name for a reply line (uppercase hex, rstash(7) REPLY LINES)."""
    return "".join(chr(b) if b in _PCT_SAFE else f"%{b:02X}" for b in raw)


def pct_decode(text: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or not re.fullmatch(r"[0-9A-F]{2}", pair):
                raise ValueError("bad percent escape")
            out.append(int(pair, 16))
            i += 3
        else:
            if ord(c) not in _PCT_SAFE:
                raise ValueError("unencoded byte in name")
            out.append(ord(c))
            i += 1
    return bytes(out)


# --- HELLO -------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """A parsed HELLO. ``signed`` is the payload minus its proof (what th covers)."""

    version: int
    mode: int
    method: int
    box: bytes
    key_id: bytes
    nonce: bytes
    time: int
    ext: dict[int, bytes]
    proof: bytes = field(repr=False)
    signed: bytes = field(repr=False)

    @property
    def server_id(self) -> str | None:
        raw = self.ext.get(EXT_SERVER_ID)
        return None if raw is None else raw.decode("utf-8", "replace")


def encode_ext(ext: dict[int, bytes]) -> bytes:
    return b"".join(bytes([tag]) + auth.s(value) for tag, value in sorted(ext.items()))


def hello_without_proof(*, mode: int, box: bytes, key_id: bytes, nonce: bytes, time: int,
                        ext: dict[int, bytes] | None = None) -> bytes:
    return (bytes([PROTOCOL_VERSION, mode, METHOD_HMAC_SHA256]) + auth.s(box) + key_id
            + nonce + auth.u64(time) + auth.s(encode_ext(ext or {})))


class _Reader:
    """Bounds-checked reads from one frame payload; any overrun is the peer's fault."""

    def __init__(self, data: bytes, reply: int) -> None:
        self.data = data
        self.pos = 0
        self.reply = reply

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RemoteProtocolError("frame too short", reply=self.reply)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def i64(self) -> int:
        return int.from_bytes(self.take(8), "big", signed=True)

    def s(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> None:
        if self.pos != len(self.data):
            raise RemoteProtocolError("trailing bytes in frame", reply=self.reply)


def parse_hello(payload: bytes) -> Hello:
    """Parse a HELLO. Only version and method get their own reply code (rule 1)."""
    if len(payload) >= 1 and payload[0] != PROTOCOL_VERSION:
        raise RemoteProtocolError("protocol version not supported", reply=Reply.VERSION_NOT_SUPPORTED)
    if len(payload) >= 3 and payload[2] != METHOD_HMAC_SHA256:
        raise RemoteProtocolError("method not supported", reply=Reply.METHOD_NOT_SUPPORTED)
    r = _Reader(payload, Reply.AUTH_FAILED)
    version, mode, method = r.u8(), r.u8(), r.u8()
    if mode not in (MODE_INTERACTIVE, MODE_PIPE):
        raise RemoteProtocolError("unknown session mode", reply=Reply.AUTH_FAILED)
    box = r.s()
    key_id = r.take(auth.KEY_ID_LEN)
    nonce = r.take(auth.NONCE_LEN)
    time = r.u64()
    ext_raw = r.s()
    proof = r.take(auth.MAC_LEN)
    r.done()
    ext: dict[int, bytes] = {}
    er = _Reader(ext_raw, Reply.AUTH_FAILED)
    while er.pos < len(ext_raw):
        tag = er.u8()
        value = er.s()
        if tag in ext:
            raise RemoteProtocolError("duplicate HELLO extension", reply=Reply.AUTH_FAILED)
        ext[tag] = value
    return Hello(version, mode, method, box, key_id, nonce, time, ext, proof, payload[:-auth.MAC_LEN])


# --- FILE --------------------------------------------------------------------


@dataclass(frozen=True)
class FileHeader:
    index: int
    name: bytes
    size: int | None  # None: unknown (2**64 - 1 on the wire)
    mtime: int
    flags: int
    tid: bytes
    offset: int
    hdr: bytes = field(repr=False)

    @property
    def dry_run(self) -> bool:
        return bool(self.flags & FLAG_DRY_RUN)


def encode_file_header(index: int, name: bytes, size: int | None, mtime: int, flags: int = 0,
                       tid: bytes = bytes(16), offset: int = 0) -> bytes:
    return (auth.u64(index) + auth.s(name) + auth.u64(auth.UNKNOWN_SIZE if size is None else size)
            + struct.pack(">q", mtime) + bytes([flags]) + tid + auth.u64(offset))


def parse_file_header(hdr: bytes) -> FileHeader:
    r = _Reader(hdr, Reply.PROTOCOL_ERROR)
    index = r.u64()
    name = r.s()
    size = r.u64()
    mtime = r.i64()
    flags = r.u8()
    tid = r.take(16)
    offset = r.u64()
    r.done()
    return FileHeader(index, name, None if size == auth.UNKNOWN_SIZE else size, mtime, flags,
                      tid, offset, hdr)


# --- events ------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    """A FILE whose tag verified and whose sequence number is the next one."""

    header: FileHeader

    @property
    def index(self) -> int:
        return self.header.index


@dataclass(frozen=True)
class Data:
    """Content bytes as they arrived: the received chunk or a view of it (chunks are
    immutable, so the view stays valid); ``bytes(event.data)`` for a copy."""

    data: bytes | memoryview = field(repr=False)


@dataclass(frozen=True)
class End:
    """A verified END: ``n`` and ``sha256`` are the server's own count and digest."""

    index: int
    n: int
    sha256: bytes


@dataclass(frozen=True)
class Abort:
    index: int


@dataclass(frozen=True)
class Bye:
    count: int


@dataclass(frozen=True)
class ConnectionClosed:
    """End of the peer's stream. ``clean`` after a verified BYE, else truncated."""

    clean: bool


ServerEvent = Hello | File | Data | End | Abort | Bye | ConnectionClosed


class IntegrityError(RemoteProtocolError):
    """A tag failed: ``554 integrity check failed NAME``; ends the session."""

    reply = Reply.INTEGRITY

    def __init__(self, message: str, name: bytes = b"", sha256: bytes | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.sha256 = sha256


class ServerState(Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"  # the application is judging the HELLO
    READY = "ready"
    IN_FILE = "in-file"
    DONE = "done"
    CLOSED = "closed"


#: Which frame may arrive in which state, and where it leads. A dry-run FILE
#: leads back to READY (no DATA or END follows it); that is the one transition
#: decided by content, in ``_on_file``. Anything not listed is a protocol error.
SERVER_TRANSITIONS: dict[ServerState, dict[int, ServerState]] = {
    ServerState.AWAIT_HELLO: {FrameType.HELLO: ServerState.AWAIT_AUTH},
    ServerState.AWAIT_AUTH: {},
    ServerState.READY: {FrameType.FILE: ServerState.IN_FILE, FrameType.BYE: ServerState.DONE},
    ServerState.IN_FILE: {FrameType.DATA: ServerState.IN_FILE, FrameType.END: ServerState.READY,
                          FrameType.ABORT: ServerState.READY},
    ServerState.DONE: {},
    ServerState.CLOSED: {},
}


class _Rope:
    """Received bytes kept as the chunks they arrived in.

    DATA payloads are handed out as views of those chunks, never copied: a
    gigabyte passes from the socket to the hash and the file without a second
    copy in between. Frame headers and small frames are copied out (≤ 4 KiB).
    """

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._off = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self.size += len(data)

    def peek(self, n: int) -> bytes:
        out = bytearray()
        off = self._off
        for chunk in self._chunks:
            out += chunk[off:off + n - len(out)]
            off = 0
            if len(out) >= n:
                break
        return bytes(out)

    def take(self, n: int) -> bytes:
        data = self.peek(n)
        self.skip(n)
        return data

    def skip(self, n: int) -> None:
        self.size -= n
        while n:
            avail = len(self._chunks[0]) - self._off
            if n < avail:
                self._off += n
                return
            n -= avail
            self._chunks.popleft()
            self._off = 0

    def view(self, n: int) -> bytes | memoryview:
        """Up to ``n`` bytes from the oldest chunk, without copying them."""
        chunk = self._chunks[0]
        k = min(n, len(chunk) - self._off)
        out: bytes | memoryview = chunk if self._off == 0 and k == len(chunk) \
            else memoryview(chunk)[self._off:self._off + k]
        self.skip(k)
        return out


class ServerConnection:
    """The server's half: frames in, verified events out."""

    def __init__(self) -> None:
        self.state = ServerState.AWAIT_HELLO
        self._buf = _Rope()
        self._eof = False
        self._keys: auth.SessionKeys | None = None
        self._next_index = 0
        self._current: FileHeader | None = None
        self._hash: hashlib._Hash | None = None
        self._received = 0
        #: bytes still to come of a DATA frame whose header was read
        self._data_left = 0

    # -- feeding --

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("data after end of stream")
        if data:
            self._buf.append(bytes(data))  # a no-op for bytes; a copy of a mutable buffer
        else:
            self._eof = True

    @property
    def keys(self) -> auth.SessionKeys | None:
        return self._keys

    @property
    def files_seen(self) -> int:
        return self._next_index

    @property
    def current(self) -> FileHeader | None:
        return self._current

    def authenticate(self, keys: auth.SessionKeys) -> None:
        """The application verified the HELLO's proof; tags are checked from now on."""
        if self.state is not ServerState.AWAIT_AUTH:
            raise LocalProtocolError(f"authenticate() in state {self.state.value}")
        self._keys = keys
        self.state = ServerState.READY

    def discard_current(self) -> None:
        """The current file was refused: stop hashing its data; its END is not judged."""
        self._hash = None

    # -- events --

    def next_event(self) -> ServerEvent | _Sentinel:
        if self.state is ServerState.AWAIT_AUTH:
            raise LocalProtocolError("next_event() before the HELLO was judged")
        if self.state is ServerState.CLOSED:
            raise LocalProtocolError("next_event() after end of stream")
        if self._data_left:
            return self._data_chunk()
        buf = self._buf
        if len(buf) < 5:
            return self._maybe_eof()
        ftype, length = _HEADER.unpack(buf.peek(5))
        self._check_header(ftype, length)
        if ftype == FrameType.DATA:
            buf.skip(5)
            self._data_left = length
            return self._data_chunk()
        if len(buf) < 5 + length:
            return self._maybe_eof()
        payload = buf.take(5 + length)[5:]
        target = SERVER_TRANSITIONS[self.state][ftype]
        event = self._dispatch(ftype, payload)
        if not (ftype == FrameType.FILE and isinstance(event, File) and event.header.dry_run):
            self.state = target
        return event

    def _maybe_eof(self) -> ConnectionClosed | _Sentinel:
        if not self._eof:
            return NEED_DATA
        clean = self.state is ServerState.DONE and not self._buf and not self._data_left
        self.state = ServerState.CLOSED
        return ConnectionClosed(clean)

    def _error_reply(self) -> int:
        return Reply.AUTH_FAILED if self._keys is None else Reply.PROTOCOL_ERROR

    def _check_header(self, ftype: int, length: int) -> None:
        limits = FRAME_LIMITS.get(ftype)
        if limits is None:
            raise RemoteProtocolError(f"unknown frame type {ftype}", reply=self._error_reply())
        if ftype not in SERVER_TRANSITIONS[self.state]:
            raise RemoteProtocolError(
                f"{FrameType(ftype).name} frame in state {self.state.value}",
                reply=self._error_reply())
        lo, hi = limits
        if not lo <= length <= hi:
            raise RemoteProtocolError(
                f"{FrameType(ftype).name} frame of {length} bytes", reply=self._error_reply())

    def _data_chunk(self) -> Data | ConnectionClosed | _Sentinel:
        buf = self._buf
        if not buf:
            return self._maybe_eof()
        assert self._current is not None
        chunk = buf.view(self._data_left)
        n = len(chunk)
        size = self._current.size
        if size is not None and self._received + n > size:
            raise RemoteProtocolError("more data than the announced size")
        self._data_left -= n
        self._received += n
        if self._hash is not None:
            self._hash.update(chunk)
        return Data(chunk)

    def _dispatch(self, ftype: int, payload: bytes) -> ServerEvent:
        if ftype == FrameType.HELLO:
            return parse_hello(payload)
        keys = self._keys
        assert keys is not None
        if ftype == FrameType.FILE:
            return self._on_file(keys, payload)
        if ftype == FrameType.END:
            return self._on_end(keys, payload)
        if ftype == FrameType.ABORT:
            cur = self._current
            assert cur is not None
            if not auth.verify(auth.abort_tag(keys.k_c2s, cur.index), payload):
                raise IntegrityError("ABORT tag failed", cur.name)
            self._current = None
            self._hash = None
            return Abort(cur.index)
        # BYE
        count = int.from_bytes(payload[:8], "big")
        if not auth.verify(auth.bye_tag(keys.k_c2s, count), payload[8:]):
            raise IntegrityError("BYE tag failed")
        if count != self._next_index:
            raise RemoteProtocolError(f"BYE counts {count} files, {self._next_index} were sent")
        return Bye(count)

    def _on_file(self, keys: auth.SessionKeys, payload: bytes) -> File:
        if len(payload) < auth.MAC_LEN:
            raise RemoteProtocolError("FILE frame too short")
        hdr, tag = payload[:-auth.MAC_LEN], payload[-auth.MAC_LEN:]
        # The tag is checked before a single field is believed (rule 3).
        if not auth.verify(auth.file_tag(keys.k_c2s, hdr), tag):
            raise IntegrityError("FILE tag failed")
        header = parse_file_header(hdr)
        if header.index != self._next_index:
            raise IntegrityError(f"FILE sequence number {header.index}, expected {self._next_index}",
                                 header.name)
        if header.offset != 0:
            raise RemoteProtocolError("FILE offset must be 0 in rstash/1")
        if header.flags & ~FLAG_DRY_RUN:
            raise RemoteProtocolError(f"unknown FILE flags {header.flags:#x}")
        self._next_index += 1
        if not header.dry_run:
            self._current = header
            self._hash = hashlib.sha256()
            self._received = 0
        return File(header)

    def _on_end(self, keys: auth.SessionKeys, payload: bytes) -> End:
        cur = self._current
        assert cur is not None
        n = self._received
        hasher = self._hash
        self._current = None
        self._hash = None
        if hasher is None:  # discarded: its END decides nothing
            return End(cur.index, n, auth.ZERO_DIGEST)
        digest = hasher.digest()
        # Judged by our own count and digest; the n on the wire is never believed.
        if not auth.verify(auth.end_tag(keys.k_c2s, cur.hdr, n, digest), payload[8:]):
            raise IntegrityError("END tag failed", cur.name, digest)
        if cur.size is not None and n != cur.size:
            raise RemoteProtocolError(f"END after {n} of {cur.size} announced bytes")
        return End(cur.index, n, digest)


# --- server reply lines ----------------------------------------------------------

#: The text of each per-file reply code, as in rstash(7) REPLY LINES.
RECEIPT_TEXT: dict[int, str] = {
    Reply.EXISTS: "exists",
    Reply.NAME_NOT_ALLOWED: "name not allowed",
    Reply.INSUFFICIENT_STORAGE: "insufficient storage",
    Reply.LOCAL_ERROR: "local error",
    Reply.ABORTED: "aborted",
}
ECHO_LIMIT = 255


def line(text: str) -> bytes:
    data = text.encode("ascii") + b"\r\n"
    if len(data) > MAX_LINE or not _PRINTABLE.fullmatch(data, 0, len(data) - 2):
        raise LocalProtocolError("reply line too long or not printable")
    return data


def greeting_line(challenge: bytes) -> str:
    return GREETING_PREFIX + auth.b64url(challenge)


def auth_ok_line(keys: auth.SessionKeys) -> bytes:
    return line(f"{Reply.AUTH_OK} ok mac={auth.auth_mac(keys.k_s2c)}")


def receipt_line(keys: auth.SessionKeys, index: int, code: int, name: bytes, *,
                 reason: str | None = None, final_name: bytes | None = None,
                 n: int = 0, sha256: bytes = auth.ZERO_DIGEST, dry_run: bool = False) -> bytes:
    """The one reply line for FILE ``index``. Refusals MAC n = 0, D = zeros, the requested name."""
    if code == Reply.STORED:
        if dry_run:
            mac = auth.receipt_mac(keys.k_s2c, index, code, name)
            return line(f"250 would store {pct_encode(name)} mac={mac}")
        final = name if final_name is None else final_name
        mac = auth.receipt_mac(keys.k_s2c, index, code, final, n, sha256)
        return line(f"250 stored {n} sha256:{sha256.hex()} {pct_encode(final)} mac={mac}")
    text = reason or RECEIPT_TEXT[code]
    mac = auth.receipt_mac(keys.k_s2c, index, code, name)
    return line(f"{code} {text} {pct_encode(name[:ECHO_LIMIT])} mac={mac}")


def integrity_line(name: bytes) -> bytes:
    return line(f"{Reply.INTEGRITY} integrity check failed {pct_encode(name[:ECHO_LIMIT])}".rstrip())


def bye_line(keys: auth.SessionKeys, count: int, stored: int) -> bytes:
    return line(f"{Reply.BYE} bye {stored} mac={auth.done_mac(keys.k_s2c, count, stored)}")


#: Session-level lines without a MAC.
SESSION_LINES: dict[int, str] = {
    Reply.BUSY: "421 busy",
    Reply.AUTH_FAILED: "535 authentication failed",
    Reply.VERSION_NOT_SUPPORTED: "505 version not supported",
    Reply.METHOD_NOT_SUPPORTED: "504 method not supported",
    Reply.PIPE_MODE_OFF: "530 pipe mode off",
    Reply.REPLAYED: "532 replayed session",
    Reply.LOCAL_ERROR: "451 local error",
    Reply.PROTOCOL_ERROR: "500 protocol error",
}


def session_line(code: int) -> bytes:
    return line(SESSION_LINES[code])


def skew_line(skew: int) -> bytes:
    return line(f"{Reply.CLOCK_SKEW} clock skew {skew:+d} s")


# --- the client's half -------------------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    text: str
    challenge: bytes


@dataclass(frozen=True)
class AuthOk:
    pass


@dataclass(frozen=True)
class Receipt:
    """A verified reply to FILE ``index``. ``final_name`` is what the box holds."""

    index: int
    code: int
    reason: str
    name: bytes
    final_name: bytes
    size: int
    sha256: str
    dry_run: bool

    @property
    def ok(self) -> bool:
        return self.code == Reply.STORED


@dataclass(frozen=True)
class Done:
    """A verified ``221 bye STORED``."""

    stored: int


@dataclass(frozen=True)
class SessionRefused:
    """A session-level line without MAC: busy, auth failed, pipe-mode refusals, 554, 500…"""

    code: int
    text: str


ClientEvent = Greeting | AuthOk | Receipt | Done | SessionRefused | ConnectionClosed

_LINE_RE = re.compile(r"([2-5][0-9]{2}) (.*)\Z")
_RECEIPT_RE = re.compile(r"(?P<text>.*?) ?(?P<name>[^ ]*) mac=(?P<mac>[A-Za-z0-9_-]{22})\Z")
_STORED_RE = re.compile(r"stored (?P<n>[0-9]{1,20}) sha256:(?P<hex>[0-9a-f]{64}) (?P<name>[^ ]+)\Z")


@dataclass
class _Pending:
    index: int
    name: bytes
    hdr: bytes
    dry_run: bool
    n: int | None = None
    digest: bytes | None = None


class ClientState(Enum):
    AWAIT_GREETING = "await-greeting"
    AWAIT_HELLO = "await-hello"  # greeting read, HELLO not yet made
    AUTHENTICATING = "authenticating"
    READY = "ready"
    IN_FILE = "in-file"
    BYE_SENT = "bye-sent"
    DONE = "done"
    CLOSED = "closed"


class ClientConnection:
    """The client's half: frames out, verified replies in.

    Pipe mode (``pipe=True``) never reads a greeting: its HELLO binds an empty G.
    """

    def __init__(self, key: auth.Key, box: str, *, pipe: bool = False,
                 server_id: str | None = None) -> None:
        self.key = key
        self.box = box.encode("utf-8")
        self.pipe = pipe
        self.server_id = server_id
        self.state = ClientState.AWAIT_HELLO if pipe else ClientState.AWAIT_GREETING
        self.keys: auth.SessionKeys | None = None
        self._buf = bytearray()
        self._eof = False
        self._authed = False
        self._pending: deque[_Pending] = deque()
        self._current: _Pending | None = None
        self._hash: hashlib._Hash | None = None
        self._sent = 0
        self._size: int | None = None
        self._next_index = 0
        self.greeting: str = ""
        self.stored = 0

    # -- frames out --

    def hello(self, nonce: bytes, time: int) -> bytes:
        if self.state is not ClientState.AWAIT_HELLO:
            raise LocalProtocolError(f"hello() in state {self.state.value}")
        ext = {} if self.server_id is None else {EXT_SERVER_ID: self.server_id.encode("utf-8")}
        signed = hello_without_proof(mode=MODE_PIPE if self.pipe else MODE_INTERACTIVE,
                                     box=self.box, key_id=self.key.key_id, nonce=nonce,
                                     time=time, ext=ext)
        g = b"" if self.pipe else self.greeting.encode("ascii")
        self.keys = auth.session_keys(self.key, g, signed)
        self.state = ClientState.AUTHENTICATING
        return frame(FrameType.HELLO, signed + self.keys.proof)

    def _ready_for_file(self) -> auth.SessionKeys:
        if self.state not in (ClientState.AUTHENTICATING, ClientState.READY) or self.keys is None:
            raise LocalProtocolError(f"FILE in state {self.state.value}")
        return self.keys

    def file(self, name: bytes, size: int | None, mtime: int, *, dry_run: bool = False) -> bytes:
        keys = self._ready_for_file()
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
            self.state = ClientState.IN_FILE
        return frame(FrameType.FILE, hdr + auth.file_tag(keys.k_c2s, hdr))

    def data_header(self, chunk_len: int) -> bytes:
        """Header of a DATA frame; the caller writes it and then the chunk itself,
        after passing the chunk to :meth:`data_sent` (no copy of the content)."""
        if self.state is not ClientState.IN_FILE:
            raise LocalProtocolError("DATA outside a file")
        if not 1 <= chunk_len <= MAX_DATA:
            raise LocalProtocolError(f"DATA of {chunk_len} bytes")
        return _HEADER.pack(FrameType.DATA, chunk_len)

    def data_sent(self, chunk: bytes | memoryview) -> None:
        assert self._hash is not None
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

    def end(self) -> bytes:
        cur = self._current
        if self.state is not ClientState.IN_FILE or cur is None or self._hash is None:
            raise LocalProtocolError("END outside a file")
        if self._size is not None and self._sent != self._size:
            raise LocalProtocolError(f"END after {self._sent} of {self._size} bytes")
        cur.n, cur.digest = self._sent, self._hash.digest()
        assert self.keys is not None
        payload = auth.u64(cur.n) + auth.end_tag(self.keys.k_c2s, cur.hdr, cur.n, cur.digest)
        self._current = None
        self._hash = None
        self.state = ClientState.READY
        return frame(FrameType.END, payload)

    @property
    def current_index(self) -> int | None:
        return None if self._current is None else self._current.index

    def abort(self) -> bytes:
        cur = self._current
        if self.state is not ClientState.IN_FILE or cur is None:
            raise LocalProtocolError("ABORT outside a file")
        assert self.keys is not None
        self._current = None
        self._hash = None
        self.state = ClientState.READY
        return frame(FrameType.ABORT, auth.abort_tag(self.keys.k_c2s, cur.index))

    def bye(self) -> bytes:
        if self.state not in (ClientState.AUTHENTICATING, ClientState.READY) or self.keys is None:
            raise LocalProtocolError(f"BYE in state {self.state.value}")
        self.state = ClientState.BYE_SENT
        count = self._next_index
        return frame(FrameType.BYE, auth.u64(count) + auth.bye_tag(self.keys.k_c2s, count))

    @property
    def files_sent(self) -> int:
        return self._next_index

    @property
    def authenticated(self) -> bool:
        return self._authed

    # -- lines in --

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("data after end of stream")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> ClientEvent | _Sentinel:
        if self.state is ClientState.CLOSED:
            raise LocalProtocolError("next_event() after end of stream")
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > MAX_LINE:
                raise RemoteProtocolError("reply line longer than 1024 bytes")
            if self._eof:
                self.state = ClientState.CLOSED
                return ConnectionClosed(clean=False)
            return NEED_DATA
        if nl + 1 > MAX_LINE:
            raise RemoteProtocolError("reply line longer than 1024 bytes")
        raw = bytes(self._buf[:nl])
        del self._buf[:nl + 1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not _PRINTABLE.fullmatch(raw):
            raise RemoteProtocolError(f"not an rstash reply: {_quote(raw)}")
        text = raw.decode("ascii")
        m = _LINE_RE.match(text)
        if m is None:
            raise RemoteProtocolError(f"not an rstash reply: {_quote(raw)}")
        return self._on_line(int(m.group(1)), m.group(2), text)

    def _on_line(self, code: int, rest: str, text: str) -> ClientEvent:
        if self.state is ClientState.AWAIT_GREETING:
            if code == Reply.GREETING:
                challenge = _parse_greeting(text)
                self.greeting = text
                self.state = ClientState.AWAIT_HELLO
                return Greeting(text, challenge)
            if code == Reply.BUSY:
                return SessionRefused(code, text)
            raise RemoteProtocolError(f"not an rstash greeting: {_quote(text.encode())}")
        if self.pipe and not self._authed and code == Reply.GREETING:
            return Greeting(text, b"")  # pipe mode: the unread greeting binds nothing
        if self.state is ClientState.AWAIT_HELLO:
            raise RemoteProtocolError(f"reply before HELLO: {_quote(text.encode())}")
        keys = self.keys
        assert keys is not None
        if not self._authed:
            if code == Reply.AUTH_OK:
                if not auth.verify_line_mac(auth.auth_mac(keys.k_s2c), rest.removeprefix("ok mac=")):
                    raise RemoteProtocolError("the server's 235 failed its MAC: it does not hold the key")
                self._authed = True
                return AuthOk()
            return SessionRefused(code, text)
        m = _RECEIPT_RE.match(rest)
        if self.state is ClientState.BYE_SENT and not self._pending and code == Reply.BYE:
            parts = rest.split(" ")
            if len(parts) != 3 or parts[0] != "bye" or not parts[1].isdigit() or not parts[2].startswith("mac="):
                raise RemoteProtocolError(f"malformed 221 line: {_quote(text.encode())}")
            stored = int(parts[1])
            if stored != self.stored:
                raise RemoteProtocolError(f"221 says {stored} stored, {self.stored} receipts were verified")
            if not auth.verify_line_mac(auth.done_mac(keys.k_s2c, self._next_index, stored), parts[2][4:]):
                raise RemoteProtocolError("the server's 221 failed its MAC")
            self.state = ClientState.DONE
            return Done(stored)
        if code == Reply.BYE or (m is not None and not self._pending):
            raise RemoteProtocolError(f"reply matches no FILE sent: {_quote(text.encode())}")
        if m is None:
            # 554, 500, 421 timeout, 451 local error: the session ends here.
            return SessionRefused(code, text)
        pending = self._pending.popleft()
        if code == Reply.STORED and not pending.dry_run:
            sm = _STORED_RE.match(m.group("text") + " " + m.group("name"))
            if sm is None or pending.n is None or pending.digest is None:
                raise RemoteProtocolError(f"malformed receipt: {_quote(text.encode())}")
            # The MAC covers our own n and D; the text must say the same.
            if sm.group("n") != str(pending.n) or sm.group("hex") != pending.digest.hex():
                raise RemoteProtocolError(f"receipt for file {pending.index} states another size or digest")
            try:
                final = pct_decode(sm.group("name"))
            except ValueError:
                raise RemoteProtocolError(f"malformed name in receipt: {_quote(text.encode())}") from None
            expected = auth.receipt_mac(keys.k_s2c, pending.index, code, final, pending.n, pending.digest)
            if not auth.verify_line_mac(expected, m.group("mac")):
                raise RemoteProtocolError(f"receipt for file {pending.index} failed its MAC")
            self.stored += 1
            return Receipt(pending.index, code, "stored", pending.name, final, pending.n,
                           pending.digest.hex(), False)
        expected = auth.receipt_mac(keys.k_s2c, pending.index, code, pending.name)
        if not auth.verify_line_mac(expected, m.group("mac")):
            raise RemoteProtocolError(f"receipt for file {pending.index} failed its MAC")
        reason = m.group("text")
        if code == Reply.STORED:
            reason = "would store"
        return Receipt(pending.index, code, reason, pending.name, pending.name, 0, "", pending.dry_run)


def _parse_greeting(text: str) -> bytes:
    """The challenge of a ``220 rstash/1 …`` greeting that offers hmac-sha256."""
    words = text.split(" ")
    if len(words) < 3 or words[1] != "rstash/1":
        raise RemoteProtocolError(f"unsupported greeting: {_quote(text.encode())}")
    fields = dict(w.partition("=")[::2] for w in words[2:])
    if "hmac-sha256" not in fields.get("methods", "").split(","):
        raise RemoteProtocolError("the server offers no method this client speaks")
    try:
        challenge = auth.b64url_decode(fields.get("challenge", ""))
    except ValueError:
        raise RemoteProtocolError("malformed greeting challenge") from None
    if len(challenge) < 16:
        raise RemoteProtocolError("greeting challenge too short")
    return challenge


def _quote(raw: bytes) -> str:
    return repr(raw[:120].decode("ascii", "backslashreplace"))
