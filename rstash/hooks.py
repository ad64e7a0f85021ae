"""on_receive hooks: run after a file is stored and its 250 line is sent.

The stored file reaches a hook as an open read-only descriptor (its number in
``RSTASH_FD``), which names the verified inode whatever happens to the box
afterwards; ``{path}`` and ``RSTASH_PATH`` are given only after checking,
relative to the box's directory descriptor and without following a symlink,
that the name still holds that inode: in a box others may write, a name
swapped for a symlink (to the box key, say) must not reach an archiving hook.
When it does not, the hook is skipped with a log line.

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
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .log import Logger

if TYPE_CHECKING:
    from .config import BoxConfig
    from .upload import Upload
    from .wire import End

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
    #: a read-only descriptor of the stored file, owned (closed) by the hook runner
    fd: int | None = None
    #: (st_dev, st_ino) of the stored file and the box directory descriptor it is in
    identity: tuple[int, int] | None = None
    dir_fd: int | None = None

    @classmethod
    def of_upload(cls, box: BoxConfig, upload: Upload, requested: str, end: End,
                  client_mtime: int) -> Delivery:
        """The delivery of a committed upload: its name, descriptor and inode."""
        final = upload.final_name or requested
        return cls(box=box.name, name=final, requested_name=requested, path=str(box.path / final),
                   size=end.n, sha256=end.sha256.hex(), client_mtime=client_mtime,
                   fd=upload.reader_fd, identity=upload.identity, dir_fd=upload.store.dir_fd)

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


def still_stored(d: Delivery) -> bool:
    """Whether the stored name still holds the stored inode (never following a symlink)."""
    if d.identity is None or d.dir_fd is None:
        return True  # nothing to compare with (a caller outside a session)
    try:
        st = os.stat(d.name, dir_fd=d.dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == d.identity


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
        **({"RSTASH_FD": str(d.fd)} if d.fd is not None else {}),
    }


def run_hook(template: tuple[str, ...] | list[str], d: Delivery, timeout: float,
             log: Logger) -> int | None:
    """Run one hook to completion (or its kill); returns its exit status. Closes ``d.fd``."""
    try:
        return _run_hook(template, d, timeout, log)
    finally:
        d.close()


def _run_hook(template: tuple[str, ...] | list[str], d: Delivery, timeout: float,
              log: Logger) -> int | None:
    if not still_stored(d):
        log.warning(event="hook", box=d.box, name=d.name, outcome="skipped",
                    detail="the stored name no longer holds the stored file")
        return None
    argv = hook_argv(template, d)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=hook_env(d), close_fds=True, start_new_session=True, cwd="/",
            pass_fds=() if d.fd is None else (d.fd,))
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
            d.close()
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
