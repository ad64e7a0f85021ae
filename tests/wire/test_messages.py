"""rstash.wire: the one line each protocol error says, as the server logs it and rstash-send prints it.

A user reading ``rstash-send: …`` or an operator reading the log learns what broke from
these words alone, so each error path is pinned to its exact text here, fed whole, one byte
at a time and with trailing data (``server_error`` / ``client_error``).
"""

from __future__ import annotations

import hashlib
import re

import pytest

from rstash import auth, wire
from rstash.errors import IntegrityError, LocalProtocolError, RemoteProtocolError, Reply
from rstash.wire import FrameType, frame
from rstash.wire.frames import data_header
from rstash.wire.replies import parse_greeting
from wire.wire_support import (
    AUTH_LINE,
    CONTENT,
    HDR0,
    HELLO,
    KEY,
    KEYS,
    NAME,
    NONCE,
    STORED_LINE,
    T,
    abort_frame,
    bye_frame,
    client_after,
    client_error,
    data_frame,
    end_frame,
    file_frame,
    file_hdr,
    header,
    lines,
    one_file_client,
    run_client,
    server_error,
)


def exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


def _hello(mode: int = 1, ext_raw: bytes = b"") -> bytes:
    signed = bytes([1, mode, 1]) + auth.s(b"vm1") + KEY.key_id + NONCE + auth.u64(T) + auth.s(ext_raw)
    return signed + bytes(32)


DUP_EXT = bytes([1]) + auth.s(b"a") + bytes([1]) + auth.s(b"b")


@pytest.mark.parametrize(("data", "reply", "message"), [
    (frame(FrameType.HELLO, b"\x02"), Reply.VERSION_NOT_SUPPORTED, "protocol version not supported"),
    (frame(FrameType.HELLO, b"\x01\x01\x07"), Reply.METHOD_NOT_SUPPORTED, "method not supported"),
    (frame(FrameType.HELLO, _hello(mode=3)), Reply.AUTH_FAILED, "unknown session mode"),
    (frame(FrameType.HELLO, _hello(ext_raw=DUP_EXT)), Reply.AUTH_FAILED, "duplicate HELLO extension"),
    (frame(FrameType.HELLO, _hello()[:-1]), Reply.AUTH_FAILED, "frame too short"),
    (frame(FrameType.HELLO, _hello() + b"\x00"), Reply.AUTH_FAILED, "trailing bytes in frame"),
    (header(9, 1), Reply.AUTH_FAILED, "unknown frame type 9"),
    (header(FrameType.FILE, 10), Reply.AUTH_FAILED, "FILE frame in state await-hello"),
    (HELLO + header(FrameType.END, 41), Reply.PROTOCOL_ERROR, "END frame in state ready"),
], ids=["version", "method", "mode", "duplicate-ext", "short", "trailing", "type", "state-before-auth",
        "state-after-auth"])
def test_what_the_server_says_about_a_broken_frame(data: bytes, reply: int, message: str) -> None:
    assert str(server_error(data, reply)) == message


def test_what_the_server_says_about_a_frame_of_an_illegal_length() -> None:
    assert str(server_error(HELLO + file_frame(HDR0) + header(FrameType.END, 41), Reply.PROTOCOL_ERROR)) \
        == "END frame of 41 bytes"


def test_what_the_server_says_about_more_data_than_announced() -> None:
    data = HELLO + file_frame(HDR0) + data_frame(CONTENT + b"!")
    assert str(server_error(data, Reply.PROTOCOL_ERROR)) == "more data than the announced size"


def test_what_the_server_says_about_a_short_file_frame_and_a_bad_file_tag() -> None:
    assert str(server_error(HELLO + frame(FrameType.FILE, bytes(31)), Reply.PROTOCOL_ERROR)) == \
        "FILE frame too short"
    err = server_error(HELLO + frame(FrameType.FILE, bytes(32)), Reply.INTEGRITY, IntegrityError)
    assert str(err) == "FILE tag failed"
    assert isinstance(err, IntegrityError) and err.name == b""


