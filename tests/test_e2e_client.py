"""rstash-send end to end: the real client against the real rstash-recv on loopback.

The server is rstash-recv as the service user, one session per connection, started by
``systemd-socket-activate --inetd`` (inetd ``nowait``: the connection is fd 0). Fake servers
(tiny threads in this process) play the peers the real server never is: one that answers 250
to everything without the key, an sshd banner, a ``421 busy`` greeting, and one that hangs up.
A counting TCP proxy measures what the client puts on the wire. ssh:// is tested elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pty
import select
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e_support import (
    Box,
    ProcGroup,
    ServiceUser,
    free_port,
    make_box,
    need_program,
    venv_bin,
    wait_until,
    write_config,
    write_key,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
#: Bound on any single rstash-send run (a hang is a failure, never a stuck CI job).
RUN_TIMEOUT = 60.0


# --------------------------------------------------------------------------- harness


@dataclass
class Env:
    """What a test needs to start servers and run the client."""

    e2e_dir: Path
    venv: Path
    user: ServiceUser
    spawn: ProcGroup
    _n: int = 0

    def server(self, boxes: Sequence[Box], *, host: str = "127.0.0.1", **top: object) -> int:
        """rstash-recv behind systemd-socket-activate --inetd; returns its loopback port."""
        activate = need_program("systemd-socket-activate")
        self._n += 1
        conf = write_config(self.e2e_dir, boxes, path=self.e2e_dir / f"recv-{self._n}.toml", **top)
        port = free_port(host)
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        argv = [activate, "-a", "--inetd", "-l", listen,
                *self.user.wrap([venv_bin(self.venv, "rstash-recv"), "-c", str(conf)])]
        proc = self.spawn(argv, name=f"activate-{self._n}", env=self.user.env())
        # Waiting on its message, not by connecting: a probe would be a session of its own.
        wait_until(lambda: "Listening on" in proc.stderr() or not proc.running(), timeout=10,
                   what="systemd-socket-activate listening")
        assert proc.running(), proc.describe()
        return port

    def send(self, *args: str | os.PathLike[str], stdin: bytes | None = None,
             timeout: float = RUN_TIMEOUT, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
        """Run rstash-send to completion with ``args``; stdin is /dev/null unless given."""
        argv = [venv_bin(self.venv, "rstash-send"), *[os.fspath(a) for a in args]]
        return subprocess.run(argv, input=stdin.decode("latin-1") if stdin is not None else None,
                              stdin=None if stdin is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout,
                              env=env if env is not None else send_env(), check=False)


def send_env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "HOME": os.environ.get("HOME", "/root")}
    env.update(extra)
    return env


@pytest.fixture
def env(e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser, spawn: ProcGroup) -> Env:
    return Env(e2e_dir, e2e_venv, service_user, spawn)


def out(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def json_lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def sha256sum(path: Path) -> str:
    """The digest as the coreutils program prints it (not our own code)."""
    line = subprocess.run(["sha256sum", "--", str(path)], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    return line.split()[0]


def stored(box: Box) -> dict[str, bytes]:
    """Files in the box, temps excluded."""
    return {n: c for n, c in box.files().items() if not n.startswith(".rstash-tmp-")}


def make_file(dirpath: Path, name: str, size: int, *, sparse: bool = False) -> Path:
    path = dirpath / name
    if sparse:
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        path.write_bytes(os.urandom(size))
    return path


@pytest.fixture
def src(e2e_dir: Path) -> Path:
    """A directory for the client's files (the client runs as the tester)."""
    d = e2e_dir / "src"
    d.mkdir()
    return d


# --------------------------------------------------------------------------- loopback helpers


