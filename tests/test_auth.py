"""rstash.auth and the rstash(7) construction against the independent vectors.

tests/vectors/vectors.json is written by tests/vectors/make_vectors.py from the
specification alone (it never imports rstash); every value in it must be
reproduced here by rstash.auth and rstash.wire.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rstash import auth, wire
from rstash.errors import KeyFileError, Reply

VECTORS = Path(__file__).parent / "vectors" / "vectors.json"


@dataclass(frozen=True)
class Vec:
    """The vectors, with the fixed inputs decoded once."""

    raw: dict[str, Any]
    key: auth.Key
    challenge: bytes
    nonce: bytes
    time: int
    content: bytes
    name: bytes
    size: int
    mtime: int
    greeting: str

    def h(self, *path: str) -> bytes:
        """A hex value of the vectors, decoded: ``v.h("file0", "tag")``."""
        node: Any = self.raw
        for part in path:
            node = node[part]
        return bytes.fromhex(node)

    def s(self, *path: str) -> Any:
        node: Any = self.raw
        for part in path:
            node = node[part]
        return node


@pytest.fixture(scope="module")
def v() -> Vec:
    raw = json.loads(VECTORS.read_text(encoding="ascii"))
    inp = raw["inputs"]
    return Vec(
        raw=raw,
        key=auth.Key(bytes.fromhex(inp["key"]), inp["key_comment"]),
        challenge=bytes.fromhex(inp["challenge"]),
        nonce=bytes.fromhex(inp["nc"]),
        time=inp["t"],
        content=bytes.fromhex(inp["content"]),
        name=inp["file"]["name"].encode("utf-8"),
        size=inp["file"]["size"],
        mtime=inp["file"]["mtime"],
        greeting=raw["interactive"]["greeting"],
    )


def ia_keys(v: Vec) -> auth.SessionKeys:
    return auth.session_keys(v.key, v.greeting.encode("ascii"), v.h("interactive",
                                                                     "hello_without_proof"))


def pipe_keys(v: Vec) -> auth.SessionKeys:
    return auth.session_keys(v.key, b"", v.h("sessions", "pipe", "hello_without_proof"))


# --- keys and fingerprints ---------------------------------------------------------


def test_key_file_line_parses_to_the_vector_key_and_comment(v: Vec) -> None:
    key = auth.parse_key_text(v.s("key_file_line") + "\n")
    assert key.secret == v.key.secret
    assert key.comment == v.s("inputs", "key_comment")


def test_format_key_writes_the_vector_key_file_line(v: Vec) -> None:
    assert auth.format_key(v.key.secret, "vm1") == v.s("key_file_line") + "\n"


def test_fingerprint_and_describe_line_match_the_vectors(v: Vec) -> None:
    assert auth.fingerprint(v.key.secret) == v.s("fingerprint")
    assert v.key.fingerprint == v.s("fingerprint")
    assert v.key.describe() == v.s("fingerprint_line")


def test_describe_says_no_comment_for_a_key_without_one(v: Vec) -> None:
    key = auth.parse_key_text(f"rstash-key-v1 {v.key.secret.hex()}\n")
    assert key.describe() == f"256 {v.s('fingerprint')} no comment (rstash-hmac)"


def test_prk_and_key_id_match_the_vectors(v: Vec) -> None:
    assert v.key.prk == v.h("prk")
    assert v.key.key_id == v.h("key_id")


# --- the handshake ---------------------------------------------------------------


def test_interactive_hello_without_proof_matches_the_vector(v: Vec) -> None:
    signed = wire.hello_without_proof(mode=wire.MODE_INTERACTIVE, box=b"vm1",
                                          key_id=v.key.key_id, nonce=v.nonce, time=v.time)
    assert signed == v.h("interactive", "hello_without_proof")


def test_greeting_line_matches_the_vector(v: Vec) -> None:
    assert wire.greeting_line(v.challenge) == v.greeting


def test_interactive_th_proof_and_session_keys_match_the_vectors(v: Vec) -> None:
    signed = v.h("interactive", "hello_without_proof")
    assert auth.transcript_hash(v.greeting.encode("ascii"), signed) == v.h("interactive", "th")
    keys = ia_keys(v)
    assert keys.th == v.h("interactive", "th")
    assert keys.proof == v.h("interactive", "proof")
    assert keys.k_c2s == v.h("interactive", "k_c2s")
    assert keys.k_s2c == v.h("interactive", "k_s2c")
    assert signed + keys.proof == v.h("interactive", "hello_payload")


def test_session_keys_accept_raw_key_bytes_as_well_as_a_key(v: Vec) -> None:
    signed = v.h("interactive", "hello_without_proof")
    assert auth.session_keys(v.key.secret, v.greeting.encode(), signed) == ia_keys(v)


def test_pipe_th_proof_and_session_keys_match_the_vectors(v: Vec) -> None:
    signed = wire.hello_without_proof(mode=wire.MODE_PIPE, box=b"vm1",
                                          key_id=v.key.key_id, nonce=v.nonce, time=v.time)
    assert signed == v.h("sessions", "pipe", "hello_without_proof")
    keys = pipe_keys(v)
    assert keys.th == v.h("sessions", "pipe", "th")
    assert keys.proof == v.h("sessions", "pipe", "proof")
    assert keys.k_c2s == v.h("sessions", "pipe", "k_c2s")
    assert keys.k_s2c == v.h("sessions", "pipe", "k_s2c")


def test_235_line_matches_the_vector(v: Vec) -> None:
    keys = ia_keys(v)
    assert wire.auth_ok_line(keys) == (v.s("interactive", "auth_line") + "\r\n").encode()
    assert v.s("interactive", "auth_line") == "235 ok mac=" + auth.auth_mac(keys.k_s2c)


def test_parse_hello_reads_every_field_of_the_vector_payload(v: Vec) -> None:
    hello = wire.parse_hello(v.h("interactive", "hello_payload"))
    assert (hello.version, hello.mode, hello.method) == (1, 1, 1)
    assert hello.box == b"vm1"
    assert hello.key_id == v.key.key_id
    assert hello.nonce == v.nonce
    assert hello.time == v.time
    assert hello.ext == {}
    assert hello.proof == v.h("interactive", "proof")
    assert hello.signed == v.h("interactive", "hello_without_proof")


# --- file 0, abort, bye, receipts ------------------------------------------------


def test_file_header_tag_and_payload_match_the_vectors(v: Vec) -> None:
    f = v.s("inputs", "file")
    hdr = wire.encode_file_header(0, v.name, f["size"], f["mtime"], f["flags"],
                                      bytes.fromhex(f["tid"]), f["offset"])
    assert hdr == v.h("file0", "hdr")
    keys = ia_keys(v)
    assert auth.file_tag(keys.k_c2s, hdr) == v.h("file0", "tag")
    assert hdr + auth.file_tag(keys.k_c2s, hdr) == v.h("file0", "payload")
    parsed = wire.parse_file_header(hdr)
    assert (parsed.index, parsed.name, parsed.size, parsed.mtime) == (0, v.name, 14, f["mtime"])
    assert not parsed.dry_run


def test_end_tag_and_payload_match_the_vectors(v: Vec) -> None:
    import hashlib

    keys = ia_keys(v)
    d = hashlib.sha256(v.content).digest()
    assert d == v.h("file0", "content_sha256")
    assert hashlib.sha256(v.h("file0", "hdr")).digest() == v.h("file0", "hdr_sha256")
    tag = auth.end_tag(keys.k_c2s, v.h("file0", "hdr"), len(v.content), d)
    assert tag == v.h("file0", "end_tag")
    assert auth.u64(len(v.content)) + tag == v.h("file0", "end_payload")


def test_receipt_line_for_a_stored_file_matches_the_vector(v: Vec) -> None:
    keys = ia_keys(v)
    d = v.h("file0", "content_sha256")
    assert auth.receipt_mac(keys.k_s2c, 0, 250, v.name, 14, d) == v.s("file0", "receipt_mac")
    got = wire.receipt_line(keys, 0, Reply.STORED, v.name, n=14, sha256=d)
    assert got == (v.s("file0", "receipt_line") + "\r\n").encode()


def test_553_refusal_line_matches_the_vector(v: Vec) -> None:
    keys = ia_keys(v)
    refused = v.s("inputs", "refused_name").encode()
    assert auth.receipt_mac(keys.k_s2c, 1, 553, refused) == v.s("refusal", "receipt_mac")
    got = wire.receipt_line(keys, 1, Reply.NAME_NOT_ALLOWED, refused)
    assert got == (v.s("refusal", "receipt_line") + "\r\n").encode()


def test_abort_payload_matches_the_vector(v: Vec) -> None:
    assert auth.abort_tag(ia_keys(v).k_c2s, 0) == v.h("file0", "abort_payload")


def test_client_abort_frame_carries_the_vector_payload(v: Vec) -> None:
    c = _interactive_client(v)
    c.file(v.name, v.size, v.mtime)
    out = c.abort()
    assert out == wire.frame(wire.FrameType.ABORT, v.h("file0", "abort_payload"))


def test_bye_payload_and_221_line_match_the_vectors(v: Vec) -> None:
    keys = ia_keys(v)
    assert auth.u64(1) + auth.bye_tag(keys.k_c2s, 1) == v.h("bye1_payload")
    assert wire.bye_line(keys, 1, 1) == (v.s("done_line") + "\r\n").encode()


def test_percent_encoding_matches_the_vector(v: Vec) -> None:
    raw = v.s("percent_encoding", "input").encode("utf-8")
    assert wire.pct_encode(raw) == v.s("percent_encoding", "output")
    assert wire.pct_decode(v.s("percent_encoding", "output")) == raw


# --- whole sessions --------------------------------------------------------------


def _interactive_client(v: Vec) -> wire.ClientConnection:
    c = wire.ClientConnection(v.key, "vm1")
    c.receive_data((v.greeting + "\r\n").encode())
    ev = c.next_event()
    assert isinstance(ev, wire.Greeting)
    c.hello(v.nonce, v.time)
    return c


def _client_bytes(v: Vec, c: wire.ClientConnection) -> bytes:
    out = c.hello(v.nonce, v.time)
    out += c.file(v.name, v.size, v.mtime)
    out += c.data(v.content)
    out += c.end()
    out += c.bye()
    return out


def _drain(next_event: Callable[[], Any]) -> list[Any]:
    events: list[Any] = []
    while True:
        ev = next_event()
        if ev is wire.NEED_DATA:
            return events
        events.append(ev)
        if isinstance(ev, wire.ConnectionClosed):
            return events


@pytest.mark.parametrize("kind", ["interactive", "pipe"])
def test_client_sends_the_vector_session_bytes(v: Vec, kind: str) -> None:
    pipe = kind == "pipe"
    c = wire.ClientConnection(v.key, "vm1", pipe=pipe)
    if not pipe:
        c.receive_data((v.greeting + "\r\n").encode())
        assert isinstance(c.next_event(), wire.Greeting)
    assert _client_bytes(v, c) == v.h("sessions", kind, "client_hex")


@pytest.mark.parametrize("kind", ["interactive", "pipe"])
def test_client_verifies_the_vector_server_lines(v: Vec, kind: str) -> None:
    pipe = kind == "pipe"
    c = wire.ClientConnection(v.key, "vm1", pipe=pipe)
    server = v.h("sessions", kind, "server_hex")
    if pipe:
        _client_bytes(v, c)
        c.receive_data(server)
    else:
        c.receive_data(server)
        greeting = c.next_event()
        assert isinstance(greeting, wire.Greeting)
        assert greeting.challenge == v.challenge
        _client_bytes(v, c)
    c.receive_data(b"")
    events = _drain(c.next_event)
    if pipe:  # the greeting a pipe client never reads binds nothing
        assert isinstance(events[0], wire.Greeting)
        events = events[1:]
    assert isinstance(events[0], wire.AuthOk)
    receipt = events[1]
    assert isinstance(receipt, wire.Receipt)
    assert (receipt.index, receipt.code, receipt.final_name) == (0, 250, v.name)
    assert receipt.ok and not receipt.dry_run
    assert receipt.size == 14
    assert receipt.sha256 == v.s("file0", "content_sha256")
    assert events[2] == wire.Done(1)
    assert isinstance(events[3], wire.ConnectionClosed)
    assert len(events) == 4
    assert c.authenticated and c.stored == 1


@pytest.mark.parametrize("kind", ["interactive", "pipe"])
def test_server_reads_the_vector_session_and_replies_with_the_vector_lines(
        v: Vec, kind: str) -> None:
    pipe = kind == "pipe"
    srv = wire.ServerConnection()
    srv.receive_data(v.h("sessions", kind, "client_hex"))
    srv.receive_data(b"")
    hello = srv.next_event()
    assert isinstance(hello, wire.Hello)
    assert hello.mode == (wire.MODE_PIPE if pipe else wire.MODE_INTERACTIVE)
    g = b"" if pipe else v.greeting.encode("ascii")
    keys = auth.session_keys(v.key, g, hello.signed)
    assert auth.verify(keys.proof, hello.proof)
    srv.authenticate(keys)
    events = _drain(srv.next_event)
    assert [type(e) for e in events] == [wire.File, wire.Data, wire.End,
                                         wire.Bye, wire.ConnectionClosed]
    file_ev, data_ev, end_ev, bye_ev, closed = events
    assert file_ev.header.name == v.name and file_ev.header.size == 14
    assert data_ev.data == v.content
    assert end_ev == wire.End(0, 14, v.h("file0", "content_sha256"))
    assert bye_ev == wire.Bye(1)
    assert closed == wire.ConnectionClosed(clean=True)
    replies = (wire.line(wire.greeting_line(v.challenge))
               + wire.auth_ok_line(keys)
               + wire.receipt_line(keys, end_ev.index, Reply.STORED, file_ev.header.name,
                                       n=end_ev.n, sha256=end_ev.sha256)
               + wire.bye_line(keys, bye_ev.count, 1))
    assert replies == v.h("sessions", kind, "server_hex")


# --- what a proof binds ----------------------------------------------------------


def _proof_verifies(key: auth.Key, payload: bytes, greeting: str) -> bool:
    """The server's check: G is the greeting it sent, or empty for a pipe-mode HELLO."""
    hello = wire.parse_hello(payload)
    g = b"" if hello.mode == wire.MODE_PIPE else greeting.encode("ascii")
    return auth.verify(auth.session_keys(key, g, hello.signed).proof, hello.proof)


