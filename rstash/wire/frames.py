"""Client → server framing of rstash/1 (rstash(7) FRAMING), and what both roles share.

A frame is ``type:u8 | length:u32 BE | payload``. Each type's legal payload
lengths are known, so a length is judged the moment the five header bytes are
in, before a byte of the body is buffered: a hostile peer can make the server
hold at most one legal frame. This module owns those limits, the encoding of
a frame, the buffer received bytes wait in, the bounds-checked reader of a
payload, and the guard that moves a role to ERROR when one of its calls fails.

It must never do I/O, read a clock or draw random bytes.
"""

from __future__ import annotations

import functools
import struct
from collections import deque
from collections.abc import Callable
from enum import Enum, IntEnum
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from ..errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION = 1
METHOD_HMAC_SHA256 = 1
#: the SSH server authenticated the client (rstash(7) CONSTRUCTION 11)
METHOD_SSH = 0
MODE_INTERACTIVE = 1
MODE_PIPE = 2
FLAG_DRY_RUN = 1
EXT_SERVER_ID = 1
#: A FILE's tid when it has none.
NO_TID = bytes(16)
#: A FILE with a tid of at least this size waits for its first line (rstash(7)
#: RESUME AND RE-RUNS): below it a round trip costs more than a resume saves.
WAIT_SIZE = 1 << 26
#: The greeting field of a server that keeps interrupted transfers.
GREETING_RESUME = "resume"


def is_waited(*, resume: bool, tid: bytes, size: int | None, dry_run: bool) -> bool:
    """Whether a FILE waits for its first line: one rule, for both roles."""
    return resume and tid != NO_TID and not dry_run and size is not None and size >= WAIT_SIZE
#: The largest DATA payload: 1 MiB.
MAX_DATA = 1 << 20


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

HEADER = struct.Struct(">BI")


class Sentinel(Enum):
    NEED_DATA = "NEED_DATA"


#: What ``next_event()`` returns when the bytes fed so far mean nothing yet.
NEED_DATA = Sentinel.NEED_DATA


def frame(ftype: int, payload: bytes) -> bytes:
    """One whole frame; a payload outside its type's limits is our own mistake."""
    lo, hi = FRAME_LIMITS[ftype]
    if not lo <= len(payload) <= hi:
        raise LocalProtocolError(f"{FrameType(ftype).name} payload of {len(payload)} bytes")
    return HEADER.pack(ftype, len(payload)) + payload


def data_header(chunk_len: int) -> bytes:
    """The header of a DATA frame holding ``chunk_len`` bytes."""
    if not 1 <= chunk_len <= MAX_DATA:
        raise LocalProtocolError(f"DATA of {chunk_len} bytes")
    return HEADER.pack(FrameType.DATA, chunk_len)


class PayloadReader:
    """Bounds-checked reads from one frame payload; any overrun is the peer's fault,
    told with ``reply``."""

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

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def i64(self) -> int:
        return int.from_bytes(self.take(8), "big", signed=True)

    def s(self) -> bytes:
        return self.take(int.from_bytes(self.take(2), "big"))

    def done(self) -> None:
        if self.pos != len(self.data):
            raise RemoteProtocolError("trailing bytes in frame", reply=self.reply)


class Rope:
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


# --- the ERROR state both roles share -------------------------------------------------


class _Role(Protocol):
    @property
    def failed(self) -> bool: ...

    def _fail(self) -> None: ...


_R = TypeVar("_R", bound=_Role)
_P = ParamSpec("_P")
_T = TypeVar("_T")


def refused_after_error(method: Callable[Concatenate[_R, _P], _T]) -> Callable[Concatenate[_R, _P], _T]:
    """Make ``method`` a guarded call of a role: refused once the role is in ERROR, and
    moving it to ERROR when it raises.

    Whatever raised, the buffer, counters and hash may be half updated (a frame is
    consumed before its tag is judged), so nothing the role would say afterwards
    could be trusted: the only safe answer to every later call is a refusal.
    """

    @functools.wraps(method)
    def guarded(self: _R, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self.failed:
            raise LocalProtocolError(f"{method.__name__}() after a protocol error")
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self._fail()
            raise

    return guarded
