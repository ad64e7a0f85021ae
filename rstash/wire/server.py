"""The server's role in rstash/1: frames in, verified events out (rstash(7)).

The server verifies every tag (FILE, END, ABORT, BYE) itself once the
application has handed it the session keys of a verified HELLO, and hashes the
content of each file exactly once as it passes, so that an END is judged by
the server's own byte count and SHA-256, never by values from the wire.

It must never judge a HELLO's proof (that needs the box's keys: the
application's job), do I/O, read a clock or draw random bytes.
"""

from __future__ import annotations

import hashlib
from enum import Enum

from .. import auth
from ..errors import IntegrityError, LocalProtocolError, RemoteProtocolError, Reply
from .events import (
    Abort,
    Bye,
    ConnectionClosed,
    Data,
    End,
    File,
    FileHeader,
    ServerEvent,
    parse_file_header,
    parse_hello,
)
from .frames import (
    FLAG_DRY_RUN,
    FRAME_LIMITS,
    HEADER,
    NEED_DATA,
    FrameType,
    Rope,
    Sentinel,
    is_waited,
    refused_after_error,
)


class ServerState(Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"  # the application is judging the HELLO
    READY = "ready"
    AWAIT_GO = "await-go"  # a waited FILE: the application answers before more frames
    IN_FILE = "in-file"
    DONE = "done"  # a verified BYE was read
    CLOSED = "closed"
    ERROR = "error"


class Judged(Enum):
    """What moves the server without a frame of its own kind."""

    #: the application verified the HELLO's proof (``authenticate()``)
    AUTHENTICATED = "authenticated"
    #: a FILE with the dry-run flag: no DATA or END follows it
    DRY_RUN_FILE = "dry-run FILE"
    #: a FILE that waits for its first line (rstash(7) RESUME AND RE-RUNS)
    WAITED_FILE = "waited FILE"
    #: the application sent 354 or 350 (``go()``): DATA follows
    GO = "354/350 sent"
    #: the application sent 251 or a refusal to a waited FILE (``finish_waited()``)
    FINISHED = "251/refusal sent"


# Theory of operation
# -------------------
# The server reads one frame at a time; what arrived is looked up under the
# current state here. A frame type missing there is refused on its five-byte
# header, before its body is buffered: 535 before authentication, 500 after (a
# peer that has not proved the key learns nothing from the code). A frame that
# is allowed moves the state only after it has been parsed and its tag verified,
# so a frame that fails leaves no trace but the ERROR state.
#
# A waited FILE (a tid, 64 MiB or more, in a session that offered resume) moves
# to AWAIT_GO, which admits no frame: the client waits for the application's
# answer, ``go()`` (354 or 350: DATA follows, from the offset the server holds)
# or ``finish_waited()`` (251 or a refusal: nothing follows).
#
# After HELLO the server waits in AWAIT_AUTH, reading nothing, until the
# application has judged the proof and called ``authenticate()``. DATA keeps a
# file open; END and ABORT close it; a dry-run FILE leaves the server READY. BYE
# ends the session: DONE admits no frame at all. End of stream moves any state
# to CLOSED (clean only from DONE with nothing left over).
#
# ERROR is entered from any state the moment a call raises (a bad tag, a frame
# in the wrong state, a call the state does not allow); every later call is
# refused with a LocalProtocolError.
SERVER_TRANSITIONS: dict[ServerState, dict[FrameType | Judged, ServerState]] = {
    ServerState.AWAIT_HELLO: {FrameType.HELLO: ServerState.AWAIT_AUTH},
    ServerState.AWAIT_AUTH: {Judged.AUTHENTICATED: ServerState.READY},
    ServerState.READY: {FrameType.FILE: ServerState.IN_FILE, Judged.DRY_RUN_FILE: ServerState.READY,
                        Judged.WAITED_FILE: ServerState.AWAIT_GO, FrameType.BYE: ServerState.DONE},
    ServerState.AWAIT_GO: {Judged.GO: ServerState.IN_FILE, Judged.FINISHED: ServerState.READY},
    ServerState.IN_FILE: {FrameType.DATA: ServerState.IN_FILE, FrameType.END: ServerState.READY,
                          FrameType.ABORT: ServerState.READY},
    ServerState.DONE: {},
}


class ServerConnection:
    """The server's half: fed bytes (``b""`` = end of stream), asked for events."""

    def __init__(self, *, resume: bool = False, checkpoint_every: int = 0) -> None:
        """``resume``: the greeting offered it, so FILEs with a tid of WAIT_SIZE or more
        wait. ``checkpoint_every``: for a file with a tid, remember the SHA-256 of the
        content at each multiple of this many bytes (``checkpoint``)."""
        self.resume = resume
        self.checkpoint_every = checkpoint_every
        #: (offset, SHA-256 of the first offset bytes) of the current file, at its
        #: last multiple of ``checkpoint_every``
        self.checkpoint: tuple[int, bytes] | None = None
        self.state = ServerState.AWAIT_HELLO
        self._buf = Rope()
        self._eof = False
        self._keys: auth.SessionKeys | None = None
        self._next_index = 0
        self._current: FileHeader | None = None
        self._hash: hashlib._Hash | None = None
        self._received = 0
        #: bytes still to come of a DATA frame whose header was read
        self._data_left = 0

    @property
    def failed(self) -> bool:
        return self.state is ServerState.ERROR

    def _fail(self) -> None:
        self.state = ServerState.ERROR

    def _allowed(self) -> dict[FrameType | Judged, ServerState]:
        return SERVER_TRANSITIONS.get(self.state, {})

    @property
    def keys(self) -> auth.SessionKeys | None:
        return self._keys

    @property
    def files_seen(self) -> int:
        return self._next_index

    @property
    def current(self) -> FileHeader | None:
        return self._current

    # -- feeding --

    @refused_after_error
    def receive_data(self, data: bytes) -> None:
        if self._eof:
            raise LocalProtocolError("data after end of stream")
        if data:
            self._buf.append(bytes(data))  # a no-op for bytes; a copy of a mutable buffer
        else:
            self._eof = True

    @refused_after_error
    def authenticate(self, keys: auth.SessionKeys) -> None:
        """The application verified the HELLO's proof; tags are checked from now on."""
        target = self._allowed().get(Judged.AUTHENTICATED)
        if target is None:
            raise LocalProtocolError(f"authenticate() in state {self.state.value}")
        self._keys = keys
        self.state = target

    @refused_after_error
    def go(self, offset: int = 0, prefix: hashlib._Hash | None = None) -> None:
        """A waited FILE was answered with 354 (``offset`` 0) or 350: DATA follows.

        ``prefix`` holds the SHA-256 state of the ``offset`` bytes the server kept,
        so the END is judged over the whole content."""
        target = self._allowed().get(Judged.GO)
        cur = self._current
        if target is None or cur is None:
            raise LocalProtocolError(f"go() in state {self.state.value}")
        if (offset == 0) != (prefix is None) or (cur.size is not None and offset >= cur.size):
            raise LocalProtocolError(f"go() at offset {offset} of {cur.size}")
        self._hash = prefix or hashlib.sha256()
        self._received = offset
        self.checkpoint = None if offset == 0 else (offset, self._hash.copy().digest())
        self.state = target

    @refused_after_error
    def finish_waited(self) -> None:
        """A waited FILE was answered with 251 or a refusal: no frame of it follows."""
        target = self._allowed().get(Judged.FINISHED)
        if target is None:
            raise LocalProtocolError(f"finish_waited() in state {self.state.value}")
        self._current = None
        self._hash = None
        self.state = target

    @refused_after_error
    def discard_current(self) -> None:
        """The current file was refused: stop hashing its data; its END is not judged."""
        self._hash = None

    # -- events --

    @refused_after_error
    def next_event(self) -> ServerEvent | Sentinel:
        if self.state is ServerState.AWAIT_AUTH:
            raise LocalProtocolError("next_event() before the HELLO was judged")
        if self.state is ServerState.AWAIT_GO:
            raise LocalProtocolError("next_event() before the waited FILE was answered")
        if self.state is ServerState.CLOSED:
            raise LocalProtocolError("next_event() after end of stream")
        if self._data_left:
            return self._data_chunk()
        buf = self._buf
        if len(buf) < 5:
            return self._maybe_eof()
        ftype, length = HEADER.unpack(buf.peek(5))
        kind = self._check_header(ftype, length)
        if kind is FrameType.DATA:
            buf.skip(5)
            self._data_left = length
            return self._data_chunk()
        if len(buf) < 5 + length:
            return self._maybe_eof()
        payload = buf.take(5 + length)[5:]
        event = self._dispatch(kind, payload)
        if isinstance(event, File) and event.header.dry_run:
            self.state = self._allowed()[Judged.DRY_RUN_FILE]
        elif isinstance(event, File) and self._waited(event.header):
            self.state = self._allowed()[Judged.WAITED_FILE]
        else:
            self.state = self._allowed()[kind]
        return event

    def _waited(self, h: FileHeader) -> bool:
        return is_waited(resume=self.resume, tid=h.tid, size=h.size, dry_run=h.dry_run)

    def _maybe_eof(self) -> ConnectionClosed | Sentinel:
        if not self._eof:
            return NEED_DATA
        clean = self.state is ServerState.DONE and not self._buf and not self._data_left
        self.state = ServerState.CLOSED
        return ConnectionClosed(clean)

    def _check_header(self, ftype: int, length: int) -> FrameType:
        reply = Reply.AUTH_FAILED if self._keys is None else Reply.PROTOCOL_ERROR
        limits = FRAME_LIMITS.get(ftype)
        if limits is None:
            raise RemoteProtocolError(f"unknown frame type {ftype}", reply=reply)
        kind = FrameType(ftype)
        if kind not in self._allowed():
            raise RemoteProtocolError(f"{kind.name} frame in state {self.state.value}", reply=reply)
        lo, hi = limits
        if not lo <= length <= hi:
            raise RemoteProtocolError(f"{kind.name} frame of {length} bytes", reply=reply)
        return kind

    def _data_chunk(self) -> Data | ConnectionClosed | Sentinel:
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
        if self._hash is not None:
            self._hash_chunk(chunk)
        self._received += n
        return Data(chunk)

    def _hash_chunk(self, chunk: bytes | memoryview) -> None:
        assert self._hash is not None and self._current is not None
        every = self.checkpoint_every
        if not every or not self._current.has_tid:
            self._hash.update(chunk)
            return
        pos = self._received
        while chunk:
            # Split at each multiple of ``every``: its digest is what a later
            # session offers (350) without reading the kept bytes again.
            take = min(len(chunk), every - pos % every)
            self._hash.update(chunk[:take])
            pos += take
            chunk = chunk[take:]
            if pos % every == 0:
                self.checkpoint = (pos, self._hash.copy().digest())

    def _dispatch(self, kind: FrameType, payload: bytes) -> ServerEvent:
        if kind is FrameType.HELLO:
            return parse_hello(payload)
        keys = self._keys
        assert keys is not None
        if kind is FrameType.FILE:
            return self._on_file(keys, payload)
        if kind is FrameType.END:
            return self._on_end(keys, payload)
        if kind is FrameType.ABORT:
            return self._on_abort(keys, payload)
        return self._on_bye(keys, payload)

    def _on_file(self, keys: auth.SessionKeys, payload: bytes) -> File:
        if len(payload) < auth.MAC_LEN:
            raise RemoteProtocolError("FILE frame too short")
        hdr, tag = payload[:-auth.MAC_LEN], payload[-auth.MAC_LEN:]
        # The tag is checked before a single field is believed (rstash(7) CONSTRUCTION 5).
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
            self.checkpoint = None
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

    def _on_abort(self, keys: auth.SessionKeys, payload: bytes) -> Abort:
        cur = self._current
        assert cur is not None
        if not auth.verify(auth.abort_tag(keys.k_c2s, cur.index), payload):
            raise IntegrityError("ABORT tag failed", cur.name)
        self._current = None
        self._hash = None
        return Abort(cur.index)

    def _on_bye(self, keys: auth.SessionKeys, payload: bytes) -> Bye:
        count = int.from_bytes(payload[:8], "big")
        if not auth.verify(auth.bye_tag(keys.k_c2s, count), payload[8:]):
            raise IntegrityError("BYE tag failed")
        if count != self._next_index:
            raise RemoteProtocolError(f"BYE counts {count} files, {self._next_index} were sent")
        return Bye(count)
