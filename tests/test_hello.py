"""HELLO judging (rstash/hello.py) without sockets: rstash(7) RULES, rule 1."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from rstash import auth, wire
from rstash.config import load_config
from rstash.errors import Outcome
from rstash.hello import HelloJudge, peer_allowed
from rstash.replay import MARK_NAME


def _setup(tmp_path: Path) -> tuple[HelloJudge, auth.Key, str]:
    (tmp_path / "box").mkdir()
    secret = secrets.token_bytes(32)
    (tmp_path / "vm1.key").write_text(auth.format_key(secret, "vm1"))
    os.chmod(tmp_path / "vm1.key", 0o600)
    (tmp_path / "recv.toml").write_text(
        f'[box.vm1]\npath = "{tmp_path / "box"}"\nkeys = ["{tmp_path / "vm1.key"}"]\n'
        'allow_from = ["192.0.2.0/24"]\n')
    cfg = load_config(tmp_path / "recv.toml")
    key = auth.Key(secret, "vm1")
    return HelloJudge(cfg, {"vm1": [key]}), key, wire.greeting_line(secrets.token_bytes(32))


def _hello(key: auth.Key, box: str, greeting: str) -> wire.Hello:
    client = wire.ClientConnection(key, box)
    client.receive_data(greeting.encode() + b"\r\n")
    client.next_event()
    server = wire.ServerConnection()
    server.receive_data(client.hello(secrets.token_bytes(32), int(time.time())))
    event = server.next_event()
    assert isinstance(event, wire.Hello)
    return event


def test_the_right_key_from_an_allowed_peer_is_authenticated(tmp_path: Path) -> None:
    judge, key, greeting = _setup(tmp_path)
    verdict = judge.judge(_hello(key, "vm1", greeting), greeting.encode(), "192.0.2.7")
    assert verdict.outcome is None and verdict.box is not None and verdict.box.name == "vm1"
    assert verdict.keys is not None


def test_every_failure_is_the_same_outcome_with_its_own_logged_reason(tmp_path: Path) -> None:
    judge, key, greeting = _setup(tmp_path)
    cases = {
        "unknown box": (_hello(key, "nosuch", greeting), "192.0.2.7"),
        "unknown key id": (_hello(auth.Key(secrets.token_bytes(32)), "vm1", greeting), "192.0.2.7"),
        "peer not in allow_from": (_hello(key, "vm1", greeting), "198.51.100.1"),
    }
    for reason, (hello, peer) in cases.items():
        verdict = judge.judge(hello, greeting.encode(), peer)
        assert (verdict.outcome, verdict.reason) == (Outcome.AUTH_FAILED, reason)
    other = wire.greeting_line(bytes(32))
    assert judge.judge(_hello(key, "vm1", other), greeting.encode(), "192.0.2.7").reason == (
        "bad proof")


def test_a_box_without_pipe_mode_refuses_pipe_sessions(tmp_path: Path) -> None:
    judge, key, greeting = _setup(tmp_path)
    verdict = judge.judge_pipe(judge.cfg.boxes["vm1"], _hello(key, "vm1", greeting))
    assert verdict is not None and verdict.outcome is Outcome.PIPE_MODE_OFF


def test_peer_allowed() -> None:
    import ipaddress

    nets = (ipaddress.ip_network("10.0.0.0/8"),)
    assert peer_allowed("10.1.2.3", nets) and not peer_allowed("11.0.0.1", nets)
    assert not peer_allowed(None, nets) and peer_allowed(None, ())


def _pipe_hello(key: auth.Key, when: int) -> wire.Hello:
    signed = wire.hello_without_proof(mode=wire.MODE_PIPE, box=b"vm1", key_id=key.key_id,
                                          nonce=secrets.token_bytes(32), time=when)
    server = wire.ServerConnection()
    server.receive_data(wire.frame(wire.FrameType.HELLO,
                                       signed + auth.session_keys(key, b"", signed).proof))
    event = server.next_event()
    assert isinstance(event, wire.Hello)
    return event


def test_a_pipe_stream_is_fresh_once_then_replayed_and_a_far_clock_is_skew(
        tmp_path: Path) -> None:
    judge, key, _greeting = _setup(tmp_path)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    (tmp_path / "recv.toml").write_text(
        f'state_dir = "{state_dir}"\n[box.vm1]\npath = "{tmp_path / "box"}"\n'
        f'keys = ["{tmp_path / "vm1.key"}"]\npipe_mode = true\n')
    judge = HelloJudge(load_config(tmp_path / "recv.toml"), {"vm1": [key]})
    box = judge.cfg.boxes["vm1"]
    hello = _pipe_hello(key, int(time.time()) - 5)  # made before the cache exists: fine
    assert not (tmp_path / "box" / MARK_NAME).exists()
    assert judge.judge_pipe(box, hello) is None
    # The accepted time is in the box's mark, which outlives state_dir (rstash-recv(8) FILES).
    assert (tmp_path / "box" / MARK_NAME).read_text() == f"{hello.time}\n"
    again = judge.judge_pipe(box, hello)
    assert again is not None and again.outcome is Outcome.REPLAYED
    skewed = judge.judge_pipe(box, _pipe_hello(key, int(time.time()) + 3600))
    assert skewed is not None and skewed.outcome is Outcome.CLOCK_SKEW
    assert skewed.skew is not None and skewed.skew > 3000
