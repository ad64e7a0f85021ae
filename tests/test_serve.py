"""The accept loop (rstash/serve.py) end to end: the real rstash-recv and rstash-send on loopback.

Covers ``--listen`` (IPv4, IPv6, concurrency), the limits of rstash-recv.toml(5) (``max_sessions``,
the pre-auth share, ``max_preauth_per_peer``: ``421 busy``), SIGTERM (sessions finish, nothing
new is accepted), SIGHUP (reload, broken config kept out), sd_notify, and systemd-socket-activate
in its three shapes (listening socket on fd 0, ``LISTEN_FDS``, one connection per process).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_support import (
    Box,
    Proc,
    ProcGroup,
    ServiceUser,
    as_service,
    free_port,
    is_ci,
    make_box,
    need_program,
    service_env,
    venv_bin,
    wait_for_port,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e

#: Bound for every wait of a single step.
STEP = 15.0


# --------------------------------------------------------------------------- helpers


def client_env(e2e_dir: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
            "HOME": str(e2e_dir)}


def log_text(e2e_dir: Path) -> str:
    path = e2e_dir / "rstash-recv.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_log(e2e_dir: Path, pattern: str, count: int = 1, timeout: float = STEP) -> None:
    """Wait until the server log matches ``pattern`` (a regex) at least ``count`` times."""
    rx = re.compile(pattern)
    try:
        wait_until(lambda: len(rx.findall(log_text(e2e_dir))) >= count, timeout=timeout,
                   what=f"{count} x {pattern!r} in the log")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n--- log\n{log_text(e2e_dir)[-3000:]}") from None


def make_file(e2e_dir: Path, name: str, size: int = 1000) -> Path:
    d = e2e_dir / "src"
    d.mkdir(exist_ok=True)
    path = d / name
    path.write_bytes(secrets.token_bytes(size))
    return path


def start_recv(spawn: ProcGroup, venv: Path, conf: Path, *listen: str, name: str = "recv",
               env: dict[str, str] | None = None) -> Proc:
    argv = [venv_bin(venv, "rstash-recv"), "-c", str(conf)]
    for spec in listen:
        argv += ["--listen", spec]
    return spawn(as_service(argv), name=unique(name), env=env or service_env())


_names = itertools.count(1)


def unique(name: str) -> str:
    """A log name never used before: Proc's own de-duplication ("NAME.2") loops forever
    when NAME.out exists, because with_suffix() turns "send.2" back into "send.out"."""
    return f"{name}-{next(_names)}"


def sender(spawn: ProcGroup, venv: Path, e2e_dir: Path, box: Box, url: str, *files: Path,
           opts: tuple[str, ...] = (), name: str = "send") -> Proc:
    argv = [venv_bin(venv, "rstash-send"), "-k", str(box.client_key), "--no-progress", *opts,
            url, *map(str, files)]
    return spawn(argv, name=unique(name), env=client_env(e2e_dir))


def send_ok(spawn: ProcGroup, venv: Path, e2e_dir: Path, box: Box, url: str, *files: Path,
            opts: tuple[str, ...] = ()) -> None:
    proc = sender(spawn, venv, e2e_dir, box, url, *files, opts=opts)
    assert proc.wait(STEP * 2) == 0, proc.describe() + "\n--- log\n" + log_text(e2e_dir)[-3000:]


def assert_stored(box: Box, *files: Path) -> None:
    have = box.files()
    for f in files:
        assert have.get(f.name) == f.read_bytes(), f"{f.name} not stored intact in {box.path}"


@contextlib.contextmanager
def raw_client(port: int, host: str = "127.0.0.1", source: str | None = None) -> Iterator[socket.socket]:
    """A TCP connection that sends nothing: a slow client holding a pre-auth slot."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(STEP)
    try:
        if source is not None:
            s.bind((source, 0))
        s.connect((host, port))
        yield s
    finally:
        s.close()


def first_line(s: socket.socket) -> bytes:
    """The server's first line (greeting or 421), bounded by the socket's timeout."""
    data = b""
    while b"\n" not in data:
        chunk = s.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


@contextlib.contextmanager
def holding_client(port: int) -> Iterator[socket.socket]:
    """A connection that got its greeting and then sends nothing, holding a pre-auth slot.

    Retried while the server still counts an earlier connection (wait_for_port's probe)
    that has not been reaped yet.
    """
    deadline = time.monotonic() + STEP
    while True:
        with raw_client(port) as s:
            line = first_line(s)
            if line.startswith(b"220 rstash/1 "):
                yield s
                return
            assert line == b"421 busy\r\n", line
        if time.monotonic() > deadline:
            raise AssertionError("the server stayed busy")
        time.sleep(0.1)


