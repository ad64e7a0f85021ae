"""min_free across boxes: every box on one file system shares its free space.

min_free is about the file system, not a directory: two boxes on one file
system, each checking only its own temps, can each see room for one more
upload and together leave less than min_free. This module owns the other
boxes a store must look at: the ones on the same device (``st_dev``) as its
own box, opened once by :func:`rstash.boxpath.open_box_dir`, whose temps' outstanding
reservations count against this box's min_free too, and the order in which
every process locks them (by inode number), so that the check and the
reservation stay atomic across boxes without deadlock.

It must never write, create or remove anything in another box: it only
scans their temps' names and sizes and takes their directory locks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from rstash.boxpath import open_box_dir
from rstash.errors import RstashError, StoreError


class FsReservations:
    """The other boxes on one box's file system."""

    def __init__(self, dir_fd: int, siblings: Iterable[str | os.PathLike[str]]) -> None:
        own = os.fstat(dir_fd)
        #: (st_ino, fd) of every other box directory on the same device
        self.others: list[tuple[int, int]] = []
        self._own_ino = own.st_ino
        for path in siblings:
            try:
                # The rules of the box's own path: a directory someone else could
                # swap in must not be able to hold our locks.
                fd = open_box_dir(os.fspath(path))
            except StoreError:
                continue  # a box we would not serve reserves nothing; --check-config says why
            st = os.fstat(fd)
            if st.st_dev != own.st_dev or st.st_ino == own.st_ino or any(
                    st.st_ino == ino for ino, _fd in self.others):
                os.close(fd)
                continue
            self.others.append((st.st_ino, fd))

    def lock_order(self, own_fd: int) -> list[int]:
        """Every box directory of the file system, this one included, in locking order."""
        return [fd for _ino, fd in sorted([*self.others, (self._own_ino, own_fd)])]

    def reserved_elsewhere(self) -> int:
        """Outstanding reservations of the other boxes (their locks held by the caller)."""
        from rstash.store import scan_usage

        total = 0
        for _ino, fd in self.others:
            try:
                total += scan_usage(fd)[1]
            except (RstashError, OSError):
                continue  # a box we cannot scan cannot be reserving through us either
        return total

    def close(self) -> None:
        others, self.others = self.others, []
        for _ino, fd in others:
            os.close(fd)
