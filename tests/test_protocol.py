"""rstash.protocol, sans I/O: framing, state machines, tags and MACs (rstash(7)).

h11 style: every parser input is fed whole, one byte at a time, and with
trailing data (``server_events`` / ``client_events`` and their ``*_error``
twins), and must mean the same each way. The frames are built here with
``protocol.frame`` and the ``auth`` tag functions (whose values
tests/test_auth.py pins to the independent vectors), so that a test can
tamper with any field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rstash import auth, protocol
from rstash.errors import LocalProtocolError, RemoteProtocolError, Reply
from rstash.protocol import (
    NEED_DATA,
    AuthOk,
    ClientConnection,
    ConnectionClosed,
    Data,
    Done,
    End,
    File,
    FrameType,
    Greeting,
    Hello,
    IntegrityError,
    Receipt,
    ServerConnection,
    ServerState,
    SessionRefused,
    frame,
)

KEY = auth.Key(bytes(range(32)), "test")
CHALLENGE = bytes(range(32, 64))
GREETING = protocol.greeting_line(CHALLENGE)
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
        c.receive_data(protocol.line(GREETING))
        assert isinstance(c.next_event(), Greeting)
    out = c.hello(NONCE, T)
    assert c.keys is not None
    return out, c.keys


HELLO, KEYS = hello_frame()
PIPE_HELLO, PIPE_KEYS = hello_frame(pipe=True)


def server_keys(hello: Hello) -> auth.SessionKeys:
    """What the application derives for a HELLO (rstash(7) CONSTRUCTION 4)."""
    g = b"" if hello.mode == protocol.MODE_PIPE else GREETING.encode("ascii")
    return auth.session_keys(KEY, g, hello.signed)


def file_hdr(i: int = 0, name: bytes = NAME, size: int | None = len(CONTENT), *,
             flags: int = 0, offset: int = 0) -> bytes:
    return protocol.encode_file_header(i, name, size, MTIME, flags, bytes(16), offset)


def file_frame(hdr: bytes, keys: auth.SessionKeys = KEYS) -> bytes:
    return frame(FrameType.FILE, hdr + auth.file_tag(keys.k_c2s, hdr))


def data_frame(content: bytes) -> bytes:
    return b"".join(frame(FrameType.DATA, content[i:i + protocol.MAX_DATA])
                    for i in range(0, len(content), protocol.MAX_DATA))


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
        c.receive_data(protocol.line(GREETING))
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
    return b"".join(protocol.line(t) for t in texts)


AUTH_LINE = protocol.auth_ok_line(KEYS).decode().rstrip("\r\n")
DIGEST = hashlib.sha256(CONTENT).digest()
STORED_LINE = protocol.receipt_line(KEYS, 0, Reply.STORED, NAME, n=len(CONTENT),
                                    sha256=DIGEST).decode().rstrip("\r\n")
BYE_LINE = protocol.bye_line(KEYS, 1, 1).decode().rstrip("\r\n")


def one_file_client() -> ClientConnection:
    return client_after(files=[(NAME, CONTENT)], bye=True)


def mac_flips(text: str) -> Iterator[str]:
    """``text`` with every single bit of its trailing ``mac=`` value flipped."""
    head, mac = text.rsplit("mac=", 1)
    for _bit, raw in flips(auth.b64url_decode(mac)):
        yield f"{head}mac={auth.b64url(raw)}"


# === server: a whole session ========================================================


def test_server_reads_a_whole_session_every_way() -> None:
    events = server_events(SESSION)
    assert [type(e) for e in events] == [Hello, File, Data, End, protocol.Bye, ConnectionClosed]
    assert events[1].header.name == NAME
    assert events[2].data == CONTENT
    assert events[3] == End(0, len(CONTENT), DIGEST)
    assert events[4] == protocol.Bye(1)
    assert events[5] == ConnectionClosed(clean=True)


def test_server_reads_a_pipe_session_every_way() -> None:
    hdr = file_hdr()
    data = (PIPE_HELLO + file_frame(hdr, PIPE_KEYS) + data_frame(CONTENT)
            + end_frame(hdr, CONTENT, PIPE_KEYS) + bye_frame(1, PIPE_KEYS))
    events = server_events(data)
    assert events[0].mode == protocol.MODE_PIPE
    assert events[3] == End(0, len(CONTENT), DIGEST)
    assert events[-1] == ConnectionClosed(clean=True)


def test_eof_before_bye_is_a_truncated_session() -> None:
    assert server_events(ONE_FILE)[-1] == ConnectionClosed(clean=False)


def test_eof_inside_a_file_is_a_truncated_session() -> None:
    events = run_server([HELLO + FILE0 + data_frame(CONTENT[:5]), b""])
    assert events[-1] == ConnectionClosed(clean=False)
    assert not any(isinstance(e, End) for e in events)


def test_eof_inside_a_frame_after_bye_is_not_clean() -> None:
    assert run_server([SESSION + b"\x02\x00", b""])[-1] == ConnectionClosed(clean=False)


def test_server_tracks_files_seen_and_the_current_file() -> None:
    conn = authed_server(HELLO + FILE0)
    assert conn.files_seen == 1
    assert conn.current is not None and conn.current.name == NAME
    assert conn.state is ServerState.IN_FILE
    run_server([data_frame(CONTENT) + end_frame(HDR0, CONTENT)], conn=conn)
    assert conn.current is None
    assert conn.state is ServerState.READY


def test_several_files_in_one_session() -> None:
    frames = HELLO
    for i in range(3):
        hdr = file_hdr(i, f"f{i}".encode(), i * 3)
        frames += file_frame(hdr) + data_frame(b"abc" * i) + end_frame(hdr, b"abc" * i)
    events = server_events(frames + bye_frame(3))
    ends = [e for e in events if isinstance(e, End)]
    assert ends == [End(i, i * 3, hashlib.sha256(b"abc" * i).digest()) for i in range(3)]


def test_an_empty_file_has_no_data_frame() -> None:
    hdr = file_hdr(size=0)
    events = server_events(HELLO + file_frame(hdr) + end_frame(hdr, b""), eof=False)
    assert events[-1] == End(0, 0, hashlib.sha256(b"").digest())


def test_a_file_of_unknown_size_ends_at_any_count() -> None:
    hdr = file_hdr(size=None)
    content = b"x" * 1000
    events = server_events(HELLO + file_frame(hdr) + data_frame(content) + end_frame(hdr, content),
                           eof=False)
    assert events[1].header.size is None
    assert events[-1] == End(0, 1000, hashlib.sha256(content).digest())


def test_hello_carries_its_extensions() -> None:
    c = ClientConnection(KEY, "vm1", server_id="host-a")
    c.receive_data(protocol.line(GREETING))
    c.next_event()
    events = server_events(c.hello(NONCE, T), eof=False)
    assert events[0].server_id == "host-a"
    assert events[0].ext == {protocol.EXT_SERVER_ID: b"host-a"}


# === server: lengths refused on the five-byte header =================================

HEADER_CASES = [
    # (what came before, frame type, length, reply)
    (b"", FrameType.HELLO, 4097, Reply.AUTH_FAILED),
    (b"", FrameType.HELLO, 0, Reply.AUTH_FAILED),
    (b"", FrameType.HELLO, 0xFFFFFFFF, Reply.AUTH_FAILED),
    (b"", 0, 1, Reply.AUTH_FAILED),
    (b"", 7, 1, Reply.AUTH_FAILED),
    (b"", 255, 1, Reply.AUTH_FAILED),
    (HELLO, FrameType.FILE, 4097, Reply.PROTOCOL_ERROR),
    (HELLO, FrameType.FILE, 0, Reply.PROTOCOL_ERROR),
    (HELLO, FrameType.BYE, 39, Reply.PROTOCOL_ERROR),
    (HELLO, FrameType.BYE, 41, Reply.PROTOCOL_ERROR),
    (HELLO, 0, 40, Reply.PROTOCOL_ERROR),
    (HELLO, 7, 40, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, FrameType.DATA, MIB + 1, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, FrameType.DATA, 0xFFFFFFFF, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, FrameType.DATA, 0, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, FrameType.END, 39, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, FrameType.END, 41, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, FrameType.ABORT, 31, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, FrameType.ABORT, 33, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, 0, 32, Reply.PROTOCOL_ERROR),
    (HELLO + FILE0, 7, 32, Reply.PROTOCOL_ERROR),
]


@pytest.mark.parametrize(("prefix", "ftype", "length", "reply"), HEADER_CASES,
                         ids=[f"{'auth' if p else 'pre'}-type{t}-len{n}"
                              for p, t, n, _ in HEADER_CASES])
def test_an_illegal_length_or_type_is_refused_on_the_header_alone(
        prefix: bytes, ftype: int, length: int, reply: int) -> None:
    hdr = header(ftype, length)
    # four header bytes are not yet a verdict
    conn = authed_server(prefix)
    conn.receive_data(hdr[:4])
    assert conn.next_event() is NEED_DATA
    # the fifth is: no byte of the body is needed (or ever buffered)
    conn.receive_data(hdr[4:])
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.reply == reply
    server_error(prefix + hdr, reply)


@pytest.mark.parametrize(("prefix", "ftype", "length"), [
    (b"", FrameType.HELLO, 4096),
    (b"", FrameType.HELLO, 1),
    (HELLO, FrameType.FILE, 4096),
    (HELLO, FrameType.FILE, 1),
    (HELLO, FrameType.BYE, 40),
    (HELLO + FILE0, FrameType.END, 40),
    (HELLO + FILE0, FrameType.ABORT, 32),
], ids=["hello-4096", "hello-1", "file-4096", "file-1", "bye-40", "end-40", "abort-32"])
def test_a_legal_length_waits_for_its_body(prefix: bytes, ftype: int, length: int) -> None:
    conn = authed_server(prefix)
    conn.receive_data(header(ftype, length) + bytes(length - 1))
    assert conn.next_event() is NEED_DATA


def test_a_data_frame_of_one_mib_is_legal() -> None:
    hdr = file_hdr(size=MIB)
    conn = authed_server(HELLO + file_frame(hdr))
    conn.receive_data(header(FrameType.DATA, MIB))
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("ftype", [FrameType.FILE, FrameType.BYE])
def test_a_short_frame_body_is_refused_after_auth(ftype: int) -> None:
    server_error(HELLO + frame(ftype, bytes(40)), Reply.INTEGRITY, IntegrityError)


def test_a_file_frame_shorter_than_its_tag_is_a_protocol_error() -> None:
    server_error(HELLO + frame(FrameType.FILE, bytes(31)), Reply.PROTOCOL_ERROR)


# === server: HELLO ==================================================================


def _hello_payload() -> bytes:
    return HELLO[5:]


def test_an_unsupported_version_gets_505() -> None:
    p = _hello_payload()
    server_error(frame(FrameType.HELLO, b"\x02" + p[1:]), Reply.VERSION_NOT_SUPPORTED)
    server_error(frame(FrameType.HELLO, b"\x02"), Reply.VERSION_NOT_SUPPORTED)


def test_an_unsupported_method_gets_504() -> None:
    p = _hello_payload()
    server_error(frame(FrameType.HELLO, p[:2] + b"\x02" + p[3:]), Reply.METHOD_NOT_SUPPORTED)


@pytest.mark.parametrize("payload", [
    _hello_payload()[:1],
    _hello_payload()[:20],
    _hello_payload()[:-1],
    _hello_payload() + b"\x00",
    _hello_payload()[:1] + b"\x03" + _hello_payload()[2:],
    _hello_payload()[:1] + b"\x00" + _hello_payload()[2:],
    b"\x01\x01\x01\xff\xff",
], ids=["version-only", "cut", "one-short", "trailing", "mode-3", "mode-0", "box-overrun"])
def test_a_malformed_hello_is_authentication_failed(payload: bytes) -> None:
    server_error(frame(FrameType.HELLO, payload), Reply.AUTH_FAILED)


def test_a_duplicate_hello_extension_is_authentication_failed() -> None:
    ext = bytes([1]) + auth.s(b"a") + bytes([1]) + auth.s(b"b")
    signed = (bytes([1, 1, 1]) + auth.s(b"vm1") + KEY.key_id + NONCE + auth.u64(T) + auth.s(ext))
    server_error(frame(FrameType.HELLO, signed + bytes(32)), Reply.AUTH_FAILED)


def test_unknown_hello_extensions_are_kept_inside_the_signed_part() -> None:
    signed = protocol.hello_without_proof(mode=1, box=b"vm1", key_id=KEY.key_id, nonce=NONCE,
                                          time=T, ext={9: b"future"})
    hello = run_server([frame(FrameType.HELLO, signed + bytes(32))])[0]
    assert hello.ext == {9: b"future"}
    assert hello.signed == signed


# === server: illegal transitions =====================================================


@pytest.mark.parametrize("frame_bytes", [
    FILE0, data_frame(b"x"), end_frame(HDR0, CONTENT), abort_frame(0), bye_frame(0),
], ids=["FILE", "DATA", "END", "ABORT", "BYE"])
def test_any_frame_but_hello_first_is_authentication_failed(frame_bytes: bytes) -> None:
    server_error(frame_bytes, Reply.AUTH_FAILED)


@pytest.mark.parametrize(("prefix", "frame_bytes"), [
    (HELLO, data_frame(b"x")),
    (HELLO, end_frame(HDR0, CONTENT)),
    (HELLO, abort_frame(0)),
    (HELLO, HELLO),
    (HELLO + FILE0, HELLO),
    (HELLO + FILE0, bye_frame(1)),
    (HELLO + FILE0, file_frame(file_hdr(1))),
    (ONE_FILE, data_frame(b"x")),
    (ONE_FILE, end_frame(HDR0, CONTENT)),
    (ONE_FILE, abort_frame(0)),
], ids=["DATA-in-READY", "END-in-READY", "ABORT-in-READY", "second-HELLO", "HELLO-in-file",
        "BYE-in-file", "FILE-in-file", "DATA-after-END", "END-after-END", "ABORT-after-END"])
def test_a_frame_in_the_wrong_state_is_a_protocol_error(prefix: bytes, frame_bytes: bytes) -> None:
    server_error(prefix + frame_bytes, Reply.PROTOCOL_ERROR)


@pytest.mark.parametrize("frame_bytes", [
    HELLO, file_frame(file_hdr(1)), data_frame(b"x"), end_frame(HDR0, CONTENT), abort_frame(1),
    bye_frame(1), header(0, 1) + b"x",
], ids=["HELLO", "FILE", "DATA", "END", "ABORT", "BYE", "type0"])
def test_anything_after_bye_is_a_protocol_error(frame_bytes: bytes) -> None:
    server_error(SESSION + frame_bytes, Reply.PROTOCOL_ERROR)


def test_next_event_while_the_hello_is_judged_is_a_local_error() -> None:
    conn = ServerConnection()
    conn.receive_data(HELLO + FILE0)
    assert isinstance(conn.next_event(), Hello)
    assert conn.state is ServerState.AWAIT_AUTH
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    conn.authenticate(KEYS)
    assert isinstance(conn.next_event(), File)


def test_authenticate_outside_await_auth_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ServerConnection().authenticate(KEYS)
    conn = authed_server()
    with pytest.raises(LocalProtocolError):
        conn.authenticate(KEYS)


def test_the_server_reads_nothing_after_end_of_stream() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed(clean=False)
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


def test_no_tag_is_checked_before_authentication() -> None:
    conn = ServerConnection()
    assert conn.keys is None
    conn.receive_data(HELLO)
    hello = conn.next_event()
    assert isinstance(hello, Hello)
    conn.authenticate(server_keys(hello))
    assert conn.keys == KEYS


# === server: tags ==================================================================


def test_every_flipped_bit_of_the_file_tag_is_an_integrity_failure() -> None:
    payload = FILE0[5:]
    hdr, tag = payload[:-32], payload[-32:]
    for bit, bad in flips(tag):
        with pytest.raises(IntegrityError) as info:
            run_server([HELLO + frame(FrameType.FILE, hdr + bad)])
        assert info.value.reply == Reply.INTEGRITY, bit


def test_every_flipped_bit_of_the_file_header_is_an_integrity_failure() -> None:
    tag = FILE0[-32:]
    for bit, bad in flips(HDR0):
        with pytest.raises(IntegrityError) as info:
            run_server([HELLO + frame(FrameType.FILE, bad + tag)])
        assert info.value.reply == Reply.INTEGRITY, bit


def test_a_file_tag_made_with_another_sessions_key_fails() -> None:
    server_error(HELLO + file_frame(HDR0, PIPE_KEYS), Reply.INTEGRITY, IntegrityError)


def test_every_flipped_bit_of_the_content_fails_the_end_tag() -> None:
    for bit, bad in flips(CONTENT):
        frames = HELLO + FILE0 + data_frame(bad) + end_frame(HDR0, CONTENT)
        with pytest.raises(IntegrityError) as info:
            run_server([frames])
        err = info.value
        assert err.reply == Reply.INTEGRITY, bit
        assert err.name == NAME
        # the server's own digest of what it received, for the log
        assert err.sha256 == hashlib.sha256(bad).digest()


def test_every_flipped_bit_of_the_end_tag_is_an_integrity_failure() -> None:
    end = end_frame(HDR0, CONTENT)
    for bit, bad in flips(end[-32:]):
        with pytest.raises(IntegrityError) as info:
            run_server([HELLO + FILE0 + data_frame(CONTENT) + end[:-32] + bad])
        assert info.value.reply == Reply.INTEGRITY, bit


def test_the_wire_n_of_end_is_never_believed() -> None:
    """rstash(7) END: the tag is computed over the server's own n and D.

    So a flipped n with a tag over the real count changes nothing, and a
    consistent lie (n and tag over a false count) fails.
    """
    prefix = HELLO + FILE0 + data_frame(CONTENT)
    for bit, bad in flips(auth.u64(len(CONTENT))):
        end = frame(FrameType.END, bad + end_frame(HDR0, CONTENT)[-32:])
        events = run_server([prefix + end])
        assert events[-1] == End(0, len(CONTENT), DIGEST), bit
    for lie in (0, 13, 15, 2**64 - 1):
        with pytest.raises(IntegrityError):
            run_server([prefix + end_frame(HDR0, CONTENT, wire_n=lie, tag_n=lie)])


def test_a_tag_for_a_content_of_another_length_fails() -> None:
    # the client claims to have sent 15 bytes (and tags them) but sent 14
    hdr = file_hdr(size=None)
    server_error(HELLO + file_frame(hdr) + data_frame(CONTENT)
                 + end_frame(hdr, CONTENT + b"!"), Reply.INTEGRITY, IntegrityError)


def test_end_before_the_announced_size_is_a_protocol_error() -> None:
    part = CONTENT[:10]
    server_error(HELLO + FILE0 + data_frame(part) + end_frame(HDR0, part), Reply.PROTOCOL_ERROR)


def test_an_end_for_another_files_header_fails() -> None:
    other = file_hdr(0, b"other.txt")
    server_error(HELLO + FILE0 + data_frame(CONTENT) + end_frame(other, CONTENT),
                 Reply.INTEGRITY, IntegrityError)


def test_every_flipped_bit_of_abort_is_an_integrity_failure() -> None:
    good = abort_frame(0)
    events = server_events(HELLO + FILE0 + data_frame(b"he") + good, eof=False)
    assert events[-1] == protocol.Abort(0)
    for bit, bad in flips(good[5:]):
        with pytest.raises(IntegrityError) as info:
            run_server([HELLO + FILE0 + frame(FrameType.ABORT, bad)])
        assert info.value.reply == Reply.INTEGRITY, bit


def test_an_abort_for_another_index_fails() -> None:
    server_error(HELLO + FILE0 + abort_frame(1), Reply.INTEGRITY, IntegrityError)


def test_after_abort_the_next_file_follows() -> None:
    hdr1 = file_hdr(1)
    events = server_events(HELLO + FILE0 + data_frame(b"hel") + abort_frame(0) + file_frame(hdr1)
                           + data_frame(CONTENT) + end_frame(hdr1, CONTENT) + bye_frame(2))
    assert [type(e) for e in events] == [Hello, File, Data, protocol.Abort, File, Data, End,
                                         protocol.Bye, ConnectionClosed]
    assert events[6] == End(1, len(CONTENT), DIGEST)
    assert events[-1].clean


def test_every_flipped_bit_of_the_bye_tag_is_an_integrity_failure() -> None:
    good = bye_frame(1)
    for bit, bad in flips(good[-32:]):
        with pytest.raises(IntegrityError) as info:
            run_server([ONE_FILE + good[:-32] + bad])
        assert info.value.reply == Reply.INTEGRITY, bit


def test_every_flipped_bit_of_the_bye_count_is_refused() -> None:
    good = bye_frame(1)
    for bit, bad in flips(good[5:13]):
        with pytest.raises(RemoteProtocolError) as info:
            run_server([ONE_FILE + good[:5] + bad + good[13:]])
        assert info.value.reply in (Reply.INTEGRITY, Reply.PROTOCOL_ERROR), bit


@pytest.mark.parametrize("count", [0, 2, 2**64 - 1])
def test_a_tagged_bye_with_the_wrong_count_is_a_protocol_error(count: int) -> None:
    server_error(ONE_FILE + bye_frame(count), Reply.PROTOCOL_ERROR)


def test_a_bye_tagged_with_another_count_is_an_integrity_failure() -> None:
    err = server_error(ONE_FILE + bye_frame(1, tag_count=2), Reply.INTEGRITY, IntegrityError)
    assert isinstance(err, IntegrityError) and err.name == b""


def test_bye_counts_dry_runs_and_aborted_files() -> None:
    dry = file_hdr(1, flags=protocol.FLAG_DRY_RUN, size=0)
    hdr2 = file_hdr(2)
    frames = (ONE_FILE + file_frame(dry) + file_frame(hdr2) + abort_frame(2) + bye_frame(3))
    assert server_events(frames)[-1] == ConnectionClosed(clean=True)


@pytest.mark.parametrize("first", [1, 2, 2**64 - 1])
def test_a_first_file_with_the_wrong_sequence_number_is_an_integrity_failure(first: int) -> None:
    server_error(HELLO + file_frame(file_hdr(first)), Reply.INTEGRITY, IntegrityError)


@pytest.mark.parametrize("second", [0, 2, 5])
def test_a_reordered_file_sequence_number_is_an_integrity_failure(second: int) -> None:
    err = server_error(ONE_FILE + file_frame(file_hdr(second, b"next")), Reply.INTEGRITY,
                       IntegrityError)
    assert isinstance(err, IntegrityError) and err.name == b"next"


def test_reserved_file_flags_are_a_protocol_error() -> None:
    for flags in (2, 4, 0x80, 0xFF):
        server_error(HELLO + file_frame(file_hdr(flags=flags)), Reply.PROTOCOL_ERROR)


def test_a_nonzero_offset_is_a_protocol_error() -> None:
    server_error(HELLO + file_frame(file_hdr(offset=1)), Reply.PROTOCOL_ERROR)


def test_a_tagged_but_malformed_file_header_is_a_protocol_error() -> None:
    for hdr in (HDR0[:-1], HDR0 + b"\x00", b"\x00" * 8 + b"\xff\xff"):
        server_error(HELLO + file_frame(hdr), Reply.PROTOCOL_ERROR)


def test_a_discarded_file_streams_its_data_and_its_end_decides_nothing() -> None:
    conn = authed_server(HELLO + FILE0)
    conn.discard_current()
    bogus_end = frame(FrameType.END, bytes(40))
    events = run_server([data_frame(CONTENT) + bogus_end], conn=conn)
    assert events == [Data(CONTENT), End(0, len(CONTENT), auth.ZERO_DIGEST)]
    assert conn.state is ServerState.READY
    # and the session goes on with the next file
    hdr1 = file_hdr(1)
    events = run_server([file_frame(hdr1) + data_frame(CONTENT) + end_frame(hdr1, CONTENT)],
                        conn=conn)
    assert events[-1] == End(1, len(CONTENT), DIGEST)


def test_a_discarded_file_still_refuses_bytes_beyond_its_size() -> None:
    conn = authed_server(HELLO + FILE0)
    conn.discard_current()
    with pytest.raises(RemoteProtocolError) as info:
        run_server([data_frame(CONTENT + b"!")], conn=conn)
    assert info.value.reply == Reply.PROTOCOL_ERROR


# === server: DATA streaming and the announced size =====================================


def test_data_events_come_as_bytes_arrive_before_the_frame_is_whole() -> None:
    hdr = file_hdr(size=MIB)
    conn = authed_server(HELLO + file_frame(hdr))
    conn.receive_data(header(FrameType.DATA, MIB))
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"a" * 1000)
    assert conn.next_event() == Data(b"a" * 1000)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"b" * (MIB - 1000) + end_frame(hdr, b"a" * 1000 + b"b" * (MIB - 1000)))
    assert conn.next_event() == Data(b"b" * (MIB - 1000))
    end = conn.next_event()
    assert isinstance(end, End) and end.n == MIB


def test_a_whole_mib_file_in_one_frame() -> None:
    content = bytes(range(256)) * 4096
    hdr = file_hdr(size=len(content))
    events = run_server([HELLO + file_frame(hdr) + data_frame(content) + end_frame(hdr, content)])
    assert events[-2] == Data(content)
    assert events[-1] == End(0, MIB, hashlib.sha256(content).digest())


@pytest.mark.parametrize("frames", [
    data_frame(CONTENT + b"!"),
    data_frame(CONTENT) + data_frame(b"!"),
    data_frame(CONTENT[:7]) + data_frame(CONTENT[7:] + b"!!"),
], ids=["one-frame", "extra-frame", "split"])
def test_bytes_beyond_the_announced_size_are_refused(frames: bytes) -> None:
    server_error(HELLO + FILE0 + frames, Reply.PROTOCOL_ERROR)


def test_bytes_up_to_the_announced_size_are_delivered_before_the_excess_is_refused() -> None:
    conn = authed_server(HELLO + FILE0)
    events: list[Any] = []
    with pytest.raises(RemoteProtocolError):
        run_server([bytes([b]) for b in data_frame(CONTENT + b"!")], conn=conn, events=events)
    assert b"".join(e.data for e in events) == CONTENT


# === server: dry run =================================================================


def test_a_dry_run_file_expects_no_data_and_stays_ready() -> None:
    dry = file_hdr(0, size=len(CONTENT), flags=protocol.FLAG_DRY_RUN)
    conn = authed_server(HELLO)
    events = run_server([file_frame(dry)], conn=conn)
    assert len(events) == 1 and events[0].header.dry_run
    assert conn.state is ServerState.READY
    assert conn.current is None
    server_error(HELLO + file_frame(dry) + data_frame(CONTENT), Reply.PROTOCOL_ERROR)
    server_error(HELLO + file_frame(dry) + end_frame(dry, b""), Reply.PROTOCOL_ERROR)
    server_error(HELLO + file_frame(dry) + abort_frame(0), Reply.PROTOCOL_ERROR)


def test_dry_runs_take_sequence_numbers() -> None:
    dry = file_hdr(0, flags=protocol.FLAG_DRY_RUN)
    hdr1 = file_hdr(1)
    events = server_events(HELLO + file_frame(dry) + file_frame(hdr1) + data_frame(CONTENT)
                           + end_frame(hdr1, CONTENT) + bye_frame(2))
    assert [e.index for e in events if isinstance(e, File)] == [0, 1]
    assert events[-1].clean


# === server reply lines ==============================================================


def test_reply_lines_end_in_crlf_and_percent_encode_names() -> None:
    raw = "ä b%c\u202e.txt".encode()
    out = protocol.receipt_line(KEYS, 3, Reply.EXISTS, raw)
    text = out.decode("ascii")
    assert text.endswith("\r\n") and text.count("\r\n") == 1
    assert text.startswith("550 exists %C3%A4%20b%25c%E2%80%AE.txt mac=")
    assert text.rstrip("\r\n").rsplit("mac=", 1)[1] == auth.receipt_mac(KEYS.k_s2c, 3, 550, raw)


def test_a_refused_name_is_echoed_cut_at_255_bytes_but_macced_whole() -> None:
    raw = "é".encode() * 200  # 400 bytes
    text = protocol.receipt_line(KEYS, 0, Reply.NAME_NOT_ALLOWED, raw).decode().rstrip("\r\n")
    echoed = text.split(" ")[-2]
    assert protocol.pct_decode(echoed) == raw[:255]
    assert text.endswith("mac=" + auth.receipt_mac(KEYS.k_s2c, 0, 553, raw))
    assert len(text) + 2 <= protocol.MAX_LINE


def test_a_dry_run_receipt_says_would_store() -> None:
    text = protocol.receipt_line(KEYS, 0, Reply.STORED, NAME, dry_run=True).decode()
    assert text == f"250 would store hello.txt mac={auth.receipt_mac(KEYS.k_s2c, 0, 250, NAME)}\r\n"


def test_a_stored_receipt_names_the_final_name() -> None:
    text = protocol.receipt_line(KEYS, 0, Reply.STORED, NAME, final_name=b"hello~1.txt",
                                 n=14, sha256=DIGEST).decode()
    mac = auth.receipt_mac(KEYS.k_s2c, 0, 250, b"hello~1.txt", 14, DIGEST)
    assert text == f"250 stored 14 sha256:{DIGEST.hex()} hello~1.txt mac={mac}\r\n"


def test_session_lines() -> None:
    assert protocol.session_line(Reply.AUTH_FAILED) == b"535 authentication failed\r\n"
    assert protocol.session_line(Reply.BUSY) == b"421 busy\r\n"
    assert protocol.skew_line(-42) == b"531 clock skew -42 s\r\n"
    assert protocol.skew_line(7) == b"531 clock skew +7 s\r\n"
    assert protocol.integrity_line(NAME) == b"554 integrity check failed hello.txt\r\n"
    assert protocol.integrity_line(b"") == b"554 integrity check failed\r\n"


def test_a_reply_line_never_exceeds_1024_bytes_or_holds_unprintable_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        protocol.line("5" * 1023)
    with pytest.raises(LocalProtocolError):
        protocol.line("500 a\rb")
    assert len(protocol.line("5" * 1022)) == 1024


@pytest.mark.parametrize("text", ["%", "%4", "%4g", "%4a", "a b", "\u00e9", "a\x7f"])
def test_pct_decode_refuses_anything_pct_encode_never_writes(text: str) -> None:
    with pytest.raises(ValueError):
        protocol.pct_decode(text)


@given(st.binary(max_size=300))
@PROPERTY
def test_pct_encoding_round_trips_and_stays_printable(raw: bytes) -> None:
    enc = protocol.pct_encode(raw)
    assert all(0x21 <= ord(c) <= 0x7E for c in enc)
    assert protocol.pct_decode(enc) == raw


# === client: frames out ===============================================================


def test_client_frames_are_read_back_by_the_server() -> None:
    c = client_after()
    out = HELLO
    out += c.file(NAME, len(CONTENT), MTIME) + c.data(CONTENT) + c.end()
    out += c.file(b"dry.txt", 5, MTIME, dry_run=True)
    out += c.file(b"big", 3 * MIB, MTIME) + c.data(b"x" * (3 * MIB)) + c.end()
    out += c.file(b"stream", None, MTIME) + c.data(b"abc") + c.abort()
    out += c.bye()
    events = run_server([out, b""])
    assert [e.index for e in events if isinstance(e, File)] == [0, 1, 2, 3]
    assert [e.n for e in events if isinstance(e, End)] == [14, 3 * MIB]
    assert events[-2] == protocol.Bye(4)
    assert events[-1].clean


def test_client_data_header_and_data_sent_make_the_same_frames_as_data() -> None:
    a, b = client_after(), client_after()
    a.file(NAME, len(CONTENT), MTIME)
    b.file(NAME, len(CONTENT), MTIME)
    hdr = b.data_header(len(CONTENT))
    b.data_sent(memoryview(CONTENT))
    assert a.data(CONTENT) == hdr + CONTENT
    assert a.end() == b.end()


def test_client_illegal_sends_are_local_errors() -> None:
    c = client_after(greeting=False, hello=False)
    with pytest.raises(LocalProtocolError):
        c.hello(NONCE, T)  # the greeting was not read
    c = client_after()
    with pytest.raises(LocalProtocolError):
        c.hello(NONCE, T)  # twice
    with pytest.raises(LocalProtocolError):
        c.data(b"x")  # outside a file
    with pytest.raises(LocalProtocolError):
        c.data_header(1)
    with pytest.raises(LocalProtocolError):
        c.end()  # outside a file
    with pytest.raises(LocalProtocolError):
        c.abort()
    c.file(NAME, len(CONTENT), MTIME)
    c.data(CONTENT[:5])
    with pytest.raises(LocalProtocolError):
        c.end()  # before the size is reached
    with pytest.raises(LocalProtocolError):
        c.bye()  # inside a file
    with pytest.raises(LocalProtocolError):
        c.file(b"second", 1, MTIME)  # inside a file
    with pytest.raises(LocalProtocolError):
        c.data(CONTENT)  # beyond the announced size
    with pytest.raises(LocalProtocolError):
        c.data_header(protocol.MAX_DATA + 1)
    with pytest.raises(LocalProtocolError):
        c.data_header(0)


def test_client_refuses_to_send_before_hello_and_after_bye() -> None:
    before = client_after(hello=False)
    sends: list[Callable[[], bytes]] = [lambda: before.file(NAME, 1, MTIME), before.bye,
                                        lambda: before.data(b"x")]
    after = client_after(bye=True)
    sends += [lambda: after.file(NAME, 1, MTIME), after.bye, lambda: after.data(b"x"), after.end]
    for send in sends:
        with pytest.raises(LocalProtocolError):
            send()


def test_a_dry_run_file_keeps_the_client_ready_and_takes_no_data() -> None:
    c = client_after()
    c.file(NAME, len(CONTENT), MTIME, dry_run=True)
    assert c.state is not protocol.ClientState.IN_FILE
    assert c.current_index is None
    with pytest.raises(LocalProtocolError):
        c.data(CONTENT)
    with pytest.raises(LocalProtocolError):
        c.end()
    c.file(NAME, 0, MTIME)
    assert c.current_index == 1


def test_a_client_may_send_files_before_the_235_arrives() -> None:
    c = client_after()
    assert not c.authenticated
    c.file(NAME, len(CONTENT), MTIME)
    assert c.files_sent == 1


# === client: lines in ==================================================================


def test_a_whole_interactive_session_is_verified_every_way() -> None:
    events = client_events(one_file_client, lines(AUTH_LINE, STORED_LINE, BYE_LINE), eof=True)
    assert [type(e) for e in events] == [AuthOk, Receipt, Done, ConnectionClosed]
    receipt = events[1]
    assert receipt == Receipt(0, 250, "stored", NAME, NAME, 14, DIGEST.hex(), False)
    assert events[2] == Done(1)


def test_a_bare_lf_is_accepted() -> None:
    data = (AUTH_LINE + "\n" + STORED_LINE + "\n" + BYE_LINE + "\n").encode()
    crlf = client_events(one_file_client, lines(AUTH_LINE, STORED_LINE, BYE_LINE))
    assert client_events(one_file_client, data) == crlf


def test_the_greeting_is_read_every_way() -> None:
    events = client_events(lambda: client_after(greeting=False, hello=False),
                           protocol.line(GREETING))
    assert events == [Greeting(GREETING, CHALLENGE)]


def test_a_pipe_client_ignores_the_greeting_it_never_read() -> None:
    stored = protocol.receipt_line(PIPE_KEYS, 0, 250, NAME, n=14, sha256=DIGEST)
    data = (protocol.line(GREETING) + protocol.auth_ok_line(PIPE_KEYS) + stored
            + protocol.bye_line(PIPE_KEYS, 1, 1))
    events = client_events(lambda: client_after(pipe=True, files=[(NAME, CONTENT)], bye=True),
                           data)
    assert [type(e) for e in events] == [Greeting, AuthOk, Receipt, Done]
    assert events[0].challenge == b""


def test_a_busy_greeting_is_a_session_refusal() -> None:
    events = client_events(lambda: client_after(greeting=False, hello=False),
                           protocol.session_line(Reply.BUSY))
    assert events == [SessionRefused(421, "421 busy")]


@pytest.mark.parametrize("first", [
    "Welcome to Debian", "Last login: Mon Jan  1 00:00:00 2026", "SSH-2.0-OpenSSH_9.6",
    "220", "220x rstash/1", "2200 rstash/1", "abc def",
])
def test_a_non_protocol_first_line_is_refused_quoting_it(first: str) -> None:
    err = client_error(lambda: client_after(greeting=False, hello=False),
                       (first + "\n").encode())
    assert first[:20] in str(err)


@pytest.mark.parametrize("greeting", [
    "220 smtp.example.org ESMTP Postfix",
    "220 rstash/2 methods=hmac-sha256 challenge=" + auth.b64url(CHALLENGE),
    "220 rstash/1 methods=ed25519 challenge=" + auth.b64url(CHALLENGE),
    "220 rstash/1 methods=hmac-sha256",
    "220 rstash/1 methods=hmac-sha256 challenge=" + auth.b64url(CHALLENGE[:8]),
    "220 rstash/1 methods=hmac-sha256 challenge=" + auth.b64url(CHALLENGE) + "=",
    "220 rstash/1 methods=hmac-sha256 challenge=" + auth.b64url(b"\xff" * 32).replace("_", "/"),
], ids=["smtp", "version-2", "other-method", "no-challenge", "short", "padded", "std-b64"])
def test_a_greeting_this_client_cannot_use_is_refused(greeting: str) -> None:
    client_error(lambda: client_after(greeting=False, hello=False), (greeting + "\r\n").encode())


def test_a_greeting_of_1024_bytes_is_accepted_and_1025_refused() -> None:
    def greeting_of(total: int) -> bytes:
        base = GREETING + " x="
        return (base + "a" * (total - len(base) - 2) + "\r\n").encode()

    make = lambda: client_after(greeting=False, hello=False)  # noqa: E731
    assert len(greeting_of(1024)) == 1024
    assert isinstance(client_events(make, greeting_of(1024))[0], Greeting)
    client_error(make, greeting_of(1025), "longer than 1024")


def test_a_line_over_1024_bytes_is_refused_before_its_end_arrives() -> None:
    c = client_after(greeting=False, hello=False)
    c.receive_data(b"2" * 1024)
    assert c.next_event() is NEED_DATA
    c.receive_data(b"2")
    with pytest.raises(RemoteProtocolError, match="longer than 1024"):
        c.next_event()


@pytest.mark.parametrize("raw", [b"235 ok\x00\r\n", b"235 ok \xc3\xa9\r\n", b"235 \tok\n",
                                 b"235 ok\rx\n"])
def test_a_line_with_unprintable_bytes_is_refused(raw: bytes) -> None:
    client_error(client_after, raw)


def test_a_line_before_hello_is_refused() -> None:
    client_error(lambda: client_after(hello=False), lines(AUTH_LINE), "before HELLO")


def test_every_flipped_bit_of_the_235_mac_is_refused() -> None:
    for bad in mac_flips(AUTH_LINE):
        client_error(client_after, lines(bad), "235")


def test_a_235_without_its_mac_is_refused() -> None:
    for bad in ("235 ok", "235 ok mac=", "235 mac=" + AUTH_LINE.rsplit("=", 1)[1],
                AUTH_LINE + "x"):
        client_error(client_after, lines(bad))


def test_a_235_from_another_session_is_refused() -> None:
    other = protocol.auth_ok_line(PIPE_KEYS)
    client_error(client_after, other)


def test_no_receipt_counts_before_the_235() -> None:
    c = one_file_client()
    c.receive_data(lines(STORED_LINE))
    try:
        ev = c.next_event()
    except RemoteProtocolError:
        ev = None
    assert not isinstance(ev, Receipt)
    assert c.stored == 0 and not c.authenticated


def test_every_flipped_bit_of_a_stored_receipt_mac_is_refused() -> None:
    for bad in mac_flips(STORED_LINE):
        client_error(one_file_client, lines(AUTH_LINE, bad), "MAC")


def test_every_flipped_bit_of_a_refusal_receipt_mac_is_refused() -> None:
    refusal = protocol.receipt_line(KEYS, 0, Reply.EXISTS, NAME).decode().rstrip("\r\n")
    assert client_events(one_file_client, lines(AUTH_LINE, refusal))[1].code == Reply.EXISTS
    for bad in mac_flips(refusal):
        client_error(one_file_client, lines(AUTH_LINE, bad), "MAC")


def test_a_refusal_receipt_with_another_code_is_refused() -> None:
    line_ = protocol.receipt_line(KEYS, 0, Reply.EXISTS, NAME).decode()
    client_error(one_file_client, lines(AUTH_LINE) + line_.replace("550", "553", 1).encode(), "MAC")


def test_every_flipped_bit_of_the_221_mac_is_refused() -> None:
    for bad in mac_flips(BYE_LINE):
        client_error(one_file_client, lines(AUTH_LINE, STORED_LINE, bad), "221")


@pytest.mark.parametrize("bad", ["221 bye", "221 bye 1", "221 bye x mac=AAAA", "221 bye 1 2 mac=x"])
def test_a_malformed_221_is_refused(bad: str) -> None:
    client_error(one_file_client, lines(AUTH_LINE, STORED_LINE, bad))


def test_every_flipped_bit_of_the_stored_name_is_refused() -> None:
    head, mac = STORED_LINE.rsplit(" mac=", 1)
    head, name = head.rsplit(" ", 1)
    for _bit, bad in flips(protocol.pct_decode(name)):
        client_error(one_file_client,
                     lines(AUTH_LINE, f"{head} {protocol.pct_encode(bad)} mac={mac}"))


def test_a_stored_receipt_stating_another_size_is_refused() -> None:
    for size in ("15", "13", "0", "140", "014"):
        client_error(one_file_client,
                     lines(AUTH_LINE, STORED_LINE.replace(" 14 ", f" {size} ", 1)))


def test_a_stored_receipt_stating_another_digest_is_refused() -> None:
    for _bit, bad in flips(DIGEST):
        client_error(one_file_client,
                     lines(AUTH_LINE, STORED_LINE.replace(DIGEST.hex(), bad.hex(), 1)))


def test_a_stored_receipt_macced_over_another_digest_is_refused() -> None:
    wrong = hashlib.sha256(b"something else").digest()
    line_ = protocol.receipt_line(KEYS, 0, 250, NAME, n=14, sha256=wrong)
    client_error(one_file_client, lines(AUTH_LINE) + line_)
    line_ = protocol.receipt_line(KEYS, 0, 250, NAME, n=15, sha256=DIGEST)
    client_error(one_file_client, lines(AUTH_LINE) + line_)


def test_a_stored_receipt_for_a_file_never_ended_is_refused() -> None:
    make = lambda: client_after(files=[(NAME, CONTENT)], end=False)  # noqa: E731
    client_error(make, lines(AUTH_LINE, STORED_LINE))


def test_a_stored_receipt_for_another_index_is_refused() -> None:
    line1 = protocol.receipt_line(KEYS, 1, 250, NAME, n=14, sha256=DIGEST)
    client_error(one_file_client, lines(AUTH_LINE) + line1, "MAC")


def test_receipts_are_matched_to_files_in_order() -> None:
    make = lambda: client_after(files=[(b"a", b"1"), (b"b", b"22")], bye=True)  # noqa: E731
    r_a = protocol.receipt_line(KEYS, 0, 250, b"a", n=1, sha256=hashlib.sha256(b"1").digest())
    r_b = protocol.receipt_line(KEYS, 1, 550, b"b")
    done = protocol.bye_line(KEYS, 2, 1)
    events = client_events(make, lines(AUTH_LINE) + r_a + r_b + done)
    assert [(e.index, e.code) for e in events if isinstance(e, Receipt)] == [(0, 250), (1, 550)]
    assert events[-1] == Done(1)
    client_error(make, lines(AUTH_LINE) + r_b + r_a, "MAC")


def test_a_renamed_file_is_reported_under_its_final_name() -> None:
    final = b"hello~1.txt"
    line_ = protocol.receipt_line(KEYS, 0, 250, NAME, final_name=final, n=14, sha256=DIGEST)
    events = client_events(one_file_client, lines(AUTH_LINE) + line_)
    assert events[1].final_name == final and events[1].name == NAME


def test_a_non_ascii_final_name_is_percent_decoded() -> None:
    name = "bäckup 1.tar".encode()
    make = lambda: client_after(files=[(name, CONTENT)])  # noqa: E731
    line_ = protocol.receipt_line(KEYS, 0, 250, name, n=14, sha256=DIGEST)
    assert b" b%C3%A4ckup%201.tar mac=" in line_
    assert client_events(make, lines(AUTH_LINE) + line_)[1].final_name == name
    client_error(make, lines(AUTH_LINE) + line_.replace(b"%C3%A4", b"%c3%a4"))


def test_a_221_before_every_file_is_answered_is_refused() -> None:
    client_error(one_file_client, lines(AUTH_LINE, BYE_LINE))


def test_a_221_claiming_another_stored_count_is_refused() -> None:
    for stored in (0, 2):
        bye = protocol.bye_line(KEYS, 1, stored)
        client_error(one_file_client, lines(AUTH_LINE, STORED_LINE) + bye)


def test_a_receipt_matching_no_file_is_a_protocol_error() -> None:
    client_error(client_after, lines(AUTH_LINE, STORED_LINE))


def test_a_221_before_bye_is_a_protocol_error() -> None:
    client_error(lambda: client_after(files=[(NAME, CONTENT)]),
                 lines(AUTH_LINE, STORED_LINE, BYE_LINE))


def test_a_221_for_another_file_count_is_refused() -> None:
    bye = protocol.bye_line(KEYS, 2, 1)
    client_error(one_file_client, lines(AUTH_LINE, STORED_LINE) + bye, "221")


def test_the_dry_run_verdict_is_verified() -> None:
    make = lambda: client_after(dry=[NAME], bye=True)  # noqa: E731
    would = protocol.receipt_line(KEYS, 0, 250, NAME, dry_run=True)
    events = client_events(make, lines(AUTH_LINE) + would + protocol.bye_line(KEYS, 1, 0))
    receipt = events[1]
    assert isinstance(receipt, Receipt)
    assert receipt.dry_run and receipt.code == 250 and receipt.reason == "would store"
    assert events[-1] == Done(0)
    for bad in mac_flips(would.decode().rstrip("\r\n")):
        client_error(make, lines(AUTH_LINE, bad), "MAC")


def test_would_store_for_a_real_file_is_refused() -> None:
    would = protocol.receipt_line(KEYS, 0, 250, NAME, dry_run=True)
    client_error(one_file_client, lines(AUTH_LINE) + would)


@pytest.mark.parametrize("text", ["535 authentication failed", "530 pipe mode off",
                                  "531 clock skew +400 s", "532 replayed session",
                                  "451 local error", "421 busy"])
def test_a_session_refusal_instead_of_235(text: str) -> None:
    assert client_events(one_file_client, lines(text)) == [SessionRefused(int(text[:3]), text)]


@pytest.mark.parametrize("text", ["554 integrity check failed hello.txt", "500 protocol error",
                                  "421 timeout"])
def test_a_session_ending_line_after_235(text: str) -> None:
    events = client_events(one_file_client, lines(AUTH_LINE, text))
    assert events == [AuthOk(), SessionRefused(int(text[:3]), text)]


def test_eof_without_221_is_not_clean() -> None:
    events = client_events(one_file_client, lines(AUTH_LINE, STORED_LINE), eof=True)
    assert events[-1] == ConnectionClosed(clean=False)


def test_the_client_reads_nothing_after_end_of_stream() -> None:
    c = client_after()
    c.receive_data(b"")
    assert c.next_event() == ConnectionClosed(clean=False)
    with pytest.raises(LocalProtocolError):
        c.next_event()
    with pytest.raises(LocalProtocolError):
        c.receive_data(b"x")


# === property tests ===================================================================


def _outcome(chunks: Sequence[bytes]) -> tuple[list[Any], int | None]:
    """Events (without Data) and the reply of the RemoteProtocolError, if any."""
    events: list[Any] = []
    try:
        run_server(chunks, events=events)
    except RemoteProtocolError as e:
        assert isinstance(e.reply, int) and 200 <= e.reply <= 599
        return [x for x in events if not isinstance(x, Data)], e.reply
    return [x for x in events if not isinstance(x, Data)], None


def _split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@given(prefix=st.sampled_from([b"", HELLO, PIPE_HELLO, HELLO + FILE0]),
       data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 2000), max_size=8),
       eof=st.booleans())
@PROPERTY
def test_random_bytes_yield_events_or_a_remote_protocol_error(
        prefix: bytes, data: bytes, cuts: list[int], eof: bool) -> None:
    blob = prefix + data
    end = [b""] if eof else []
    whole = _outcome([c for c in [blob] if c] + end)
    split = _outcome(_split(blob, cuts) + end)
    assert split == whole


@st.composite
def frame_scripts(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, int]]]:
    """Bytes of a session after a valid HELLO: well-formed frames, some mutated."""
    kinds = ["file", "file", "data", "data", "end", "abort", "bye", "garbage", "badindex",
             "header"]
    steps = draw(st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 2**32),
                                    st.integers(0, 9), st.binary(max_size=48)), max_size=14))
    out = bytearray(HELLO)
    index = 0
    cur: tuple[int, bytes, bytearray] | None = None  # index, hdr, content so far
    plan: list[tuple[str, int]] = []
    for kind, arg, mutate, blob in steps:
        if kind == "file":
            size = None if arg % 5 == 0 else arg % 40
            dry = arg % 7 == 0
            hdr = file_hdr(index, blob[:24] or b"f", size,
                           flags=protocol.FLAG_DRY_RUN if dry else 0)
            fr = file_frame(hdr)
            if not dry:
                cur = (index, hdr, bytearray())
            index += 1
        elif kind == "data":
            content = blob or b"d"
            fr = data_frame(content)
            if cur is not None:
                cur[2].extend(content)
        elif kind == "end" and cur is not None:
            n = len(cur[2])
            fr = end_frame(cur[1], bytes(cur[2]), wire_n=n if arg % 3 else arg,
                           tag_n=n if arg % 11 else arg)
            cur = None
        elif kind == "abort" and cur is not None:
            fr = abort_frame(cur[0] if arg % 4 else arg % 9)
            cur = None
        elif kind == "bye":
            fr = bye_frame(index if arg % 4 else arg % 9)
        elif kind == "badindex":
            hdr = file_hdr(arg % 9, b"x", arg % 3)
            fr = file_frame(hdr)
        elif kind == "header":
            fr = header(arg % 8, arg >> 8 & 0xFFFF) + blob
        else:
            fr = blob
        if mutate == 0 and fr:
            bit = arg % (len(fr) * 8)
            fr = bytes(fr[:bit // 8]) + bytes([fr[bit // 8] ^ (0x80 >> bit % 8)]) + fr[bit // 8 + 1:]
        out += fr
        plan.append((kind, len(fr)))
    return bytes(out), plan


def _check_server_invariants(events: Sequence[Any]) -> None:
    """Every End reports the server's own count and digest of the Data since its File."""
    files = [e.index for e in events if isinstance(e, File)]
    assert files == list(range(len(files)))
    current: File | None = None
    received = bytearray()
    for ev in events:
        if isinstance(ev, File):
            if not ev.header.dry_run:
                current, received = ev, bytearray()
        elif isinstance(ev, Data):
            received += ev.data
        elif isinstance(ev, End):
            assert current is not None and ev.index == current.index
            assert ev.n == len(received)
            assert ev.sha256 == hashlib.sha256(bytes(received)).digest()
            if current.header.size is not None:
                assert ev.n == current.header.size
            current = None
        elif isinstance(ev, protocol.Abort):
            assert current is not None and ev.index == current.index
            current = None
        if current is not None and current.header.size is not None:
            assert len(received) <= current.header.size


