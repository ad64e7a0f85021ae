"""The server session driver in-process: behaviour that needs no daemon."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from rstash import auth, protocol
from rstash.config import load_config
from rstash.log import Logger
from rstash.session import ServerSession
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
    c = protocol.ClientConnection(auth.Key(key), "vm1")
    c.receive_data(rf.readline())
    assert isinstance(c.next_event(), protocol.Greeting)
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
