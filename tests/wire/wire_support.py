"""What the tests of rstash.wire share: fixed keys and frames built by hand, and drivers
that feed a role its input whole, one byte at a time and with trailing data.

The frames are built here with ``wire.frame`` and the ``auth`` tag functions (whose
values tests/test_auth.py pins to the independent vectors), so that a test can tamper
with any field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from rstash import auth, wire
from rstash.errors import RemoteProtocolError, Reply
from rstash.wire import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    Data,
    FrameType,
    Greeting,
    Hello,
    ServerConnection,
    frame,
)

KEY = auth.Key(bytes(range(32)), "test")
CHALLENGE = bytes(range(32, 64))
GREETING = wire.greeting_line(CHALLENGE)
NONCE = bytes(range(64, 96))
T = 1767225600
NAME = b"hello.txt"
CONTENT = b"hello, rstash\n"
MTIME = 1767225000
MIB = 1 << 20

PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- building client frames by hand -------------------------------------------------


def hello_frame(*, pipe: bool = False, box: str = "vm1") -> tuple[bytes, auth.SessionKeys]:
    c = ClientConnection(KEY, box, pipe=pipe)
    if not pipe:
        c.receive_data(wire.line(GREETING))
        assert isinstance(c.next_event(), Greeting)
    out = c.hello(NONCE, T)
    assert c.keys is not None
    return out, c.keys


HELLO, KEYS = hello_frame()
PIPE_HELLO, PIPE_KEYS = hello_frame(pipe=True)


def server_keys(hello: Hello) -> auth.SessionKeys:
    """What the application derives for a HELLO (rstash(7) CONSTRUCTION 4)."""
    g = b"" if hello.mode == wire.MODE_PIPE else GREETING.encode("ascii")
    return auth.session_keys(KEY, g, hello.signed)


def file_hdr(i: int = 0, name: bytes = NAME, size: int | None = len(CONTENT), *,
             flags: int = 0, offset: int = 0) -> bytes:
    return wire.encode_file_header(i, name, size, MTIME, flags, bytes(16), offset)


def file_frame(hdr: bytes, keys: auth.SessionKeys = KEYS) -> bytes:
    return frame(FrameType.FILE, hdr + auth.file_tag(keys.k_c2s, hdr))


def data_frame(content: bytes) -> bytes:
    return b"".join(frame(FrameType.DATA, content[i:i + wire.MAX_DATA])
                    for i in range(0, len(content), wire.MAX_DATA))


def end_frame(hdr: bytes, content: bytes, keys: auth.SessionKeys = KEYS, *,
              wire_n: int | None = None, tag_n: int | None = None) -> bytes:
    n = len(content)
    tag = auth.end_tag(keys.k_c2s, hdr, n if tag_n is None else tag_n,
                       hashlib.sha256(content).digest())
    return frame(FrameType.END, auth.u64(n if wire_n is None else wire_n) + tag)


def abort_frame(i: int, keys: auth.SessionKeys = KEYS) -> bytes:
    return frame(FrameType.ABORT, auth.abort_tag(keys.k_c2s, i))


def bye_frame(count: int, keys: auth.SessionKeys = KEYS, *, tag_count: int | None = None) -> bytes:
    tag = auth.bye_tag(keys.k_c2s, count if tag_count is None else tag_count)
    return frame(FrameType.BYE, auth.u64(count) + tag)


def header(ftype: int, length: int) -> bytes:
    return bytes([ftype]) + length.to_bytes(4, "big")


HDR0 = file_hdr()
FILE0 = file_frame(HDR0)
ONE_FILE = HELLO + FILE0 + data_frame(CONTENT) + end_frame(HDR0, CONTENT)
SESSION = ONE_FILE + bye_frame(1)


def flips(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Every single-bit flip of ``data``, with the bit's number."""
    for bit in range(len(data) * 8):
        out = bytearray(data)
        out[bit // 8] ^= 0x80 >> (bit % 8)
        yield bit, bytes(out)


# --- driving a ServerConnection -----------------------------------------------------


def coalesce(events: Sequence[Any]) -> list[Any]:
    """Adjacent Data events joined: how data is chunked is not part of the meaning."""
    out: list[Any] = []
    for ev in events:
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(bytes(out[-1].data) + bytes(ev.data))
        else:
            out.append(ev)
    return out


def run_server(chunks: Sequence[bytes], *, conn: ServerConnection | None = None,
               events: list[Any] | None = None) -> list[Any]:
    """Feed ``chunks`` in turn (b"" = EOF), authenticating every HELLO; return the events."""
    conn = ServerConnection() if conn is None else conn
    events = [] if events is None else events
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, Hello):
                conn.authenticate(server_keys(ev))
            if isinstance(ev, ConnectionClosed):
                return coalesce(events)
    return coalesce(events)


