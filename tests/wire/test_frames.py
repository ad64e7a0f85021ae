"""rstash.wire.frames: frame limits judged on the five-byte header (rstash(7) FRAMING).

Every input is fed whole, one byte at a time and with trailing data (``server_error``).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rstash import wire
from rstash.errors import IntegrityError, LocalProtocolError, RemoteProtocolError, Reply
from rstash.wire import (
    NEED_DATA,
    FrameType,
    frame,
)
from rstash.wire.frames import Rope
from wire.wire_support import (
    FILE0,
    HELLO,
    MIB,
    PROPERTY,
    authed_server,
    file_frame,
    file_hdr,
    header,
    server_error,
)

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


@pytest.mark.parametrize(("ftype", "length"), [
    (FrameType.HELLO, 0), (FrameType.HELLO, 4097), (FrameType.DATA, MIB + 1), (FrameType.END, 39),
    (FrameType.END, 41), (FrameType.ABORT, 33), (FrameType.BYE, 0),
])
def test_a_payload_outside_its_limits_is_never_framed(ftype: FrameType, length: int) -> None:
    with pytest.raises(LocalProtocolError):
        frame(ftype, bytes(length))
    lo, hi = wire.FRAME_LIMITS[ftype]
    for ok in (lo, hi):
        assert frame(ftype, bytes(ok))[:5] == header(ftype, ok)


@given(st.lists(st.binary(min_size=1, max_size=7), min_size=1, max_size=6),
       st.lists(st.tuples(st.sampled_from(["take", "peek", "view", "skip"]), st.integers(0, 12)), max_size=12))
@PROPERTY
def test_the_receive_buffer_gives_back_the_bytes_in_order_however_they_arrived(
    chunks: list[bytes], ops: list[tuple[str, int]]
) -> None:
    rope, model = Rope(), b"".join(chunks)
    for chunk in chunks:
        rope.append(chunk)
    for op, n in ops:
        n = min(n, len(model))
        if op == "peek":
            assert rope.peek(n) == model[:n]
            continue
        if op == "view":
            if not model or n == 0:
                continue
            got = bytes(rope.view(n))
            assert got and model.startswith(got) and len(got) <= n
            model = model[len(got):]
        elif op == "take":
            assert rope.take(n) == model[:n]
            model = model[n:]
        else:
            rope.skip(n)
            model = model[n:]
        assert len(rope) == len(model)
    assert rope.take(len(model)) == model
