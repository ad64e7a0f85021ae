"""End to end: what a per-connection rstash-recv imports before its greeting (rstash-recv(8) NOTES).

The real rstash-recv from the e2e venv, as the service user, on a socket as fd 0 and fd 1
(inetd nowait, systemd ``Accept=yes``), under ``python -X importtime``: the first connection
validates the configuration and writes the snapshot; every later one greets without pydantic
or anything else a greeting does not need.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_support import Box, ServiceUser, as_service, make_box, service_env, write_config
from rstash import wire as protocol
from test_e2e_server import Wire, event, login, put

pytestmark = pytest.mark.e2e

#: Modules a session needs only after its greeting, or never: each costs milliseconds
#: per connection (pydantic alone tens of them).
NOT_BEFORE_GREETING = (
    "pydantic", "pydantic_core", "annotated_types", "typing_extensions", "email",
    "importlib.metadata", "sqlite3", "subprocess", "threading", "argparse_manpage",
    "rstash.config", "rstash.store", "rstash.state", "rstash.hooks", "rstash.admin",
    "rstash.monitor", "rstash.checks", "rstash.serve",
)


def imported(err: Path) -> list[str]:
    """Module names in the ``-X importtime`` lines written so far, in import order."""
    names = []
    for line in err.read_text(errors="replace").splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.append(name)
    return names


def heavy(names: list[str]) -> list[str]:
    return [n for n in names if any(n == h or n.startswith(h + ".") for h in NOT_BEFORE_GREETING)]


class Connection:
    """One rstash-recv under -X importtime on a socketpair, stderr to a file."""

    def __init__(self, venv: Path, conf: Path, err: Path) -> None:
        self.err = err
        ours, theirs = socket.socketpair()
        # The venv's script, not -m: -m would import a checkout in the current directory.
        argv = as_service([str(venv / "bin" / "python"), "-X", "importtime",
                           str(venv / "bin" / "rstash-recv"), "-c", str(conf)])
        with open(err, "wb") as f:
            self.popen = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(),
                                          stderr=f, env=service_env(), start_new_session=True)
        theirs.close()
        self.sock = ours
        self.wire = Wire(ours.fileno(), ours.fileno(), shut=lambda: ours.shutdown(socket.SHUT_WR))

    def store(self, box: Box, name: bytes, content: bytes) -> None:
        conn = login(self.wire, box.key, box.name)
        put(self.wire, conn, name, content)
        assert isinstance(event(self.wire, conn), protocol.Receipt)
        self.wire.send(conn.bye())
        self.wire.close_write()
        assert isinstance(event(self.wire, conn), protocol.Done)
        assert self.popen.wait(30) == 0, self.err.read_text(errors="replace")[-2000:]

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self.sock.close()


@pytest.fixture
def connections(e2e_venv: Path) -> Iterator[list[Connection]]:
    opened: list[Connection] = []
    yield opened
    for c in opened:
        c.close()


def test_a_per_connection_server_greets_without_pydantic_once_the_snapshot_exists(
        e2e_venv: Path, e2e_dir: Path, service_user: ServiceUser,
        connections: list[Connection]) -> None:
    box = make_box(e2e_dir, "vm1")
    conf = write_config(e2e_dir, [box])
    state = e2e_dir / "state"

    first = Connection(e2e_venv, conf, e2e_dir / "first.err")
    connections.append(first)
    first.store(box, b"one.txt", b"one\n")
    assert "pydantic" in imported(first.err), "the first connection validates the configuration"
    snaps = [n for n in os.listdir(state) if n.startswith("config-snapshot-")]
    assert len(snaps) == 1, os.listdir(state)
    st = os.lstat(state / snaps[0])
    assert (st.st_uid, st.st_mode & 0o7777) == (service_user.uid, 0o600)

    second = Connection(e2e_venv, conf, e2e_dir / "second.err")
    connections.append(second)
    greeting = second.wire.line(timeout=30)
    assert greeting.startswith(b"220 rstash/1 "), greeting
    # The server now waits for HELLO: everything imported so far came before the greeting.
    before = imported(second.err)
    assert "rstash.session" in before and "rstash.snapshot" in before, before
    assert heavy(before) == [], heavy(before)
    second.wire.buf[:0] = greeting  # login() reads the greeting itself
    second.store(box, b"two.txt", b"two\n")
    assert not [n for n in imported(second.err) if n.split(".")[0] in ("pydantic", "pydantic_core")]
    assert box.files() == {"one.txt": b"one\n", "two.txt": b"two\n"}

    # A changed configuration is validated again: the new box exists at once.
    other = make_box(e2e_dir, "vm2")
    write_config(e2e_dir, [box, other])
    third = Connection(e2e_venv, conf, e2e_dir / "third.err")
    connections.append(third)
    third.store(other, b"three.txt", b"three\n")
    assert "pydantic" in imported(third.err)
    assert other.files() == {"three.txt": b"three\n"}


#: What ``rstash-send FILE rstash://…`` needs before its first byte on the wire: no progress
#: bar (stderr is not a terminal), no profile (a URL), no ssh, no --from-command.
CLIENT_NOT_BEFORE_FIRST_BYTE = (
    "pydantic", "pydantic_core", "tqdm", "tomllib", "subprocess", "threading", "shutil", "bz2",
    "lzma", "sqlite3", "email", "importlib.metadata", "rstash.config", "rstash.client.profiles",
)


def test_rstash_send_reaches_the_wire_without_what_a_plain_transfer_does_not_use(
        e2e_venv: Path, e2e_dir: Path) -> None:
    box = make_box(e2e_dir, "vm1")
    src = e2e_dir / "plain.txt"
    src.write_bytes(b"plain\n")
    err = e2e_dir / "send.err"
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        port = server.getsockname()[1]
        argv = [str(e2e_venv / "bin" / "python"), "-X", "importtime", str(e2e_venv / "bin" / "rstash-send"),
                "-k", str(box.client_key), "--timeout", "30", box.url(port), str(src)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(e2e_dir),
               "LANG": "C.UTF-8"}
        with open(err, "wb") as f:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=f, env=env, start_new_session=True)
        try:
            conn, _ = server.accept()
            # Connected, and now waiting for our greeting: all it imported came before.
            before = imported(err)
            conn.close()
            assert popen.wait(30) != 0
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait(10)
    assert "rstash.client.session" in before and "rstash.wire" in before, before
    assert [n for n in before if any(n == h or n.startswith(h + ".")
                                     for h in CLIENT_NOT_BEFORE_FIRST_BYTE)] == []