def _with_byte(payload: bytes, pos: int, value: int) -> bytes:
    return payload[:pos] + bytes([value]) + payload[pos + 1:]


def test_the_vector_hellos_verify(v: Vec) -> None:
    assert _proof_verifies(v.key, v.h("interactive", "hello_payload"), v.greeting)
    pipe_payload = v.h("sessions", "pipe", "client_hex")[5:5 + 90]
    assert _proof_verifies(v.key, pipe_payload, v.greeting)


def test_a_proof_for_one_box_never_verifies_for_another_with_the_same_key(v: Vec) -> None:
    payload = v.h("interactive", "hello_payload")
    box_at = payload.index(b"vm1")
    for other in (b"vm2", b"VM1", b"vm0", b"wm1"):
        forged = payload[:box_at] + other + payload[box_at + 3:]
        assert wire.parse_hello(forged).box == other
        assert not _proof_verifies(v.key, forged, v.greeting)
    # and a client asking for vm2 makes a different proof from the same inputs
    c = wire.ClientConnection(v.key, "vm2")
    c.receive_data((v.greeting + "\r\n").encode())
    c.next_event()
    vm2 = c.hello(v.nonce, v.time)[5:]
    assert vm2[-32:] != payload[-32:]
    assert _proof_verifies(v.key, vm2, v.greeting)


