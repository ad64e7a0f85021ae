"""rstash.wire.events: HELLO and FILE header parsing, as the server reads them (rstash(7)).

Every input is fed whole, one byte at a time and with trailing data (``server_events``,
``server_error``).
"""

from __future__ import annotations

import pytest

from rstash import auth, wire
from rstash.errors import Reply
from rstash.wire import (
    ClientConnection,
    FrameType,
    frame,
)
from wire.wire_support import (
    GREETING,
    HDR0,
    HELLO,
    KEY,
    NONCE,
    T,
    file_frame,
    run_server,
    server_error,
    server_events,
)

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
    signed = wire.hello_without_proof(mode=1, box=b"vm1", key_id=KEY.key_id, nonce=NONCE,
                                          time=T, ext={9: b"future"})
    hello = run_server([frame(FrameType.HELLO, signed + bytes(32))])[0]
    assert hello.ext == {9: b"future"}
    assert hello.signed == signed


def test_hello_carries_its_extensions() -> None:
    c = ClientConnection(KEY, "vm1", server_id="host-a")
    c.receive_data(wire.line(GREETING))
    c.next_event()
    events = server_events(c.hello(NONCE, T), eof=False)
    assert events[0].server_id == "host-a"
    assert events[0].ext == {wire.EXT_SERVER_ID: b"host-a"}


def test_a_tagged_but_malformed_file_header_is_a_protocol_error() -> None:
    for hdr in (HDR0[:-1], HDR0 + b"\x00", b"\x00" * 8 + b"\xff\xff"):
        server_error(HELLO + file_frame(hdr), Reply.PROTOCOL_ERROR)
