"""Boxes reached by an SSH login (rstash/sshlogin.py, rstash/hello.py; rstash(7) CONSTRUCTION 11).

Each condition of rstash-recv(8) SSH is checked on its own: remove one from the
code and the test naming it fails.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from e2e_support import is_root, need
from rstash import auth, wire
from rstash.config import load_config
from rstash.errors import Outcome
from rstash.hello import HelloJudge
from rstash.sshlogin import UNKNOWN_KEY, SshLogin, exposed_key, reached_by, ssh_login

ENV = {"SSH_CONNECTION": "192.0.2.7 50000 192.0.2.1 22"}
BLOB = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes(range(32))


def _config(tmp_path: Path) -> HelloJudge:
    secret = bytes(range(32))
    (tmp_path / "k").write_text(auth.format_key(secret, "k"))
    os.chmod(tmp_path / "k", 0o600)
    text = ""
    for name, mode, keyed in (("vm1", "ssh", False), ("both", "key+ssh", True),
                              ("plain", "key", True), ("vm2", "ssh", False)):
        (tmp_path / name).mkdir()
        text += f'[box.{name}]\npath = "{tmp_path / name}"\nauth = "{mode}"\n'
        if keyed:
            text += f'keys = ["{tmp_path / "k"}"]\n'
    (tmp_path / "recv.toml").write_text(text)
    cfg = load_config(tmp_path / "recv.toml")
    key = auth.Key(secret, "k")
    return HelloJudge(cfg, {"both": [key], "plain": [key]})


def _judge(tmp_path: Path, boxes: set[str] | None, login_box: str | None) -> HelloJudge:
    where = tmp_path / secrets.token_hex(4)  # one fresh configuration per judge
    where.mkdir()
    judge = _config(where)
    judge.allowed_boxes = None if boxes is None else frozenset(boxes)
    judge.login = None if login_box is None else SshLogin(login_box, "SHA256:x (ssh ssh-ed25519)")
    return judge


def _hello(judge: HelloJudge, box: str, key: auth.Key | None, *, pipe: bool = False,
           key_id: bytes | None = None, proof: bytes | None = None) -> tuple[wire.Hello, bytes]:
    greeting = wire.greeting_line(secrets.token_bytes(32), ssh=judge.offers_ssh)
    signed = wire.hello_without_proof(
        mode=wire.MODE_PIPE if pipe else wire.MODE_INTERACTIVE, box=box.encode(),
        key_id=key_id if key_id is not None else (bytes(8) if key is None else key.key_id),
        nonce=secrets.token_bytes(32), time=int(time.time()),
        method=wire.METHOD_SSH if key is None else wire.METHOD_HMAC_SHA256)
    g = b"" if pipe else greeting.encode()
    if proof is None:
        proof = bytes(32) if key is None else auth.session_keys(key, g, signed).proof
    server = wire.ServerConnection()
    server.receive_data(wire.frame(wire.FrameType.HELLO, signed + proof))
    event = server.next_event()
    assert isinstance(event, wire.Hello)
    return event, greeting.encode()


def _verdict(judge: HelloJudge, box: str, key: auth.Key | None = None, **kw: object) -> str | None:
    hello, greeting = _hello(judge, box, key, **kw)  # type: ignore[arg-type]
    verdict = judge.judge(hello, greeting, "192.0.2.7")
    if verdict.outcome is None:
        return None
    assert verdict.outcome is Outcome.AUTH_FAILED
    return verdict.reason


def test_an_ssh_box_is_reached_with_the_ssh_login_alone(tmp_path: Path) -> None:
    judge = _judge(tmp_path, {"vm1"}, "vm1")
    assert judge.offers_ssh
    hello, greeting = _hello(judge, "vm1", None)
    verdict = judge.judge(hello, greeting, "192.0.2.7")
    assert verdict.outcome is None and verdict.box is not None and verdict.box.name == "vm1"
    assert verdict.keys is not None and not verdict.keys.macs
    assert verdict.key_name == "SHA256:x (ssh ssh-ed25519)"


def test_method_ssh_without_a_login_is_refused(tmp_path: Path) -> None:
    # inetd, --listen, a LISTEN_FDS socket: no login was ever made for them.
    judge = _judge(tmp_path, {"vm1"}, None)
    assert not judge.offers_ssh
    assert _verdict(judge, "vm1") == "method ssh not offered for this box"


def test_method_ssh_without_box_limit_is_refused(tmp_path: Path) -> None:
    judge = _judge(tmp_path, None, "vm1")
    assert not judge.offers_ssh
    assert _verdict(judge, "vm1") == "method ssh not offered for this box"


def test_method_ssh_with_two_boxes_is_refused(tmp_path: Path) -> None:
    judge = _judge(tmp_path, {"vm1", "vm2"}, "vm1")
    assert not judge.offers_ssh
    assert _verdict(judge, "vm1") == "method ssh not offered for this box"


def test_a_login_for_another_box_reaches_nothing_else(tmp_path: Path) -> None:
    # An SSH key whose forced command names vm2 cannot open vm1.
    judge = _judge(tmp_path, {"vm2"}, "vm2")
    assert _verdict(judge, "vm1") == "box excluded by --box"
    assert _verdict(_judge(tmp_path, {"vm1"}, "vm2"), "vm1") == "method ssh not offered for this box"


def test_method_ssh_on_key_boxes_is_refused(tmp_path: Path) -> None:
    for box in ("plain", "both"):
        judge = _judge(tmp_path, {box}, box)
        assert not judge.offers_ssh
        assert _verdict(judge, box) == "method ssh not offered for this box"


def test_method_ssh_in_pipe_mode_is_refused(tmp_path: Path) -> None:
    judge = _judge(tmp_path, {"vm1"}, "vm1")
    assert _verdict(judge, "vm1", pipe=True) == "method ssh in pipe mode"


def test_method_ssh_with_a_key_id_or_proof_is_refused(tmp_path: Path) -> None:
    judge = _judge(tmp_path, {"vm1"}, "vm1")
    assert _verdict(judge, "vm1", key_id=b"\x01" + bytes(7)) == "method ssh with a key id or proof"
    assert _verdict(judge, "vm1", proof=bytes(31) + b"\x01") == "method ssh with a key id or proof"


def test_key_plus_ssh_needs_both(tmp_path: Path) -> None:
    key = auth.Key(bytes(range(32)), "k")
    assert _verdict(_judge(tmp_path, {"both"}, "both"), "both", key) is None
    assert _verdict(_judge(tmp_path, {"both"}, None), "both", key) == (
        "auth key+ssh: not an SSH login limited to this box")
    assert _verdict(_judge(tmp_path, None, "both"), "both", key) == (
        "auth key+ssh: not an SSH login limited to this box")
    assert _verdict(_judge(tmp_path, {"both"}, "both"), "both",
                    auth.Key(secrets.token_bytes(32))) == "unknown key id"


def test_a_key_box_needs_no_login(tmp_path: Path) -> None:
    key = auth.Key(bytes(range(32)), "k")
    assert _verdict(_judge(tmp_path, None, None), "plain", key) is None


def test_the_conditions_of_a_login() -> None:
    vm1 = frozenset({"vm1"})
    r, w = os.pipe()
    try:
        assert ssh_login(vm1, ENV, r) == SshLogin("vm1", UNKNOWN_KEY)
        assert ssh_login(None, ENV, r) is None
        assert ssh_login(frozenset({"vm1", "vm2"}), ENV, r) is None
        assert ssh_login(vm1, {}, r) is None
        assert ssh_login(vm1, {"SSH_CONNECTION": " "}, r) is None
    finally:
        os.close(r)
        os.close(w)


def test_a_login_on_a_network_socket_is_refused() -> None:
    # systemd-socket-activate --inetd or inetd started from an ssh shell: SSH_CONNECTION
    # is inherited, fd 0 is the TCP connection.
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    try:
        assert ssh_login(frozenset({"vm1"}), ENV, conn.fileno()) is None
    finally:
        for s in (conn, client, server):
            s.close()
    a, b = socket.socketpair()
    try:
        assert ssh_login(frozenset({"vm1"}), ENV, a.fileno()) is not None  # sshd's socketpair
    finally:
        a.close()
        b.close()


def _auth_info(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "sshauth.info"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_the_exposed_key_is_named_like_ssh_keygen(tmp_path: Path) -> None:
    b64 = base64.b64encode(BLOB).decode()
    fp = base64.b64encode(hashlib.sha256(BLOB).digest()).rstrip(b"=").decode()
    path = _auth_info(tmp_path, f"publickey ssh-ed25519 {b64}\n")
    assert exposed_key(path) == f"SHA256:{fp} (ssh ssh-ed25519)"
    env = {**ENV, "SSH_USER_AUTH": path}
    r, w = os.pipe()
    try:
        assert ssh_login(frozenset({"vm1"}), env, r) == SshLogin("vm1", f"SHA256:{fp} (ssh ssh-ed25519)")
    finally:
        os.close(r)
        os.close(w)


def test_an_exposed_key_file_others_could_write_is_ignored(tmp_path: Path) -> None:
    b64 = base64.b64encode(BLOB).decode()
    assert exposed_key(_auth_info(tmp_path, f"publickey ssh-ed25519 {b64}\n", 0o622)) == UNKNOWN_KEY
    target = _auth_info(tmp_path, f"publickey ssh-ed25519 {b64}\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert exposed_key(str(link)) == UNKNOWN_KEY
    assert exposed_key(str(tmp_path)) == UNKNOWN_KEY
    assert exposed_key(str(tmp_path / "missing")) == UNKNOWN_KEY
    assert exposed_key(_auth_info(tmp_path, "password\nkeyboard-interactive\n")) == UNKNOWN_KEY


def test_an_exposed_key_file_of_another_user_is_ignored(tmp_path: Path) -> None:
    b64 = base64.b64encode(BLOB).decode()
    path = _auth_info(tmp_path, f"publickey ssh-ed25519 {b64}\n")
    need(is_root(), "needs root to make a file owned by another user")
    os.chown(path, 65534, 65534)
    assert exposed_key(path) == UNKNOWN_KEY


@pytest.mark.parametrize("mode,words", [("key", "any transport"), ("ssh", "SSH key alone"),
                                        ("key+ssh", "one of its keys, only as the forced command")])
def test_check_config_says_how_a_box_is_reached(tmp_path: Path, mode: str, words: str) -> None:
    judge = _config(tmp_path)
    box = {"key": "plain", "ssh": "vm1", "key+ssh": "both"}[mode]
    line = reached_by(judge.cfg.boxes[box])
    assert line.startswith(f"auth {mode}:") and words in line
