"""The server session driver in-process: behaviour that needs no daemon."""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rstash import auth, wire
from rstash.config import load_config
from rstash.log import Logger
from rstash.session import ServerSession, run_session
from rstash.store import BoxStore
from rstash.transport import FdStream


def test_a_batch_is_logged_and_hooked_even_when_the_client_leaves_before_its_receipts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "box"
    box.mkdir(mode=0o750)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = secrets.token_bytes(32)
    (tmp_path / "vm1.key").write_text(auth.format_key(key, "vm1"))
    os.chmod(tmp_path / "vm1.key", 0o600)
    hooked = tmp_path / "hooked"
    log = tmp_path / "recv.log"
    (tmp_path / "recv.toml").write_text(f"""
state_dir = "{state}"
log = "{log}"
[box.vm1]
path = "{box}"
keys = ["{tmp_path / 'vm1.key'}"]
on_receive = ["/bin/sh", "-c", "echo \\"$RSTASH_NAME\\" >> {hooked}"]
""")
    cfg = load_config(tmp_path / "recv.toml")
    # Hold the batch's directory fsync until the client has gone.
    gate = threading.Event()
    real_sync = BoxStore.sync_dir

    def held_sync(self: BoxStore) -> None:
        gate.wait(10)
        real_sync(self)

    monkeypatch.setattr(BoxStore, "sync_dir", held_sync)
    srv, cli = socket.socketpair()
    session = ServerSession(cfg, FdStream(srv.fileno()), Logger(str(log)), peer="192.0.2.1")
    t = threading.Thread(target=session.run, daemon=True)
    t.start()
    rf = cli.makefile("rb")
    c = wire.ClientConnection(auth.Key(key), "vm1")
    c.receive_data(rf.readline())
    assert isinstance(c.next_event(), wire.Greeting)
    names = [f"f{i}" for i in range(5)]
    data = c.hello(secrets.token_bytes(32), int(time.time()))
    for name in names:
        data += c.file(name.encode(), 3, 0) + c.data(b"abc") + c.end()
    cli.sendall(data + c.bye())
    assert rf.readline().startswith(b"235 ok ")
    rf.close()
    cli.close()  # gone before a single receipt
    gate.set()
    t.join(30)
    assert not t.is_alive()
    srv.close()
    assert sorted(p.name for p in box.iterdir()) == names
    text = log.read_text()
    assert text.count("outcome=stored") == len(names), text
    assert sorted(hooked.read_text().split()) == names


# --- an in-process rig: one session over a socketpair ---------------------------------


def _site(tmp_path: Path, **box: str) -> tuple[auth.Key, Path, Path]:
    """A box vm1 with a fresh key; returns (key, config path, log path)."""
    (tmp_path / "box").mkdir(mode=0o750)
    (tmp_path / "state").mkdir(mode=0o700)
    key = secrets.token_bytes(32)
    (tmp_path / "vm1.key").write_text(auth.format_key(key, "vm1"))
    os.chmod(tmp_path / "vm1.key", 0o600)
    extra = "".join(f"{k} = {v}\n" for k, v in box.items())
    (tmp_path / "recv.toml").write_text(
        f'state_dir = "{tmp_path / "state"}"\nlog = "{tmp_path / "recv.log"}"\nhook_timeout = 10\n'
        f'[box.vm1]\npath = "{tmp_path / "box"}"\nkeys = ["{tmp_path / "vm1.key"}"]\n{extra}')
    return auth.Key(key), tmp_path / "recv.toml", tmp_path / "recv.log"


def _run(conf: Path, log: Path, client: Callable[[bytes], bytes]) -> list[bytes]:
    """One session: ``client`` gets the greeting line and returns everything it sends
    (then it closes its side); returns the server's lines."""
    srv, cli = socket.socketpair()
    session = ServerSession(load_config(conf), FdStream(srv.fileno()), Logger(str(log)),
                            peer="192.0.2.1")

    def serve() -> None:
        try:
            session.run()
        finally:
            srv.shutdown(socket.SHUT_RDWR)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cli.settimeout(30)
    rf = cli.makefile("rb")
    greeting = rf.readline()
    cli.sendall(client(greeting))
    cli.shutdown(socket.SHUT_WR)
    rest = rf.read()
    t.join(30)
    rf.close()
    cli.close()
    srv.close()
    return (greeting + rest).splitlines()


