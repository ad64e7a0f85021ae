"""One file on its way into a box: a locked temp until commit or abort.

This module owns writing a temp file, checking its size against what was
announced, fsyncing it and claiming its final name (``link()`` for refuse and
rename, ``rename()`` for replace). The box directory, its lock, its limits and
its temps belong to :mod:`rstash.store`, which creates every :class:`Upload`.

It must never resolve a path (every call is relative to the box's directory
descriptor), replace an entry except under overwrite = "replace", or leave a
file under a final name that was not fully written and fsynced.

The bytes go to an unnamed ``O_TMPFILE`` where the file system has it, and the
verified descriptor itself is linked (``linkat`` of ``/proc/self/fd/N``): a
member of a group-writable box cannot swap the temp between verification and
link, because there is no temp name to swap. The named temp then only carries
the reservation (a sparse file as long as the bytes written, locked for the
upload's life). Without ``O_TMPFILE`` the named temp holds the bytes, and after
the link the final name must hold the descriptor's device and inode, or the
name is unlinked and the file refused: a ``250`` always names the verified inode.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rstash.errors import Outcome, Refused, StoreError
from rstash.names import check_name, rename_candidate

if TYPE_CHECKING:
    from rstash.store import BoxStore

#: An upload of unknown size reserves the bytes it has written plus this much,
#: and re-checks quota and min_free each time it crosses a multiple of it.
UNKNOWN_RESERVE = 64 * 2**20

#: Highest N tried for overwrite = "rename" (NAME~1.ext … NAME~999.ext).
MAX_RENAME = 999

#: Out of space: the file system's or the user's disk quota. Temporary (452).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})



class SizeMismatch(StoreError):
    """More bytes than announced were written, or fewer at commit.

    The caller enforces sizes first and treats this as the peer's protocol
    error; the store checks again because a short or long file must never be
    stored under a final name.
    """


def no_space(detail: str) -> Refused:
    return Refused(Outcome.INSUFFICIENT_STORAGE, detail)


def local_error(detail: str) -> Refused:
    return Refused(Outcome.LOCAL_ERROR, detail)


def from_oserror(what: str, exc: OSError) -> Refused:
    detail = f"{what}: {exc.strerror or exc}"
    if exc.errno in _NO_SPACE:
        return no_space(detail)
    return local_error(detail)



class Upload:
    """One file on its way into a box: a locked temp until :meth:`commit` or :meth:`abort`.

    Any exception from :meth:`write` or :meth:`commit` leaves it aborted: the
    temp is gone and nothing exists under the final name that was not there
    before (or, for replace, the old file is still in place).
    """

    def __init__(
        self, store: BoxStore, name: str, temp_name: str, announced: int | None, fd: int,
        data_fd: int | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.temp_name = temp_name
        self.announced = announced
        self.written = 0
        #: the named temp: the reservation; its OFD lock and mtime lease keep the sweep away
        self._fd = fd
        #: where the bytes go: an unnamed O_TMPFILE, or the named temp itself
        self._data_fd = fd if data_fd is None else data_fd
        self.final_name: str | None = None
        #: (st_dev, st_ino) of the stored file, after commit
        self.identity: tuple[int, int] | None = None
        #: a read-only descriptor of the stored file, after commit when the store keeps readers
        self.reader_fd: int | None = None

    @property
    def unnamed(self) -> bool:
        return self._data_fd != self._fd

    @property
    def done(self) -> bool:
        return self._fd < 0

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` to the temp. Raises :class:`Refused` or :class:`SizeMismatch`."""
        self._require_open()
        view = memoryview(data).cast("B")
        before = self.written
        new_total = before + len(view)
        try:
            if self.announced is not None and new_total > self.announced:
                raise SizeMismatch(f"{new_total} bytes > announced {self.announced}")
            max_size = self.store.max_file_size
            if self.announced is None and max_size is not None and new_total > max_size:
                raise Refused(Outcome.TOO_LARGE, f"> max_file_size {max_size}")
            while view:
                try:
                    n = os.write(self._data_fd, view)
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise from_oserror("write", exc) from exc
                view = view[n:]
                self.written += n
            if self.unnamed:
                # The reservation's quota count is the named temp's size: keep it
                # as long as the bytes written (sparse: it occupies no blocks).
                try:
                    os.ftruncate(self._fd, self.written)
                except OSError as exc:
                    raise from_oserror("reserve", exc) from exc
            self.store.renew_leases()
            if self.announced is None and (
                self.written // UNKNOWN_RESERVE > before // UNKNOWN_RESERVE
            ):
                # Crossed a reservation boundary: the temp's on-disk size plus
                # UNKNOWN_RESERVE is its new claim, and the scan already sees it.
                with self.store._dir_lock():
                    self.store._check_limits(self.name, quota_add=0, free_need=0)
        except BaseException:
            self.abort()
            raise

    def commit(self, *, sync_dir: bool = True, data_synced: bool = False) -> str:
        """Make the file durable under its final name; return that name.

        Order: fsync(temp) < fchmod < link/rename < fsync(dir). The caller sends
        the 250 line only after this returns, or, with ``sync_dir=False`` (a batch
        of files pipelined by one client), only after :meth:`BoxStore.sync_dir`.
        ``data_synced``: a syncfs() after the last write made the data durable
        (:meth:`BoxStore.commit_batch`), so the fsync of the temp is not repeated.
        Raises :class:`Refused` or :class:`SizeMismatch`.
        """
        self._require_open()
        store = self.store
        try:
            if self.announced is not None and self.written != self.announced:
                raise SizeMismatch(f"{self.written} bytes, announced {self.announced}")
            try:
                if not data_synced:
                    os.fsync(self._data_fd)
            except OSError as exc:
                raise from_oserror("fsync", exc) from exc
            try:
                # Only now, after the caller verified the END tag: until here the
                # temp is 0600, so no one in the box's group reads a partial file.
                os.fchmod(self._data_fd, store.file_mode)
                st = os.fstat(self._data_fd)
            except OSError as exc:
                raise from_oserror("fchmod", exc) from exc
            self.identity = (st.st_dev, st.st_ino)
            # The box lock serialises claims of every receiver sharing the box:
            # link() alone is not atomic on a distributed volume, and unlocked
            # renames onto one name from two clients can hang there.
            with store.box_lock():
                if store.overwrite == "replace":
                    final = self._replace()
                else:
                    final = self._link_first_free()
                    # The final name holds the inode now; the temp link is redundant.
                    store._unlink_quietly(self.temp_name)
                self._check_identity(final)
                if sync_dir:
                    store._sync_dir_unlocked()
            if store.keep_readers:
                self.reader_fd = self._reopen_readonly()
        except BaseException:
            self.close_reader()
            self.abort()
            raise
        self.final_name = final
        self._close()
        return final

    def _check_identity(self, final: str) -> None:
        """The final name must hold the verified inode; else unlink it and refuse."""
        dir_fd = self.store.dir_fd
        try:
            now = os.stat(final, dir_fd=dir_fd, follow_symlinks=False)
            same = (now.st_dev, now.st_ino) == self.identity
        except OSError:
            same = False
        if not same:
            self.store._unlink_quietly(final)
            raise local_error(f"{final!r} no longer holds the verified file (swapped by "
                              "someone with write access to the box)")

    def renew_lease(self) -> None:
        """Stamp the named temp's mtime: the lease a sweep on any receiver reads."""
        if self._fd >= 0:
            try:
                os.utime(self._fd)
            except OSError:
                pass  # the next write or fsync reports a broken volume

    def close_reader(self) -> None:
        if self.reader_fd is not None:
            fd, self.reader_fd = self.reader_fd, None
            os.close(fd)

    def _reopen_readonly(self) -> int | None:
        try:
            return os.open(f"/proc/self/fd/{self._data_fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # the hook gets {path} alone, still checked against identity

    def abort(self) -> None:
        """Close and unlink the temp; idempotent."""
        if self.done:
            return
        self._close()
        # The temp holds our inode only until commit's link; after a successful
        # link it is already gone, and unlinking it again is harmless.
        self.store._unlink_quietly(self.temp_name)

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()  # after a commit, a no-op

    # -- internals ----------------------------------------------------------

    def _candidates(self) -> Iterator[str]:
        yield self.name
        if self.store.overwrite != "rename":
            return
        for n in range(1, MAX_RENAME + 1):
            candidate = rename_candidate(self.name, n)
            # Too long (255 bytes) or breaking a pattern: skip, never truncate.
            if check_name(candidate, self.store.allow_names, self.store.deny_names) is None:
                yield candidate

    def _link_first_free(self) -> str:
        for candidate in self._candidates():
            try:
                # link() claims the name atomically and never replaces an entry,
                # a planted symlink included.
                self._link_to(candidate)
            except FileExistsError:
                continue
            except OSError as exc:
                # Never fall back to rename(): it would silently replace whatever
                # holds the name (e.g. file systems without hard links).
                raise local_error(f"link {candidate!r}: {exc.strerror}") from exc
            return candidate
        raise Refused(Outcome.EXISTS, f"no free name for {self.name!r}")

    def _link_to(self, target: str) -> None:
        dir_fd = self.store.dir_fd
        if self.unnamed:
            # The descriptor itself, not a name anyone else could swap; the
            # /proc link is followed to the inode (AT_SYMLINK_FOLLOW).
            os.link(f"/proc/self/fd/{self._data_fd}", target, dst_dir_fd=dir_fd,
                    follow_symlinks=True)
        else:
            # follow_symlinks=False: a temp swapped for a symlink is never dereferenced.
            os.link(self.temp_name, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)

    def _replace(self) -> str:
        dir_fd = self.store.dir_fd
        if self.unnamed:
            # rename() needs a name: give the verified inode a fresh temp name first.
            self.store._unlink_quietly(self.temp_name)
            self.temp_name = self.store.new_temp_name(self.announced)
            try:
                self._link_to(self.temp_name)
            except OSError as exc:
                raise from_oserror("link temp", exc) from exc
        try:
            # rename() replaces the entry itself: a symlink at the name is
            # replaced, its target never touched.
            os.rename(self.temp_name, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            raise from_oserror(f"rename to {self.name!r}", exc) from exc
        return self.name

    def _require_open(self) -> None:
        if self.done:
            raise StoreError(f"upload of {self.name!r} is already finished")

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self.store._uploads.discard(self)
            if self._data_fd != fd:
                os.close(self._data_fd)  # an unlinked O_TMPFILE vanishes here
            self._data_fd = -1
            os.close(fd)  # releases the temp's OFD lock