def test_a_pipe_proof_never_verifies_as_interactive(v: Vec) -> None:
    pipe_payload = v.h("sessions", "pipe", "client_hex")[5:5 + 90]
    as_interactive = _with_byte(pipe_payload, 1, wire.MODE_INTERACTIVE)
    assert not _proof_verifies(v.key, as_interactive, v.greeting)
    # even checked with the empty G it was made with: the mode is inside th
    hello = wire.parse_hello(as_interactive)
    assert not auth.verify(auth.session_keys(v.key, b"", hello.signed).proof, hello.proof)


def test_an_interactive_proof_never_verifies_as_pipe(v: Vec) -> None:
    payload = v.h("interactive", "hello_payload")
    as_pipe = _with_byte(payload, 1, wire.MODE_PIPE)
    assert not _proof_verifies(v.key, as_pipe, v.greeting)
    hello = wire.parse_hello(as_pipe)
    assert not auth.verify(auth.session_keys(v.key, v.greeting.encode(), hello.signed).proof,
                           hello.proof)


def test_a_different_greeting_breaks_the_proof(v: Vec) -> None:
    payload = v.h("interactive", "hello_payload")
    other = wire.greeting_line(bytes(32))
    assert not _proof_verifies(v.key, payload, other)
    assert not _proof_verifies(v.key, payload, v.greeting + " ")


