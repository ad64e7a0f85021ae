"""Waited FILEs, 354, 350 and 251 in both roles (rstash(7) RESUME AND RE-RUNS)."""

from __future__ import annotations

import hashlib

import pytest

from rstash import auth, wire
from rstash.errors import LocalProtocolError, RemoteProtocolError, Reply
from rstash.wire import ClientConnection, ClientState, File, ServerConnection, ServerState
from wire.wire_support import CHALLENGE, CONTENT, KEY, MTIME, NONCE, T, run_server

GREETING_R = wire.greeting_line(CHALLENGE, resume=True)
TID = bytes(range(1, 17))
BIG = wire.WAIT_SIZE
NAME = b"backup.tar"


def resume_client() -> ClientConnection:
    c = ClientConnection(KEY, "vm1")
    c.receive_data(wire.line(GREETING_R))
    assert isinstance(c.next_event(), wire.Greeting)
    c.hello(NONCE, T)
    assert c.keys is not None
    c.receive_data(wire.auth_ok_line(c.keys))
    assert isinstance(c.next_event(), wire.AuthOk)
    return c


def keys_of(c: ClientConnection) -> auth.SessionKeys:
    assert c.keys is not None
    return c.keys




def authed(resume: bool = True, every: int = 0) -> tuple[ClientConnection, ServerConnection]:
    c = ClientConnection(KEY, "vm1")
    c.receive_data(wire.line(GREETING_R))
    assert isinstance(c.next_event(), wire.Greeting)
    hello = c.hello(NONCE, T)
    s = ServerConnection(resume=resume, checkpoint_every=every)
    s.receive_data(hello)
    assert isinstance(s.next_event(), wire.Hello)
    s.authenticate(keys_of(c))
    c.receive_data(wire.auth_ok_line(keys_of(c)))
    assert isinstance(c.next_event(), wire.AuthOk)
    return c, s


def test_greeting_field_resume_is_read_and_a_plain_greeting_offers_none() -> None:
    assert resume_client().resume
    c = ClientConnection(KEY, "vm1")
    c.receive_data(wire.line(wire.greeting_line(CHALLENGE)))
    c.next_event()
    assert not c.resume
    c.hello(NONCE, T)
    with pytest.raises(LocalProtocolError):
        c.file(NAME, BIG, MTIME, tid=TID)


def test_a_waited_file_holds_both_roles_until_it_is_answered() -> None:
    c, s = authed()
    s.receive_data(c.file(NAME, BIG, MTIME, tid=TID))
    assert c.waits and c.state is ClientState.WAITING
    with pytest.raises(LocalProtocolError):
        c.data_header(1)
    ev = s.next_event()
    assert isinstance(ev, File) and s.state is ServerState.AWAIT_GO
    with pytest.raises(LocalProtocolError):
        s.next_event()


def test_go_sends_from_the_first_byte_and_a_small_file_stays_pipelined() -> None:
    c, s = authed()
    s.receive_data(c.file(NAME, BIG, MTIME, tid=TID))
    s.next_event()
    s.go()
    assert s.state is ServerState.IN_FILE
    c.receive_data(wire.line(wire.GO_LINE))
    assert isinstance(c.next_event(), wire.Go) and c.state is ClientState.IN_FILE
    c.abort()
    c2, _ = authed()
    c2.file(NAME, BIG - 1, MTIME, tid=TID)
    assert not c2.waits and c2.state is ClientState.IN_FILE


def test_without_resume_offered_a_tid_file_is_not_waited_by_the_server() -> None:
    c, s = authed(resume=False)
    s.receive_data(c.file(NAME, BIG, MTIME, tid=TID))
    s.next_event()
    assert s.state is ServerState.IN_FILE


def test_refusal_or_already_stored_finishes_a_waited_file() -> None:
    c, s = authed()
    s.receive_data(c.file(NAME, BIG, MTIME, tid=TID))
    s.next_event()
    s.finish_waited()
    assert s.state is ServerState.READY
    c.receive_data(wire.receipt_line(keys_of(c), 0, Reply.EXISTS, NAME))
    ev = c.next_event()
    assert isinstance(ev, wire.Receipt) and ev.code == Reply.EXISTS
    assert c.state is ClientState.READY
    c.file(NAME, BIG, MTIME, tid=TID)
    digest = hashlib.sha256(b"x").digest()
    c.receive_data(wire.already_line(keys_of(c), 1, b"other.tar", BIG, digest))
    ev = c.next_event()
    assert isinstance(ev, wire.Receipt) and ev.already and ev.final_name == b"other.tar"
    assert c.state is ClientState.READY and c.stored == 0