#: An incomplete frame header: it must stay in the buffer, changing nothing.
SERVER_TRAILING = b"\x02\x00\x00"


def server_events(data: bytes, *, eof: bool = True) -> list[Any]:
    """The events of ``data`` fed whole, one byte at a time, and with trailing data."""
    end = [b""] if eof else []
    whole = run_server([data, *end])
    bytewise = run_server([data[i:i + 1] for i in range(len(data))] + end)
    assert bytewise == whole
    trailing = run_server([data + SERVER_TRAILING])
    expected = whole[:-1] if whole and isinstance(whole[-1], ConnectionClosed) else whole
    assert trailing == expected
    return whole


def server_error(data: bytes, reply: int, exc: type[Exception] = RemoteProtocolError,
                 *, trailing: bytes = b"\x06" * 64) -> Exception:
    """``data`` must raise ``exc`` carrying ``reply`` whole, byte by byte, and with more after it."""
    caught: list[Exception] = []
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))], [data + trailing]):
        with pytest.raises(exc) as info:
            run_server(chunks)
        assert getattr(info.value, "reply", None) == reply, info.value
        caught.append(info.value)
    return caught[0]


def authed_server(prefix: bytes = HELLO) -> ServerConnection:
    """A server fed ``prefix`` (its HELLO authenticated), without end of stream."""
    conn = ServerConnection()
    if prefix:
        run_server([prefix], conn=conn)
    return conn


# --- driving a ClientConnection -----------------------------------------------------


def client_after(*, greeting: bool = True, pipe: bool = False, hello: bool = True,
                 files: Sequence[tuple[bytes, bytes | None]] = (), dry: Sequence[bytes] = (),
                 bye: bool = False, end: bool = True) -> ClientConnection:
    """A client that has read the greeting and sent HELLO, the given files and maybe BYE.

    ``files`` holds (name, content) pairs sent whole; the last one is left open
    when ``end`` is false.
    """
    c = ClientConnection(KEY, "vm1", pipe=pipe)
    if greeting and not pipe:
        c.receive_data(wire.line(GREETING))
        assert isinstance(c.next_event(), Greeting)
    if not hello:
        return c
    c.hello(NONCE, T)
    for k, (name, content) in enumerate(files):
        c.file(name, None if content is None else len(content), MTIME)
        if content:
            c.data(content)
        if end or k < len(files) - 1:
            c.end()
    for name in dry:
        c.file(name, 0, MTIME, dry_run=True)
    if bye:
        c.bye()
    return c


def run_client(c: ClientConnection, chunks: Sequence[bytes]) -> list[Any]:
    events: list[Any] = []
    for chunk in chunks:
        c.receive_data(chunk)
        while True:
            ev = c.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, ConnectionClosed):
                return events
    return events


#: An incomplete line: it must stay in the buffer, changing nothing.
CLIENT_TRAILING = b"250 stored 1"


def client_events(make: Callable[[], ClientConnection], data: bytes, *,
                  eof: bool = False) -> list[Any]:
    end = [b""] if eof else []
    whole = run_client(make(), [data, *end])
    assert run_client(make(), [data[i:i + 1] for i in range(len(data))] + end) == whole
    expected = whole[:-1] if whole and isinstance(whole[-1], ConnectionClosed) else whole
    assert run_client(make(), [data + CLIENT_TRAILING]) == expected
    return whole


def client_error(make: Callable[[], ClientConnection], data: bytes,
                 match: str | None = None) -> RemoteProtocolError:
    caught = []
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))],
                   [data + b"250 more\r\n"]):
        with pytest.raises(RemoteProtocolError, match=match) as info:
            run_client(make(), chunks)
        assert isinstance(info.value.reply, int)
        caught.append(info.value)
    return caught[0]


def lines(*texts: str) -> bytes:
    return b"".join(wire.line(t) for t in texts)


AUTH_LINE = wire.auth_ok_line(KEYS).decode().rstrip("\r\n")
DIGEST = hashlib.sha256(CONTENT).digest()
STORED_LINE = wire.receipt_line(KEYS, 0, Reply.STORED, NAME, n=len(CONTENT),
                                    sha256=DIGEST).decode().rstrip("\r\n")
BYE_LINE = wire.bye_line(KEYS, 1, 1).decode().rstrip("\r\n")


def one_file_client() -> ClientConnection:
    return client_after(files=[(NAME, CONTENT)], bye=True)


def mac_flips(text: str) -> Iterator[str]:
    """``text`` with every single bit of its trailing ``mac=`` value flipped."""
    head, mac = text.rsplit("mac=", 1)
    for _bit, raw in flips(auth.b64url_decode(mac)):
        yield f"{head}mac={auth.b64url(raw)}"


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]
