"""Replays and forgeries against the server's proof, MACs and replay cache (rstash(7) RULES).

Each case is a whole client stream fed to the real session, store and box directory in process;
a refused case gets no ``235`` line (or, after the proof, no ``250``), and stores nothing. The
dummy-key rule is checked structurally: an unknown box, an unknown key id and a wrong key run
the same calls, in the same order, as a good key.

Figure: ``replay/forgery N/N refused``.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from adv_inproc import Box, fixed_challenge, make_box
from adv_support import record
from adv_wire import wire

from rstash import auth
from rstash import hello as hello_judge
from rstash.state import StateDB

CHALLENGE = bytes(range(100, 132))
OTHER_CHALLENGE = bytes(range(200, 232))

TALLY = {"tried": 0, "refused": 0}


@pytest.fixture(scope="module", autouse=True)
def _figure() -> Iterator[None]:
    yield
    record("crypto", **TALLY)


def stream(box: Box, *, greeting: str | None, t: int | None = None, box_name: str | None = None,
           key: bytes | None = None, files: tuple[tuple[bytes, bytes], ...] = ((b"f", b"x\n"),),
           nonce: bytes | None = None) -> tuple[bytes, Any]:
    conn = wire.ClientConnection(auth.Key(key or box.key, "c"), box_name or box.name,
                                 pipe=greeting is None)
    if greeting is not None:
        conn.receive_data(greeting.encode() + b"\r\n")
        assert isinstance(conn.next_event(), wire.Greeting)
    out = conn.hello(nonce or secrets.token_bytes(32), int(time.time()) if t is None else t)
    for name, content in files:
        out += conn.file(name, len(content), 0) + conn.data(content) + conn.end()
    return out + conn.bye(), conn


def frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = struct.unpack(">I", data[pos + 1:pos + 5])[0]
        out.append(data[pos:pos + 5 + n])
        pos += 5 + n
    return out


def retag(f: bytes, body: bytes) -> bytes:
    return struct.pack(">BI", f[0], len(body)) + body


def refused(box: Box, data: bytes, expect: bytes) -> None:
    """Run ``data``; it must be refused with a line starting ``expect`` and store nothing."""
    before = set(os.listdir(box.path))
    out, _ = box.run(data)
    lines = out.split(b"\r\n")
    TALLY["tried"] += 1
    ok = (b"250 " not in out and set(os.listdir(box.path)) == before
          and any(x.startswith(expect) for x in lines))
    TALLY["refused"] += ok
    assert ok, (expect, out)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return make_box(tmp_path, "vm1", pipe_mode=True)  # replay_window: the default 300 s


def fresh_cache(box: Box) -> None:
    """Create the replay cache, then let a second pass: it refuses streams of its first second."""
    StateDB(box.root / "state").status()
    time.sleep(1.1)


def test_a_replayed_pipe_session_is_refused(box: Box) -> None:
    fresh_cache(box)  # the replay cache refuses streams from the second it was created
    data, _ = stream(box, greeting=None)
    out, _ = box.run(data)
    assert b"\r\n250 stored" in out, out
    os.unlink(box.path / "f")
    refused(box, data, b"532 ")
    refused(box, data[:-45], b"532 ")  # the same HELLO with less after it


def test_a_replayed_interactive_session_is_refused(box: Box) -> None:
    with fixed_challenge(CHALLENGE) as g1:
        data, _ = stream(box, greeting=g1)
        out, _ = box.run(data)
        assert b"\r\n250 stored" in out, out  # the stream is genuine for its own greeting
        os.unlink(box.path / "f")
    with fixed_challenge(OTHER_CHALLENGE):
        refused(box, data, b"535 ")


@pytest.mark.parametrize("which", ["HELLO", "FILE", "END", "BYE"])
@pytest.mark.parametrize("change", ["truncated", "extended", "flipped"])
def test_a_truncated_extended_or_flipped_tag_is_refused(box: Box, which: str, change: str) -> None:
    with fixed_challenge(CHALLENGE) as g:
        data, _ = stream(box, greeting=g)
        fs = frames(data)
        i = {"HELLO": 0, "FILE": 1, "END": 3, "BYE": 4}[which]
        body = fs[i][5:]
        body = {"truncated": body[:-1], "extended": body + b"\0",
                "flipped": body[:-1] + bytes([body[-1] ^ 0x80])}[change]
        fs[i] = retag(fs[i], body)
        expect = {"HELLO": b"535 ", "FILE": b"5", "END": b"5", "BYE": b"5"}[which]
        if which == "BYE":
            # the file before it was proved and may be stored; the 221 must not come
            out, _ = box.run(b"".join(fs))
            TALLY["tried"] += 1
            ok = b"221 " not in out and any(x.startswith(b"5") for x in out.split(b"\r\n"))
            TALLY["refused"] += ok
            assert ok, out
        else:
            refused(box, b"".join(fs), expect)


def test_a_key_id_of_box_a_is_refused_on_box_b(tmp_path: Path) -> None:
    a = make_box(tmp_path / "a", "vma")
    b = make_box(tmp_path / "b", "vmb")
    with fixed_challenge(CHALLENGE) as g:
        data, _ = stream(b, greeting=g, key=a.key)  # A's key, B's box, B's server
        refused(b, data, b"535 ")
        data, _ = stream(a, greeting=g, box_name="vmb")  # B's name, A's key, A's server
        refused(a, data, b"535 ")


@pytest.mark.parametrize("offset", [-301, -3600, 301, 86400, 2 ** 40, 1 - 1_700_000_000])
def test_a_pipe_stream_outside_the_time_window_is_refused(box: Box, offset: int) -> None:
    data, _ = stream(box, greeting=None, t=int(time.time()) + offset)
    refused(box, data, b"531 ")


def test_a_clock_jump_never_lets_a_replay_through(box: Box,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_cache(box)
    data, _ = stream(box, greeting=None)
    out, _ = box.run(data)
    assert b"\r\n250 stored" in out, out
    os.unlink(box.path / "f")
    real = time.time
    for jump in (-3600.0, -250.0, 250.0, 3600.0, 10 * 86400.0):
        monkeypatch.setattr(time, "time", lambda j=jump: real() + j)
        refused(box, data, b"53")  # 531 outside the window, 532 inside it


@pytest.mark.parametrize("pos,value,expect", [(0, 2, b"505 "), (0, 0, b"505 "), (0, 255, b"505 "),
                                              (2, 2, b"504 "), (2, 255, b"504 "), (1, 3, b"535 "),
                                              # method 0 (ssh) on a box that does not offer it
                                              (2, 0, b"535 ")])
def test_an_unknown_version_method_or_mode_is_refused(box: Box, pos: int, value: int,
                                                      expect: bytes) -> None:
    with fixed_challenge(CHALLENGE) as g:
        data, _ = stream(box, greeting=g)
        hello = bytearray(frames(data)[0])
        hello[5 + pos] = value
        refused(box, bytes(hello) + data[len(hello):], expect)


def test_the_dummy_key_path_is_the_same_code_path(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """rstash(7) RULES rule 1: an unknown box or key id still derives session keys and checks
    the proof, against a dummy key of the real shape; the calls match a wrong key's exactly."""
    box = make_box(tmp_path, "vm1")
    calls: list[tuple[str, Any]] = []

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            shape = tuple((type(a).__name__, len(a.secret) if isinstance(a, auth.Key)
                           else len(a) if isinstance(a, bytes) else None) for a in args)
            calls.append((name, shape))
            if name == "session_keys":
                keys_used.append(args[0])
            return real(*args)
        return wrapper

    keys_used: list[Any] = []
    monkeypatch.setattr(auth, "session_keys", spy("session_keys", auth.session_keys))
    monkeypatch.setattr(auth, "verify", spy("verify", auth.verify))
    traces = {}
    with fixed_challenge(CHALLENGE) as g:
        for case, kwargs in {"wrong key": {"key": secrets.token_bytes(32)},
                             "unknown box": {"box_name": "vm9"},  # the length of vm1
                             "unknown key id": {"key": secrets.token_bytes(32)}}.items():
            calls.clear()
            data, _ = stream(box, greeting=g, **kwargs)
            if case == "wrong key":
                # same key id as the real key, wrong secret: a candidate whose proof fails
                hello = bytearray(frames(data)[0])
                real_id = auth.Key(box.key).key_id
                at = 5 + 3 + 2 + len(box.name)
                hello[at:at + len(real_id)] = real_id
                data = bytes(hello) + data[len(hello):]
            refused(box, data, b"535 ")
            traces[case] = list(calls)
    assert traces["unknown box"] == traces["unknown key id"], traces
    assert [c for c in traces["unknown box"] if c[0] == "session_keys"] == \
        [c for c in traces["wrong key"] if c[0] == "session_keys"], traces
    # the proof check ran in every case, on the derived proof and the sent one
    for case, trace in traces.items():
        assert ("verify", (("bytes", 32), ("bytes", 32))) in trace, (case, trace)
    dummies = [k for k in keys_used if k is hello_judge.DUMMY_KEY]
    assert len(dummies) == 2 and len(dummies[0].secret) == len(box.key)