def _interactive(key: auth.Key, body: Callable[[wire.ClientConnection], bytes]) -> Callable[[bytes], bytes]:
    def client(greeting: bytes) -> bytes:
        c = wire.ClientConnection(key, "vm1")
        c.receive_data(greeting)
        assert isinstance(c.next_event(), wire.Greeting)
        return c.hello(secrets.token_bytes(32), int(time.time())) + body(c)
    return client


def _files(c: wire.ClientConnection, names: list[str]) -> bytes:
    return b"".join(c.file(n.encode(), 2, 0) + c.data(b"ok") + c.end() for n in names)


def test_unknown_hello_extensions_are_ignored_but_bound_by_the_proof(tmp_path: Path) -> None:
    key, conf, log = _site(tmp_path)

    def pipe_hello(*, strip: bool) -> Callable[[bytes], bytes]:
        def client(_greeting: bytes) -> bytes:
            nonce, now = secrets.token_bytes(32), int(time.time())

            def signed_with(ext: dict[int, bytes]) -> bytes:
                return wire.hello_without_proof(mode=wire.MODE_PIPE, box=b"vm1", key_id=key.key_id,
                                                nonce=nonce, time=now, ext=ext)

            signed = signed_with({9: b"a future extension"})
            proof = auth.session_keys(key, b"", signed).proof
            if strip:  # an on-path attacker removes the extension the client signed
                signed = signed_with({})
            return wire.frame(wire.FrameType.HELLO, signed + proof)
        return client

    # The box refuses pipe mode: 530 is only ever said after a verified proof.
    assert _run(conf, log, pipe_hello(strip=False))[1] == b"530 pipe mode off"
    assert _run(conf, log, pipe_hello(strip=True))[1] == b"535 authentication failed"


def test_the_log_says_complete_only_after_a_verified_bye(tmp_path: Path) -> None:
    key, conf, log = _site(tmp_path)
    lines = _run(conf, log, _interactive(key, lambda c: _files(c, ["a", "b"]) + c.bye()))
    assert lines[-1].startswith(b"221 bye 2 ")
    assert " outcome=complete code=221 " in log.read_text()
    _run(conf, log, _interactive(key, lambda c: _files(c, ["c", "d"])))  # no BYE
    text = log.read_text()
    assert 'outcome="truncated after 2"' in text
    assert text.count("outcome=complete") == 1


def test_the_session_line_carries_the_counts_of_the_221_line(tmp_path: Path) -> None:
    key, conf, log = _site(tmp_path)
    # Three files, one refused (the name is taken): the wire says 2 stored.
    lines = _run(conf, log, _interactive(key, lambda c: _files(c, ["a", "a", "b"]) + c.bye()))
    assert lines[-1].startswith(b"221 bye 2 "), lines
    [session] = [ln for ln in log.read_text().splitlines() if "event=session" in ln
                 and "code=221" in ln]
    # The outcome word carries no number of its own to be mistaken for the stored count.
    assert re.search(r" outcome=complete code=221 .*\bfiles=3 stored=2$", session), session


def test_after_221_the_server_closes_without_waiting_for_the_client(tmp_path: Path) -> None:
    key, conf, log = _site(tmp_path)
    srv, cli = socket.socketpair()
    session = ServerSession(load_config(conf), FdStream(srv.fileno()), Logger(str(log)),
                            peer="192.0.2.1")
    t = threading.Thread(target=session.run, daemon=True)
    t.start()
    cli.settimeout(20)  # well below idle_timeout (60 s): only the server's close ends the read
    rf = cli.makefile("rb")
    c = wire.ClientConnection(key, "vm1")
    c.receive_data(rf.readline())
    assert isinstance(c.next_event(), wire.Greeting)
    cli.sendall(c.hello(secrets.token_bytes(32), int(time.time())) + _files(c, ["a"]) + c.bye())
    # Our side stays open for writing, like nc without -N.
    rest = rf.read().splitlines()
    t.join(20)
    assert not t.is_alive()
    assert rest[-1].startswith(b"221 bye 1 "), rest
    cli.close()
    srv.close()
    text = log.read_text()
    assert text.count("event=session") == 2, text  # authenticated, complete: no timeout line
    assert "421" not in text


