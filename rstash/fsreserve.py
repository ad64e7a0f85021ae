"""min_free across boxes: every box on one file system shares its free space.

min_free is about the file system, not a directory: two boxes on one file
system, each checking only its own temps, can each see room for one more
upload and together leave less than min_free. This module owns the other
boxes a store must look at: the ones on the same device (``st_dev``) as its
own box, opened once by :func:`rstash.boxpath.open_box_dir`, whose temps' outstanding
reservations count against this box's min_free too, and the order in which
every process locks them (by inode number), so that the check and the
reservation stay atomic across boxes without deadlock.

It must never write or remove anything in another box: it only scans their
temps' names and sizes and takes their box locks (creating the empty lock file,
``.rstash-lock``, where none exists yet).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable

from rstash.boxlock import LOCK_NAME
from rstash.boxpath import open_box_dir
from rstash.errors import RstashError, StoreError
from rstash.partials import usage as partials_usage
from rstash.upload import UNKNOWN_RESERVE, from_oserror

TEMP_PREFIX = ".rstash-tmp-"
#: Only names of exactly this shape are ever treated as temps (counted as
#: reservations, swept). A client cannot create one: names may not begin with ".".
TEMP_RE = re.compile(r"\.rstash-tmp-[0-9a-f]{32}\.(?P<size>[0-9]{1,20}|u)\Z")


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


def _temp_reservation(match: re.Match[str], st_size: int) -> tuple[int, int]:
    """(quota usage, outstanding free-space reservation) of one temp."""
    size = match.group("size")
    if size == "u":
        # Bytes written are already on disk; the next UNKNOWN_RESERVE are promised.
        return st_size + UNKNOWN_RESERVE, UNKNOWN_RESERVE
    announced = int(size)
    return max(st_size, announced), max(announced - st_size, 0)


def scan_usage(dir_fd: int) -> tuple[int, int]:
    """(quota usage, outstanding reservations) of one box directory, from one scan."""
    usage = 0
    reserved = 0
    try:
        with os.scandir(dir_fd) as it:
            for entry in it:
                if entry.name == LOCK_NAME:
                    continue
                match = TEMP_RE.match(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    if match is not None:
                        # Fails closed: a temp another receiver holds may be
                        # momentarily unreadable (ESTALE); it reserves what it announced.
                        used, outstanding = _temp_reservation(match, 0)
                        usage += used
                        reserved += outstanding
                    continue  # a stored file vanished between readdir and stat
                if not stat.S_ISREG(st.st_mode):
                    continue
                if match is None:
                    usage += st.st_size
                else:
                    used, outstanding = _temp_reservation(match, st.st_size)
                    usage += used
                    reserved += outstanding
    except OSError as exc:
        raise from_oserror("scan box", exc) from exc
    # Partial transfers kept for resume claim the box too (rstash-recv.toml(5) resume_ttl).
    kept, outstanding = partials_usage(dir_fd)
    return usage + kept, reserved + outstanding
