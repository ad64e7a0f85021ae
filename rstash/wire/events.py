"""The events of rstash/1, and the HELLO and FILE headers they carry (rstash(7)).

Events are small frozen dataclasses: what a ``ServerConnection`` reads from
frames (Hello, File, Data, End, Abort, Bye) and what a ``ClientConnection``
reads from reply lines (Greeting, AuthOk, Receipt, Done, SessionRefused);
both end with ConnectionClosed. This module also encodes and parses the HELLO
payload and the FILE header. It must never verify a tag or proof: judging
them needs session keys, which the roles hold.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .. import auth
from ..errors import RemoteProtocolError, Reply
from .frames import (
    EXT_SERVER_ID,
    FLAG_DRY_RUN,
    METHOD_HMAC_SHA256,
    METHOD_SSH,
    MODE_INTERACTIVE,
    MODE_PIPE,
    NO_TID,
    PROTOCOL_VERSION,
    PayloadReader,
)

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
    """HELLO extensions as ``tag:u8 | s(value)`` entries, in tag order."""
    return b"".join(bytes([tag]) + auth.s(value) for tag, value in sorted(ext.items()))


def hello_without_proof(*, mode: int, box: bytes, key_id: bytes, nonce: bytes, time: int,
                        ext: dict[int, bytes] | None = None, method: int = METHOD_HMAC_SHA256) -> bytes:
    """The signed part of a HELLO; the proof over it follows on the wire."""
    return (bytes([PROTOCOL_VERSION, mode, method]) + auth.s(box) + key_id
            + nonce + auth.u64(time) + auth.s(encode_ext(ext or {})))


def parse_hello(payload: bytes) -> Hello:
    """Parse a HELLO. Only version and method get their own reply code; every other
    flaw is ``535``, like a failed proof, so a prober learns nothing."""
    if len(payload) >= 1 and payload[0] != PROTOCOL_VERSION:
        raise RemoteProtocolError("protocol version not supported", reply=Reply.VERSION_NOT_SUPPORTED)
    if len(payload) >= 3 and payload[2] not in (METHOD_HMAC_SHA256, METHOD_SSH):
        raise RemoteProtocolError("method not supported", reply=Reply.METHOD_NOT_SUPPORTED)
    r = PayloadReader(payload, Reply.AUTH_FAILED)
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
    er = PayloadReader(ext_raw, Reply.AUTH_FAILED)
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
    """A FILE header; ``hdr`` is its encoding, which the FILE and END tags cover."""

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

    @property
    def has_tid(self) -> bool:
        return self.tid != NO_TID


def encode_file_header(index: int, name: bytes, size: int | None, mtime: int, flags: int = 0,
                       tid: bytes = bytes(16), offset: int = 0) -> bytes:
    return (auth.u64(index) + auth.s(name) + auth.u64(auth.UNKNOWN_SIZE if size is None else size)
            + struct.pack(">q", mtime) + bytes([flags]) + tid + auth.u64(offset))


def parse_file_header(hdr: bytes) -> FileHeader:
    """Parse a FILE header whose tag verified; a flaw is ``500``."""
    r = PayloadReader(hdr, Reply.PROTOCOL_ERROR)
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


# --- what the server reads -----------------------------------------------------


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
    """A verified ABORT of file ``index``."""

    index: int


@dataclass(frozen=True)
class Bye:
    """A verified BYE counting ``count`` FILE frames, all of them seen."""

    count: int


@dataclass(frozen=True)
class ConnectionClosed:
    """End of the peer's stream. The server reports ``clean`` after a verified BYE
    and nothing after it, else the session was cut short; the client always
    reports ``clean=False`` and judges a session by its ``Done``."""

    clean: bool


ServerEvent = Hello | File | Data | End | Abort | Bye | ConnectionClosed


# --- what the client reads -----------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    """The ``220`` line; ``challenge`` is empty in pipe mode, whose HELLO binds none."""

    text: str
    challenge: bytes


@dataclass(frozen=True)
class AuthOk:
    """A ``235`` whose MAC verified: the server holds the key."""


@dataclass(frozen=True)
class Go:
    """``354 go``: send waited FILE ``index`` from its first byte."""

    index: int


@dataclass(frozen=True)
class ResumeOffer:
    """A ``350 resume`` whose MAC verified: the server holds ``offset`` bytes of
    FILE ``index`` whose SHA-256 is ``prefix``. The caller compares them with its
    file and then calls ``resume()`` or ``abort()``."""

    index: int
    offset: int
    prefix: bytes


@dataclass(frozen=True)
class Receipt:
    """A verified reply to FILE ``index``. ``final_name`` is what the box holds.

    ``already``: a ``251`` line; its ``sha256`` is the server's, which the caller
    compares with its own file before it counts the file stored."""

    index: int
    code: int
    reason: str
    name: bytes
    final_name: bytes
    size: int
    sha256: str
    dry_run: bool
    already: bool = False

    @property
    def ok(self) -> bool:
        return self.code == Reply.STORED


@dataclass(frozen=True)
class Done:
    """A verified ``221 bye STORED``: ``stored`` equals the count of verified
    receipts that said stored."""

    stored: int


@dataclass(frozen=True)
class SessionRefused:
    """A session-level line without MAC: busy, auth failed, pipe-mode refusals, 554, 500…"""

    code: int
    text: str


ClientEvent = Greeting | AuthOk | Go | ResumeOffer | Receipt | Done | SessionRefused | ConnectionClosed