def test_hook_output_reaches_the_log_escaped_on_one_line_and_cut_at_4_kib(tmp_path: Path) -> None:
    script = tmp_path / "noisy"
    script.write_text("#!/bin/sh\nprintf 'line one\\nfake=field \\033[31m'\n"
                      "head -c 20000 /dev/zero | tr '\\0' x\n")
    script.chmod(0o755)
    key, conf, log = _site(tmp_path, on_receive=f'["{script}"]')
    _run(conf, log, _interactive(key, lambda c: _files(c, ["x"]) + c.bye()))
    hook_lines = [ln for ln in log.read_text().splitlines() if "event=hook" in ln]
    assert len(hook_lines) == 1, hook_lines
    line = hook_lines[0]
    assert "\x1b" not in line and "\\u001b" in line  # escaped, never raw
    assert " fake=field" not in line  # the hook cannot forge a field
    assert 4000 <= line.count("x") <= 4096  # its output is kept up to 4 KiB


def test_an_interactive_session_does_not_check_the_clients_time_but_logs_it(tmp_path: Path) -> None:
    key, conf, log = _site(tmp_path)

    def client(greeting: bytes) -> bytes:
        c = wire.ClientConnection(key, "vm1")
        c.receive_data(greeting)
        c.next_event()
        return c.hello(secrets.token_bytes(32), 12345) + _files(c, ["late"]) + c.bye()

    lines = _run(conf, log, client)
    assert lines[1].startswith(b"235 ok ") and lines[2].startswith(b"250 stored 2 ")
    assert "client_time=12345" in log.read_text()


def test_the_server_refuses_invisible_and_look_alike_names_with_553(tmp_path: Path) -> None:
    # rstash(7) NAMES: one name per refused class, judged by the server's own checker.
    key, conf, log = _site(tmp_path)
    names = ["\u3164", "a\u2800b", "a\ufffeb", "\u0301a", "\u2024\u2024\u2215x", "a\uff3cb"]
    lines = _run(conf, log, _interactive(key, lambda c: _files(c, [*names, "ok.txt"]) + c.bye()))
    codes = [line[:3] for line in lines[2:-1]]
    assert codes == [b"553"] * len(names) + [b"250"]
    assert lines[-1].startswith(b"221 bye 1 ")
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["ok.txt"]


def test_a_failing_delivery_log_is_reported_once_per_session_and_files_are_still_stored(
        tmp_path: Path) -> None:
    """--status reads the delivery log: when it cannot be written, the log must say so
    (naming the state dir and the error) once per session, and the files still get 250."""
    key, conf, log = _site(tmp_path)
    (tmp_path / "state" / "rstash.db").mkdir()  # the database cannot be opened
    lines = _run(conf, log, _interactive(key, lambda c: _files(c, ["a", "b"]) + c.bye()))
    assert [ln[:10] for ln in lines[2:4]] == [b"250 stored"] * 2
    warnings = [ln for ln in log.read_text().splitlines() if "event=state" in ln]
    assert len(warnings) == 1, warnings
    assert str(tmp_path / "state") in warnings[0] and "outcome=error" in warnings[0]
    assert sorted(os.listdir(tmp_path / "box")) == ["a", "b"]


def test_run_session_logs_an_unexpected_failure_and_exits_2(tmp_path: Path) -> None:
    """The one top-level handler of every deployment shape: never a traceback."""
    _key, conf, log = _site(tmp_path)
    r, w = os.pipe()
    os.close(r)
    os.close(w)  # a descriptor that is no longer open
    assert run_session(load_config(conf), Logger(str(log)), r, peer="192.0.2.1", boxes=None) == 2
    line = log.read_text()
    assert "event=session outcome=error peer=192.0.2.1" in line and "OSError" in line