@pytest.mark.parametrize("field", ["nonce", "time", "key_id"])
def test_every_hello_field_is_bound_by_the_proof(v: Vec, field: str) -> None:
    payload = v.h("interactive", "hello_payload")
    signed = v.h("interactive", "hello_without_proof")
    pos = {"key_id": 3 + 2 + 3, "nonce": 3 + 2 + 3 + 8, "time": 3 + 2 + 3 + 8 + 32 + 7}[field]
    assert pos < len(signed)
    forged = _with_byte(payload, pos, payload[pos] ^ 1)
    assert not _proof_verifies(v.key, forged, v.greeting)


def test_a_proof_never_verifies_under_another_key(v: Vec) -> None:
    other = auth.Key(bytes(32))
    assert not _proof_verifies(other, v.h("interactive", "hello_payload"), v.greeting)


# --- key files -------------------------------------------------------------------

HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"


def test_parse_key_text_ignores_comment_and_empty_lines() -> None:
    text = f"# made by rstash-recv --gen-key\n\n# another\nrstash-key-v1 {HEX} # vm1 backups\n"
    key = auth.parse_key_text(text)
    assert key.secret == bytes.fromhex(HEX)
    assert key.comment == "vm1 backups"


def test_parse_key_text_accepts_crlf_and_no_comment() -> None:
    key = auth.parse_key_text(f"rstash-key-v1 {HEX}\r\n")
    assert key.secret == bytes.fromhex(HEX)
    assert key.comment == ""