def is_busy(port: int, source: str | None = None) -> bool:
    with raw_client(port, source=source) as s:
        line = first_line(s)
        if line != b"421 busy\r\n":
            assert line.startswith(b"220 rstash/1 "), line
            return False
        assert s.recv(100) == b"", "a 421 must be followed by a close"
        return True


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def box(e2e_dir: Path) -> Box:
    return make_box(e2e_dir, "vm1")


# --------------------------------------------------------------------------- --listen


def test_twenty_concurrent_senders_all_store(e2e_venv: Path, e2e_dir: Path, box: Box,
                                             spawn: ProcGroup) -> None:
    conf = write_config(e2e_dir, [box])
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    files = [make_file(e2e_dir, f"file-{i:02d}.bin", 50_000 + i) for i in range(20)]
    procs = [sender(spawn, e2e_venv, e2e_dir, box, box.url(port), f, name=f"send-{i:02d}")
             for i, f in enumerate(files)]
    for p in procs:
        # Beyond max_preauth_per_peer (4) a sender is told 421 and retries: all must succeed.
        assert p.wait(90) == 0, p.describe() + "\n--- log\n" + log_text(e2e_dir)[-3000:]
    assert_stored(box, *files)
    assert len(box.files()) == 20
    assert log_text(e2e_dir).count("outcome=stored") == 20
    assert server.running()
    # Each session ran in its own process, never in the listening parent.
    pids = set(re.findall(r"rstash-recv\[(\d+)\]: info event=file ", log_text(e2e_dir)))
    assert len(pids) == 20 and str(server.pid) not in pids


def test_ipv6_listen(e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup) -> None:
    if not is_ci() and not ipv6_loopback():
        pytest.skip("::1 is not available here")
    port = free_port("::1")
    conf = write_config(e2e_dir, [box])
    server = start_recv(spawn, e2e_venv, conf, f"[::1]:{port}")
    wait_for_port("::1", port, proc=server)
    f = make_file(e2e_dir, "v6.bin")
    send_ok(spawn, e2e_venv, e2e_dir, box, box.url(port, "::1"), f)
    assert_stored(box, f)
    assert "peer=::1" in log_text(e2e_dir)
    assert re.search(rf"detail=.?\[::1\]:{port}", log_text(e2e_dir))
    # [::1] only: nothing listens on IPv4.
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(STEP)
        s.connect(("127.0.0.1", port))


def test_a_bad_listen_address_is_a_local_error(e2e_venv: Path, e2e_dir: Path, box: Box,
                                               spawn: ProcGroup) -> None:
    conf = write_config(e2e_dir, [box])
    server = start_recv(spawn, e2e_venv, conf, "::1:7370")
    assert server.wait(STEP) == 2
    assert "[ADDRESS]:PORT" in server.stderr()
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}", name="recv-inuse")
        assert server.wait(STEP) == 2
    assert "Address already in use" in server.stderr()


# --------------------------------------------------------------------------- limits


def test_preauth_share_full_gets_421_and_rstash_send_exits_75(
        e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup) -> None:
    # max_sessions = 2: at most max(1, 2 // 4) = 1 session before authentication.
    conf = write_config(e2e_dir, [box], max_sessions=2, preauth_timeout=30)
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    with holding_client(port):
        assert is_busy(port)
        f = make_file(e2e_dir, "busy.bin")
        proc = sender(spawn, e2e_venv, e2e_dir, box, box.url(port), f, opts=("--busy-wait", "0"))
        assert proc.wait(STEP) == 75, proc.describe()
        assert "busy" in proc.stderr()
        assert f.name not in box.files()
        wait_log(e2e_dir, r"outcome=busy code=421 reason=preauth_sessions", 2)
    # The slow client left: its slot is free again.
    send_ok(spawn, e2e_venv, e2e_dir, box, box.url(port), f)
    assert_stored(box, f)


