"""End to end: pipe mode and how sessions close, with the real rstash-recv ``--listen`` and real nc.

rstash(7) PIPE MODE AND REPLAY (floors from each box's mark, rstash-recv(8) FILES) and
"Closing the connection": the first stream to a freshly set-up server is stored, a stream
delivered before state_dir was lost is refused, an unwritable mark fails closed, the
server closes after ``221`` and lingers after a last line so that a pipelining client
still reads it, and the session line carries the counts of the ``221`` line.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e_support import (
    Box,
    Proc,
    ProcGroup,
    ServiceUser,
    as_service,
    free_port,
    make_box,
    need_program,
    service_env,
    venv_bin,
    wait_for_port,
    wait_until,
    write_config,
)
from rstash import auth, wire

pytestmark = pytest.mark.e2e

MARK = ".rstash-pipe-mark"
WINDOW = 120
_names = itertools.count(1)


@dataclass
class Server:
    dir: Path
    venv: Path
    spawn: ProcGroup
    box: Box
    port: int

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def log(self) -> str:
        path = self.dir / "rstash-recv.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stream(self, src: Path) -> Path:
        """A pipe stream made now by the real ``rstash-send --stdout``."""
        maker = self.spawn([venv_bin(self.venv, "rstash-send"), "--stdout", "-k",
                            str(self.box.client_key), self.box.name, str(src)],
                           name=f"stream-{next(_names)}")
        assert maker.wait(15) == 0, maker.describe()
        assert maker.stdout_path.stat().st_size > 0
        return maker.stdout_path

    def nc(self, stream: Path, *, half_close: bool = True) -> Proc:
        nc = need_program("nc")
        with open(stream, "rb") as f:
            return self.spawn([nc, *(["-N"] if half_close else []), "127.0.0.1", str(self.port)],
                              stdin=f, name=f"nc-{next(_names)}")


@pytest.fixture
def server(e2e_dir: Path, e2e_venv: Path, spawn: ProcGroup,
           service_user: ServiceUser) -> Iterator[Server]:
    """A freshly set-up server: an empty state_dir, a new box, ``rstash-recv --listen`` just started."""
    box = make_box(e2e_dir, "vm1", pipe_mode=True)
    conf = write_config(e2e_dir, [box], replay_window=WINDOW)
    port = free_port()
    recv = spawn(as_service([venv_bin(e2e_venv, "rstash-recv"), "-c", str(conf),
                             "--listen", f"127.0.0.1:{port}"]), name="recv", env=service_env())
    wait_for_port("127.0.0.1", port, timeout=15, proc=recv)
    yield Server(e2e_dir, e2e_venv, spawn, box, port)


def src(server: Server, name: str, content: bytes) -> Path:
    d = server.dir / "src"
    d.mkdir(mode=0o755, exist_ok=True)
    (d / name).write_bytes(content)
    return d / name


def crafted_stream(server: Server, name: bytes, content: bytes, t: int) -> Path:
    """A pipe stream whose HELLO says time ``t`` (a client whose clock is off)."""
    c = wire.ClientConnection(auth.Key(server.box.key), server.box.name, pipe=True)
    data = c.hello(secrets.token_bytes(32), t)
    data += c.file(name, len(content), 0) + c.data(content) + c.end() + c.bye()
    path = server.dir / f"crafted-{next(_names)}.stream"
    path.write_bytes(data)
    return path


def deliver(server: Server, stream: Path, *, half_close: bool = True, within: float = 20) -> str:
    """What nc printed after the server's greeting (a pipe client never reads it)."""
    p = server.nc(stream, half_close=half_close)
    p.wait(within)
    out = p.stdout_path.read_bytes().decode("ascii", "replace")
    greeting, _, rest = out.partition("\r\n")
    assert greeting.startswith("220 rstash/1 "), out
    return rest


def session_lines(server: Server) -> list[str]:
    return [ln for ln in server.log().splitlines() if "event=session" in ln]


def wipe_state_dir(server: Server) -> None:
    """What a lost state_dir looks like: an empty directory (mode and owner kept). A closing
    session may remove its SQLite side files meanwhile, hence the tolerance of vanished ones."""
    for entry in server.state.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    assert not (server.state / "rstash.db").exists()


# --------------------------------------------------------------------------- the first stream


def test_the_first_pipe_stream_to_a_freshly_set_up_server_is_stored(server: Server) -> None:
    stream = server.stream(src(server, "first.txt", b"first\n"))  # made before any session ran
    assert not (server.state / "rstash.db").exists()  # no replay cache yet (a settings snapshot may be there)
    out = deliver(server, stream)
    assert re.search(r"^235 ok ", out, re.M), out + server.log()
    assert re.search(r"^250 stored 6 sha256:[0-9a-f]{64} first\.txt mac=", out, re.M), out
    assert re.search(r"^221 bye 1 mac=", out, re.M), out
    assert server.box.files() == {"first.txt": b"first\n", MARK: server.box.files()[MARK]}
    assert int(server.box.files()[MARK]) <= time.time()