@pytest.mark.parametrize("text", [
    f"rstash-key-v1 {HEX}\nrstash-key-v1 {HEX}\n",
    f"rstash-key-v1 {HEX} # a\nrstash-key-v1 {'ff' * 32} # b\n",
], ids=["same-twice", "two-keys"])
def test_parse_key_text_refuses_two_key_lines(text: str) -> None:
    with pytest.raises(KeyFileError, match="exactly one"):
        auth.parse_key_text(text)


@pytest.mark.parametrize("text", [
    f"rstash-key-v1 {HEX.upper()}\n",
    f"rstash-key-v1 {HEX[:-1]}\n",
    f"rstash-key-v1 {HEX[:-2]}\n",
    f"rstash-key-v1 {HEX}0\n",
    f"rstash-key-v1 {HEX[:-1]}g\n",
    f"rstash-key-v2 {HEX}\n",
    f"rstash-key-v1  {HEX}\n",
    f" rstash-key-v1 {HEX}\n",
    f"rstash-key-v1 {HEX}junk\n",
    f"rstash-key-v1 {HEX}\nsomething else\n",
    "",
    "# only a comment\n",
], ids=["uppercase", "63-hex", "62-hex", "65-hex", "non-hex", "v2", "two-spaces",
        "leading-space", "junk-after", "extra-line", "empty", "comment-only"])
def test_parse_key_text_refuses_malformed_keys(text: str) -> None:
    with pytest.raises(KeyFileError):
        auth.parse_key_text(text)


def _write_key(path: Path, mode: int) -> Path:
    path.write_text(f"rstash-key-v1 {HEX} # t\n")
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o660])
def test_load_key_file_accepts_a_server_key_not_readable_by_others(
        tmp_path: Path, mode: int) -> None:
    key = auth.load_key_file(_write_key(tmp_path / "k", mode))
    assert key.secret == bytes.fromhex(HEX)
    assert key.comment == "t"
    assert key.path == str(tmp_path / "k")


def test_load_key_file_refuses_a_symlink(tmp_path: Path) -> None:
    target = _write_key(tmp_path / "real.key", 0o600)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match="symlink"):
        auth.load_key_file(link)
    with pytest.raises(KeyFileError, match="symlink"):
        auth.load_key_file(link, client=True)