@given(script=frame_scripts(), cuts=st.lists(st.integers(0, 4000), max_size=8),
       eof=st.booleans())
@PROPERTY
def test_random_frame_sequences_yield_verified_events_or_a_remote_protocol_error(
        script: tuple[bytes, list[tuple[str, int]]], cuts: list[int], eof: bool) -> None:
    blob, _plan = script
    end = [b""] if eof else []
    for chunks in ([c for c in [blob] if c] + end, _split(blob, cuts) + end):
        events: list[Any] = []
        try:
            run_server(chunks, events=events)
        except RemoteProtocolError as e:
            assert isinstance(e.reply, int) and 200 <= e.reply <= 599
        _check_server_invariants(coalesce(events))
    assert _outcome([c for c in [blob] if c] + end) == _outcome(_split(blob, cuts) + end)


REAL_LINES = [
    GREETING, AUTH_LINE, STORED_LINE, BYE_LINE,
    protocol.receipt_line(KEYS, 0, 550, NAME).decode().rstrip("\r\n"),
    protocol.receipt_line(KEYS, 1, 250, NAME, dry_run=True).decode().rstrip("\r\n"),
    "421 busy", "535 authentication failed", "554 integrity check failed hello.txt",
    protocol.auth_ok_line(PIPE_KEYS).decode().rstrip("\r\n"),
]