def test_what_the_server_says_about_offsets_flags_and_sequence_numbers() -> None:
    assert str(server_error(HELLO + file_frame(file_hdr(offset=5)), Reply.PROTOCOL_ERROR)) == \
        "FILE offset must be 0 in rstash/1"
    assert str(server_error(HELLO + file_frame(file_hdr(flags=2)), Reply.PROTOCOL_ERROR)) == \
        "unknown FILE flags 0x2"
    err = server_error(HELLO + file_frame(file_hdr(i=3)), Reply.INTEGRITY, IntegrityError)
    assert str(err) == "FILE sequence number 3, expected 0"


def test_what_the_server_says_about_a_bad_end_abort_or_bye() -> None:
    start = HELLO + file_frame(HDR0) + data_frame(CONTENT)
    err = server_error(start + end_frame(HDR0, CONTENT, tag_n=1), Reply.INTEGRITY, IntegrityError)
    assert str(err) == "END tag failed"
    assert isinstance(err, IntegrityError) and err.name == NAME
    assert err.sha256 == hashlib.sha256(CONTENT).digest()
    err = server_error(start + abort_frame(7), Reply.INTEGRITY, IntegrityError)
    assert str(err) == "ABORT tag failed"
    assert isinstance(err, IntegrityError) and err.name == NAME
    done = start + end_frame(HDR0, CONTENT)
    assert str(server_error(done + bye_frame(1, tag_count=2), Reply.INTEGRITY, IntegrityError)) == \
        "BYE tag failed"
    assert str(server_error(done + bye_frame(2), Reply.PROTOCOL_ERROR)) == "BYE counts 2 files, 1 were sent"


def test_what_the_server_says_about_an_end_short_of_the_announced_size() -> None:
    short = CONTENT[:3]
    data = HELLO + file_frame(HDR0) + data_frame(short) + end_frame(HDR0, short)
    assert str(server_error(data, Reply.PROTOCOL_ERROR)) == f"END after 3 of {len(CONTENT)} announced bytes"


# --- the client ------------------------------------------------------------------------


def test_what_the_client_says_about_a_235_or_221_that_fails_its_mac() -> None:
    bad_auth = AUTH_LINE[:-1] + ("A" if AUTH_LINE[-1] != "A" else "B")
    assert str(client_error(one_file_client, lines(bad_auth))) == \
        "the server's 235 failed its MAC: it does not hold the key"
    bye = wire.bye_line(KEYS, 1, 1).decode().rstrip("\r\n")
    bad_bye = bye[:-1] + ("A" if bye[-1] != "A" else "B")
    assert str(client_error(one_file_client, lines(AUTH_LINE, STORED_LINE, bad_bye))) == \
        "the server's 221 failed its MAC"
    assert str(client_error(one_file_client, lines(AUTH_LINE, STORED_LINE) + wire.bye_line(KEYS, 1, 0))) == \
        "221 says 0 stored, 1 receipts were verified"


def test_what_the_client_says_about_lines_it_cannot_use() -> None:
    assert str(client_error(lambda: client_after(greeting=False, hello=False), b"250 hello\r\n")) == \
        "not an rstash greeting: '250 hello'"
    assert str(client_error(one_file_client, lines(AUTH_LINE, STORED_LINE, STORED_LINE))) == \
        f"reply matches no FILE sent: {STORED_LINE[:120]!r}"
    assert str(client_error(client_after, b"x\r\n")) == "not an rstash reply: 'x'"
    assert str(client_error(lambda: client_after(hello=False), lines(AUTH_LINE))) == \
        f"reply before HELLO: {AUTH_LINE[:120]!r}"


