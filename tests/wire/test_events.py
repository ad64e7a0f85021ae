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


def _hello_with_ext_bytes(ext_raw: bytes) -> bytes:
    signed = bytes([1, 1, 1]) + auth.s(b"vm1") + KEY.key_id + NONCE + auth.u64(T) + auth.s(ext_raw)
    return frame(FrameType.HELLO, signed + bytes(32))


@pytest.mark.parametrize("ext_raw", [
    b"\x01", b"\x01\x00", b"\x01\x00\x05abc", b"\x01\x00\x01a\x02",
], ids=["tag-only", "half-length", "value-overrun", "second-cut"])
def test_a_malformed_hello_extension_is_authentication_failed_not_a_protocol_error(ext_raw: bytes) -> None:
    # Before authentication every flaw but version and method is 535 (rstash(7) HELLO).
    server_error(_hello_with_ext_bytes(ext_raw), Reply.AUTH_FAILED)


def test_a_three_byte_hello_with_a_bad_method_gets_504() -> None:
    server_error(frame(FrameType.HELLO, b"\x01\x01\x02"), Reply.METHOD_NOT_SUPPORTED)
    server_error(frame(FrameType.HELLO, b"\x01\x01\x01"), Reply.AUTH_FAILED)
    server_error(frame(FrameType.HELLO, b"\x01\x01"), Reply.AUTH_FAILED)


def test_a_server_id_that_is_not_utf8_is_read_with_replacement_characters() -> None:
    hello = run_server([_hello_with_ext_bytes(bytes([wire.EXT_SERVER_ID]) + auth.s(b"host-\xff\xfe"))])[0]
    assert hello.ext == {wire.EXT_SERVER_ID: b"host-\xff\xfe"}
    assert hello.server_id == "host-\ufffd\ufffd"


def test_a_hello_without_a_server_id_has_none() -> None:
    hello = run_server([_hello_with_ext_bytes(b"")])[0]
    assert hello.ext == {}
    assert hello.server_id is None


def test_extensions_are_encoded_in_tag_order() -> None:
    assert wire.encode_ext({9: b"b", 1: b"a"}) == b"\x01\x00\x01a\x09\x00\x01b"


@pytest.mark.parametrize("mtime", [-1, -(2**63), 0, 2**63 - 1, -86400])
def test_file_header_mtime_is_signed_and_round_trips(mtime: int) -> None:
    hdr = wire.encode_file_header(5, b"old.txt", 3, mtime)
    parsed = wire.parse_file_header(hdr)
    assert parsed.mtime == mtime
    assert (parsed.index, parsed.name, parsed.size, parsed.flags, parsed.offset) == (5, b"old.txt", 3, 0, 0)


def test_file_header_unknown_size_is_all_ones_on_the_wire() -> None:
    hdr = wire.encode_file_header(0, b"x", None, 0)
    assert b"\xff" * 8 in hdr
    assert wire.parse_file_header(hdr).size is None
    assert wire.parse_file_header(wire.encode_file_header(0, b"x", 0, 0)).size == 0


def test_parse_hello_reads_every_field() -> None:
    signed = wire.hello_without_proof(mode=wire.MODE_PIPE, box=b"vm1", key_id=KEY.key_id, nonce=NONCE,
                                      time=T, ext={wire.EXT_SERVER_ID: b"host"})
    proof = bytes(range(32))
    hello = wire.parse_hello(signed + proof)
    assert (hello.version, hello.mode, hello.method) == (1, wire.MODE_PIPE, 1)
    assert (hello.box, hello.key_id, hello.nonce, hello.time) == (b"vm1", KEY.key_id, NONCE, T)
    assert (hello.proof, hello.signed, hello.ext) == (proof, signed, {wire.EXT_SERVER_ID: b"host"})


def test_file_header_carries_its_transfer_id() -> None:
    tid = bytes(range(16))
    parsed = wire.parse_file_header(wire.encode_file_header(1, b"x", 2, 3, 0, tid))
    assert parsed.tid == tid
    assert parsed.hdr == wire.encode_file_header(1, b"x", 2, 3, 0, tid)
