"""rstash.wire.replies: the lines the server makes, percent-encoded names (rstash(7) REPLY LINES)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rstash import auth, wire
from rstash.errors import LocalProtocolError, RemoteProtocolError, Reply
from rstash.wire.replies import parse_greeting, parse_line, parse_receipt
from wire.wire_support import (
    DIGEST,
    KEYS,
    NAME,
    PROPERTY,
)

# === server reply lines ==============================================================


def test_reply_lines_end_in_crlf_and_percent_encode_names() -> None:
    raw = "ä b%c\u202e.txt".encode()
    out = wire.receipt_line(KEYS, 3, Reply.EXISTS, raw)
    text = out.decode("ascii")
    assert text.endswith("\r\n") and text.count("\r\n") == 1
    assert text.startswith("550 exists %C3%A4%20b%25c%E2%80%AE.txt mac=")
    assert text.rstrip("\r\n").rsplit("mac=", 1)[1] == auth.receipt_mac(KEYS.k_s2c, 3, 550, raw)


def test_a_refused_name_is_echoed_cut_at_255_bytes_but_macced_whole() -> None:
    raw = "é".encode() * 200  # 400 bytes
    text = wire.receipt_line(KEYS, 0, Reply.NAME_NOT_ALLOWED, raw).decode().rstrip("\r\n")
    echoed = text.split(" ")[-2]
    assert wire.pct_decode(echoed) == raw[:255]
    assert text.endswith("mac=" + auth.receipt_mac(KEYS.k_s2c, 0, 553, raw))
    assert len(text) + 2 <= wire.MAX_LINE


def test_a_dry_run_receipt_says_would_store() -> None:
    text = wire.receipt_line(KEYS, 0, Reply.STORED, NAME, dry_run=True).decode()
    assert text == f"250 would store hello.txt mac={auth.receipt_mac(KEYS.k_s2c, 0, 250, NAME)}\r\n"


def test_a_stored_receipt_names_the_final_name() -> None:
    text = wire.receipt_line(KEYS, 0, Reply.STORED, NAME, final_name=b"hello~1.txt",
                                 n=14, sha256=DIGEST).decode()
    mac = auth.receipt_mac(KEYS.k_s2c, 0, 250, b"hello~1.txt", 14, DIGEST)
    assert text == f"250 stored 14 sha256:{DIGEST.hex()} hello~1.txt mac={mac}\r\n"


def test_session_lines() -> None:
    assert wire.session_line(Reply.AUTH_FAILED) == b"535 authentication failed\r\n"
    assert wire.session_line(Reply.BUSY) == b"421 busy\r\n"
    assert wire.skew_line(-42) == b"531 clock skew -42 s\r\n"
    assert wire.skew_line(7) == b"531 clock skew +7 s\r\n"
    assert wire.integrity_line(NAME) == b"554 integrity check failed hello.txt\r\n"
    assert wire.integrity_line(b"") == b"554 integrity check failed\r\n"


def test_a_reply_line_never_exceeds_1024_bytes_or_holds_unprintable_bytes() -> None:
    with pytest.raises(LocalProtocolError):
        wire.line("5" * 1023)
    with pytest.raises(LocalProtocolError):
        wire.line("500 a\rb")
    assert len(wire.line("5" * 1022)) == 1024


@pytest.mark.parametrize("text", ["%", "%4", "%4g", "%4a", "a b", "\u00e9", "a\x7f"])
def test_pct_decode_refuses_anything_pct_encode_never_writes(text: str) -> None:
    with pytest.raises(ValueError):
        wire.pct_decode(text)


@given(st.binary(max_size=300))
@PROPERTY
def test_pct_encoding_round_trips_and_stays_printable(raw: bytes) -> None:
    enc = wire.pct_encode(raw)
    assert all(0x21 <= ord(c) <= 0x7E for c in enc)
    assert wire.pct_decode(enc) == raw


@pytest.mark.parametrize("text", ["250 ok\x7f", "250 o\tk", "250 ok\t", "250 ok\x01", "\x7f250 ok"])
def test_the_server_never_makes_a_line_with_del_tab_or_a_control_anywhere(text: str) -> None:
    with pytest.raises(LocalProtocolError):
        wire.line(text)


def test_every_printable_character_may_end_a_line() -> None:
    for code in range(0x20, 0x7F):
        assert wire.line("250 " + chr(code)) == ("250 " + chr(code) + "\r\n").encode()


@pytest.mark.parametrize("raw", [b"250 a\x7fb", b"250 a\tb", b"250 ab\x7f", b"250 ab\t", b"\t250 ab"])
def test_a_received_line_with_del_or_tab_is_not_a_reply(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="not an rstash reply"):
        parse_line(raw)


def test_a_refusal_receipt_carries_its_reason_and_the_requested_name() -> None:
    text = wire.receipt_line(KEYS, 2, Reply.NAME_NOT_ALLOWED, b"a b", reason="matches deny_names '*.exe'")
    mac = auth.receipt_mac(KEYS.k_s2c, 2, 553, b"a b")
    assert text == f"553 matches deny_names '*.exe' a%20b mac={mac}\r\n".encode()
    fields = parse_receipt(text.decode().rstrip("\r\n").split(" ", 1)[1])
    assert fields is not None
    assert (fields.text, fields.name, fields.mac) == ("matches deny_names '*.exe'", "a%20b", mac)


@pytest.mark.parametrize(("code", "text"), [
    (Reply.EXISTS, "exists"), (Reply.NAME_NOT_ALLOWED, "name not allowed"),
    (Reply.INSUFFICIENT_STORAGE, "insufficient storage"), (Reply.LOCAL_ERROR, "local error"),
    (Reply.ABORTED, "aborted"),
])
def test_a_refusal_receipt_without_a_reason_says_the_codes_text(code: int, text: str) -> None:
    line = wire.receipt_line(KEYS, 0, code, NAME).decode()
    assert line.startswith(f"{code} {text} hello.txt mac=")


def test_the_greeting_parser_finds_hmac_among_several_methods() -> None:
    challenge = bytes(range(16))
    for methods in ("hmac-sha256", "ssh-ed25519,hmac-sha256", "hmac-sha256,x", "a,hmac-sha256,b"):
        text = f"220 rstash/1 methods={methods} challenge={auth.b64url(challenge)}"
        assert parse_greeting(text) == challenge
    text = f"220 rstash/1 challenge={auth.b64url(challenge)} methods=x,hmac-sha256 later=1"
    assert parse_greeting(text) == challenge


@pytest.mark.parametrize("methods", ["hmac-sha25", "hmac-sha256x", "x-hmac-sha256", "", "HMAC-SHA256"])
def test_the_greeting_parser_refuses_a_method_list_without_hmac(methods: str) -> None:
    text = f"220 rstash/1 methods={methods} challenge={auth.b64url(bytes(32))}"
    with pytest.raises(RemoteProtocolError, match="no method"):
        parse_greeting(text)


@pytest.mark.parametrize("length", [16, 17, 32, 64, 200])
def test_the_greeting_parser_accepts_a_challenge_of_16_bytes_or_more(length: int) -> None:
    challenge = bytes(range(length))
    assert parse_greeting(f"220 rstash/1 methods=hmac-sha256 challenge={auth.b64url(challenge)}") == challenge


@pytest.mark.parametrize("length", [0, 1, 8, 15])
def test_the_greeting_parser_refuses_a_challenge_under_16_bytes(length: int) -> None:
    text = f"220 rstash/1 methods=hmac-sha256 challenge={auth.b64url(bytes(length))}"
    with pytest.raises(RemoteProtocolError, match="too short"):
        parse_greeting(text)


@pytest.mark.parametrize("text", ["220", "220 rstash/1", "220 rstash/2 methods=hmac-sha256 challenge=AAAA"])
def test_the_greeting_parser_refuses_another_protocol(text: str) -> None:
    with pytest.raises(RemoteProtocolError, match="unsupported greeting"):
        parse_greeting(text)


def test_the_greeting_line_carries_the_challenge() -> None:
    assert wire.greeting_line(bytes(range(16))) == "220 rstash/1 methods=hmac-sha256 challenge=AAECAwQFBgcICQoLDA0ODw"


def test_a_stored_receipt_for_an_empty_file_says_zero_bytes() -> None:
    empty = hashlib.sha256(b"").digest()
    text = wire.receipt_line(KEYS, 0, Reply.STORED, b"empty", sha256=empty).decode()
    mac = auth.receipt_mac(KEYS.k_s2c, 0, 250, b"empty", 0, empty)
    assert text == f"250 stored 0 sha256:{empty.hex()} empty mac={mac}\r\n"


@pytest.mark.parametrize(("text", "raw"), [
    ("a%41b%42c", b"aAbBc"), ("%25%25%25", b"%%%"), ("ab%20cd%20ef", b"ab cd ef"), ("xyz", b"xyz"),
])
def test_pct_decode_reads_every_escape_and_character(text: str, raw: bytes) -> None:
    assert wire.pct_decode(text) == raw
