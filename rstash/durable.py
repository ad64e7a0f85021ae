"""syncfs(2) for a batch of files: one flush of the box's file system instead of one per file.

A client that pipelines many small files gets them committed as one batch
(rstash-recv(8), DURABILITY). Each file's own fsync() waits for a journal
commit of its own; one syncfs() on the box directory writes back every
temporary file of the batch and commits once. This module owns that call and
the rule for trusting it: syncfs() reports writeback errors only since Linux
5.8 (before, it returned 0 whatever happened), so elsewhere the answer is
"not available" and the caller fsyncs each file as for a single file.

It must never report success it cannot prove, never be used for a single
file (fsync() of that file is cheaper and touches no one else's data), and
never import anything heavier than ctypes, and that only when first used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

#: The first Linux whose syncfs() returns writeback errors (errseq per super block).
SYNCFS_REPORTS_ERRORS = (5, 8)

_syncfs: Callable[[int], int] | None = None


def kernel_reports_errors(release: str | None = None) -> bool:
    """Whether this kernel's syncfs() reports writeback errors (Linux >= 5.8)."""
    if release is None:
        if os.uname().sysname != "Linux":
            return False
        release = os.uname().release
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= SYNCFS_REPORTS_ERRORS


def _load() -> Callable[[int], int] | None:
    global _syncfs
    if _syncfs is None and kernel_reports_errors():
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            return None
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int

        def call(fd: int) -> int:
            if fn(fd) == 0:
                return 0
            return ctypes.get_errno() or -1

        _syncfs = call
    return _syncfs


def syncfs(fd: int) -> bool:
    """Write back and commit the whole file system holding ``fd``.

    True: every dirty page and inode of it is on disk, with no writeback error
    since ``fd`` was opened. False: not available, or it reported an error —
    the caller must then fsync each file, whose own fsync() tells which one failed.
    """
    call = _load()
    return call is not None and call(fd) == 0
