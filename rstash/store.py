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
- resolve a path below the box directory: the box is opened once with
  ``O_NOFOLLOW`` and every later call is relative to that descriptor
  (``dir_fd=``), so a box path swapped for a symlink mid-session, or a
  symlink planted at a file name by anyone with write access to the box
  directory, is never followed.

Reservations live on disk, not in memory: a temp's name carries its announced
size, so every session in every process sees every other session's claim by
scanning the directory under ``flock`` on the directory descriptor. There is no
shared state to corrupt and nothing to clean up but the temps themselves.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from types import TracebackType

from rstash.errors import Reply, StoreError
from rstash.names import check_name, name_problem, rename_candidate

#: An upload of unknown size reserves the bytes it has written plus this much,
#: and re-checks quota and min_free each time it crosses a multiple of it.
UNKNOWN_RESERVE = 64 * 2**20

TEMP_PREFIX = ".rstash-tmp-"
#: Only names of exactly this shape are ever treated as temps (counted as
#: reservations, swept). A client cannot create one: names may not begin with ".".
TEMP_RE = re.compile(r"\.rstash-tmp-[0-9a-f]{32}\.(?P<size>[0-9]{1,20}|u)\Z")

#: Highest N tried for overwrite = "rename" (NAME~1.ext … NAME~999.ext).
MAX_RENAME = 999

POLICIES = ("refuse", "replace", "rename")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: O_NONBLOCK: a FIFO planted under a temp-like name must not hang the sweep.
_SWEEP_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: Out of space: the file system's or the user's disk quota. Temporary (452).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class Refused(StoreError):
    """A per-file refusal: the session goes on with the next file.

    ``reply`` is the code and ``reason`` the text of the reply line
    (``550 exists``, ``552 too large``, ``552 quota``, ``452 insufficient
    storage``, ``451 local error``); ``detail`` is for the log only.
    """

    reason: str
    detail: str

    def __init__(self, reply: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason, reply=reply)
        self.reason = reason
        self.detail = detail


class SizeMismatch(StoreError):
    """More bytes than announced were written, or fewer at commit.

    The caller enforces sizes first and treats this as the peer's protocol
    error; the store checks again because a short or long file must never be
    stored under a final name.
    """


def _no_space(detail: str) -> Refused:
    return Refused(Reply.INSUFFICIENT_STORAGE, "insufficient storage", detail)


def _local(detail: str) -> Refused:
    return Refused(Reply.LOCAL_ERROR, "local error", detail)


def _from_oserror(what: str, exc: OSError) -> Refused:
    detail = f"{what}: {exc.strerror or exc}"
    if exc.errno in _NO_SPACE:
        return _no_space(detail)
    return _local(detail)


def _temp_reservation(match: re.Match[str], st_size: int) -> tuple[int, int]:
    """(quota usage, outstanding free-space reservation) of one temp."""
    size = match.group("size")
    if size == "u":
        # Bytes written are already on disk; the next UNKNOWN_RESERVE are promised.
        return st_size + UNKNOWN_RESERVE, UNKNOWN_RESERVE
    announced = int(size)
    return max(st_size, announced), max(announced - st_size, 0)