class Background:
    """A thread serving a listening socket until closed; every wait bounded."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.handler = handler
        self.connections = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._main = threading.Thread(target=self._loop, daemon=True)
        self._main.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(10)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        self._stop.set()
        self._main.join(5)
        self.listener.close()
        for t in self._threads:
            t.join(5)


StartBackground = Callable[[Callable[[socket.socket], None]], Background]


@pytest.fixture
def background() -> Iterator[StartBackground]:
    made: list[Background] = []

    def start(handler: Callable[[socket.socket], None]) -> Background:
        b = Background(handler)
        made.append(b)
        return b

    yield start
    for b in made:
        b.close()


@dataclass
class Counter:
    """Bytes through a counting proxy, per direction."""

    up: int = 0
    down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def proxy_handler(upstream_port: int, counter: Counter) -> Callable[[socket.socket], None]:
    """Relay a connection to 127.0.0.1:upstream_port, counting the bytes each way."""

    def handle(client: socket.socket) -> None:
        with socket.create_connection(("127.0.0.1", upstream_port), timeout=10) as server:
            socks = {client.fileno(): (client, server, "up"), server.fileno(): (server, client, "down")}
            open_ = set(socks)
            deadline = time.monotonic() + RUN_TIMEOUT
            while open_ and time.monotonic() < deadline:
                ready, _, _ = select.select(list(open_), [], [], 0.5)
                for fd in ready:
                    a, b, way = socks[fd]
                    try:
                        data = a.recv(256 * 1024)
                    except OSError:
                        data = b""
                    if not data:
                        open_.discard(fd)
                        with contextlib.suppress(OSError):
                            b.shutdown(socket.SHUT_WR)
                        continue
                    with counter.lock:
                        if way == "up":
                            counter.up += len(data)
                        else:
                            counter.down += len(data)
                    b.sendall(data)

    return handle


def proxied(background: StartBackground,
            upstream_port: int) -> tuple[int, Counter]:
    counter = Counter()
    return background(proxy_handler(upstream_port, counter)).port, counter


def greeting() -> bytes:
    import base64

    challenge = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")
    return b"220 rstash/1 methods=hmac-sha256 challenge=" + challenge + b"\r\n"


FAKE_MAC = b"mac=AAAAAAAAAAAAAAAAAAAAAA"


def fake_yes_server(conn: socket.socket) -> None:
    """Greets like rstash-recv and then says yes to everything, without holding the key."""
    conn.sendall(greeting())
    deadline = time.monotonic() + 20
    first = True
    while time.monotonic() < deadline:
        try:
            data = conn.recv(65536)
        except TimeoutError:
            continue
        if not data:
            return
        if first:
            conn.sendall(b"235 ok " + FAKE_MAC + b"\r\n")
            first = False
        conn.sendall(b"250 stored 5 sha256:" + b"0" * 64 + b" a.txt " + FAKE_MAC + b"\r\n"
                     b"221 bye 1 " + FAKE_MAC + b"\r\n")


def fake_line_server(line: bytes, *, linger: float = 2.0) -> Callable[[socket.socket], None]:
    """Sends one line at connect, then waits a little (reading) and hangs up."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(line)
        conn.settimeout(linger)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    return handle


def hang_up(conn: socket.socket) -> None:
    """Accepts and closes at once."""


# --------------------------------------------------------------------------- exit statuses


