"""The accept loop: listening sockets, a process per connection, limits, signals, sd_notify.

Used by ``rstash-recv --listen [HOST:]PORT``, by inetd ``wait`` (a listening
socket on fd 0) and by systemd ``Accept=no`` (``LISTEN_FDS``). The parent
process only accepts, counts, refuses and reaps; every session runs in a forked
child, which makes its own challenge and SQLite connection. The parent never
interprets a byte from a client: the only thing it ever writes to a
connection is ``421 busy``.

Theory of operation
-------------------
* **Limits** (rstash-recv(8)) are decided by rstash.admission: beyond one, a
  connection is told ``421 busy`` (from outside every ``allow_from``: nothing)
  and closed, unforked; or a silent child is ended (SIGTERM) to make room.
* **Knowing how far a child got**: each child writes one byte to a pipe when
  its peer's whole HELLO is in and one right after its ``235``; the parent
  polls the read ends. A timer ("pre-auth until preauth_timeout has passed") would be a
  correct upper bound without the pipe, but it would throttle honest clients
  to ``max_preauth_per_peer`` connections per ``preauth_timeout`` from one
  host: 20 parallel senders would mostly be told ``421``.
* **Signals** only set flags; ``signal.set_wakeup_fd`` wakes ``poll()`` at
  once, and ``poll()`` also times out every second as a safety net. Children
  are reaped with ``waitpid(WNOHANG)`` after every wake-up.
* **SIGTERM / SIGINT**: close the listeners (the kernel refuses new
  connections from then on), let sessions finish for at most
  ``idle_timeout + preauth_timeout`` seconds, then SIGTERM what is left
  (SIGKILL 5 s later); exit 0. A second SIGTERM/SIGINT ends the sessions at once.
* **SIGHUP**: re-read and validate the configuration; on error every problem
  is logged and the old configuration stays. Running sessions keep the
  configuration they started with; new children get the new one.
* **accept() failing** for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM,
  ECONNABORTED): wait 100 ms before accepting again; logged at most once a
  minute, so that a flood cannot flood the log.
This module must never write anything but ``421 busy`` to a connection from the
parent, and never run a session in the parent process.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from . import wire
from .admission import Slot, Stage, allowed_networks, decide, peer_group
from .config import Config, load_config
from .errors import ConfigError, Exit, Outcome
from .listen import ListenError, adopt_fd, bind_listen, monotonic_usec, sd_notify, sock_name
from .log import Logger, server_logger
from .session import run_session
from .transport import peer_address

__all__ = ["Server", "run"]

#: poll() never sleeps longer than this, so a lost wake-up costs at most this long.
POLL_INTERVAL = 1.0
#: Pause after an accept() failure for lack of resources (rstash-recv(8)).
ACCEPT_BACKOFF = 0.1
#: accept() errors are logged at most this often.
ACCEPT_LOG_INTERVAL = 60.0
#: After the shutdown grace period, SIGTERM; this long after that, SIGKILL.
KILL_AFTER = 5.0
#: Connections accepted per listener per wake-up, so that one busy listener cannot starve the rest.
ACCEPT_BATCH = 32
#: The bytes a child writes to its pipe: a whole HELLO is in; its ``235`` is out.
_HELLO, _AUTHENTICATED, _DONE = b"H", b"A", b"D"


@dataclass
class _Child(Slot):
    peer: str | None = None
    pipe: int | None = None  # read end; None once closed


@dataclass
class _Stats:
    busy: int = 0
    sessions: int = 0
    accept_errors: int = 0
    last_accept_log: float = field(default=-ACCEPT_LOG_INTERVAL * 2)


# --------------------------------------------------------------------------- the server


class Server:
    """The accept loop's parent process."""

    def __init__(self, config_path: str, cfg: Config, log: Logger, *,
                 boxes: frozenset[str] | None = None, debug: bool = False) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self._networks = allowed_networks(cfg, boxes)
        self.log = log
        self.boxes = boxes
        self.debug = debug
        self.listeners: list[socket.socket] = []
        self.children: dict[int, _Child] = {}
        self.stats = _Stats()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = 0  # number of SIGTERM/SIGINT received
        self._reload = False
        self._old_wakeup = -1
        self._paused_until = 0.0

    # -- set-up --

    def add_listeners(self, listen: Sequence[str], fds: Sequence[int]) -> None:
        try:
            for fd in fds:
                self.listeners.append(adopt_fd(fd))
            for spec in listen:
                self.listeners.extend(bind_listen(spec))
        except BaseException:
            self.close_listeners()
            raise

    def close_listeners(self) -> None:
        for s in self.listeners:
            s.close()
        self.listeners = []

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop += 1
        elif signum == signal.SIGHUP:
            self._reload = True
        # SIGCHLD: the wake-up byte is all we need; reaping happens in the loop.

    def _install_signals(self) -> None:
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    # -- main loop --

    def serve(self) -> int:
        self._install_signals()
        addresses = " ".join(sock_name(s) for s in self.listeners)
        self.log.info(event="serve", outcome="listening", detail=addresses,
                      reason=f"max_sessions={self.cfg.max_sessions}")
        sd_notify(f"READY=1\nSTATUS=listening on {addresses}\nMAINPID={os.getpid()}")
        while not self._stop:
            self._poll_once()
            self._reap()
            if self._reload and not self._stop:
                self._reload = False
                self.reload()
        return self._shutdown()

    def _poll_once(self) -> None:
        now = time.monotonic()
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        timeout = POLL_INTERVAL
        listening = now >= self._paused_until
        if listening:
            for s in self.listeners:
                poller.register(s.fileno(), select.POLLIN)
        else:
            timeout = min(timeout, self._paused_until - now)
        pipes: dict[int, _Child] = {}
        for child in self.children.values():
            if child.pipe is not None:
                pipes[child.pipe] = child
                poller.register(child.pipe, select.POLLIN)
        try:
            events = poller.poll(max(0.0, timeout) * 1000)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            return
        by_fd = {s.fileno(): s for s in self.listeners} if listening else {}
        for fd, _ev in events:
            if fd == self._wake_r:
                self._drain_wakeup()
            elif fd in pipes:
                self._read_child_pipe(pipes[fd])
        for fd, _ev in events:
            if fd in by_fd and not self._stop:
                self._accept_from(by_fd[fd])

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _read_child_pipe(self, child: _Child) -> None:
        assert child.pipe is not None
        try:
            data = os.read(child.pipe, 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if _HELLO in data and child.stage is Stage.SILENT:
            child.stage = Stage.HELLO
        if _AUTHENTICATED in data:
            child.stage = Stage.AUTHENTICATED
        elif _DONE in data:
            child.stage = Stage.DONE
        if not data or child.stage in (Stage.AUTHENTICATED, Stage.DONE):
            os.close(child.pipe)
            child.pipe = None

    # -- accepting --

    def _accept_from(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._accept_failed(e)
                return
            self._handle(conn, addr)

    def _accept_failed(self, e: OSError) -> None:
        self.stats.accept_errors += 1
        now = time.monotonic()
        # EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED and anything else: a short pause
        # rather than a busy loop while the condition lasts.
        self._paused_until = now + ACCEPT_BACKOFF
        if now - self.stats.last_accept_log >= ACCEPT_LOG_INTERVAL:
            self.stats.last_accept_log = now
            self.log.error(event="accept", outcome="error", detail=f"accept failed: {e.strerror}",
                           reason=f"{self.stats.accept_errors} failures so far; pausing "
                                  f"{ACCEPT_BACKOFF:g} s after each, logged once a minute")

    def _handle(self, conn: socket.socket, addr: Any) -> None:
        peer = peer_address(conn.fileno())
        for child in list(self.children.values()):  # the latest word from every child first
            if child.pipe is not None and child.stage in (Stage.SILENT, Stage.HELLO):
                self._read_child_pipe(child)
        cfg = self.cfg
        verdict = decide(self.children.values(), peer, time.monotonic(),
                         max_sessions=cfg.max_sessions, networks=self._networks,
                         max_preauth_per_peer=cfg.max_preauth_per_peer)
        if not verdict.admit:
            self._refuse(conn, peer, verdict.reason or "busy", busy=verdict.busy)
            return
        if isinstance(verdict.evict, _Child):
            self._evict(verdict.evict)
        try:
            self._fork(conn, peer)
        except OSError as e:
            self._refuse(conn, peer, f"fork failed: {e.strerror}")

    def _evict(self, child: _Child) -> None:
        """End a silent or lingering child to make room (rstash.admission)."""
        child.evicted = True
        if child.stage is not Stage.DONE:  # a lingering one has logged its own outcome
            self.log.warning(event="session", peer=child.peer or "unknown", outcome="silent", reason="evicted",
                             detail=f"pid {child.pid} silent {time.monotonic() - child.started:.1f} s "
                                    "while the pre-auth share was full")
        try:
            os.kill(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _refuse(self, conn: socket.socket, peer: str | None, reason: str, busy: bool = True) -> None:
        """``421 busy`` (or nothing) and close, without blocking: a fresh socket's send buffer has room."""
        self.stats.busy += busy
        self.log.warning(event="session", peer=peer or "unknown",
                         outcome=Outcome.BUSY.log if busy else "refused",
                         code=Outcome.BUSY.code if busy else None, reason=reason)
        try:
            conn.setblocking(False)
            if busy:
                conn.send(wire.line(Outcome.BUSY.line))
            conn.shutdown(socket.SHUT_WR)
            # Unread bytes at close() turn the FIN into a RST, which may destroy the
            # 421 line before the client reads it: take what has already arrived.
            conn.recv(65536)
        except OSError:
            pass
        finally:
            conn.close()

    def _fork(self, conn: socket.socket, peer: str | None) -> None:
        pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
        cfg = self.cfg
        try:
            pid = os.fork()
        except OSError:
            os.close(pipe_r)
            os.close(pipe_w)
            raise
        if pid == 0:  # pragma: no cover - the child; covered by the e2e tests
            status: int = Exit.LOCAL
            try:
                os.close(pipe_r)
                status = self._child(conn, peer, cfg, pipe_w)
            finally:
                os._exit(status)
        os.close(pipe_w)
        conn.close()
        os.set_blocking(pipe_r, False)
        self.children[pid] = _Child(pid, peer_group(peer), time.monotonic(), peer=peer, pipe=pipe_r)
        self.stats.sessions += 1
        self.log.debug(event="session", peer=peer, outcome="forked", detail=f"pid {pid}")

    def _child(self, conn: socket.socket, peer: str | None, cfg: Config, pipe_w: int) -> int:
        """In the forked child: drop the parent's state, run one session, return its status."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The terminal's Ctrl-C and a reload are for the parent: a session runs to its end.
        # A Python handler (not SIG_IGN) so that hooks exec'ed later start with the default.
        signal.signal(signal.SIGINT, _ignore)
        signal.signal(signal.SIGHUP, _ignore)
        for s in self.listeners:
            s.close()
        for c in self.children.values():
            if c.pipe is not None:
                os.close(c.pipe)
        os.close(self._wake_r)
        os.close(self._wake_w)

        def tell(stage: str) -> None:
            with contextlib.suppress(OSError):
                os.write(pipe_w, {"hello": _HELLO, "done": _DONE}.get(stage, _AUTHENTICATED))

        return run_session(cfg, self.log, conn.fileno(), peer=peer, boxes=self.boxes, on_stage=tell)

    # -- children --

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.pipe is not None:
                # The byte may still be in the pipe; it no longer matters.
                os.close(child.pipe)
            code = os.waitstatus_to_exitcode(status)
            if code < 0 and not child.evicted:
                self.log.warning(event="session", peer=child.peer, outcome="killed",
                                 detail=f"pid {pid} killed by signal {-code}")
            else:
                self.log.debug(event="session", peer=child.peer, outcome="exited",
                               detail=f"pid {pid} exit {code}")

    def _signal_children(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # -- reload and stop --

    def reload(self) -> bool:
        """Re-read and validate the configuration; keep the old one on any error."""
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
        try:
            try:
                new = load_config(self.config_path)
            except ConfigError as e:
                for problem in e.problems:
                    self.log.error(event="reload", outcome="error", detail=problem)
                self.log.error(event="reload", outcome="refused",
                               detail="configuration not reloaded; the old one stays in force")
                return False
            except Exception as e:  # a reload must never stop the server
                self.log.error(event="reload", outcome="refused",
                               detail=f"{type(e).__name__}: {e}; the old configuration stays in force")
                return False
            if not self.debug:
                self.log = server_logger(new)
            self.cfg = new
            self._networks = allowed_networks(new, self.boxes)
            for warning in new.warnings:
                self.log.warning(event="reload", outcome="warning", detail=warning)
            self.log.info(event="reload", outcome="ok", detail=f"{len(new.boxes)} boxes",
                          reason=f"max_sessions={new.max_sessions}")
            return True
        finally:
            sd_notify("READY=1")

    def _shutdown(self) -> int:
        sd_notify("STOPPING=1")
        self.close_listeners()
        grace = self.cfg.idle_timeout + self.cfg.preauth_timeout
        self.log.info(event="serve", outcome="stopping",
                      detail=f"{len(self.children)} sessions running; waiting up to {grace:g} s")
        deadline = time.monotonic() + grace
        terminated = False
        signalled = self._stop
        while self.children:
            now = time.monotonic()
            if not terminated and (now >= deadline or self._stop > signalled):
                self.log.warning(event="serve", outcome="terminating",
                                 detail=f"ending {len(self.children)} sessions")
                self._signal_children(signal.SIGTERM)
                terminated = True
                deadline = now + KILL_AFTER
            elif terminated and now >= deadline:
                self._signal_children(signal.SIGKILL)
                deadline = now + KILL_AFTER
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            poller.poll(max(0.0, min(POLL_INTERVAL, deadline - now)) * 1000)
            self._drain_wakeup()
            self._reap()
        self.log.info(event="serve", outcome="stopped",
                      detail=f"{self.stats.sessions} sessions, {self.stats.busy} refused busy")
        self._close()
        return Exit.OK

    def _close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    pass


def run(config_path: str, cfg: Config, log: Logger, *, listen: Sequence[str] = (),
        fds: Sequence[int] = (), boxes: frozenset[str] | None = None, debug: bool = False) -> int:
    """The accept loop on ``--listen`` addresses and inherited listening fds; returns the exit status."""
    server = Server(config_path, cfg, log, boxes=boxes, debug=debug)
    try:
        server.add_listeners(listen, fds)
    except ListenError as e:
        if log.target != "stderr":  # recv.main prints it on stderr too
            log.error(event="serve", outcome="error", detail=e.message)
        raise
    if not server.listeners:
        raise ListenError("nothing to listen on")
    return server.serve()
