"""rstash agrees with the independent vectors of rstash(7) TEST VECTORS: the
further cases (dry run, 426, a renamed file, UTF-8 and percent-encoded names,
unknown size, ext tag 1, receipts for i > 0) and the negative ones, which the
implementation must refuse.

tests/vectors/vectors.json is written by tests/vectors/make_vectors.py from
the page alone; here rstash computes the same values, and its client and server
halves are fed the vector bytes and lines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from rstash import auth
from rstash import wire as protocol  # wire() is this file's line builder
from rstash.errors import LocalProtocolError, RemoteProtocolError
from rstash.wire import ClientConnection, IntegrityError, Receipt, ServerConnection

RAW: dict[str, Any] = json.loads((Path(__file__).parent / "vectors" / "vectors.json")
                                 .read_text(encoding="ascii"))
INP = RAW["inputs"]
KEY = auth.Key(bytes.fromhex(INP["key"]), INP["key_comment"])
CONTENT = bytes.fromhex(INP["content"])
MTIME = INP["file"]["mtime"]
GREETING = RAW["interactive"]["greeting"]
MORE = RAW["more"]
NEG = RAW["negative"]


def h(*path: str) -> bytes:
    node: Any = RAW
    for part in path:
        node = node[part]
    return bytes.fromhex(node)


def ia_keys() -> auth.SessionKeys:
    return auth.session_keys(KEY, GREETING.encode("ascii"), h("interactive", "hello_without_proof"))


def wire(text: str) -> bytes:
    return text.encode("ascii") + b"\r\n"


def authed_client(server_id: str | None = None) -> ClientConnection:
    """A client that read the vector greeting, sent the vector HELLO and verified 235."""
    client = ClientConnection(KEY, INP["box"], server_id=server_id)
    client.receive_data(wire(GREETING))
    assert isinstance(client.next_event(), protocol.Greeting)
    client.hello(bytes.fromhex(INP["nc"]), INP["t"])
    auth_line = MORE["server_id"]["auth_line"] if server_id else RAW["interactive"]["auth_line"]
    client.receive_data(wire(auth_line))
    assert isinstance(client.next_event(), protocol.AuthOk)
    return client


def send_file(client: ClientConnection, name: bytes, size: int | None) -> bytes:
    frames = client.file(name, size, MTIME)
    frames += client.data(CONTENT)
    return frames + client.end()


def receipt(client: ClientConnection, line: str) -> Receipt:
    client.receive_data(wire(line))
    event = client.next_event()
    assert isinstance(event, Receipt)
    return event


# --- the further cases --------------------------------------------------------------


def test_dry_run_header_and_would_store_line_match() -> None:
    name = INP["file"]["name"].encode()
    hdr = protocol.encode_file_header(0, name, INP["file"]["size"], MTIME, protocol.FLAG_DRY_RUN)
    assert hdr == h("more", "would_store", "hdr")
    keys = ia_keys()
    assert protocol.receipt_line(keys, 0, 250, name, dry_run=True) \
        == wire(MORE["would_store"]["receipt_line"])
    client = authed_client()
    frame = client.file(name, INP["file"]["size"], MTIME, dry_run=True)
    assert frame[5:] == h("more", "would_store", "payload")
    event = receipt(client, MORE["would_store"]["receipt_line"])
    assert event.dry_run and event.code == 250 and event.final_name == name
    assert event.reason == "would store" and event.size == 0


def test_abort_and_426_line_match() -> None:
    name = INP["file"]["name"].encode()
    assert protocol.receipt_line(ia_keys(), 0, 426, name) == wire(MORE["aborted"]["reply_line"])
    client = authed_client()
    client.file(name, INP["file"]["size"], MTIME)
    assert client.abort()[5:] == h("more", "aborted", "abort_payload")
    event = receipt(client, MORE["aborted"]["reply_line"])
    assert event.code == 426 and not event.ok


@pytest.mark.parametrize(("case", "index", "name", "size", "final"), [
    ("renamed", 1, "hello.txt", 14, "hello~1.txt"),
    ("utf8_name", 2, INP["utf8_name"], 14, INP["utf8_name"]),
    ("unknown_size", 3, INP["stream_name"], None, INP["stream_name"]),
])
def test_stored_receipts_for_later_files_match(case: str, index: int, name: str,
                                               size: int | None, final: str) -> None:
    keys = ia_keys()
    raw = name.encode("utf-8")
    hdr = protocol.encode_file_header(index, raw, size, MTIME)
    assert hdr == h("more", case, "hdr")
    digest = h("file0", "content_sha256")
    line = MORE[case]["receipt_line"]
    assert protocol.receipt_line(keys, index, 250, raw, final_name=final.encode(), n=len(CONTENT),
                                 sha256=digest) == wire(line)
    # The client sends files 0 .. index and verifies the last receipt.
    client = authed_client()
    for earlier in range(index):
        send_file(client, b"f%d" % earlier, len(CONTENT))
    frames = send_file(client, raw, size)
    assert h("more", case, "payload") in frames
    assert frames.endswith(h("more", case, "end_payload"))
    for earlier in range(index):
        receipt(client, protocol.receipt_line(keys, earlier, 553, b"f%d" % earlier)
                .decode().rstrip("\r\n"))
    event = receipt(client, line)
    assert event.ok and event.index == index and event.final_name == final.encode()


def test_hello_with_server_id_matches() -> None:
    sid = MORE["server_id"]
    assert protocol.encode_ext({protocol.EXT_SERVER_ID: INP["server_id"].encode()}) == h(
        "more", "server_id", "ext")
    client = ClientConnection(KEY, INP["box"], server_id=INP["server_id"])
    client.receive_data(wire(GREETING))
    client.next_event()
    payload = client.hello(bytes.fromhex(INP["nc"]), INP["t"])[5:]
    assert payload == h("more", "server_id", "hello_without_proof") + h("more", "server_id",
                                                                         "proof")
    keys = auth.session_keys(KEY, GREETING.encode(), h("more", "server_id", "hello_without_proof"))
    assert keys.k_c2s == h("more", "server_id", "k_c2s")
    assert keys.k_s2c == h("more", "server_id", "k_s2c")
    assert protocol.auth_ok_line(keys) == wire(sid["auth_line"])
    hello = protocol.parse_hello(payload)
    assert hello.server_id == INP["server_id"]


# --- the negative cases -------------------------------------------------------------


def test_a_tampered_file_tag_gets_554_without_a_name() -> None:
    server = ServerConnection()
    server.receive_data(protocol.frame(protocol.FrameType.HELLO, h("interactive", "hello_payload")))
    assert isinstance(server.next_event(), protocol.Hello)
    server.authenticate(ia_keys())
    server.receive_data(protocol.frame(protocol.FrameType.FILE, h("negative", "bad_file_tag",
                                                                    "payload")))
    with pytest.raises(IntegrityError) as err:
        server.next_event()
    assert protocol.integrity_line(err.value.name) == wire(NEG["bad_file_tag"]["reply_line"])


def test_a_non_canonical_235_mac_is_refused() -> None:
    client = ClientConnection(KEY, INP["box"])
    client.receive_data(wire(GREETING))
    client.next_event()
    client.hello(bytes.fromhex(INP["nc"]), INP["t"])
    client.receive_data(wire(NEG["non_canonical_auth_line"]))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_a_non_canonical_receipt_mac_is_refused() -> None:
    client = authed_client()
    send_file(client, INP["file"]["name"].encode(), INP["file"]["size"])
    client.receive_data(wire(NEG["non_canonical_receipt_line"]))
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    # The canonical line is accepted by a fresh client: only the spelling differs.
    fresh = authed_client()
    send_file(fresh, INP["file"]["name"].encode(), INP["file"]["size"])
    assert receipt(fresh, RAW["file0"]["receipt_line"]).ok


def test_non_canonical_lines_decode_to_the_same_mac() -> None:
    # What makes them negative vectors: a lenient decoder would take them.
    import base64

    for bad, good in ((NEG["non_canonical_auth_line"], RAW["interactive"]["auth_line"]),
                      (NEG["non_canonical_receipt_line"], RAW["file0"]["receipt_line"])):
        b, g = bad.rsplit("mac=", 1)[1], good.rsplit("mac=", 1)[1]
        assert b != g
        assert base64.urlsafe_b64decode(b + "==") == base64.urlsafe_b64decode(g + "==")
        with pytest.raises(ValueError):
            auth.b64url_decode(b)


# --- resume and re-runs -------------------------------------------------------------

RES = MORE["resume"]
BIG = INP["resume"]


def big_content() -> bytes:
    # rstash(7): "byte k is k mod 251"
    size = int(BIG["size"])
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def resume_hello() -> bytes:
    return protocol.hello_without_proof(mode=1, box=INP["box"].encode(), key_id=KEY.key_id,
                                        nonce=bytes.fromhex(INP["nc"]), time=INP["t"])


def resume_client() -> ClientConnection:
    client = ClientConnection(KEY, INP["box"])
    client.receive_data(wire(RES["greeting"]))
    assert isinstance(client.next_event(), protocol.Greeting) and client.resume
    client.hello(bytes.fromhex(INP["nc"]), INP["t"])
    assert client.keys is not None and client.keys.k_s2c == h("more", "resume", "k_s2c")
    client.receive_data(wire("235 ok mac=" + auth.auth_mac(client.keys.k_s2c)))
    assert isinstance(client.next_event(), protocol.AuthOk)
    return client


def test_resume_greeting_keys_and_waited_file_match() -> None:
    keys = auth.session_keys(KEY, RES["greeting"].encode(), resume_hello())
    assert keys.k_c2s == h("more", "resume", "k_c2s") and keys.k_s2c == h("more", "resume", "k_s2c")
    challenge = bytes.fromhex(INP["challenge"])
    assert protocol.greeting_line(challenge, resume=True) == RES["greeting"]
    client = resume_client()
    frames = client.file(BIG["name"].encode(), BIG["size"], MTIME, tid=bytes.fromhex(BIG["tid"]))
    assert frames[5:] == h("more", "resume", "payload") and client.waits


def test_resume_offer_and_whole_file_end_match() -> None:
    """The "resume" case: 350 under the resume keys, then the rest, judged whole."""
    content = big_content()
    offset = BIG["offset"]
    keys = auth.session_keys(KEY, RES["greeting"].encode(), resume_hello())
    name = BIG["name"].encode()
    prefix = hashlib.sha256(content[:offset])
    assert prefix.digest() == h("more", "resume", "prefix_sha256")
    assert protocol.resume_line(keys, 0, offset, prefix.digest(), name) == wire(RES["resume_line"])
    # The server: the vector FILE waits; after 350 it takes the rest only.
    server = ServerConnection(resume=True)
    server.receive_data(protocol.frame(protocol.FrameType.HELLO, resume_hello() + keys.proof))
    assert isinstance(server.next_event(), protocol.Hello)
    server.authenticate(keys)
    server.receive_data(protocol.frame(protocol.FrameType.FILE, h("more", "resume", "payload")))
    assert isinstance(server.next_event(), protocol.File)
    assert server.state is protocol.ServerState.AWAIT_GO
    server.go(offset, prefix.copy())
    # The client: 350 verified, its own prefix accepted, the rest sent.
    client = resume_client()
    client.file(name, BIG["size"], MTIME, tid=bytes.fromhex(BIG["tid"]))
    client.receive_data(wire(RES["resume_line"]))
    offer = client.next_event()
    assert isinstance(offer, protocol.ResumeOffer) and offer.offset == offset
    client.resume_from(offset, prefix.copy())
    rest = client.data(content[offset:])
    end = client.end()
    assert end[5:] == h("more", "resume", "end_payload")
    server.receive_data(rest + end)
    events = []
    while not isinstance(event := server.next_event(), protocol.End):
        events.append(event)
    assert event.n == BIG["size"] and event.sha256 == h("more", "resume", "content_sha256")
    assert protocol.receipt_line(keys, 0, 250, name, n=BIG["size"], sha256=event.sha256) == \
        wire(RES["receipt_line"])
    stored = receipt(client, RES["receipt_line"])
    assert stored.ok and stored.size == BIG["size"]


def test_go_and_already_stored_lines_match() -> None:
    keys = auth.session_keys(KEY, RES["greeting"].encode(), resume_hello())
    name = BIG["name"].encode()
    digest = h("more", "resume", "content_sha256")
    assert protocol.GO_LINE == RES["go_line"]
    assert protocol.already_line(keys, 0, name, BIG["size"], digest) == wire(RES["already_line"])
    client = resume_client()
    client.file(name, BIG["size"], MTIME, tid=bytes.fromhex(BIG["tid"]))
    event = receipt(client, RES["already_line"])
    assert event.already and not event.ok and event.sha256 == digest.hex()
    assert client.state is protocol.ClientState.READY and not client.waits
    # 251 does not count in 221's STORED.
    assert client.stored == 0


def test_a_tampered_350_is_refused() -> None:
    client = resume_client()
    client.file(BIG["name"].encode(), BIG["size"], MTIME, tid=bytes.fromhex(BIG["tid"]))
    client.receive_data(wire(non_canonical_or_flip(RES["resume_line"])))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def non_canonical_or_flip(line: str) -> str:
    """The line with one digit of its OFFSET changed: its MAC no longer covers it."""
    return line.replace(f"resume {BIG['offset']} ", f"resume {BIG['offset'] - 1} ")


def test_a_receipt_without_mac_is_refused_by_a_client_with_a_key() -> None:
    # "macless_receipt_line": what method ssh sends; a client that sent method 1
    # must never take it for a receipt, whatever the transport.
    client = authed_client()
    send_file(client, INP["file"]["name"].encode(), INP["file"]["size"])
    client.receive_data(wire(NEG["macless_receipt_line"]))
    event = client.next_event()
    assert not isinstance(event, Receipt)
    assert client.stored == 0


# --- method ssh (rstash(7) CONSTRUCTION 11) ------------------------------------------

SSH = MORE["ssh_method"]


def test_ssh_method_hello_and_keys_match() -> None:
    client = ClientConnection(None, INP["box"])
    client.receive_data(wire(SSH["greeting"]))
    assert isinstance(client.next_event(), protocol.Greeting)
    hello = client.hello(bytes.fromhex(INP["nc"]), INP["t"])
    assert hello == protocol.frame(protocol.FrameType.HELLO, bytes.fromhex(SSH["hello_payload"]))
    keys = auth.ssh_session_keys(SSH["greeting"].encode(), bytes.fromhex(SSH["hello_without_proof"]))
    assert (keys.th.hex(), keys.k_c2s.hex(), keys.k_s2c.hex()) == (SSH["th"], SSH["k_c2s"], SSH["k_s2c"])
    assert client.keys == keys
    assert protocol.auth_ok_line(keys) == wire(SSH["auth_line"])


def test_ssh_method_session_frames_and_lines_match() -> None:
    client = ClientConnection(None, INP["box"])
    client.receive_data(wire(SSH["greeting"]))
    client.next_event()
    client.hello(bytes.fromhex(INP["nc"]), INP["t"])
    client.receive_data(wire(SSH["auth_line"]))
    assert isinstance(client.next_event(), protocol.AuthOk)
    name = INP["file"]["name"].encode()
    assert client.file(name, INP["file"]["size"], MTIME) == protocol.frame(
        protocol.FrameType.FILE, bytes.fromhex(SSH["file_payload"]))
    client.data(CONTENT)
    assert client.end() == protocol.frame(protocol.FrameType.END, bytes.fromhex(SSH["end_payload"]))
    assert client.bye() == protocol.frame(protocol.FrameType.BYE, bytes.fromhex(SSH["bye_payload"]))
    client.receive_data(wire(SSH["receipt_line"]) + wire(SSH["done_line"]))
    stored, done = client.next_event(), client.next_event()
    assert isinstance(stored, Receipt) and stored.ok and stored.final_name == name
    assert done == protocol.Done(1)
    # The server's half reads the same frames and makes the same lines.
    keys = auth.ssh_session_keys(SSH["greeting"].encode(), bytes.fromhex(SSH["hello_without_proof"]))
    server = ServerConnection()
    server.receive_data(protocol.frame(protocol.FrameType.HELLO, bytes.fromhex(SSH["hello_payload"])))
    hello = server.next_event()
    assert isinstance(hello, protocol.Hello) and hello.method == protocol.METHOD_SSH
    server.authenticate(keys)
    server.receive_data(protocol.frame(protocol.FrameType.FILE, bytes.fromhex(SSH["file_payload"]))
                        + protocol.frame(protocol.FrameType.DATA, CONTENT)
                        + protocol.frame(protocol.FrameType.END, bytes.fromhex(SSH["end_payload"])))
    assert isinstance(server.next_event(), protocol.File)
    assert isinstance(server.next_event(), protocol.Data)
    end = server.next_event()
    assert isinstance(end, protocol.End)
    assert protocol.receipt_line(keys, 0, 250, name, n=end.n, sha256=end.sha256) == wire(SSH["receipt_line"])
    assert protocol.receipt_line(keys, 1, 553, INP["refused_name"].encode()) == wire(SSH["refusal_line"])
    assert protocol.bye_line(keys, 1, 1) == wire(SSH["done_line"])


def test_a_keyless_client_refuses_a_greeting_without_ssh() -> None:
    client = ClientConnection(None, INP["box"])
    client.receive_data(wire(GREETING))
    with pytest.raises(RemoteProtocolError, match="method ssh"):
        client.next_event()


def test_a_keyless_client_is_never_a_pipe_client() -> None:
    with pytest.raises(LocalProtocolError, match="pipe mode"):
        ClientConnection(None, INP["box"], pipe=True)


def ssh_resume_client() -> ClientConnection:
    client = ClientConnection(None, INP["box"])
    client.receive_data(wire(SSH["greeting"] + " resume"))
    assert isinstance(client.next_event(), protocol.Greeting) and client.resume
    client.hello(bytes.fromhex(INP["nc"]), INP["t"])
    client.receive_data(wire(SSH["auth_line"]))
    assert isinstance(client.next_event(), protocol.AuthOk)
    client.file(BIG["name"].encode(), BIG["size"], MTIME, tid=bytes.fromhex(BIG["tid"]))
    return client


def test_ssh_method_350_and_251_lines_carry_no_mac() -> None:
    """rstash(7) CONSTRUCTION 11: under method ssh no server line carries a MAC field."""
    keys = auth.ssh_session_keys(SSH["greeting"].encode(), bytes.fromhex(SSH["hello_without_proof"]))
    name, offset = BIG["name"].encode(), BIG["offset"]
    prefix, digest = h("more", "resume", "prefix_sha256"), h("more", "resume", "content_sha256")
    offer = RES["resume_line"].rpartition(" mac=")[0]
    already = RES["already_line"].rpartition(" mac=")[0]
    assert protocol.resume_line(keys, 0, offset, prefix, name) == wire(offer)
    assert protocol.already_line(keys, 0, name, BIG["size"], digest) == wire(already)
    client = ssh_resume_client()
    client.receive_data(wire(offer))
    event = client.next_event()
    assert isinstance(event, protocol.ResumeOffer) and (event.offset, event.prefix) == (offset, prefix)
    client = ssh_resume_client()
    done = receipt(client, already)
    assert done.already and done.sha256 == digest.hex() and client.stored == 0
    # The same lines with a MAC field are not method ssh's: they end the session.
    client = ssh_resume_client()
    client.receive_data(wire(RES["already_line"]))
    with pytest.raises(RemoteProtocolError):
        client.next_event()