class BoxStore:
    """One box directory, opened once; the factory of :class:`Upload`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: str = "refuse",
        file_mode: int = 0o640,
        max_file_size: int | None = None,
        quota: int | None = None,
        min_free: int | None = None,
        allow_names: tuple[str, ...] | list[str] = (),
        deny_names: tuple[str, ...] | list[str] = (),
    ) -> None:
        if overwrite not in POLICIES:
            raise ValueError(f"overwrite must be one of {', '.join(POLICIES)}: {overwrite!r}")
        # Execute, setuid, setgid and sticky bits on a stored file would turn a
        # drop box into a way to plant programs; config refuses them too.
        if file_mode & ~0o777 or file_mode & 0o111:
            raise ValueError(f"file_mode {file_mode:#o} has a bit of 07111")
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self.file_mode = file_mode
        self.max_file_size = max_file_size
        self.quota = quota
        self.min_free = min_free
        # Rename candidates must pass every name rule, the box's patterns included.
        self.allow_names = tuple(allow_names)
        self.deny_names = tuple(deny_names)
        self._uploads: set[Upload] = set()
        try:
            # O_NOFOLLOW: a box path that is itself a symlink (someone with write
            # access to its parent pointing it at /etc) is refused, not followed.
            self.dir_fd: int = os.open(self.path, _DIR_FLAGS)
        except OSError as exc:
            raise StoreError(f"cannot open box directory {self.path}: {exc.strerror}") from exc
        # A world-writable box lets any local user plant symlinks, FIFOs or take
        # names ahead of the backups: refused at serve time, not only by --check-config.
        if stat.S_IMODE(os.fstat(self.dir_fd).st_mode) & stat.S_IWOTH:
            os.close(self.dir_fd)
            raise StoreError(f"box directory {self.path} is world-writable: refused")

    # -- context management -------------------------------------------------

    def close(self) -> None:
        """Abort unfinished uploads and close the directory; idempotent."""
        for upload in list(self._uploads):
            upload.abort()
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
            raise Refused(Reply.NAME_NOT_ALLOWED, "name not allowed", problem)
        if size is not None and size < 0:
            raise ValueError(f"negative size {size}")
        if self.overwrite == "refuse":
            # lstat semantics: a symlink, even a dangling one, is an entry that
            # holds the name. link() at commit is the real arbiter (a racing
            # key holder may take the name meanwhile); this only saves the
            # upload of a file that cannot be stored.
            if self._entry(name) is not None:
                raise Refused(Reply.EXISTS, "exists", "name taken at begin")
        if self.max_file_size is not None and size is not None and size > self.max_file_size:
            raise Refused(
                Reply.TOO_LARGE, "too large", f"{size} > max_file_size {self.max_file_size}"
            )
        with self._dir_lock():
            # Check and reservation under one lock: the temp created below IS
            # the reservation, and other processes scan for it under this lock.
            own = UNKNOWN_RESERVE if size is None else size
            self._check_limits(name, quota_add=own, free_need=own)
            temp_name = f"{TEMP_PREFIX}{secrets.token_hex(16)}.{'u' if size is None else size}"
            try:
                fd = os.open(temp_name, _TEMP_FLAGS, 0o600, dir_fd=self.dir_fd)
            except OSError as exc:
                raise _from_oserror("create temp", exc) from exc
            try:
                # Held for the temp's whole life: the sweep never removes a temp
                # a live session holds, however slow the client.
                fcntl.flock(fd, fcntl.LOCK_EX)
                # umask-proof: the temp is never readable by the box's group,
                # and stays writable/lockable by the service user even under umask 0777.
                os.fchmod(fd, 0o600)
            except OSError as exc:
                os.close(fd)
                self._unlink_quietly(temp_name)
                raise _from_oserror("lock temp", exc) from exc
        upload = Upload(self, name, temp_name, size, fd)
        self._uploads.add(upload)
        return upload

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
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live session holds it
                if time.time() - st.st_mtime <= older_than:
                    continue
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
            raise _from_oserror(f"stat {name!r}", exc) from exc

    def _dir_lock(self) -> _DirLock:
        return _DirLock(self.dir_fd)

    def _temp_names(self) -> Iterator[str]:
        try:
            names = os.listdir(self.dir_fd)
        except OSError as exc:
            raise _from_oserror("list box", exc) from exc
        return (n for n in names if TEMP_RE.match(n))

    def _usage(self) -> tuple[int, int]:
        """(quota usage, outstanding reservations) of the box, from one scan."""
        usage = 0
        reserved = 0
        try:
            with os.scandir(self.dir_fd) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished between readdir and stat
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    match = TEMP_RE.match(entry.name)
                    if match is None:
                        usage += st.st_size
                    else:
                        used, outstanding = _temp_reservation(match, st.st_size)
                        usage += used
                        reserved += outstanding
        except OSError as exc:
            raise _from_oserror("scan box", exc) from exc
        return usage, reserved

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
                raise Refused(
                    Reply.TOO_LARGE, "quota", f"usage {usage} + {add} > quota {self.quota}"
                )
        if self.min_free is not None:
            try:
                vfs = os.statvfs(self.dir_fd)
            except OSError as exc:
                raise _from_oserror("statvfs", exc) from exc
            free = vfs.f_bavail * vfs.f_frsize - reserved
            if free < self.min_free + free_need:
                raise _no_space(
                    f"free {free} (after reservations {reserved}) - {free_need}"
                    f" < min_free {self.min_free}"
                )

    def _unlink_quietly(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.dir_fd)
        except OSError:
            pass  # a temp left behind is swept later; never mask the first error

    def sync_dir(self) -> None:
        """fsync the box directory: the names linked so far are durable after it."""
        try:
            self._sync_dir()
        except OSError as exc:
            # The files are whole under their final names but the entries may not
            # be durable: no 250. Unlinking could destroy a file a replace already
            # swapped out, so they stay.
            raise _from_oserror("fsync box", exc) from exc

    def _sync_dir(self) -> None:
        os.fsync(self.dir_fd)


class _DirLock:
    """flock(LOCK_EX) on the box directory: serialises limit checks and reservations
    across every session of every process, and nothing else."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise _from_oserror("lock box", exc) from exc

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