def test_load_key_file_refuses_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir.key"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        auth.load_key_file(d)


def test_load_key_file_refuses_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        auth.load_key_file(fifo)


@pytest.mark.parametrize("mode", [0o604, 0o644, 0o606])
@pytest.mark.parametrize("client", [False, True])
def test_load_key_file_refuses_a_world_readable_file(
        tmp_path: Path, mode: int, client: bool) -> None:
    with pytest.raises(KeyFileError, match="too open"):
        auth.load_key_file(_write_key(tmp_path / "k", mode), client=client)


def test_a_server_key_readable_by_others_says_how_to_fix_it(tmp_path: Path) -> None:
    path = _write_key(tmp_path / "k", 0o644)
    with pytest.raises(KeyFileError) as info:
        auth.load_key_file(path)
    assert info.value.path == str(path)
    assert info.value.why == f"permissions 0644 are too open: a key must not be readable or " \
                             f"writable by others (chmod 640 {path})"


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o602])
def test_load_key_file_refuses_a_group_readable_or_writable_client_key(
        tmp_path: Path, mode: int) -> None:
    with pytest.raises(KeyFileError, match="too open"):
        auth.load_key_file(_write_key(tmp_path / "k", mode), client=True)


def test_load_key_file_accepts_a_0600_client_key(tmp_path: Path) -> None:
    assert auth.load_key_file(_write_key(tmp_path / "k", 0o600), client=True).comment == "t"


def test_load_key_file_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        auth.load_key_file(tmp_path / "absent.key")


def test_load_key_file_refuses_non_utf8_bytes(tmp_path: Path) -> None:
    p = tmp_path / "k"
    p.write_bytes(b"rstash-key-v1 \xff\n")
    os.chmod(p, 0o600)
    with pytest.raises(KeyFileError):
        auth.load_key_file(p)


def test_generated_keys_round_trip_through_format_and_parse() -> None:
    secret = auth.generate_key()
    assert len(secret) == auth.KEY_LEN
    assert auth.generate_key() != secret
    assert auth.parse_key_text(auth.format_key(secret, "c")).secret == secret


def test_key_repr_never_shows_the_secret() -> None:
    key = auth.Key(bytes.fromhex(HEX), "c")
    assert HEX not in repr(key)
    assert repr(bytes.fromhex(HEX)) not in repr(key)


# --- small encodings -------------------------------------------------------------


@pytest.mark.parametrize("text", ["a=", "a" , "a+b", "a/b", "ab=="])
def test_b64url_decode_refuses_padded_or_standard_alphabet(text: str) -> None:
    with pytest.raises(ValueError):
        auth.b64url_decode(text)


@pytest.mark.parametrize(("canonical", "other"), [
    ("yAdegu-JTpjQQCIpy0rD9Q", "yAdegu-JTpjQQCIpy0rD9R"),  # 16 bytes: 4 unused bits
    ("yAdegu-JTpjQQCIpy0rD9Q", "yAdegu-JTpjQQCIpy0rD9f"),
    ("AA", "AB"),  # 1 byte: 4 unused bits
    ("AAA", "AAB"),  # 2 bytes: 2 unused bits
])
def test_b64url_decode_refuses_a_non_canonical_last_character(canonical: str, other: str) -> None:
    assert auth.b64url_decode(canonical)
    with pytest.raises(ValueError, match="canonical"):
        auth.b64url_decode(other)


def test_b64url_is_unpadded_and_round_trips() -> None:
    for n in range(0, 40):
        data = bytes(range(250, 256)) * 7
        enc = auth.b64url(data[:n])
        assert "=" not in enc and "+" not in enc and "/" not in enc
        assert auth.b64url_decode(enc) == data[:n]


def test_s_refuses_a_field_longer_than_65535_bytes() -> None:
    assert auth.s(b"ab") == b"\x00\x02ab"
    with pytest.raises(ValueError):
        auth.s(bytes(65536))


def test_s_accepts_a_field_of_exactly_65535_bytes() -> None:
    field = auth.s(bytes(65535))
    assert field[:2] == b"\xff\xff"
    assert len(field) == 2 + 65535


def test_u64_encodes_the_unknown_size_as_all_ones() -> None:
    assert auth.u64(auth.UNKNOWN_SIZE) == b"\xff" * 8
    assert auth.u16(0xFFFF) == b"\xff\xff"