def test_max_sessions_full_of_transfers_gets_421(
        e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup) -> None:
    conf = write_config(e2e_dir, [box], max_sessions=2, idle_timeout=30)
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    # Two authenticated transfers (~7 s each at 256 KiB/s) fill max_sessions. Either sender
    # may first meet 421 (the pre-auth share is 1) and retry: the transfers still overlap.
    big = [make_file(e2e_dir, f"slow-{i}.bin", 2 << 20) for i in range(2)]
    slow = [sender(spawn, e2e_venv, e2e_dir, box, box.url(port), f, opts=("--bwlimit", "256KiB"),
                   name=f"slow-{i}") for i, f in enumerate(big)]
    wait_log(e2e_dir, r"outcome=authenticated", 2)
    assert is_busy(port)
    wait_log(e2e_dir, r"outcome=busy code=421 reason=max_sessions")
    for p in slow:
        assert p.wait(STEP * 2) == 0, p.describe()
    assert_stored(box, *big)


def test_max_preauth_per_peer(e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup) -> None:
    conf = write_config(e2e_dir, [box], max_sessions=64, max_preauth_per_peer=2,
                        preauth_timeout=30)
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    with holding_client(port), holding_client(port):
        assert is_busy(port)
        wait_log(e2e_dir, r"peer=127\.0\.0\.1 outcome=busy code=421 reason=max_preauth_per_peer")
        # Another source address has its own allowance (all of 127/8 is loopback on Linux).
        assert not is_busy(port, source="127.0.0.2")


# --------------------------------------------------------------------------- signals


def test_sigterm_lets_a_transfer_finish_and_accepts_nothing_new(
        e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup) -> None:
    conf = write_config(e2e_dir, [box], idle_timeout=30)
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    big = make_file(e2e_dir, "during-sigterm.bin", 1 << 20)
    slow = sender(spawn, e2e_venv, e2e_dir, box, box.url(port), big, opts=("--bwlimit", "256KiB"))
    wait_log(e2e_dir, r"outcome=authenticated")
    os.kill(server.pid, signal.SIGTERM)  # the parent only, as systemd's KillMode=mixed would
    wait_log(e2e_dir, r"event=serve outcome=stopping")
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(STEP)
        s.connect(("127.0.0.1", port))
    assert slow.wait(STEP * 2) == 0, slow.describe()
    assert_stored(box, big)
    assert server.wait(STEP) == 0, server.describe()
    wait_log(e2e_dir, r"event=serve outcome=stopped")


def test_sighup_adds_a_box(e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup) -> None:
    conf = write_config(e2e_dir, [box])
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    vm2 = make_box(e2e_dir, "vm2")
    f = make_file(e2e_dir, "new-box.bin")
    before = sender(spawn, e2e_venv, e2e_dir, vm2, vm2.url(port), f, name="send-before")
    assert before.wait(STEP) == 3, before.describe()
    write_config(e2e_dir, [box, vm2])
    os.kill(server.pid, signal.SIGHUP)
    wait_log(e2e_dir, r"event=reload outcome=ok")
    send_ok(spawn, e2e_venv, e2e_dir, vm2, vm2.url(port), f)
    assert_stored(vm2, f)
    assert server.running()


def test_sighup_with_a_broken_config_keeps_the_old_one(
        e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup) -> None:
    conf = write_config(e2e_dir, [box])
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    good = conf.read_text()
    conf.write_text(good + "max_sessionz = 3\n[box.vm1]\n")
    os.kill(server.pid, signal.SIGHUP)
    wait_log(e2e_dir, r"event=reload outcome=refused")
    log = log_text(e2e_dir)
    assert "event=reload outcome=error" in log and str(conf) in log
    assert "outcome=ok" not in log
    f = make_file(e2e_dir, "still-served.bin")
    send_ok(spawn, e2e_venv, e2e_dir, box, box.url(port), f)
    assert_stored(box, f)
    assert server.running()


# --------------------------------------------------------------------------- sd_notify


def _notify_socket(e2e_dir: Path, service_user: ServiceUser, abstract: bool) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"rstash-e2e-notify-{secrets.token_hex(8)}"
        s.bind("\0" + name)
        return s, "@" + name
    path = e2e_dir / "notify.sock"
    s.bind(str(path))
    service_user.chown(path)
    return s, str(path)


