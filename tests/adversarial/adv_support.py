"""Helpers of the adversarial suite: counts, figures, and the real rstash-recv on loopback.

* **Counts.** :func:`count` scales a test's full count by ``RSTASH_ADV_SCALE`` (default 1, the
  count CI runs); a local run may say ``RSTASH_ADV_SCALE=0.1``. A scaled count never drops below
  a floor, so every class of case still runs.
* **Figures.** :func:`record` appends one JSON line per test to ``$RSTASH_ADV_FIGURES`` when set;
  bench/adversarial.py sums them into the summary lines. Without the variable nothing is written.
* **The server.** :class:`Site` starts the installed rstash-recv as the service user: one session
  on pipes (:meth:`Site.piped`), inetd ``nowait`` on a loopback port (:meth:`Site.inetd`, via
  systemd-socket-activate) or standalone (:meth:`Site.listen`); and the real rstash-send.

Everything is bounded in time; every process is killed at teardown. This module must never
listen on anything but loopback, and never import the wire protocol except through adv_wire.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adversarial.adv_wire import wire
from e2e_support import (
    Box,
    Proc,
    ProcGroup,
    ServiceUser,
    as_service,
    free_port,
    need_program,
    service_env,
    venv_bin,
    wait_for_port,
    write_config,
)
from rstash import auth

TEMP_PREFIX = ".rstash-tmp-"


# --------------------------------------------------------------------------- counts, figures


def scale() -> float:
    try:
        value = float(os.environ.get("RSTASH_ADV_SCALE", "1"))
    except ValueError:
        value = 1.0
    return min(1.0, max(0.001, value))


def count(full: int, floor: int = 1) -> int:
    """``full`` (what CI runs) times RSTASH_ADV_SCALE, at least ``floor``."""
    return max(floor, round(full * scale()))


def record(figure: str, **numbers: int | str) -> None:
    """Add one test's numbers to the summary of ``figure`` (names, fuzz, mitm, ...)."""
    path = os.environ.get("RSTASH_ADV_FIGURES")
    if not path:
        return
    line = json.dumps({"figure": figure, **numbers}, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- bounded byte I/O


class Pipe:
    """Bytes to and lines from one peer over fds, every wait bounded."""

    def __init__(self, rfd: int, wfd: int, shut: Any = None) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._shut = shut
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes, timeout: float = 10.0) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = os.write(self.wfd, view)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the peer stopped reading") from None
                p = select.poll()
                p.register(self.wfd, select.POLLOUT)
                p.poll(left * 1000)
                continue
            view = view[n:]

    def close_write(self) -> None:
        if self._shut is not None:
            with contextlib.suppress(OSError):
                self._shut()

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing in time; have {bytes(self.buf)[-300:]!r}")
        p = select.poll()
        p.register(self.rfd, select.POLLIN)
        if not p.poll(left * 1000):
            raise TimeoutError(f"nothing in time; have {bytes(self.buf)[-300:]!r}")
        try:
            data = os.read(self.rfd, 65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if data:
            self.buf += data
        else:
            self.eof = True

    def line(self, timeout: float = 10.0) -> bytes:
        """The next line with its line end; b"" at end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                out = bytes(self.buf[:nl + 1])
                del self.buf[:nl + 1]
                return out
            if self.eof:
                out = bytes(self.buf)
                self.buf.clear()
                return out
            self._fill(deadline)

    def rest(self, timeout: float = 15.0) -> bytes:
        """Everything until the peer closes."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._fill(deadline)
        out = bytes(self.buf)
        self.buf.clear()
        return out


def client(key: bytes, box: str, *, pipe: bool = False) -> Any:
    """A wire.ClientConnection for ``box`` proved with ``key``."""
    return wire.ClientConnection(auth.Key(key, "adv"), box, pipe=pipe)


def greet(p: Pipe, key: bytes, box: str, t: int | None = None) -> Any:
    """Read the greeting, send a HELLO; returns the client connection (reply not read)."""
    conn = client(key, box)
    g = p.line()
    assert g.startswith(b"220 rstash/1 "), g
    conn.receive_data(g)
    assert isinstance(conn.next_event(), wire.Greeting)
    p.send(conn.hello(secrets.token_bytes(32), int(time.time()) if t is None else t))
    return conn


def event(p: Pipe, conn: Any, timeout: float = 10.0) -> Any:
    """The client protocol's verdict on the server's next line."""
    raw = p.line(timeout)
    conn.receive_data(raw)
    if not raw:
        conn.receive_data(b"")
    ev = conn.next_event()
    assert ev is not wire.NEED_DATA, raw
    return ev


def login(p: Pipe, key: bytes, box: str) -> Any:
    conn = greet(p, key, box)
    ev = event(p, conn)
    assert isinstance(ev, wire.AuthOk), ev
    return conn


def file_frames(conn: wire.ClientConnection, name: bytes, content: bytes, mtime: int = 1_700_000_000) -> bytes:
    return conn.file(name, len(content), mtime) + (conn.data(content) if content else b"") \
        + conn.end()


# --------------------------------------------------------------------------- the server


@dataclass
class Served:
    """One rstash-recv serving one session on pipes."""

    popen: subprocess.Popen[bytes]
    pipe: Pipe
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            raise TimeoutError(f"rstash-recv still running after {timeout} s; killed\n"
                               f"{self.stderr()}") from None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@dataclass
class Site:
    dir: Path
    venv: Path
    spawn: ProcGroup
    user: ServiceUser
    served: list[Served] = field(default_factory=list)

    @property
    def recv(self) -> str:
        return venv_bin(self.venv, "rstash-recv")

    @property
    def send_bin(self) -> str:
        return venv_bin(self.venv, "rstash-send")

    @property
    def log_path(self) -> Path:
        return self.dir / "rstash-recv.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def config(self, boxes: Sequence[Box], **top: Any) -> Path:
        return write_config(self.dir, boxes, **top)

    def src(self, name: str, content: bytes) -> Path:
        d = self.dir / "src"
        d.mkdir(mode=0o755, exist_ok=True)
        path = d / name
        path.write_bytes(content)
        return path

    def piped(self, conf: Path, *extra: str) -> Served:
        argv = as_service([self.recv, "-c", str(conf), *extra])
        err_path = self.dir / f"recv-piped.{len(self.served) + 1}.err"
        with open(err_path, "wb") as err:
            popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err, env=service_env(), start_new_session=True)
        assert popen.stdin is not None and popen.stdout is not None
        served = Served(popen, Pipe(popen.stdout.fileno(), popen.stdin.fileno(),
                                    shut=popen.stdin.close), err_path)
        self.served.append(served)
        return served

    def on_socket(self, conf: Path, sock: socket.socket, *extra: str) -> Served:
        """rstash-recv with fds 0 and 1 on ``sock`` (the caller keeps the other end)."""
        err_path = self.dir / f"recv-socket.{len(self.served) + 1}.err"
        with open(err_path, "wb") as err:
            popen = subprocess.Popen(as_service([self.recv, "-c", str(conf), *extra]),
                                     stdin=sock.fileno(), stdout=sock.fileno(), stderr=err,
                                     env=service_env(), start_new_session=True)
        r, w = os.pipe()  # the Pipe is unused: the caller talks on its own socket end
        os.close(w)
        served = Served(popen, Pipe(r, os.dup(r)), err_path)
        self.served.append(served)
        return served

    def inetd(self, conf: Path, *extra: str, host: str = "127.0.0.1") -> int:
        """A loopback port where every connection gets its own rstash-recv (inetd nowait)."""
        ssa = need_program("systemd-socket-activate")
        port = free_port(host)
        proc = self.spawn([ssa, "-a", "--inetd", "-l", f"{host}:{port}",
                           *as_service([self.recv, "-c", str(conf), *extra])],
                          name="socket-activate", env=service_env())
        wait_for_port(host, port, timeout=10, proc=proc)
        return port

    def listen(self, conf: Path, *extra: str, host: str = "127.0.0.1") -> tuple[int, Proc]:
        """rstash-recv --listen on a loopback port."""
        port = free_port(host)
        proc = self.spawn(as_service([self.recv, "-c", str(conf), "--listen",
                                      f"{host}:{port}", *extra]),
                          name="rstash-recv-listen", env=service_env())
        wait_for_port(host, port, timeout=15, proc=proc)
        return port, proc

    def send(self, box: Box, port: int, *files: Path, args: Sequence[str] = (),
             name: str = "rstash-send", host: str = "127.0.0.1") -> Proc:
        return self.spawn([self.send_bin, "-k", str(box.client_key), "--no-progress",
                           "--timeout", "30", *args, box.url(port, host), *map(str, files)],
                          name=name)

    def close(self) -> None:
        for s in self.served:
            s.kill()
            for f in (s.popen.stdin, s.popen.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()


def temps(path: Path) -> list[str]:
    return [n for n in os.listdir(path) if n.startswith(TEMP_PREFIX)]


def tree(root: Path, skip: Sequence[Path] = ()) -> set[str]:
    """Every path below ``root`` (relative), except below the ``skip`` directories."""
    out: set[str] = set()
    skipped = {os.fspath(s) for s in skip}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(dirpath, d) not in skipped]
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out
