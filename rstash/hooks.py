"""on_receive hooks: run after a file is stored and its 250 line is sent.

Only argv elements that are exactly ``{box}``, ``{name}`` or ``{path}`` are
replaced (never substrings, never a shell), so a hostile file name arrives as
one argument and nothing else. The environment is fixed, stdin is /dev/null,
output goes to the log escaped and cut, and a hook that outlives hook_timeout
gets SIGTERM to its process group, then SIGKILL 5 s later. A hook's result
never changes a reply. Hooks of one session run one at a time, in a worker
thread, so a slow hook never stalls the transfer of the next file.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from .log import Logger

OUTPUT_LIMIT = 4096
#: Hooks waiting to run in one session; beyond it a delivery's hook is skipped (logged).
MAX_QUEUED = 100
KILL_GRACE = 5.0


@dataclass(frozen=True)
class Delivery:
    box: str
    name: str
    requested_name: str
    path: str
    size: int
    sha256: str
    client_mtime: int


def hook_argv(template: tuple[str, ...] | list[str], d: Delivery) -> list[str]:
    subst = {"{box}": d.box, "{name}": d.name, "{path}": d.path}
    return [subst.get(arg, arg) for arg in template]


def hook_env(d: Delivery) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "RSTASH_BOX": d.box,
        "RSTASH_NAME": d.name,
        "RSTASH_PATH": d.path,
        "RSTASH_SIZE": str(d.size),
        "RSTASH_SHA256": d.sha256,
        "RSTASH_CLIENT_MTIME": str(d.client_mtime),
        "RSTASH_REQUESTED_NAME": d.requested_name,
    }


def run_hook(template: tuple[str, ...] | list[str], d: Delivery, timeout: float,
             log: Logger) -> int | None:
    """Run one hook to completion (or its kill); returns its exit status."""
    argv = hook_argv(template, d)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=hook_env(d), close_fds=True, start_new_session=True, cwd="/")
    except OSError as e:
        log.error(event="hook", box=d.box, name=d.name, outcome="error", detail=f"{argv[0]}: {e.strerror}")
        return None
    out = bytearray()
    killed = False

    def reader() -> None:
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read(65536), b""):  # type: ignore[union-attr]
            if len(out) < OUTPUT_LIMIT:
                out.extend(chunk[:OUTPUT_LIMIT - len(out)])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        rc: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        killed = True
        _signal_group(proc.pid, signal.SIGTERM)
        grace_ends = time.monotonic() + KILL_GRACE
        try:
            rc = proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            rc = None
        # The SIGKILL is for the whole group, not only the hook: a child that ignores
        # SIGTERM must not outlive its hook. The group id cannot be reused while any
        # member is alive, so signalling it after the leader was reaped is safe.
        while _group_alive(proc.pid) and time.monotonic() < grace_ends:
            time.sleep(0.1)
        _signal_group(proc.pid, signal.SIGKILL)
        if rc is None:
            rc = proc.wait()
    t.join(1.0)
    fields: dict[str, Any] = {"event": "hook", "box": d.box, "name": d.name, "code": rc,
                              "dur": time.monotonic() - start}
    if killed:
        fields["outcome"] = "timeout"
    else:
        fields["outcome"] = "ok" if rc == 0 else "failed"
    if out:
        fields["output"] = bytes(out)
    (log.info if rc == 0 and not killed else log.warning)(**fields)
    return rc


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HookRunner:
    """One worker per session: hooks run one at a time, in arrival order."""

    def __init__(self, timeout: float, log: Logger) -> None:
        self.timeout = timeout
        self.log = log
        self._queue: queue.Queue[tuple[tuple[str, ...], Delivery] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, template: tuple[str, ...], d: Delivery) -> None:
        # A key holder storing many small files must not queue unbounded work that
        # keeps this process (and its accept-loop slot) alive long after the session.
        if self._queue.qsize() >= MAX_QUEUED:
            self.log.warning(event="hook", box=d.box, name=d.name, outcome="skipped",
                             detail=f"more than {MAX_QUEUED} hooks queued")
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True)
            self._thread.start()
        self._queue.put((template, d))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            run_hook(item[0], item[1], self.timeout, self.log)

    def close(self) -> None:
        """Wait for queued hooks (each bounded by its timeout and the kill grace)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
