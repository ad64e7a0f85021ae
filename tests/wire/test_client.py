"""rstash.wire.client: frames out, verified reply lines in, ERROR.

h11 style: every line is fed whole, one byte at a time, and with trailing data
(``client_events`` / ``client_error``), and must mean the same each way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rstash import auth, wire
from rstash.errors import LocalProtocolError, RemoteProtocolError, Reply
from rstash.wire import (
    NEED_DATA,
    AuthOk,
    ClientConnection,
    ConnectionClosed,
    Done,
    End,
    File,
    Greeting,
    Receipt,
    SessionRefused,
)
from wire.wire_support import (
    AUTH_LINE,
    BYE_LINE,
    CHALLENGE,
    CLIENT_TRAILING,
    CONTENT,
    DIGEST,
    GREETING,
    HELLO,
    KEY,
    KEYS,
    MIB,
    MTIME,
    NAME,
    NONCE,
    PIPE_KEYS,
    PROPERTY,
    STORED_LINE,
    T,
    client_after,
    client_error,
    client_events,
    flips,
    lines,
    mac_flips,
    one_file_client,
    run_client,
    run_server,
    split_at,
)

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
    assert events[-2] == wire.Bye(4)
    assert events[-1].clean


def test_client_data_header_and_data_sent_make_the_same_frames_as_data() -> None:
    a, b = client_after(), client_after()
    a.file(NAME, len(CONTENT), MTIME)
    b.file(NAME, len(CONTENT), MTIME)
    hdr = b.data_header(len(CONTENT))
    b.data_sent(memoryview(CONTENT))
    assert a.data(CONTENT) == hdr + CONTENT
    assert a.end() == b.end()


def in_file() -> ClientConnection:
    """A client inside a file of 14 bytes, 5 of them sent."""
    c = client_after()
    c.file(NAME, len(CONTENT), MTIME)
    c.data(CONTENT[:5])
    return c


@pytest.mark.parametrize(("make", "send"), [
    (lambda: client_after(greeting=False, hello=False), lambda c: c.hello(NONCE, T)),
    (client_after, lambda c: c.hello(NONCE, T)),
    (client_after, lambda c: c.data(b"x")),
    (client_after, lambda c: c.data_header(1)),
    (client_after, lambda c: c.end()),
    (client_after, lambda c: c.abort()),
    (in_file, lambda c: c.end()),
    (in_file, lambda c: c.bye()),
    (in_file, lambda c: c.file(b"second", 1, MTIME)),
    (in_file, lambda c: c.data(CONTENT)),
    (in_file, lambda c: c.data_header(wire.MAX_DATA + 1)),
    (in_file, lambda c: c.data_header(0)),
], ids=["hello-before-greeting", "hello-twice", "data-outside-a-file", "data-header-outside-a-file",
        "end-outside-a-file", "abort-outside-a-file", "end-before-the-size", "bye-inside-a-file",
        "file-inside-a-file", "data-beyond-the-size", "data-header-too-long", "data-header-empty"])
def test_client_illegal_sends_are_local_errors(make: Callable[[], ClientConnection],
                                               send: Callable[[ClientConnection], object]) -> None:
    c = make()
    with pytest.raises(LocalProtocolError):
        send(c)
    assert c.state is wire.ClientState.ERROR


def test_client_refuses_to_send_before_hello_and_after_bye() -> None:
    sends: list[Callable[[ClientConnection], bytes]] = [
        lambda c: c.file(NAME, 1, MTIME), lambda c: c.bye(), lambda c: c.data(b"x"), lambda c: c.end()]
    for send in sends:
        for c in (client_after(hello=False), client_after(bye=True)):
            with pytest.raises(LocalProtocolError):
                send(c)


def test_a_dry_run_file_keeps_the_client_ready_and_takes_no_data() -> None:
    c = client_after()
    c.file(NAME, len(CONTENT), MTIME, dry_run=True)
    assert c.state is wire.ClientState.READY
    assert c.current_index is None
    c.file(NAME, 0, MTIME)
    assert c.current_index == 1
    sends: list[Callable[[ClientConnection], bytes]] = [lambda c: c.data(CONTENT), lambda c: c.end()]
    for send in sends:
        dry = client_after(dry=[NAME])
        with pytest.raises(LocalProtocolError):
            send(dry)


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
                           wire.line(GREETING))
    assert events == [Greeting(GREETING, CHALLENGE)]


def test_a_pipe_client_ignores_the_greeting_it_never_read() -> None:
    stored = wire.receipt_line(PIPE_KEYS, 0, 250, NAME, n=14, sha256=DIGEST)
    data = (wire.line(GREETING) + wire.auth_ok_line(PIPE_KEYS) + stored
            + wire.bye_line(PIPE_KEYS, 1, 1))
    events = client_events(lambda: client_after(pipe=True, files=[(NAME, CONTENT)], bye=True),
                           data)
    assert [type(e) for e in events] == [Greeting, AuthOk, Receipt, Done]
    assert events[0].challenge == b""


def test_a_busy_greeting_is_a_session_refusal() -> None:
    events = client_events(lambda: client_after(greeting=False, hello=False),
                           wire.session_line(Reply.BUSY))
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
    other = wire.auth_ok_line(PIPE_KEYS)
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
    refusal = wire.receipt_line(KEYS, 0, Reply.EXISTS, NAME).decode().rstrip("\r\n")
    assert client_events(one_file_client, lines(AUTH_LINE, refusal))[1].code == Reply.EXISTS
    for bad in mac_flips(refusal):
        client_error(one_file_client, lines(AUTH_LINE, bad), "MAC")


def test_a_refusal_receipt_with_another_code_is_refused() -> None:
    line_ = wire.receipt_line(KEYS, 0, Reply.EXISTS, NAME).decode()
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
    for _bit, bad in flips(wire.pct_decode(name)):
        client_error(one_file_client,
                     lines(AUTH_LINE, f"{head} {wire.pct_encode(bad)} mac={mac}"))


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
    line_ = wire.receipt_line(KEYS, 0, 250, NAME, n=14, sha256=wrong)
    client_error(one_file_client, lines(AUTH_LINE) + line_)
    line_ = wire.receipt_line(KEYS, 0, 250, NAME, n=15, sha256=DIGEST)
    client_error(one_file_client, lines(AUTH_LINE) + line_)


def test_a_stored_receipt_for_a_file_never_ended_is_refused() -> None:
    make = lambda: client_after(files=[(NAME, CONTENT)], end=False)  # noqa: E731
    client_error(make, lines(AUTH_LINE, STORED_LINE))


def test_a_stored_receipt_for_another_index_is_refused() -> None:
    line1 = wire.receipt_line(KEYS, 1, 250, NAME, n=14, sha256=DIGEST)
    client_error(one_file_client, lines(AUTH_LINE) + line1, "MAC")


def test_receipts_are_matched_to_files_in_order() -> None:
    make = lambda: client_after(files=[(b"a", b"1"), (b"b", b"22")], bye=True)  # noqa: E731
    r_a = wire.receipt_line(KEYS, 0, 250, b"a", n=1, sha256=hashlib.sha256(b"1").digest())
    r_b = wire.receipt_line(KEYS, 1, 550, b"b")
    done = wire.bye_line(KEYS, 2, 1)
    events = client_events(make, lines(AUTH_LINE) + r_a + r_b + done)
    assert [(e.index, e.code) for e in events if isinstance(e, Receipt)] == [(0, 250), (1, 550)]
    assert events[-1] == Done(1)
    client_error(make, lines(AUTH_LINE) + r_b + r_a, "MAC")


def test_a_renamed_file_is_reported_under_its_final_name() -> None:
    final = b"hello~1.txt"
    line_ = wire.receipt_line(KEYS, 0, 250, NAME, final_name=final, n=14, sha256=DIGEST)
    events = client_events(one_file_client, lines(AUTH_LINE) + line_)
    assert events[1].final_name == final and events[1].name == NAME


def test_a_non_ascii_final_name_is_percent_decoded() -> None:
    name = "bäckup 1.tar".encode()
    make = lambda: client_after(files=[(name, CONTENT)])  # noqa: E731
    line_ = wire.receipt_line(KEYS, 0, 250, name, n=14, sha256=DIGEST)
    assert b" b%C3%A4ckup%201.tar mac=" in line_
    assert client_events(make, lines(AUTH_LINE) + line_)[1].final_name == name
    client_error(make, lines(AUTH_LINE) + line_.replace(b"%C3%A4", b"%c3%a4"))


def test_a_221_before_every_file_is_answered_is_refused() -> None:
    client_error(one_file_client, lines(AUTH_LINE, BYE_LINE))


def test_a_221_claiming_another_stored_count_is_refused() -> None:
    for stored in (0, 2):
        bye = wire.bye_line(KEYS, 1, stored)
        client_error(one_file_client, lines(AUTH_LINE, STORED_LINE) + bye)


def test_a_receipt_matching_no_file_is_a_protocol_error() -> None:
    client_error(client_after, lines(AUTH_LINE, STORED_LINE))


def test_a_221_before_bye_is_a_protocol_error() -> None:
    client_error(lambda: client_after(files=[(NAME, CONTENT)]),
                 lines(AUTH_LINE, STORED_LINE, BYE_LINE))


def test_a_221_for_another_file_count_is_refused() -> None:
    bye = wire.bye_line(KEYS, 2, 1)
    client_error(one_file_client, lines(AUTH_LINE, STORED_LINE) + bye, "221")


def test_the_dry_run_verdict_is_verified() -> None:
    make = lambda: client_after(dry=[NAME], bye=True)  # noqa: E731
    would = wire.receipt_line(KEYS, 0, 250, NAME, dry_run=True)
    events = client_events(make, lines(AUTH_LINE) + would + wire.bye_line(KEYS, 1, 0))
    receipt = events[1]
    assert isinstance(receipt, Receipt)
    assert receipt.dry_run and receipt.code == 250 and receipt.reason == "would store"
    assert events[-1] == Done(0)
    for bad in mac_flips(would.decode().rstrip("\r\n")):
        client_error(make, lines(AUTH_LINE, bad), "MAC")


def test_would_store_for_a_real_file_is_refused() -> None:
    would = wire.receipt_line(KEYS, 0, 250, NAME, dry_run=True)
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


REAL_LINES = [
    GREETING, AUTH_LINE, STORED_LINE, BYE_LINE,
    wire.receipt_line(KEYS, 0, 550, NAME).decode().rstrip("\r\n"),
    wire.receipt_line(KEYS, 1, 250, NAME, dry_run=True).decode().rstrip("\r\n"),
    "421 busy", "535 authentication failed", "554 integrity check failed hello.txt",
    wire.auth_ok_line(PIPE_KEYS).decode().rstrip("\r\n"),
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
    for chunks in ([c for c in [data] if c] + end, split_at(data, cuts) + end):
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


# === client: ERROR ======================================================================


def _client_calls(c: ClientConnection) -> list[Callable[[], object]]:
    """Every call that changes a ClientConnection."""
    return [c.next_event, lambda: c.receive_data(lines(BYE_LINE)), lambda: c.receive_data(b""),
            lambda: c.hello(NONCE, T), lambda: c.file(b"next", 1, MTIME), lambda: c.data(b"x"),
            lambda: c.data_header(1), lambda: c.data_sent(b"x"), c.end, c.abort, c.bye]


def test_after_a_bad_receipt_mac_a_valid_line_is_refused_not_read() -> None:
    bad = next(mac_flips(STORED_LINE))
    data = lines(AUTH_LINE, bad, STORED_LINE, BYE_LINE)
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))], [data + CLIENT_TRAILING]):
        c = one_file_client()
        events: list[Any] = []
        with pytest.raises(RemoteProtocolError, match="MAC"):
            for chunk in chunks:
                c.receive_data(chunk)
                while (ev := c.next_event()) is not NEED_DATA:
                    events.append(ev)
        assert events == [AuthOk()]
        assert c.state is wire.ClientState.ERROR
        # the valid receipt and 221 behind the bad line are never read
        for call in _client_calls(c):
            with pytest.raises(LocalProtocolError, match="after a protocol error"):
                call()
        assert c.stored == 0


@pytest.mark.parametrize(("make", "data"), [
    (lambda: client_after(greeting=False, hello=False), b"SSH-2.0-OpenSSH_9.6\r\n"),
    (client_after, lines("235 ok mac=" + "A" * 22)),
    (one_file_client, lines(AUTH_LINE, BYE_LINE)),
    (one_file_client, b"2" * 1025),
], ids=["not-rstash", "235-MAC", "221-too-early", "line-too-long"])
def test_every_protocol_error_leaves_the_client_refusing_every_call(
        make: Callable[[], ClientConnection], data: bytes) -> None:
    c = make()
    with pytest.raises(RemoteProtocolError):
        run_client(c, [data])
    assert c.failed
    for call in _client_calls(c):
        with pytest.raises(LocalProtocolError, match="after a protocol error"):
            call()


def _three_stored_client() -> ClientConnection:
    return client_after(files=[(b"a", b"1"), (b"b", b"22"), (b"c", b"333")], bye=True)


def _three_stored_lines() -> bytes:
    return lines(AUTH_LINE) + b"".join(
        wire.receipt_line(KEYS, i, 250, name, n=len(content), sha256=hashlib.sha256(content).digest())
        for i, (name, content) in enumerate([(b"a", b"1"), (b"b", b"22"), (b"c", b"333")]))


def test_the_221_counts_every_stored_file() -> None:
    events = client_events(_three_stored_client, _three_stored_lines() + wire.bye_line(KEYS, 3, 3))
    assert [e.final_name for e in events if isinstance(e, Receipt)] == [b"a", b"b", b"c"]
    assert events[-1] == Done(3)


@pytest.mark.parametrize("claimed", [1, 2, 4])
def test_a_221_with_another_count_of_several_stored_files_is_refused(claimed: int) -> None:
    client_error(_three_stored_client, _three_stored_lines() + wire.bye_line(KEYS, 3, claimed), "stored")


@pytest.mark.parametrize("first", [b"\n", b"\r\n", b"\n235 ok\r\n"])
def test_a_reply_starting_with_an_empty_line_is_refused_at_once(first: bytes) -> None:
    # An empty line is whole: waiting for more would hang the client on a broken server.
    c = client_after()
    c.receive_data(first)
    with pytest.raises(RemoteProtocolError, match="not an rstash reply"):
        c.next_event()


def test_a_refusal_receipt_reports_the_servers_reason_and_the_requested_name() -> None:
    make = lambda: client_after(files=[(b"a b", b"1")], bye=True)  # noqa: E731
    refusal = wire.receipt_line(KEYS, 0, Reply.NAME_NOT_ALLOWED, b"a b", reason="matches deny_names 'a*'")
    events = client_events(make, lines(AUTH_LINE) + refusal + wire.bye_line(KEYS, 1, 0))
    receipt = events[1]
    assert receipt == Receipt(0, 553, "matches deny_names 'a*'", b"a b", b"a b", 0, "", False)
    assert not receipt.ok
    assert events[-1] == Done(0)


def test_a_client_is_interactive_unless_told_pipe() -> None:
    c = ClientConnection(KEY, "vm1")
    assert c.state is wire.ClientState.AWAIT_GREETING
    assert c.reply_state is wire.ReplyState.GREETING
    with pytest.raises(LocalProtocolError):
        c.hello(NONCE, T)  # nothing is sent before the greeting


def test_after_the_221_nothing_more_is_sent_or_read() -> None:
    c = one_file_client()
    events = run_client(c, [lines(AUTH_LINE, STORED_LINE, BYE_LINE)])
    assert events[-1] == Done(1)
    with pytest.raises(LocalProtocolError):
        c.file(b"late", 1, MTIME)
    c = one_file_client()
    run_client(c, [lines(AUTH_LINE, STORED_LINE, BYE_LINE)])
    with pytest.raises(RemoteProtocolError):
        run_client(c, [lines(BYE_LINE)])


def test_an_interactive_client_refuses_a_second_greeting_before_hello() -> None:
    client_error(lambda: client_after(hello=False), wire.line(GREETING), "before HELLO")


def test_a_pipe_client_reports_a_greeting_before_its_hello_and_binds_nothing() -> None:
    events = client_events(lambda: client_after(pipe=True, hello=False), wire.line(GREETING))
    assert events == [Greeting(GREETING, b"")]
    events = client_events(lambda: client_after(pipe=True), wire.line(GREETING))
    assert events == [Greeting(GREETING, b"")]


def test_a_dry_run_verdict_is_a_receipt_that_would_store() -> None:
    make = lambda: client_after(dry=[b"d.txt"], bye=True)  # noqa: E731
    verdict = wire.receipt_line(KEYS, 0, 250, b"d.txt", dry_run=True)
    events = client_events(make, lines(AUTH_LINE) + verdict + wire.bye_line(KEYS, 1, 0))
    assert events[1] == Receipt(0, 250, "would store", b"d.txt", b"d.txt", 0, "", True)
    assert events[-1] == Done(0)


def test_a_221_with_two_spaces_is_refused() -> None:
    bye = BYE_LINE.replace("bye ", "bye  ", 1)
    client_error(one_file_client, lines(AUTH_LINE, STORED_LINE, bye), "malformed 221")


def test_an_empty_line_then_a_long_one_is_refused_as_not_a_reply() -> None:
    c = client_after()
    c.receive_data(b"\n" + b"2" * 1100)
    with pytest.raises(RemoteProtocolError, match="not an rstash reply"):
        c.next_event()