class Upload:
    """One file on its way into a box: a locked temp until :meth:`commit` or :meth:`abort`.

    Any exception from :meth:`write` or :meth:`commit` leaves it aborted: the
    temp is gone and nothing exists under the final name that was not there
    before (or, for replace, the old file is still in place).
    """

    def __init__(
        self, store: BoxStore, name: str, temp_name: str, announced: int | None, fd: int
    ) -> None:
        self.store = store
        self.name = name
        self.temp_name = temp_name
        self.announced = announced
        self.written = 0
        self._fd = fd
        self.final_name: str | None = None

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
                raise Refused(Reply.TOO_LARGE, "too large", f"> max_file_size {max_size}")
            while view:
                try:
                    n = os.write(self._fd, view)
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise _from_oserror("write", exc) from exc
                view = view[n:]
                self.written += n
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

    def commit(self, *, sync_dir: bool = True) -> str:
        """Make the file durable under its final name; return that name.

        Order: fsync(temp) < fchmod < link/rename < fsync(dir). The caller sends
        the 250 line only after this returns, or, with ``sync_dir=False`` (a batch
        of files pipelined by one client), only after :meth:`BoxStore.sync_dir`.
        Raises :class:`Refused` or :class:`SizeMismatch`.
        """
        self._require_open()
        store = self.store
        try:
            if self.announced is not None and self.written != self.announced:
                raise SizeMismatch(f"{self.written} bytes, announced {self.announced}")
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise _from_oserror("fsync", exc) from exc
            try:
                # Only now, after the caller verified the END tag: until here the
                # temp is 0600, so no one in the box's group reads a partial file.
                os.fchmod(self._fd, store.file_mode)
            except OSError as exc:
                raise _from_oserror("fchmod", exc) from exc
            if store.overwrite == "replace":
                final = self._replace()
            else:
                final = self._link_first_free()
                # The final name holds the inode now; the temp link is redundant.
                store._unlink_quietly(self.temp_name)
            if sync_dir:
                store.sync_dir()
        except BaseException:
            self.abort()
            raise
        self.final_name = final
        self._close()
        return final

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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

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
        dir_fd = self.store.dir_fd
        for candidate in self._candidates():
            try:
                # link() claims the name atomically and never replaces an entry,
                # a planted symlink included; follow_symlinks=False so the temp
                # itself is never dereferenced.
                os.link(
                    self.temp_name,
                    candidate,
                    src_dir_fd=dir_fd,
                    dst_dir_fd=dir_fd,
                    follow_symlinks=False,
                )
            except FileExistsError:
                continue
            except OSError as exc:
                # Never fall back to rename(): it would silently replace whatever
                # holds the name (e.g. file systems without hard links).
                raise _local(f"link {candidate!r}: {exc.strerror}") from exc
            return candidate
        raise Refused(Reply.EXISTS, "exists", f"no free name for {self.name!r}")

    def _replace(self) -> str:
        dir_fd = self.store.dir_fd
        try:
            # rename() replaces the entry itself: a symlink at the name is
            # replaced, its target never touched.
            os.rename(self.temp_name, self.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            raise _from_oserror(f"rename to {self.name!r}", exc) from exc
        return self.name

    def _require_open(self) -> None:
        if self.done:
            raise StoreError(f"upload of {self.name!r} is already finished")

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self.store._uploads.discard(self)
            os.close(fd)  # releases the temp's flock
