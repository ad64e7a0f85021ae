"""Locks that hold across every receiver sharing a box: OFD locks on regular files.

This module owns the two locks rstash takes on a box: the **box lock**, which
serialises reservation scans and the claim of final names — where another host
may mount the box (:func:`rstash.statedir.may_be_shared`) an exclusive
open-file-description lock (``F_OFD_SETLKW``) on the regular file
``<box>/.rstash-lock``, on a local file system ``flock`` on the box directory
(one host: it excludes every process, and the box holds nothing but files);
and the **temp lock**, an exclusive OFD lock a session holds on its temp for
the temp's whole life, which a sweep tests with a shared lock.

OFD locks, not ``flock``: ``flock`` on a directory is node-local on GlusterFS's
FUSE client (and ``flock`` altogether on GPFS or NFS with ``local_lock=flock``),
while byte-range locks go to the bricks, the MDS or the NFS server and exclude
every client (rstash-recv(8) SCALING). OFD, not classic POSIX locks: a POSIX
lock is dropped when the process closes any descriptor of the file, and is
held per process, so two sessions of one process would share it.

It must never follow a symlink, open anything but a regular file under the
lock name, or block on a FIFO planted there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from rstash.upload import from_oserror

#: A name no client can send (names may not begin with "."); never counted, listed or swept.
LOCK_NAME = ".rstash-lock"

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)
#: O_NONBLOCK: a FIFO planted at the lock name must not hang the session.
_OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: What a lock or open fails with when the shared volume is gone or read-only.
UNAVAILABLE = frozenset({errno.ESTALE, errno.ENOTCONN, errno.EROFS, errno.EIO})


def _flock(kind: int) -> bytes:
    # struct flock: l_type, l_whence, l_start, l_len (0: to the end), l_pid (0 for OFD locks)
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


def open_lock_file(dir_fd: int) -> int:
    """The box's lock file, created 0600 when missing; a regular file or OSError."""
    try:
        fd = os.open(LOCK_NAME, _OPEN | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        fd = os.open(LOCK_NAME, _OPEN, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{LOCK_NAME} is not a regular file")
    return fd


def lock(fd: int) -> None:
    """Wait for the exclusive lock on ``fd`` (a descriptor open for writing)."""
    while True:
        try:
            fcntl.fcntl(fd, _F_OFD_SETLKW, _flock(fcntl.F_WRLCK))
            return
        except InterruptedError:
            continue


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take the lock without waiting; False when another description holds a conflicting one."""
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _flock(fcntl.F_RDLCK if shared else fcntl.F_WRLCK))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _flock(fcntl.F_UNLCK))


class BoxLock:
    """The box lock of one or more boxes (:mod:`rstash.boxlock`): serialises limit checks,
    reservations and the claim of final names across every session of every receiver."""

    def __init__(self, fds: list[int], *, ofd: bool) -> None:
        #: lock files (ofd) or box directories (flock), in locking order
        self.fds = fds
        self.ofd = ofd
        self.held: list[int] = []

    def __enter__(self) -> None:
        try:
            for fd in self.fds:
                if self.ofd:
                    lock(fd)
                else:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                self.held.append(fd)
        except OSError as exc:
            self._release()
            raise from_oserror("lock box", exc) from exc

    def _release(self) -> None:
        for fd in reversed(self.held):
            try:
                if self.ofd:
                    unlock(fd)
                else:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass  # a lost lock is the lease's business; never mask the first error
        self.held = []

    def __exit__(self, *exc_info: object) -> None:
        self._release()
