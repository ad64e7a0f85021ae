"""rstash.wire.replies: the lines the server makes, percent-encoded names (rstash(7) REPLY LINES)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rstash import auth, wire
from rstash.errors import LocalProtocolError, Reply
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