@st.composite
def server_lines(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 5))
        if choice == 0:
            text = draw(st.sampled_from(REAL_LINES)).encode()
        elif choice == 1:
            real = bytearray(draw(st.sampled_from(REAL_LINES)).encode())
            pos = draw(st.integers(0, len(real) - 1))
            real[pos] = draw(st.integers(0x20, 0x7E))
            text = bytes(real)
        elif choice == 2:
            code = draw(st.sampled_from(["220", "221", "235", "250", "421", "426", "451",
                                         "452", "500", "530", "531", "532", "535", "550",
                                         "552", "553", "554", "999", "22"]))
            words = draw(st.lists(st.text(alphabet=st.characters(min_codepoint=0x21,
                                                                 max_codepoint=0x7E)),
                                  max_size=6))
            text = " ".join([code, *words]).encode()
        elif choice == 3:
            text = draw(st.binary(max_size=80))
        elif choice == 4:
            text = b"2" * draw(st.integers(1000, 1100))
        else:
            text = draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")
        parts.append(text + draw(st.sampled_from([b"\r\n", b"\n", b""])))
    return b"".join(parts)


CLIENT_FACTORIES: list[Callable[[], ClientConnection]] = [
    lambda: client_after(greeting=False, hello=False),
    lambda: client_after(hello=False),
    client_after,
    one_file_client,
    lambda: client_after(pipe=True, files=[(NAME, CONTENT)], bye=True),
    lambda: client_after(files=[(NAME, CONTENT)], end=False),
    lambda: client_after(dry=[NAME, b"b"], bye=True),
]


@given(which=st.integers(0, len(CLIENT_FACTORIES) - 1), data=server_lines(),
       cuts=st.lists(st.integers(0, 3000), max_size=8), eof=st.booleans())
@PROPERTY
def test_random_lines_yield_events_or_a_remote_protocol_error(
        which: int, data: bytes, cuts: list[int], eof: bool) -> None:
    end = [b""] if eof else []
    outcomes: list[tuple[list[Any], type[RemoteProtocolError] | None]] = []
    for chunks in ([c for c in [data] if c] + end, _split(data, cuts) + end):
        events: list[Any] = []
        c = CLIENT_FACTORIES[which]()
        try:
            for chunk in chunks:
                c.receive_data(chunk)
                while (ev := c.next_event()) is not NEED_DATA:
                    events.append(ev)
                    if isinstance(ev, ConnectionClosed):
                        break
                if events and isinstance(events[-1], ConnectionClosed):
                    break
            outcomes.append((events, None))
        except RemoteProtocolError as e:
            assert isinstance(e.reply, int)
            outcomes.append((events, type(e)))
    assert outcomes[0] == outcomes[1]