def test_b64url_keeps_a_trailing_x() -> None:
    # Only "=" padding is stripped; "X" is an ordinary last character.
    assert auth.b64url(b"\x00\x00\x17") == "AAAX"
    assert auth.b64url_decode("AAAX") == b"\x00\x00\x17"


@pytest.mark.parametrize("text", ["A", "AAAAA", "AAAAAAAAA"])
def test_b64url_decode_refuses_a_length_no_base64_has(text: str) -> None:
    with pytest.raises(ValueError, match="not unpadded base64url"):
        auth.b64url_decode(text)


def test_verify_line_mac_is_false_for_a_non_ascii_mac() -> None:
    expected = auth.auth_mac(bytes(32))
    assert auth.verify_line_mac(expected, expected)
    assert not auth.verify_line_mac(expected, "é" * len(expected))
    assert not auth.verify_line_mac(expected, expected[:-1] + "\u00ff")


def test_format_key_without_a_comment_writes_no_comment() -> None:
    assert auth.format_key(bytes.fromhex(HEX)) == f"rstash-key-v1 {HEX}\n"


def test_parse_key_text_names_its_origin_when_it_refuses() -> None:
    with pytest.raises(KeyFileError, match=r"^vm1\.key: not an rstash key"):
        auth.parse_key_text("rstash-key-v2 00", "vm1.key")
    with pytest.raises(KeyFileError, match=r"^key: not an rstash key"):
        auth.parse_key_text("rstash-key-v2 00")


def test_parse_key_text_refuses_blanks_after_the_key() -> None:
    # A comment must be introduced by " #": trailing blanks are not one.
    with pytest.raises(KeyFileError):
        auth.parse_key_text(f"rstash-key-v1 {HEX} \n")
    with pytest.raises(KeyFileError):
        auth.parse_key_text(f"rstash-key-v1 {HEX}\t\n")


def test_log_name_is_the_fingerprint_and_the_comment() -> None:
    key = auth.Key(bytes.fromhex(HEX), "vm1 nightly")
    assert key.log_name() == f"{auth.fingerprint(bytes.fromhex(HEX))} vm1 nightly"
    bare = auth.Key(bytes.fromhex(HEX))
    assert bare.log_name() == auth.fingerprint(bytes.fromhex(HEX))
    assert HEX not in key.log_name()


def test_session_keys_repr_shows_the_transcript_hash_only() -> None:
    keys = auth.session_keys(auth.Key(bytes.fromhex(HEX)), b"G", b"hello")
    text = repr(keys)
    assert keys.th.hex() in text or repr(keys.th) in text
    for secret in (keys.proof, keys.k_c2s, keys.k_s2c):
        assert repr(secret) not in text
        assert secret.hex() not in text
    assert "k_c2s" not in text and "k_s2c" not in text and "proof" not in text


def test_parse_key_text_keeps_the_comment_whole() -> None:
    key = auth.parse_key_text(f"rstash-key-v1 {HEX} # backup of VM-BOX\n")
    assert key.comment == "backup of VM-BOX"


def test_parse_key_text_trims_blanks_around_the_comment() -> None:
    key = auth.parse_key_text(f"rstash-key-v1 {HEX} #   vm1 nightly  \n")
    assert key.comment == "vm1 nightly"
    assert key.describe().endswith(" vm1 nightly (rstash-hmac)")


def test_method_ssh_keys_are_those_of_an_all_zero_key_with_no_proof_and_no_line_macs() -> None:
    # rstash(7) CONSTRUCTION 11: the SSH server authenticated the client; K = 32 zero bytes.
    keys = auth.ssh_session_keys(b"G", b"hello")
    zero = auth.session_keys(bytes(auth.KEY_LEN), b"G", b"hello")
    assert (keys.th, keys.k_c2s, keys.k_s2c) == (zero.th, zero.k_c2s, zero.k_s2c)
    assert keys.th == auth.transcript_hash(b"G", b"hello")
    assert keys.proof == bytes(auth.MAC_LEN)
    assert keys.macs is False
    assert zero.macs is True
    assert auth.ssh_session_keys(b"G2", b"hello").th != keys.th
