"""rstash.wire.server: the server's state machine, tags, DATA streaming, dry runs, ERROR.

h11 style: every input is fed whole, one byte at a time, and with trailing data
(``server_events`` / ``server_error``), and must mean the same each way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rstash import auth, wire
from rstash.errors import IntegrityError, LocalProtocolError, RemoteProtocolError, Reply
from rstash.wire import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    End,
    File,
    FrameType,
    Hello,
    ServerConnection,
    ServerState,
    frame,
)
from wire.wire_support import (
    CONTENT,
    DIGEST,
    FILE0,
    HDR0,
    HELLO,
    KEYS,
    MIB,
    NAME,
    ONE_FILE,
    PIPE_HELLO,
    PIPE_KEYS,
    PROPERTY,
    SERVER_TRAILING,
    SESSION,
    abort_frame,
    authed_server,
    bye_frame,
    coalesce,
    data_frame,
    end_frame,
    file_frame,
    file_hdr,
    flips,
    header,
    run_server,
    server_error,
    server_events,
    server_keys,
    split_at,
)

# === server: a whole session ========================================================


def test_server_reads_a_whole_session_every_way() -> None:
    events = server_events(SESSION)
    assert [type(e) for e in events] == [Hello, File, Data, End, wire.Bye, ConnectionClosed]
    assert events[1].header.name == NAME
    assert events[2].data == CONTENT
    assert events[3] == End(0, len(CONTENT), DIGEST)
    assert events[4] == wire.Bye(1)
    assert events[5] == ConnectionClosed(clean=True)


def test_server_reads_a_pipe_session_every_way() -> None:
    hdr = file_hdr()
    data = (PIPE_HELLO + file_frame(hdr, PIPE_KEYS) + data_frame(CONTENT)
            + end_frame(hdr, CONTENT, PIPE_KEYS) + bye_frame(1, PIPE_KEYS))
    events = server_events(data)
    assert events[0].mode == wire.MODE_PIPE
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
    # like any failed call, it leaves the role in ERROR
    assert conn.failed
    with pytest.raises(LocalProtocolError):
        conn.authenticate(KEYS)


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
    assert events[-1] == wire.Abort(0)
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
    assert [type(e) for e in events] == [Hello, File, Data, wire.Abort, File, Data, End,
                                         wire.Bye, ConnectionClosed]
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
    dry = file_hdr(1, flags=wire.FLAG_DRY_RUN, size=0)
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
    dry = file_hdr(0, size=len(CONTENT), flags=wire.FLAG_DRY_RUN)
    conn = authed_server(HELLO)
    events = run_server([file_frame(dry)], conn=conn)
    assert len(events) == 1 and events[0].header.dry_run
    assert conn.state is ServerState.READY
    assert conn.current is None
    server_error(HELLO + file_frame(dry) + data_frame(CONTENT), Reply.PROTOCOL_ERROR)
    server_error(HELLO + file_frame(dry) + end_frame(dry, b""), Reply.PROTOCOL_ERROR)
    server_error(HELLO + file_frame(dry) + abort_frame(0), Reply.PROTOCOL_ERROR)


def test_dry_runs_take_sequence_numbers() -> None:
    dry = file_hdr(0, flags=wire.FLAG_DRY_RUN)
    hdr1 = file_hdr(1)
    events = server_events(HELLO + file_frame(dry) + file_frame(hdr1) + data_frame(CONTENT)
                           + end_frame(hdr1, CONTENT) + bye_frame(2))
    assert [e.index for e in events if isinstance(e, File)] == [0, 1]
    assert events[-1].clean


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


@given(prefix=st.sampled_from([b"", HELLO, PIPE_HELLO, HELLO + FILE0]),
       data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 2000), max_size=8),
       eof=st.booleans())
@PROPERTY
def test_random_bytes_yield_events_or_a_remote_protocol_error(
        prefix: bytes, data: bytes, cuts: list[int], eof: bool) -> None:
    blob = prefix + data
    end = [b""] if eof else []
    whole = _outcome([c for c in [blob] if c] + end)
    split = _outcome(split_at(blob, cuts) + end)
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
                           flags=wire.FLAG_DRY_RUN if dry else 0)
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
        elif isinstance(ev, wire.Abort):
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
    for chunks in ([c for c in [blob] if c] + end, split_at(blob, cuts) + end):
        events: list[Any] = []
        try:
            run_server(chunks, events=events)
        except RemoteProtocolError as e:
            assert isinstance(e.reply, int) and 200 <= e.reply <= 599
        _check_server_invariants(coalesce(events))
    assert _outcome([c for c in [blob] if c] + end) == _outcome(split_at(blob, cuts) + end)


# === server: ERROR ======================================================================


def _server_calls(conn: ServerConnection) -> list[Callable[[], object]]:
    """Every call that changes a ServerConnection."""
    return [conn.next_event, lambda: conn.receive_data(FILE0), lambda: conn.receive_data(b""),
            lambda: conn.authenticate(KEYS), conn.discard_current]


def test_after_a_bad_file_tag_a_valid_file_is_refused_not_read() -> None:
    bad = FILE0[:-1] + bytes([FILE0[-1] ^ 1])
    data = HELLO + bad + FILE0 + data_frame(CONTENT) + end_frame(HDR0, CONTENT)
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))], [data + SERVER_TRAILING]):
        conn = ServerConnection()
        events: list[Any] = []
        with pytest.raises(IntegrityError):
            run_server(chunks, conn=conn, events=events)
        assert [type(e) for e in events] == [Hello]
        assert conn.state is ServerState.ERROR
        # the valid FILE behind the bad one is never read, whatever is asked next
        for call in _server_calls(conn):
            with pytest.raises(LocalProtocolError):
                call()
        assert conn.files_seen == 0 and conn.current is None


@pytest.mark.parametrize(("data", "exc"), [
    (HELLO + FILE0 + data_frame(CONTENT) + end_frame(HDR0, CONTENT + b"!"), IntegrityError),
    (HELLO + FILE0 + abort_frame(1), IntegrityError),
    (ONE_FILE + bye_frame(1, tag_count=2), IntegrityError),
    (HELLO + data_frame(CONTENT), RemoteProtocolError),
    (HELLO + FILE0 + data_frame(CONTENT + b"!"), RemoteProtocolError),
    (header(FrameType.HELLO, 4097), RemoteProtocolError),
    (frame(FrameType.HELLO, b"\x02"), RemoteProtocolError),
], ids=["END-tag", "ABORT-tag", "BYE-tag", "DATA-in-READY", "beyond-the-size", "HELLO-too-long",
        "version"])
def test_every_protocol_error_leaves_the_server_refusing_every_call(
        data: bytes, exc: type[RemoteProtocolError]) -> None:
    conn = ServerConnection()
    with pytest.raises(exc):
        run_server([data], conn=conn)
    assert conn.failed
    for call in _server_calls(conn):
        with pytest.raises(LocalProtocolError, match="after a protocol error"):
            call()


def test_a_call_refused_for_its_state_also_ends_in_error() -> None:
    conn = authed_server()
    with pytest.raises(LocalProtocolError):
        conn.authenticate(KEYS)
    assert conn.state is ServerState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.receive_data(FILE0)


def test_authenticate_after_end_of_stream_is_refused() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        conn.authenticate(KEYS)


def test_after_an_abort_no_file_is_current() -> None:
    conn = authed_server(HELLO + file_frame(file_hdr()) + data_frame(CONTENT[:3]))
    assert conn.current is not None and conn.current.name == NAME
    run_server([abort_frame(0)], conn=conn)
    assert conn.current is None