def test_251_with_another_size_or_a_bad_mac_is_refused() -> None:
    c = resume_client()
    c.file(NAME, BIG, MTIME, tid=TID)
    c.receive_data(wire.already_line(keys_of(c), 0, NAME, BIG + 1, bytes(32)))
    with pytest.raises(RemoteProtocolError):
        c.next_event()
    c = resume_client()
    c.file(NAME, BIG, MTIME, tid=TID)
    c.receive_data(wire.already_line(keys_of(c), 1, NAME, BIG, bytes(32)))  # another i
    with pytest.raises(RemoteProtocolError):
        c.next_event()


def test_354_or_350_for_a_file_that_does_not_wait_is_a_protocol_error() -> None:
    c = resume_client()
    c.file(NAME, 10, MTIME, tid=TID)
    c.receive_data(wire.line(wire.GO_LINE))
    with pytest.raises(RemoteProtocolError):
        c.next_event()
    c = resume_client()
    c.file(NAME, BIG, MTIME, tid=TID)
    c.receive_data(wire.line(wire.GO_LINE) + wire.line(wire.GO_LINE))
    assert isinstance(c.next_event(), wire.Go)
    with pytest.raises(RemoteProtocolError):
        c.next_event()


def test_an_offer_must_be_inside_the_file_and_its_prefix_must_be_the_clients() -> None:
    c = resume_client()
    c.file(NAME, BIG, MTIME, tid=TID)
    c.receive_data(wire.resume_line(keys_of(c), 0, BIG, bytes(32), NAME))
    with pytest.raises(RemoteProtocolError):
        c.next_event()
    c = resume_client()
    c.file(NAME, BIG, MTIME, tid=TID)
    prefix = hashlib.sha256(b"abcd")
    c.receive_data(wire.resume_line(keys_of(c), 0, 4, prefix.digest(), NAME))
    ev = c.next_event()
    assert isinstance(ev, wire.ResumeOffer) and c.state is ClientState.OFFERED
    with pytest.raises(LocalProtocolError):
        c.resume_from(4, hashlib.sha256(b"abce"))
    c = resume_client()
    c.file(NAME, BIG, MTIME, tid=TID)
    c.receive_data(wire.resume_line(keys_of(c), 0, 4, prefix.digest(), NAME))
    c.next_event()
    c.abort()  # the prefix differs: abort, then the file again from zero
    assert c.state is ClientState.READY


def test_a_resumed_file_is_judged_over_the_whole_content() -> None:
    c, s = authed()
    content = CONTENT * 3
    s.receive_data(c.file(NAME, BIG, MTIME, tid=TID))
    s.next_event()
    held = hashlib.sha256(content[:14])
    s.go(14, held.copy())
    c.receive_data(wire.resume_line(keys_of(c), 0, 14, held.digest(), NAME))
    c.next_event()
    c.resume_from(14, held.copy())
    c.data(content[14:])
    assert c.files_sent == 1
    with pytest.raises(LocalProtocolError):
        c.end()  # short of the announced size: ABORT is the client's way out


def test_checkpoints_fall_on_multiples_whatever_the_data_split() -> None:
    content = bytes(range(256)) * 4
    for split in (1, 7, len(content)):
        c, s = authed(resume=False, every=100)
        frames = c.file(NAME, len(content), MTIME, tid=TID)
        for i in range(0, len(content), split):
            frames += c.data(content[i:i + split])
        frames += c.end()
        events = run_server([frames], conn=s)
        assert isinstance(events[-1], wire.End)
        assert s.checkpoint == (1000, hashlib.sha256(content[:1000]).digest())


def test_go_refuses_an_offset_past_the_file() -> None:
    c, s = authed()
    s.receive_data(c.file(NAME, BIG, MTIME, tid=TID))
    s.next_event()
    with pytest.raises(LocalProtocolError):
        s.go(BIG, hashlib.sha256())