def test_files_are_stored_and_json_matches_sha256sum(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    a = make_file(src, "a.bin", 300_000)
    b = make_file(src, "b.txt", 17)
    empty = make_file(src, "empty", 0)
    p = env.send("-k", box.client_key, "--json", box.url(port), a, b, empty)
    assert p.returncode == 0, out(p)
    assert stored(box) == {"a.bin": a.read_bytes(), "b.txt": b.read_bytes(), "empty": b""}
    lines = json_lines(p)
    assert [r["name"] for r in lines] == ["a.bin", "b.txt", "empty"]
    for rec, path in zip(lines, (a, b, empty), strict=True):
        assert set(rec) == {"name", "final_name", "status", "code", "bytes", "sha256", "message",
                            "already", "resumed_from"}
        assert rec["status"] == "stored" and rec["code"] == 250
        assert rec["final_name"] == path.name
        assert rec["bytes"] == path.stat().st_size
        assert rec["sha256"] == sha256sum(path)
    # Human lines on stderr.
    assert f"stored a.bin 293.0 KiB sha256:{sha256sum(a)}" in p.stderr


def test_refusals_exit_1_and_the_others_are_stored(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1", allow_names=["*.tar", "*.bin"], max_file_size="1MiB")
    (box.path / "taken.tar").write_bytes(b"old")
    port = env.server([box])
    files = [make_file(src, "taken.tar", 10), make_file(src, "ok.tar", 1000),
             make_file(src, "notes.txt", 10), make_file(src, "huge.bin", 2 * MiB)]
    p = env.send("-k", box.client_key, "--json", box.url(port), *files)
    assert p.returncode == 1, out(p)
    recs = {r["name"]: r for r in json_lines(p)}
    assert (recs["taken.tar"]["status"], recs["taken.tar"]["code"]) == ("exists", 550)
    assert (recs["ok.tar"]["status"], recs["ok.tar"]["code"]) == ("stored", 250)
    assert (recs["notes.txt"]["status"], recs["notes.txt"]["code"]) == ("refused", 553)
    assert (recs["huge.bin"]["status"], recs["huge.bin"]["code"]) == ("refused", 552)
    assert stored(box) == {"taken.tar": b"old", "ok.tar": files[1].read_bytes()}
    assert "refused taken.tar: exists" in p.stderr


def test_each_refusal_alone_exits_1(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1", allow_names=["*.tar"], max_file_size="1KiB")
    (box.path / "taken.tar").write_bytes(b"old")
    port = env.server([box])
    for f in (make_file(src, "taken.tar", 10), make_file(src, "bad.txt", 10),
              make_file(src, "big.tar", 5000)):
        p = env.send("-k", box.client_key, box.url(port), f)
        assert p.returncode == 1, (f.name, out(p))
    assert stored(box) == {"taken.tar": b"old"}


def test_local_errors_exit_2(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    good = make_file(src, "good", 10)
    # An unreadable file (a missing one: root reads any mode), a directory, a bad option.
    for args in ([src / "missing"], [good, src / "missing"], [src]):
        p = env.send("-k", box.client_key, box.url(port), *args)
        assert p.returncode == 2, out(p)
    p = env.send("-k", box.client_key, "--no-such-option", box.url(port), good)
    assert p.returncode == 2, out(p)
    p = env.send("-k", box.client_key, "--bwlimit", "fast", box.url(port), good)
    assert p.returncode == 2, out(p)
    p = env.send("-k", src / "nokey", box.url(port), good)
    assert p.returncode == 2, out(p)
    assert stored(box) == {}


def test_a_failing_producer_stores_nothing_and_exits_2(env: Env) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    p = env.send("-k", box.client_key, "--json", "--name", "dump.sql", "--from-command",
                 box.url(port), "--", "sh", "-c", "head -c 1000000 /dev/zero; exit 3")
    assert p.returncode == 2, out(p)
    assert "status 3" in p.stderr, out(p)
    assert stored(box) == {}
    assert box.files() == {}  # no temp left either


def test_a_good_producer_is_stored(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    data = make_file(src, "data", 3 * MiB + 7)
    p = env.send("-k", box.client_key, "--json", "--name", "dump.sql", "--from-command",
                 box.url(port), "--", "cat", data)
    assert p.returncode == 0, out(p)
    assert stored(box) == {"dump.sql": data.read_bytes()}
    (rec,) = json_lines(p)
    assert rec["sha256"] == sha256sum(data) and rec["bytes"] == data.stat().st_size


def test_a_wrong_key_exits_3_with_a_final_json_error(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    wrong = write_key(env.e2e_dir / "wrong.key", os.urandom(32), mode=0o600)
    f = make_file(src, "a", 10)
    p = env.send("-k", wrong, "--json", box.url(port), f)
    assert p.returncode == 3, out(p)
    last = json_lines(p)[-1]
    assert last["status"] == "error" and last["code"] == 535 and last["message"], out(p)
    assert stored(box) == {}
    p = env.send("-k", wrong, "--test", box.url(port))
    assert p.returncode == 3, out(p)


def test_a_closed_port_exits_4(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    f = make_file(src, "a", 10)
    t0 = time.monotonic()
    p = env.send("-k", box.client_key, "--json", box.url(free_port()), f)
    assert p.returncode == 4, out(p)
    assert time.monotonic() - t0 < 10  # connection refused is not retried
    assert json_lines(p)[-1]["status"] == "error"


def test_a_server_that_hangs_up_exits_4(env: Env, src: Path, background: StartBackground) -> None:
    fake = background(hang_up)
    f = make_file(src, "a", 10)
    box = make_box(env.e2e_dir, "vm1")
    p = env.send("-k", box.client_key, box.url(fake.port), f)
    assert p.returncode == 4, out(p)


def test_a_server_without_the_key_can_never_report_success(env: Env, src: Path, background: StartBackground) -> None:
    fake = background(fake_yes_server)
    box = make_box(env.e2e_dir, "vm1")
    f = make_file(src, "a.txt", 5)
    p = env.send("-k", box.client_key, "--json", box.url(fake.port), f)
    assert p.returncode == 5, out(p)
    assert all(r["status"] != "stored" for r in json_lines(p)), out(p)
    # The failure is ours to report (a MAC), not a reply code the server sent.
    assert json_lines(p)[-1] == {"status": "error", "code": None, "message": json_lines(p)[-1]["message"]}
    p = env.send("-k", box.client_key, "--test", box.url(fake.port))
    assert p.returncode == 5, out(p)


def test_an_sshd_banner_is_a_protocol_error(env: Env, src: Path, background: StartBackground) -> None:
    fake = background(fake_line_server(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"))
    box = make_box(env.e2e_dir, "vm1")
    p = env.send("-k", box.client_key, box.url(fake.port), make_file(src, "a", 5))
    assert p.returncode == 5, out(p)
    assert "SSH-2.0" in p.stderr, out(p)


def test_busy_is_retried_then_exits_75(env: Env, src: Path, background: StartBackground) -> None:
    fake = background(fake_line_server(b"421 busy\r\n", linger=0.1))
    box = make_box(env.e2e_dir, "vm1")
    t0 = time.monotonic()
    p = env.send("-k", box.client_key, "--json", "--busy-wait", "1", box.url(fake.port),
                 make_file(src, "a", 5))
    took = time.monotonic() - t0
    assert p.returncode == 75, out(p)
    assert json_lines(p)[-1]["status"] == "error" and json_lines(p)[-1]["code"] == 421, out(p)
    assert fake.connections >= 2, "421 busy was not retried"
    assert took < 15


def test_precedence_a_stored_and_an_existing_file_exit_1(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1", min_free="1000TiB")
    box2 = make_box(env.e2e_dir, "vm2")
    (box.path / "taken").write_bytes(b"old")
    (box2.path / "taken").write_bytes(b"old")
    port = env.server([box, box2])
    taken, new = make_file(src, "taken", 10), make_file(src, "new", 10)
    # stored + exists -> 1
    p = env.send("-k", box2.client_key, box2.url(port), new, taken)
    assert p.returncode == 1, out(p)
    assert stored(box2)["new"] == new.read_bytes()
    # insufficient storage alone -> 75; with an "exists" -> 1 (1 > 75)
    p = env.send("-k", box.client_key, "--json", box.url(port), new)
    assert p.returncode == 75, out(p)
    assert json_lines(p)[0]["status"] == "temporary" and json_lines(p)[0]["code"] == 452
    p = env.send("-k", box.client_key, box.url(port), taken, new)
    assert p.returncode == 1, out(p)
    # a failing producer (2) wins over nothing else; the wrong key (3) over a local error
    wrong = write_key(env.e2e_dir / "wrong.key", os.urandom(32), mode=0o600)
    p = env.send("-k", wrong, "--name", "x", "--from-command", box2.url(port), "--", "false")
    assert p.returncode == 3, out(p)


# --------------------------------------------------------------------------- data on the wire


def test_a_refused_200_mib_file_costs_little_on_the_wire(env: Env, src: Path, background: StartBackground) -> None:
    box = make_box(env.e2e_dir, "vm1", deny_names=["*.iso"])
    (box.path / "big.img").write_bytes(b"old")
    port, counter = proxied(background, env.server([box]))
    first, last = make_file(src, "first", 100_000), make_file(src, "last", 100_000)
    big = make_file(src, "big.img", 200 * MiB, sparse=True)
    iso = make_file(src, "cd.iso", 200 * MiB, sparse=True)
    p = env.send("-k", box.client_key, "--json", box.url(port), first, big, iso, last)
    assert p.returncode == 1, out(p)
    assert [r["status"] for r in json_lines(p)] == ["stored", "exists", "refused", "stored"], out(p)
    assert stored(box) == {"first": first.read_bytes(), "big.img": b"old", "last": last.read_bytes()}
    # Two refused 200 MiB files: each stopped after at most a few socket buffers.
    assert counter.up < 40 * MiB, counter.up


def test_dry_run_sends_no_data_and_stores_nothing(env: Env, src: Path, background: StartBackground) -> None:
    box = make_box(env.e2e_dir, "vm1", allow_names=["*.bin"])
    port, counter = proxied(background, env.server([box]))
    big = make_file(src, "big.bin", 8 * MiB)
    bad = make_file(src, "bad.txt", 10)
    p = env.send("-k", box.client_key, "--json", "--dry-run", box.url(port), big, bad)
    assert p.returncode == 1, out(p)
    recs = json_lines(p)
    assert [(r["status"], r["code"]) for r in recs] == [("would_store", 250), ("refused", 553)]
    p = env.send("-k", box.client_key, "--json", "--dry-run", box.url(port), big)
    assert p.returncode == 0, out(p)
    assert counter.up < 16 * 1024, counter.up
    assert stored(box) == {} and box.files() == {}


def test_pipe_mode_through_nc(env: Env, src: Path) -> None:
    nc = need_program("nc")
    box = make_box(env.e2e_dir, "vm1", pipe_mode=True)
    port = env.server([box])
    state = env.e2e_dir / "state"
    assert state.stat().st_mode & 0o777 == 0o700 and state.stat().st_uid == env.user.uid
    # An interactive delivery first: pipe mode shares the state database it creates.
    warm = make_file(src, "warm-up", 10)
    p = env.send("-k", box.client_key, box.url(port), warm)
    assert p.returncode == 0, out(p)
    assert any(state.iterdir()), "no state database after a session"
    f = make_file(src, "db.sql.gz", 2 * MiB + 3)
    send = subprocess.Popen([venv_bin(env.venv, "rstash-send"), "-k", str(box.client_key),
                             "--stdout", box.name, str(f)], env=send_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert send.stdout is not None
    try:
        netcat = subprocess.run([nc, "-N", "127.0.0.1", str(port)], stdin=send.stdout,
                                capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
        rc = send.wait(RUN_TIMEOUT)
    finally:
        send.stdout.close()
        if send.poll() is None:
            send.kill()
            send.wait(5)
    assert rc == 0, send.stderr.read() if send.stderr else ""
    assert netcat.returncode == 0, netcat
    assert f"250 stored {f.stat().st_size} sha256:{sha256sum(f)} db.sql.gz mac=" in netcat.stdout, netcat
    assert "221 bye 1 mac=" in netcat.stdout, netcat
    mark = box.files()[".rstash-pipe-mark"]  # the server's, rstash-recv(8) FILES
    assert stored(box) == {"warm-up": warm.read_bytes(), "db.sql.gz": f.read_bytes(),
                           ".rstash-pipe-mark": mark}


def test_pipe_mode_refused_when_the_box_has_it_off(env: Env, src: Path) -> None:
    nc = need_program("nc")
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    f = make_file(src, "a", 10)
    p = subprocess.run(f"'{venv_bin(env.venv, 'rstash-send')}' -k '{box.client_key}' --stdout vm1 '{f}'"
                       f" | '{nc}' -N 127.0.0.1 {port}", shell=True, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT, env=send_env(), check=False)
    assert "530 pipe mode off" in p.stdout, p
    assert stored(box) == {}


def test_slow_stdin_is_streamed_as_it_arrives(env: Env) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box], idle_timeout=4)
    proc = subprocess.Popen([venv_bin(env.venv, "rstash-send"), "-k", str(box.client_key), "--json",
                             "--name", "slow.log", box.url(port), "-"], env=send_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    chunks = [os.urandom(1000 + i) for i in range(4)]
    try:
        for i, chunk in enumerate(chunks):
            proc.stdin.write(chunk)
            proc.stdin.flush()
            if i == 1:
                # The server already holds what was sent, before stdin is closed.
                def temp_size() -> int:
                    return sum(len(c) for n, c in box.files().items() if n.startswith(".rstash-tmp-"))
                wait_until(lambda: temp_size() == len(chunks[0]) + len(chunks[1]), timeout=1.9,
                           what="the server's temp file growing")
            time.sleep(2)
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)  # closes stdin: end of stream
    finally:
        proc.kill()
        proc.wait(5)
    assert proc.returncode == 0, (stdout, stderr)
    (rec,) = [json.loads(x) for x in stdout.splitlines()]
    whole = b"".join(chunks)
    assert rec["status"] == "stored" and rec["sha256"] == hashlib.sha256(whole).hexdigest()
    assert stored(box) == {"slow.log": whole}


def test_bwlimit_slows_the_transfer(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    f = make_file(src, "three", 3 * MiB)
    t0 = time.monotonic()
    p = env.send("-k", box.client_key, "--bwlimit", "1MiB", box.url(port), f)
    took = time.monotonic() - t0
    assert p.returncode == 0, out(p)
    assert took >= 2.5, took
    assert stored(box) == {"three": f.read_bytes()}


def test_proxy_command_reaches_the_server(env: Env, src: Path) -> None:
    nc = need_program("nc")
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    f = make_file(src, "via-proxy", 500_000)
    p = env.send("-k", box.client_key, "--proxy-command", f"{nc} %h %p", box.url(port), f)
    assert p.returncode == 0, out(p)
    assert stored(box) == {"via-proxy": f.read_bytes()}


def test_ignore_existing_counts_exists_as_success(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    (box.path / "taken").write_bytes(b"old")
    port = env.server([box])
    f, new = make_file(src, "taken", 10), make_file(src, "new", 10)
    p = env.send("-k", box.client_key, "--json", "--ignore-existing", box.url(port), f, new)
    assert p.returncode == 0, out(p)
    assert [(r["status"], r["code"]) for r in json_lines(p)] == [("exists", 550), ("stored", 250)]
    # A slow producer refused as "exists" while the client waits for its output.
    p = env.send("-k", box.client_key, "--json", "--ignore-existing", "--name", "taken",
                 "--from-command", box.url(port), "--", "sh", "-c", "sleep 1; echo late")
    assert p.returncode == 0, out(p)
    assert [(r["status"], r["code"]) for r in json_lines(p)] == [("exists", 550)], out(p)
    assert stored(box) == {"taken": b"old", "new": new.read_bytes()}


def test_ignore_existing_with_quiet_prints_nothing(env: Env, src: Path) -> None:
    # The nightly cron job: a second run that finds its file already there must not mail anyone.
    box = make_box(env.e2e_dir, "vm1")
    (box.path / "taken").write_bytes(b"old")
    port = env.server([box])
    f = make_file(src, "taken", 10)
    p = env.send("-k", box.client_key, "-q", "--ignore-existing", box.url(port), f)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", ""), out(p)
    p = env.send("-k", box.client_key, "--ignore-existing", box.url(port), f)
    assert p.returncode == 0 and "exists taken (ignored)" in p.stderr, out(p)
    p = env.send("-k", box.client_key, "-q", box.url(port), f)  # without it: still a refusal
    assert p.returncode == 1 and "refused taken" in p.stderr, out(p)
    assert stored(box) == {"taken": b"old"}


# --------------------------------------------------------------------------- modes


def test_test_prints_the_protocol_and_the_fingerprint(env: Env) -> None:
    box = make_box(env.e2e_dir, "vm1", comment="vm1 backups")
    port = env.server([box])
    fp = env.send("--fingerprint", "-k", box.client_key)
    assert fp.returncode == 0, out(fp)
    fingerprint = fp.stdout.split()[1]
    p = env.send("-k", box.client_key, "--test", box.url(port))
    assert p.returncode == 0, out(p)
    assert "rstash/1" in p.stdout and fingerprint in p.stdout, out(p)
    assert stored(box) == {}


def test_fingerprint_matches_the_servers(env: Env) -> None:
    box = make_box(env.e2e_dir, "vm1", comment="vm1 nightly")
    mine = env.send("--fingerprint", "-k", box.client_key)
    theirs = subprocess.run([venv_bin(env.venv, "rstash-recv"), "--fingerprint", str(box.server_key)],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert mine.returncode == 0 and theirs.returncode == 0, (out(mine), theirs)
    line = mine.stdout.strip()
    assert line == theirs.stdout.strip()
    size, fingerprint, *comment, kind = line.split(" ")
    assert (size, kind, " ".join(comment)) == ("256", "(rstash-hmac)", "vm1 nightly")
    assert fingerprint.startswith("SHA256:") and len(fingerprint) == 7 + 43
    # RSTASH_KEY_FILE stands in for -k.
    p = env.send("--fingerprint", env=send_env(RSTASH_KEY_FILE=str(box.client_key)))
    assert p.stdout.strip() == line, out(p)


def test_rename_box_reports_the_final_name(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1", overwrite="rename")
    (box.path / "db.tar.zst").write_bytes(b"old")
    port = env.server([box])
    f = make_file(src, "db.tar.zst", 1000)
    p = env.send("-k", box.client_key, "--json", box.url(port), f)
    assert p.returncode == 0, out(p)
    (rec,) = json_lines(p)
    assert (rec["name"], rec["final_name"], rec["status"]) == ("db.tar.zst", "db~1.tar.zst", "stored")
    assert "stored db.tar.zst as db~1.tar.zst" in p.stderr
    assert stored(box) == {"db.tar.zst": b"old", "db~1.tar.zst": f.read_bytes()}


def test_server_id_must_match_when_either_side_sets_it(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    with_id = env.server([box], server_id="host-a")
    without = env.server([box])
    f = make_file(src, "a", 10)
    p = env.send("-k", box.client_key, "--server-id", "host-a", "--test", box.url(with_id))
    assert p.returncode == 0, out(p)
    p = env.send("-k", box.client_key, "--server-id", "host-a", box.url(with_id), f)
    assert p.returncode == 0, out(p)
    for args, port in ((["--server-id", "host-b"], with_id), ([], with_id),
                       (["--server-id", "host-a"], without)):
        p = env.send("-k", box.client_key, *args, "--test", box.url(port))
        assert p.returncode == 3, (args, out(p))
    assert stored(box) == {"a": f.read_bytes()}


# --------------------------------------------------------------------------- progress


def run_in_pty(argv: Sequence[str | os.PathLike[str]], *, stdout_to_pty: bool = False,
               timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
    """Run argv with stderr (and optionally stdout) on a pseudo-terminal.

    Returns (status, what the terminal showed, stdout when not on the terminal).
    """
    master, slave = pty.openpty()
    # A real terminal has a size; a fresh pty is 0x0, where tqdm draws nothing.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen([os.fspath(a) for a in argv], stdin=subprocess.DEVNULL,
                                stdout=slave if stdout_to_pty else subprocess.PIPE, stderr=slave,
                                env=send_env(TERM="xterm", COLUMNS="100"), start_new_session=True)
    finally:
        os.close(slave)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                shown += data
            elif proc.poll() is not None:
                break
        stdout = proc.stdout.read().decode() if proc.stdout is not None else ""
        rc = proc.wait(max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        os.close(master)
    return rc, shown.decode("utf-8", "replace"), stdout


def test_progress_bar_on_a_terminal_and_on_request(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    send = venv_bin(env.venv, "rstash-send")
    files = [make_file(src, f"f{i}.bin", 2 * MiB) for i in range(3)]
    # A terminal on stderr: a bar by default, none with --no-progress.
    rc, shown, _ = run_in_pty([send, "-k", box.client_key, box.url(port), files[0]])
    assert rc == 0, shown
    assert "%" in shown and "f0.bin" in shown, shown
    rc, shown, _ = run_in_pty([send, "-k", box.client_key, "--no-progress", box.url(port), files[1]])
    assert rc == 0, shown
    assert "%" not in shown and "|" not in shown, shown
    assert "stored f1.bin" in shown
    # Not a terminal: none by default, a bar with --progress.
    p = env.send("-k", box.client_key, box.url(port), files[2], make_file(src, "g", 10))
    assert p.returncode == 0, out(p)
    assert "%" not in p.stderr, out(p)
    p = env.send("-k", box.client_key, "--progress", "--ignore-existing", box.url(port), files[2],
                 make_file(src, "h.bin", 2 * MiB))
    assert p.returncode == 0, out(p)
    assert "%" in p.stderr and "h.bin" in p.stderr, out(p)


def test_a_stalled_stdin_times_out_and_is_never_retried(env: Env) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box], idle_timeout=2)
    proc = subprocess.Popen([venv_bin(env.venv, "rstash-send"), "-k", str(box.client_key), "--json",
                             "--name", "stalled.log", box.url(port), "-"], env=send_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"first part\n")
        proc.stdin.flush()
        time.sleep(4)  # longer than the server's idle_timeout: it gives up ("421 timeout")
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(b"second part\n")
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
        proc.wait(5)
    # A session that timed out after data was sent is a failure: the rest of stdin must not
    # go out in a new session as if it were the whole stream.
    assert proc.returncode == 4, (proc.returncode, stdout, stderr)
    assert b"timeout" in stderr
    assert stored(box) == {}, (stdout, stderr)


def test_ipv6_loopback_destination(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box], host="::1")
    f = make_file(src, "six", 1000)
    p = env.send("-k", box.client_key, f"rstash://[::1]:{port}/vm1", f)
    assert p.returncode == 0, out(p)
    assert stored(box) == {"six": f.read_bytes()}


def silent(conn: socket.socket) -> None:
    """Accepts and never says a word (reads until the client gives up)."""
    conn.settimeout(15)
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass


def greets_then_silent(conn: socket.socket) -> None:
    conn.sendall(greeting())
    silent(conn)


def test_connect_timeout_and_timeout_bound_the_waits(env: Env, src: Path,
                                                     background: StartBackground) -> None:
    box = make_box(env.e2e_dir, "vm1")
    f = make_file(src, "a", 10)
    mute, dumb = background(silent), background(greets_then_silent)
    t0 = time.monotonic()
    p = env.send("-k", box.client_key, "--json", "--connect-timeout", "1", box.url(mute.port), f)
    assert p.returncode == 4, out(p)
    assert json_lines(p)[-1]["code"] is None, out(p)  # our timeout, not a reply
    assert time.monotonic() - t0 < 8
    t0 = time.monotonic()
    p = env.send("-k", box.client_key, "--json", "--timeout", "1", box.url(dumb.port), f)
    assert p.returncode == 4, out(p)
    assert time.monotonic() - t0 < 8
    assert json_lines(p)[-1]["status"] == "error"


def test_a_file_larger_than_the_socket_buffers_streams_without_stalling(env: Env, src: Path) -> None:
    # The client waits for "writable or a reply" on one socket fd: both events must be
    # asked for at once, or a full send buffer stalls until --timeout.
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    big = make_file(src, "big.bin", 64 * 1024 * 1024, sparse=True)
    started = time.monotonic()
    p = env.send("-k", box.client_key, "--timeout", "30", "--json", box.url(port), big, timeout=120)
    elapsed = time.monotonic() - started
    assert p.returncode == 0, out(p)
    # A stall lasts the whole --timeout (30 s); 64 MiB on loopback takes about a second.
    assert elapsed < 20, f"{elapsed:.1f} s: the client stalled on a full send buffer"
    assert json_lines(p)[0]["sha256"] == sha256sum(big)
    assert (box.path / "big.bin").stat().st_size == 64 * 1024 * 1024


def test_an_unwritable_box_says_so_on_both_sides(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    os.chown(box.path, 0, 0)  # root's 0755: the service user cannot write into it
    port = env.server([box], service_user=env.user.name)
    f = make_file(src, "nightly.tar", 10)
    p = env.send("-k", box.client_key, box.url(port), f)
    assert p.returncode == 75, out(p)
    assert "refused nightly.tar: local error (451): the server could not write into the box; " \
           "ask its admin to run rstash-recv --check-config and read its log" in p.stderr, out(p)
    log = (env.e2e_dir / "rstash-recv.log").read_text()
    assert f"create temp: cannot write into {box.path}: Permission denied (EACCES); run rstash-recv " \
           "--check-config" in log, log
    # The command named finds it, run as root, because service_user names whom to check for.
    conf = sorted(env.e2e_dir.glob("recv-*.toml"))[-1]
    check = subprocess.run([venv_bin(env.venv, "rstash-recv"), "-c", str(conf), "-t"],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert check.returncode == 1
    assert f"box vm1: path {box.path} is not writable by {env.user.name}" in check.stderr, check.stderr


def test_a_server_key_readable_by_all_is_logged_as_unusable(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    os.chmod(box.server_key, 0o644)
    port = env.server([box])
    p = env.send("-k", box.client_key, "--test", box.url(port))
    assert p.returncode == 3, out(p)
    log = (env.e2e_dir / "rstash-recv.log").read_text()
    auth_lines = [line for line in log.splitlines() if "event=auth" in line]
    assert len(auth_lines) == 1, log
    assert 'reason="key file unusable"' in auth_lines[0] and "unknown key id" not in log
    assert f"path={box.server_key}" in auth_lines[0]
    assert "permissions 0644 are too open" in auth_lines[0]