def _messages(s: socket.socket, until: str, timeout: float = STEP) -> list[str]:
    """Datagrams received until one contains the line ``until``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {until!r} from sd_notify; got {got}")
        s.settimeout(left)
        msg = s.recv(4096).decode()
        got.append(msg)
        if until in msg.splitlines():
            return got


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_reloading_stopping(e2e_venv: Path, e2e_dir: Path, box: Box,
                                            spawn: ProcGroup, service_user: ServiceUser,
                                            abstract: bool) -> None:
    notify, address = _notify_socket(e2e_dir, service_user, abstract)
    with notify:
        conf = write_config(e2e_dir, [box])
        port = free_port()
        server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}",
                            env=service_env(NOTIFY_SOCKET=address))
        ready = _messages(notify, "READY=1")
        # READY only once listening: a connect must work at once.
        with socket.create_connection(("127.0.0.1", port), timeout=STEP):
            pass
        assert any(f"STATUS=listening on 127.0.0.1:{port}" in m for m in ready), ready
        os.kill(server.pid, signal.SIGHUP)
        reload = _messages(notify, "READY=1")
        assert "RELOADING=1" in reload[0].splitlines(), reload
        assert re.search(r"^MONOTONIC_USEC=\d+$", reload[0], re.M), reload
        os.kill(server.pid, signal.SIGTERM)
        _messages(notify, "STOPPING=1")
        assert server.wait(STEP) == 0, server.describe()


# --------------------------------------------------------------------------- systemd-socket-activate


def _socket_activate(spawn: ProcGroup, venv: Path, conf: Path, port: int, *flags: str,
                     name: str = "ssa") -> Proc:
    ssa = need_program("systemd-socket-activate")
    recv = as_service([venv_bin(venv, "rstash-recv"), "-c", str(conf)])
    return spawn([ssa, "-l", f"127.0.0.1:{port}", *flags, "-E", "LANG=C.UTF-8", "--", *recv],
                 name=unique(name))


@pytest.mark.parametrize("flags", [("--inetd",), ()], ids=["fd0-listening", "LISTEN_FDS"])
def test_socket_activate_without_accept_runs_the_accept_loop(
        e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup, flags: tuple[str, ...]) -> None:
    conf = write_config(e2e_dir, [box])
    port = free_port()
    ssa = _socket_activate(spawn, e2e_venv, conf, port, *flags)
    wait_for_port("127.0.0.1", port, proc=ssa)
    files = [make_file(e2e_dir, f"ssa-{i}.bin") for i in range(3)]
    for f in files:
        send_ok(spawn, e2e_venv, e2e_dir, box, box.url(port), f)
    assert_stored(box, *files)
    log = log_text(e2e_dir)
    # One accept loop: it started once, and exec'ed in place (setpriv keeps the pid,
    # so LISTEN_PID matched); three sessions, each in a child of its own.
    starts = re.findall(r"rstash-recv\[(\d+)\]: info event=serve outcome=listening", log)
    assert starts == [str(ssa.pid)], log
    pids = set(re.findall(r"rstash-recv\[(\d+)\]: info event=file ", log))
    assert len(pids) == 3 and str(ssa.pid) not in pids
    ssa.signal(signal.SIGTERM)
    assert ssa.wait(STEP) == 0, ssa.describe()


@pytest.mark.parametrize("flags", [("--inetd", "-a"), ("-a",)], ids=["inetd", "LISTEN_FDS"])
def test_socket_activate_accept_serves_one_session_per_process(
        e2e_venv: Path, e2e_dir: Path, box: Box, spawn: ProcGroup, flags: tuple[str, ...]) -> None:
    conf = write_config(e2e_dir, [box])
    port = free_port()
    ssa = _socket_activate(spawn, e2e_venv, conf, port, *flags)
    wait_for_port("127.0.0.1", port, proc=ssa)
    files = [make_file(e2e_dir, f"ssa-a-{i}.bin") for i in range(2)]
    for f in files:
        send_ok(spawn, e2e_venv, e2e_dir, box, box.url(port), f)
    assert_stored(box, *files)
    log = log_text(e2e_dir)
    assert "outcome=listening" not in log, log
    pids = set(re.findall(r"rstash-recv\[(\d+)\]: info event=file ", log))
    assert len(pids) == 2 and str(ssa.pid) not in pids
    # a wrong key is refused the same way in this shape
    other = make_box(e2e_dir, "other")
    wrong = Box(box.name, box.path, other.key, other.server_key, other.client_key, {})
    bad = sender(spawn, e2e_venv, e2e_dir, wrong, box.url(port), make_file(e2e_dir, "x.bin"),
                 name="send-wrong")
    assert bad.wait(STEP) == 3, bad.describe()
