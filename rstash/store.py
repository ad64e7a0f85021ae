"""A box on disk: temp files, fsync, link/rename, limits and reservations.

This module owns everything rstash-recv does to a box directory: creating and
locking temp files, writing and fsyncing them, claiming the final name
(``link()`` for refuse and rename, ``rename()`` for replace), fsyncing the
directory, enforcing max_file_size, quota and min_free, and sweeping temps left
behind by dead sessions.

It must never:

- touch a socket or a reply line (the session driver sends the reply after
  :meth:`Upload.commit` returns, which is what makes ``250`` mean "durable");
- read a stored file's contents, list the box for a client, or delete a stored
  file: the product is write-only, and the only files it ever unlinks are its
  own temps;
- hash content (the protocol layer computes SHA-256 once, as bytes arrive);
- resolve a path below the box directory: the box is opened once, component
  by component with ``O_NOFOLLOW`` and each component judged for who may
  write it (:mod:`rstash.boxpath`), and every later call is relative to that descriptor
  (``dir_fd=``), so a box path swapped for a symlink mid-session, or a
  symlink planted at a file name by anyone with write access to the box
  directory, is never followed.

Reservations live on disk, not in memory: a temp's name carries its announced
size, so every session in every process, on every receiver sharing the box,
sees every other session's claim by scanning the directory under the box lock
(:mod:`rstash.boxlock`: the directory's flock on a local file system, an OFD
lock on ``.rstash-lock`` where another host may mount the box; it also
serialises the claim of final names). There is no shared state to corrupt and nothing to
clean up but the temps themselves.

A temp is alive while its session holds its OFD lock and keeps its mtime
recent (every write renews the mtime of every open temp of the store): the
sweep removes a temp only when both say it is dead, so a lock lost with a
restarted storage server or a file system whose locks are node-local never
lets one receiver sweep another's live temp (rstash-recv(8) SCALING).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rstash import boxlock
from rstash.boxlock import BoxLock
from rstash.boxpath import open_box_dir
from rstash.errors import Outcome, Refused, StoreError
from rstash.fsreserve import TEMP_PREFIX, TEMP_RE, FsReservations, scan_usage
from rstash.names import name_problem
from rstash.settings import BoxPolicy
from rstash.statedir import may_be_shared
from rstash.upload import UNKNOWN_RESERVE, SizeMismatch, Upload, from_oserror, no_space

if TYPE_CHECKING:
    from rstash.config import BoxConfig

__all__ = ["TEMP_PREFIX", "TEMP_RE", "UNKNOWN_RESERVE", "BoxStore", "Refused", "SizeMismatch",
           "Upload", "scan_usage"]


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: No O_EXCL: the unnamed file must stay linkable.
_TMPFILE_FLAGS = getattr(os, "O_TMPFILE", 0) | os.O_RDWR | os.O_CLOEXEC
#: What open(O_TMPFILE) fails with where the file system (or kernel) lacks it.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})
#: O_NONBLOCK: a FIFO planted under a temp-like name must not hang the sweep.
_SWEEP_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Seconds between renewals of the open temps' mtime leases (far below any idle_timeout).
LEASE_RENEW = 1.0


class BoxStore:
    """One box directory, opened once; the factory of :class:`Upload`."""

    def __init__(self, path: str | os.PathLike[str], policy: BoxPolicy | None = None, *,
                 check_path: bool = True, siblings: Iterable[str | os.PathLike[str]] = (),
                 keep_readers: bool = False, **changes: Any) -> None:
        """``policy`` (default: the built-in one) with ``changes`` to some of its fields.

        ``check_path`` False (only for reading sizes and temps, never for serving)
        skips the ownership walk of :func:`rstash.boxpath.open_box_dir`.
        ``siblings`` are the other boxes' paths: those on this box's file system
        share its min_free (see :mod:`rstash.fsreserve`). ``keep_readers``: each
        commit keeps a read-only descriptor of the stored file (for hooks).

        BoxPolicy refuses an unknown overwrite policy and a file_mode with a bit of 07111:
        execute, setuid, setgid and sticky bits would turn a drop box into a way to
        plant programs.
        """
        self.path = os.fspath(path)
        self.policy = replace(policy or BoxPolicy(), **changes)
        self.overwrite = self.policy.overwrite
        self.file_mode = self.policy.file_mode
        self.max_file_size = self.policy.max_file_size
        self.quota = self.policy.quota
        self.min_free = self.policy.min_free
        # Rename candidates must pass every name rule, the box's patterns included.
        self.allow_names = self.policy.allow_names
        self.deny_names = self.policy.deny_names
        self._uploads: set[Upload] = set()
        #: box directory fd -> its lock file's fd, opened at the first lock
        self._lock_fds: dict[int, int] = {}
        self._renewed = time.monotonic()
        #: another host may mount the box: the box lock is the OFD lock on .rstash-lock
        self.shared = may_be_shared(self.path)
        self.keep_readers = keep_readers
        self.dir_fd: int = -1
        if check_path:
            # Every component from / judged on the descriptor that is then used:
            # the box's owner, and no ancestor anyone else may write (a world-
            # writable box lets any local user plant symlinks or take names).
            self.dir_fd = open_box_dir(self.path)
        else:
            try:
                self.dir_fd = os.open(self.path, _DIR_FLAGS)
            except OSError as exc:
                raise StoreError(f"cannot open box directory {self.path}: {exc.strerror}") from exc
        # Other boxes matter only to min_free; they are opened under the same rules.
        self._fs = FsReservations(self.dir_fd, siblings if self.min_free is not None else ())
        #: linking an unnamed O_TMPFILE needs /proc/self/fd (absent: the named temp is checked)
        self._unnamed = bool(_TMPFILE_FLAGS & ~(os.O_RDWR | os.O_CLOEXEC)) and os.path.isdir(
            "/proc/self/fd")

    @classmethod
    def serving(cls, box: BoxConfig, boxes: Iterable[BoxConfig]) -> BoxStore:
        """The store a session serves ``box`` from: every box's path is a possible sibling
        on its file system (min_free), and hooks get each stored file's descriptor."""
        return cls(box.path, box, siblings=[b.path for b in boxes], keep_readers=bool(box.on_receive))

    # -- context management -------------------------------------------------

    def close(self) -> None:
        """Abort unfinished uploads and close the directory; idempotent."""
        for upload in list(self._uploads):
            upload.abort()
        self._fs.close()
        for fd in self._lock_fds.values():
            os.close(fd)
        self._lock_fds = {}
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> BoxStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- uploads ------------------------------------------------------------

    def begin(self, name: str, size: int | None) -> Upload:
        """Check ``name`` against the policy and limits, reserve, create the temp.

        ``size`` None means unknown (streamed). Raises :class:`Refused`.
        """
        problem = name_problem(name)
        if problem is not None:
            # The driver checks names first; this is the store's own guard
            # against a path ever reaching dir_fd-relative calls.
            raise Refused(Outcome.NAME_NOT_ALLOWED, problem)
        if size is not None and size < 0:
            raise ValueError(f"negative size {size}")
        if self.overwrite == "refuse":
            # lstat semantics: a symlink, even a dangling one, is an entry that
            # holds the name. link() at commit is the real arbiter (a racing
            # key holder may take the name meanwhile); this only saves the
            # upload of a file that cannot be stored.
            if self._entry(name) is not None:
                raise Refused(Outcome.EXISTS, "name taken at begin")
        if self.max_file_size is not None and size is not None and size > self.max_file_size:
            raise Refused(Outcome.TOO_LARGE, f"{size} > max_file_size {self.max_file_size}")
        with self._dir_lock():
            # Check and reservation under one lock: the temp created below IS
            # the reservation, and other processes scan for it under this lock.
            own = UNKNOWN_RESERVE if size is None else size
            self._check_limits(name, quota_add=own, free_need=own)
            temp_name = self.new_temp_name(size)
            try:
                fd = os.open(temp_name, _TEMP_FLAGS, 0o600, dir_fd=self.dir_fd)
            except OSError as exc:
                raise from_oserror("create temp", exc) from exc
            try:
                # Held for the temp's whole life, on every receiver's view: the
                # sweep never removes a temp a live session holds.
                if not boxlock.try_lock(fd):
                    raise OSError(errno.EAGAIN, "a fresh temp is locked by someone else")
                # umask-proof: the temp is never readable by the box's group,
                # and stays writable/lockable by the service user even under umask 0777.
                os.fchmod(fd, 0o600)
            except OSError as exc:
                os.close(fd)
                self._unlink_quietly(temp_name)
                raise from_oserror("lock temp", exc) from exc
        data_fd = None  # without O_TMPFILE the named temp holds the bytes; commit checks the inode
        try:
            if self._unnamed:
                data_fd = os.open(".", _TMPFILE_FLAGS, 0o600, dir_fd=self.dir_fd)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                os.close(fd)
                self._unlink_quietly(temp_name)
                raise from_oserror("create temp", exc) from exc
        upload = Upload(self, name, temp_name, size, fd, data_fd)
        self._uploads.add(upload)
        return upload

    def commit_batch(self, uploads: list[Upload]) -> list[str | Refused]:
        """Commit ``uploads`` under one directory fsync: each one's final name or refusal.

        Files pipelined by one client: one syncfs() of the box's file system makes
        the data of all of them durable before any is linked (one journal commit
        instead of one per file; where syncfs() cannot report writeback errors, or
        reports one, each file is fsynced instead), and one directory fsync covers
        their names; when it fails, every file of the batch that was linked is
        refused (its name may not be durable: no 250). rstash-recv(8), DURABILITY.
        """
        from rstash.durable import syncfs

        results: list[str | Refused] = []
        data_synced = len(uploads) > 1 and syncfs(self.dir_fd)
        for upload in uploads:
            try:
                results.append(upload.commit(sync_dir=False, data_synced=data_synced))
            except Refused as e:
                results.append(e)  # commit aborted the upload
            except OSError as e:
                upload.abort()
                results.append(Refused(Outcome.LOCAL_ERROR, e.strerror or str(e)))
        if any(isinstance(r, str) for r in results):
            try:
                self.sync_dir()
            except Refused as e:
                results = [e if isinstance(r, str) else r for r in results]
                for upload in uploads:
                    upload.close_reader()
        return results

    # -- housekeeping -------------------------------------------------------

    def sweep(self, older_than: float) -> list[str]:
        """Remove temps no live session holds whose mtime is older than ``older_than`` s.

        Returns the names removed. Anything not named exactly like a temp, not a
        regular file, or locked is left alone.
        """
        removed: list[str] = []
        for name in self._temp_names():
            try:
                fd = os.open(name, _SWEEP_FLAGS, dir_fd=self.dir_fd)
            except OSError:
                continue  # gone, or a symlink (ELOOP): not ours to touch
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                try:
                    # Shared: two receivers sweeping at once both see it dead.
                    if not boxlock.try_lock(fd, shared=True):
                        continue  # a live session holds it
                except OSError:
                    continue
                if time.time() - st.st_mtime <= older_than:
                    continue  # its lease is live (a lock may be lost, the lease is not)
                # The entry must still be the inode we locked: someone with write
                # access to the box may have swapped it since we opened it.
                try:
                    now = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
                except OSError:
                    continue
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    continue
                try:
                    os.unlink(name, dir_fd=self.dir_fd)
                except OSError:
                    continue
                removed.append(name)
            finally:
                os.close(fd)
        if removed:
            self._sync_dir()
        return removed

    def stale_temps(self) -> list[tuple[str, int, float]]:
        """(name, size, age in seconds) of every temp, for --check-config. No locking."""
        now = time.time()
        found: list[tuple[str, int, float]] = []
        for name in self._temp_names():
            try:
                st = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((name, st.st_size, max(now - st.st_mtime, 0.0)))
        return found

    # -- internals ----------------------------------------------------------

    def _entry(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise from_oserror(f"stat {name!r}", exc) from exc

    def new_temp_name(self, size: int | None) -> str:
        return f"{TEMP_PREFIX}{secrets.token_hex(16)}.{'u' if size is None else size}"

    def _dir_lock(self) -> BoxLock:
        # min_free is about the file system: every box on it is locked (in one
        # order for every process), so the check and the reservation stay atomic.
        dirs = self._fs.lock_order(self.dir_fd) if self.min_free is not None else [self.dir_fd]
        return BoxLock([self._lock_fd(fd) for fd in dirs], ofd=self.shared)

    def box_lock(self) -> BoxLock:
        """This box's lock alone: held to claim a final name and fsync the directory."""
        return BoxLock([self._lock_fd(self.dir_fd)], ofd=self.shared)

    def _lock_fd(self, dir_fd: int) -> int:
        if not self.shared:
            return dir_fd  # one host mounts it: the directory's flock excludes every process
        fd = self._lock_fds.get(dir_fd)
        if fd is None:
            try:
                fd = self._lock_fds[dir_fd] = boxlock.open_lock_file(dir_fd)
            except OSError as exc:
                raise from_oserror(f"open {boxlock.LOCK_NAME}", exc) from exc
        return fd

    def renew_leases(self) -> None:
        """Touch every open temp of this store (at most every LEASE_RENEW s): their mtime
        is the lease a sweep on another receiver reads, also while a batch waits for commit."""
        now = time.monotonic()
        if now - self._renewed < LEASE_RENEW:
            return
        self._renewed = now
        for upload in self._uploads:
            upload.renew_lease()

    def _temp_names(self) -> Iterator[str]:
        try:
            names = os.listdir(self.dir_fd)
        except OSError as exc:
            raise from_oserror("list box", exc) from exc
        return (n for n in names if TEMP_RE.match(n))

    def _usage(self) -> tuple[int, int]:
        """(quota usage, outstanding reservations) of the box, from one scan."""
        return scan_usage(self.dir_fd)


    def _check_limits(self, name: str, *, quota_add: int, free_need: int) -> None:
        """Refuse when quota or min_free would be broken. Caller holds the dir lock.

        ``quota_add`` and ``free_need`` are what the caller is about to claim
        beyond what the scan already sees (0 when re-checking an existing temp).
        """
        if self.quota is None and self.min_free is None:
            return
        usage, reserved = self._usage()
        if self.quota is not None:
            add = quota_add
            if self.overwrite == "replace":
                # Replace frees the old file when it lands: count the net change.
                old = self._entry(name)
                if old is not None and stat.S_ISREG(old.st_mode):
                    add -= old.st_size
            if usage + add > self.quota:
                raise Refused(Outcome.QUOTA, f"usage {usage} + {add} > quota {self.quota}")
        if self.min_free is not None:
            try:
                vfs = os.statvfs(self.dir_fd)
            except OSError as exc:
                raise from_oserror("statvfs", exc) from exc
            # Outstanding claims of every box on this file system, not only this one.
            reserved += self._fs.reserved_elsewhere()
            free = vfs.f_bavail * vfs.f_frsize - reserved
            if free < self.min_free + free_need:
                raise no_space(
                    f"free {free} (after reservations {reserved}) - {free_need}"
                    f" < min_free {self.min_free}"
                )

    def _unlink_quietly(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.dir_fd)
        except OSError:
            pass  # a temp left behind is swept later; never mask the first error

    def sync_dir(self) -> None:
        """fsync the box directory under the box lock: the names linked so far are durable."""
        with self.box_lock():
            self._sync_dir_unlocked()

    def _sync_dir_unlocked(self) -> None:
        try:
            self._sync_dir()
        except OSError as exc:
            # The files are whole under their final names but the entries may not
            # be durable: no 250. Unlinking could destroy a file a replace already
            # swapped out, so they stay.
            raise from_oserror("fsync box", exc) from exc

    def _sync_dir(self) -> None:
        os.fsync(self.dir_fd)
