"""Reaching a server: a TCP connection, a ``--proxy-command``, or a spawned ssh,
each as one :class:`Connection` (a byte stream and what it takes to close it).

Knows nothing of frames or replies. ssh's standard error passes through to ours;
its last line is kept to explain a failure before the first protocol byte.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import DEFAULT_PORT
from ..errors import TransportError
from ..transport import FdStream, widen_pipe
from .destinations import Dest, ssh_argv
from .options import Options

if TYPE_CHECKING:
    import subprocess
    import threading


class Connection:
    """A bidirectional byte stream to a server and what it takes to close it."""

    def __init__(self, stream: FdStream, closers: list[Callable[[], None]],
                 proc: subprocess.Popen[bytes] | None = None,
                 stderr_tail: list[str] | None = None,
                 stderr_pump: threading.Thread | None = None) -> None:
        self.stream = stream
        self.closers = closers
        self.proc = proc
        self.stderr_tail = stderr_tail if stderr_tail is not None else []
        self.stderr_pump = stderr_pump
        #: ends our sending direction only (after BYE: rstash(7) "Closing the connection")
        self.half_closer: Callable[[], None] | None = None
        #: an SSH channel we opened ourselves (ssh://): the only stream that may carry
        #: method ssh, whose lines have no MAC (rstash(7) CONSTRUCTION 11)
        self.over_ssh = False

    def half_close(self) -> None:
        """Tell the server we send nothing more, and keep reading."""
        if self.half_closer is not None:
            try:
                self.half_closer()
            except OSError:
                pass

    def last_stderr_line(self, timeout: float = 5.0) -> str | None:
        """ssh's last stderr line, read after ssh exited and its stderr reached EOF.

        Without the wait, the stdout EOF often wins the race against the thread that
        copies stderr, and the reason ssh printed would be lost.
        """
        if self.proc is not None and self.stderr_pump is not None:
            import subprocess

            deadline = time.monotonic() + timeout
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:  # still running: it did not fail (yet), nothing to quote
                return None
            self.stderr_pump.join(max(0.0, deadline - time.monotonic()))
        return self.stderr_tail[-1] if self.stderr_tail else None

    def close(self) -> None:
        for c in self.closers:
            try:
                c()
            except OSError:
                pass
        if self.proc is not None:
            import subprocess

            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(argv: list[str], *, keep_stderr: bool = False) -> Connection:
    """Run ``argv`` with its stdin and stdout as the stream; with ``keep_stderr`` its
    stderr is copied to ours and the last line kept."""
    # Only here: a plain rstash:// transfer needs neither (milliseconds at start-up).
    import subprocess
    import threading

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if keep_stderr else None, close_fds=True)
    except OSError as e:
        raise TransportError(f"{argv[0]}: {e.strerror}") from None
    assert proc.stdin is not None and proc.stdout is not None
    tail: list[str] = []
    pump_thread = None
    if keep_stderr:
        assert proc.stderr is not None
        err = proc.stderr

        def pump() -> None:
            for raw in iter(err.readline, b""):
                sys.stderr.buffer.write(raw)
                sys.stderr.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    tail[:] = [line]

        pump_thread = threading.Thread(target=pump, daemon=True)
        pump_thread.start()
    widen_pipe(proc.stdin.fileno())
    widen_pipe(proc.stdout.fileno())
    stream = FdStream(proc.stdout.fileno(), proc.stdin.fileno())
    conn = Connection(stream, [proc.stdin.close, proc.stdout.close], proc, tail, pump_thread)
    conn.half_closer = proc.stdin.close  # ssh sends EOF on the channel
    return conn


def connect(dest: Dest, opts: Options) -> Connection:
    if dest.scheme == "ssh":
        rsh = opts.rsh or os.environ.get("RSTASH_RSH") or "ssh"
        conn = spawn(ssh_argv(rsh, dest, opts.remote_path, opts.subsystem), keep_stderr=True)
        conn.over_ssh = True
        return conn
    port = dest.port or DEFAULT_PORT
    if opts.proxy_command:
        cmd = opts.proxy_command.replace("%h", dest.host).replace("%p", str(port)).replace("%%", "%")
        return spawn(["/bin/sh", "-c", f"exec {cmd}"])
    import socket

    try:
        sock = socket.create_connection((dest.host, port), timeout=opts.connect_timeout)
    except TimeoutError:
        raise TransportError(f"{dest.host} port {port}: connect timed out") from None
    except OSError as e:
        raise TransportError(f"{dest.host} port {port}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(FdStream(sock.fileno()), [sock.close])
    conn.half_closer = lambda: sock.shutdown(socket.SHUT_WR)
    return conn