def test_what_the_client_says_about_malformed_receipts_and_221s() -> None:
    head, mac = STORED_LINE.rsplit(" mac=", 1)
    bad = head.replace("stored 14", "stored x") + " mac=" + mac
    assert str(client_error(one_file_client, lines(AUTH_LINE, bad))) == f"malformed receipt: {bad[:120]!r}"
    other = STORED_LINE.replace("stored 14", "stored 15")
    assert str(client_error(one_file_client, lines(AUTH_LINE, other))) == \
        "receipt for file 0 states another size or digest"
    bad_name = STORED_LINE.replace(" hello.txt ", " hello%zz ")
    assert str(client_error(one_file_client, lines(AUTH_LINE, bad_name))) == \
        f"malformed name in receipt: {bad_name[:120]!r}"
    assert str(client_error(one_file_client, lines(AUTH_LINE, STORED_LINE, "221 bye x mac=AAAA"))) == \
        "malformed 221 line: '221 bye x mac=AAAA'"


def test_a_quoted_line_is_cut_at_120_bytes() -> None:
    long = "x" * 200
    assert str(client_error(client_after, (long + "\r\n").encode())) == f"not an rstash reply: {'x' * 120!r}"


@pytest.mark.parametrize(("text", "message"), [
    ("220 rstash/1", "unsupported greeting: '220 rstash/1'"),
    ("220 rstash/1 challenge=" + auth.b64url(bytes(16)), "the server offers no method this client speaks"),
    ("220 rstash/1 methods=hmac-sha256", "greeting challenge too short"),
    ("220 rstash/1 methods=hmac-sha256 challenge=" + auth.b64url(bytes(16)) + "=", "malformed greeting challenge"),
    ("220  rstash/1 methods=hmac-sha256 challenge=" + auth.b64url(bytes(16)),
     "unsupported greeting: '220  rstash/1 methods=hmac-sha256 challenge=AAAAAAAAAAAAAAAAAAAAAA'"),
])
def test_what_the_client_says_about_a_greeting(text: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=exactly(message)):
        parse_greeting(text)


def test_what_the_library_says_when_its_caller_breaks_the_rules() -> None:
    with pytest.raises(LocalProtocolError, match=exactly("HELLO payload of 0 bytes")):
        frame(FrameType.HELLO, b"")
    with pytest.raises(LocalProtocolError, match=exactly("DATA of 0 bytes")):
        data_header(0)
    with pytest.raises(LocalProtocolError, match=exactly("reply line too long or not printable")):
        wire.line("250 \x7f")
    with pytest.raises(ValueError, match=exactly("bad percent escape")):
        wire.pct_decode("a%4")
    with pytest.raises(ValueError, match=exactly("unencoded byte in name")):
        wire.pct_decode("a b")


def test_what_the_client_says_about_a_call_its_state_does_not_allow() -> None:
    c = client_after(bye=True)
    with pytest.raises(LocalProtocolError, match=exactly("FILE in state bye-sent")):
        c.file(b"late", 1, 0)


def test_what_the_client_says_about_a_stored_receipt_for_a_file_still_being_sent() -> None:
    make = lambda: client_after(files=[(NAME, CONTENT)], end=False)  # noqa: E731
    assert str(client_error(make, lines(AUTH_LINE, STORED_LINE))) == f"malformed receipt: {STORED_LINE[:120]!r}"


@pytest.mark.parametrize("raw", [b"150 hi", b"600 hi", b"099 hi", b"25 hi"])
def test_a_code_outside_2xx_to_5xx_is_not_a_reply(raw: bytes) -> None:
    assert str(client_error(client_after, raw + b"\r\n")) == f"not an rstash reply: {raw.decode()!r}"


def test_a_dry_run_verdict_is_reported_in_the_protocols_words_not_the_lines() -> None:
    # The verdict's MAC covers index, code and name, not its text: the text is never believed.
    verdict = wire.receipt_line(KEYS, 0, 250, b"d.txt", dry_run=True).replace(b"would store", b"has eaten")
    events = run_client(client_after(dry=[b"d.txt"]), [lines(AUTH_LINE) + verdict])
    assert events[1].reason == "would store"


def test_what_the_client_says_about_a_line_over_1024_bytes() -> None:
    with pytest.raises(RemoteProtocolError, match=exactly("reply line longer than 1024 bytes")):
        run_client(client_after(), [b"2" * 1025])