def test_without_nc_N_the_session_ends_right_after_221_with_one_log_line(server: Server) -> None:
    # nc without -N never half-closes: only the server's close ends it (idle_timeout is 60 s).
    stream = server.stream(src(server, "nohalf.txt", b"no half close\n"))
    started = time.monotonic()
    out = deliver(server, stream, half_close=False, within=5)
    took = time.monotonic() - started
    assert re.search(r"^221 bye 1 mac=", out, re.M), out
    assert out.endswith("\r\n") and "421" not in out, repr(out)
    assert took < 5, took
    time.sleep(0.5)  # a second line, if any, would follow the first at once
    lines = session_lines(server)
    assert [ln for ln in lines if "code=221" in ln], lines
    assert not [ln for ln in lines if "timeout" in ln or "code=421" in ln], lines
    assert server.box.files()["nohalf.txt"] == b"no half close\n"


def test_the_log_line_carries_the_counts_of_the_221_line(server: Server) -> None:
    c = wire.ClientConnection(auth.Key(server.box.key), server.box.name, pipe=True)
    data = c.hello(secrets.token_bytes(32), int(time.time()))
    for name in (b"a.txt", b"a.txt", b"b.txt"):  # the second a.txt is refused: the name is taken
        data += c.file(name, 2, 0) + c.data(b"ok") + c.end()
    path = server.dir / "counts.stream"
    path.write_bytes(data + c.bye())
    out = deliver(server, path)
    wire_stored = re.search(r"^221 bye (\d+) mac=", out, re.M)
    assert wire_stored is not None, out
    wait_until(lambda: any("code=221" in ln for ln in session_lines(server)), timeout=10,
               what="the session line")
    [line] = [ln for ln in session_lines(server) if "code=221" in ln]
    logged = re.search(r" outcome=complete code=221 .*\bfiles=(\d+) stored=(\d+)$", line)
    assert logged is not None, line
    assert logged.group(2) == wire_stored.group(1) == "2", (line, out)
    assert logged.group(1) == "3", line


# --------------------------------------------------------------------------- a lost state_dir


def test_a_stream_dated_ahead_is_refused_after_state_dir_is_wiped(server: Server) -> None:
    ahead = int(time.time()) + WINDOW // 2  # the client's clock runs ahead, within replay_window
    stream = crafted_stream(server, b"once.txt", b"only once\n", ahead)
    first = deliver(server, stream)
    assert re.search(r"^221 bye 1 mac=", first, re.M), first + server.log()
    assert server.box.files()["once.txt"] == b"only once\n"

    wipe_state_dir(server)
    second = deliver(server, stream)

    assert second == "532 replayed session\r\n", second
    assert server.box.files()["once.txt"] == b"only once\n"
    assert "once~1.txt" not in server.box.files()
    refusal = [ln for ln in session_lines(server) if "code=532" in ln]
    assert refusal, server.log()
    after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ahead))
    assert f"floor={ahead} " in refusal[-1] and f"accepted_after={after}" in refusal[-1], refusal


def test_an_unwritable_mark_fails_closed_with_451_and_stores_nothing(server: Server) -> None:
    os.chmod(server.box.path, 0o555)  # the service user owns the box but cannot write in it
    try:
        stream = crafted_stream(server, b"closed.txt", b"fails closed\n", int(time.time()))
        out = deliver(server, stream)
    finally:
        os.chmod(server.box.path, 0o755)
    assert out == "451 local error\r\n", out
    assert server.box.files() == {}
    assert re.search(r"code=451 .*pipe mark", server.log()), server.log()
    # Nothing was recorded: the same stream is accepted once the box is writable again.
    again = deliver(server, stream)
    assert re.search(r"^221 bye 1 mac=", again, re.M), again + server.log()


# --------------------------------------------------------------------------- the last line survives


def test_a_client_pipelining_after_a_wrong_hello_still_reads_535_and_a_clean_close(
        server: Server) -> None:
    wrong = auth.Key(secrets.token_bytes(32))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    errors: list[BaseException] = []
    try:
        greeting = b""
        while not greeting.endswith(b"\r\n"):
            greeting += sock.recv(1)
        c = wire.ClientConnection(wrong, server.box.name)
        c.receive_data(greeting)
        assert isinstance(c.next_event(), wire.Greeting)
        # HELLO and, without waiting for 235, a file that more than fills the server's first read.
        big = secrets.token_bytes(1 << 20)
        payload = c.hello(secrets.token_bytes(32), int(time.time()))
        payload += c.file(b"big.bin", len(big), 0) + c.data(big) + c.end() + c.bye()

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                errors.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except OSError as e:  # a reset: the server closed with our bytes unread
            errors.append(e)
        sender.join(15)
    finally:
        sock.close()
    assert got == b"535 authentication failed\r\n", got
    assert errors == [], errors
    assert MARK not in server.box.files() and server.box.files() == {}
