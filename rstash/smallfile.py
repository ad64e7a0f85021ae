"""Small owner-only files written whole or not at all, and prefix hashes.

Partial-upload records and the configuration snapshot are both small files
that a reader must find complete or absent: written to a temporary name in
the same directory, fsynced, renamed over the final name, and the directory
fsynced. This module owns that sequence and the SHA-256 of a file's first
bytes (the check both ends of a resume make).

It must never leave a temporary file behind on failure, never create a file
any other user can read, and never follow a link at the temporary name.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_private(dir_fd: int, name: str, data: bytes, tmp: str) -> None:
    """Put ``data`` at ``name`` in ``dir_fd`` (mode 0600) through ``tmp``; OSError on failure."""
    try:
        fd = os.open(tmp, _CREATE, 0o600, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def sha256_prefix(fd: int, n: int, chunk: int) -> Any:
    """SHA-256 state of the first ``n`` bytes of ``fd`` read ``chunk`` at a time,
    or None when it is shorter."""
    h = hashlib.sha256()
    pos = 0
    while pos < n:
        got = os.pread(fd, min(chunk, n - pos), pos)
        if not got:
            return None
        h.update(got)
        pos += len(got)
    return h
