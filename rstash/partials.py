"""Interrupted transfers kept for resume, and stored transfers remembered for
re-runs (rstash(7) RESUME AND RE-RUNS; resume_ttl in rstash-recv.toml(5)).

This module owns the hidden directory ``.rstash-partials`` inside a box, which
exists only while a partial does (the partial must be on the box's file system
to be linked into it), and ``STATE_DIR/rerun/BOX/``, where the records of
stored transfers live (small files on the local state_dir, never in the box).
A name is a digest of the key's fingerprint, the transfer id and (for a
partial) the requested name and size, so only the key that started a transfer
finds it again, and nothing there can be named by a client (names may not
begin with "."). Per partial: ``ID.SIZE.part`` (the bytes, locked with flock
by the session that writes it) and ``ID.meta`` (how many of them are good and
their SHA-256); per stored transfer: ``ID.done`` (final name, size, SHA-256).

It must never offer bytes it has not just re-read and matched against their
recorded digest, hand one partial to two sessions at once, keep a partial of a
file without a transfer id, or resolve a path outside the box (the directory
is opened with O_NOFOLLOW relative to the box's descriptor).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstash.smallfile import sha256_prefix, write_private
from rstash.upload import Upload

if TYPE_CHECKING:
    from rstash.store import BoxStore

PARTIALS_DIR = ".rstash-partials"
#: The checkpoint step: a resume re-sends at most this many bytes, and each
#: checkpoint costs one copy of the hash state.
CHUNK = 16 * 2**20
#: Stored transfers are remembered at least this long, however short resume_ttl.
DONE_MIN_TTL = 7 * 86400.0
#: At most this many stored transfers are remembered per box (the oldest go first).
MAX_DONE = 4096

PART_RE = re.compile(r"(?P<id>[0-9a-f]{40})\.(?P<size>[0-9]{1,20})\.part\Z")
_ENTRY_RE = re.compile(r"[0-9a-f]{40}(\.[0-9]{1,20}\.part|\.meta|\.done)\Z")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PART_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _digest_id(*parts: bytes) -> str:
    h = hashlib.sha256(b"rstash partial\0")
    for p in parts:
        h.update(struct.pack(">H", len(p)) + p)
    return h.hexdigest()[:40]


def usage(box_fd: int) -> tuple[int, int]:
    """(quota usage, outstanding free-space reservation) of the kept partials.

    A partial counts at its announced size, like a temp: it is a claim on the
    box until it is resumed or expires."""
    used = reserved = 0
    try:
        fd = os.open(PARTIALS_DIR, _DIR_FLAGS, dir_fd=box_fd)
    except OSError:
        return 0, 0
    try:
        with os.scandir(fd) as it:
            for entry in it:
                m = PART_RE.match(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if m is None:
                    used += st.st_size
                    continue
                size = int(m["size"])
                used += max(size, st.st_size)
                reserved += max(size - st.st_size, 0)
    finally:
        os.close(fd)
    return used, reserved


@dataclass
class Partial:
    """A partial transfer this session holds (locked) until it is stored, dropped or kept."""

    owner: Partials
    fd: int
    part: str
    meta: str
    size: int
    #: bytes already held and verified, and their SHA-256 state (None when 0)
    offset: int = 0
    prefix: Any = None

    def upload(self, name: str) -> Upload:
        """An :class:`Upload` writing after the held bytes and committing the partial's inode."""
        os.lseek(self.fd, self.offset, os.SEEK_SET)
        up = Upload(self.owner.store, name, f"{PARTIALS_DIR}/{self.part}", self.size, os.dup(self.fd))
        up.written = self.offset
        return up

    def drop(self) -> None:
        """Forget the partial (stored, aborted, mismatched or broken); idempotent."""
        if self.fd < 0:
            return
        # Only while the name is still our inode: after a commit or an abort it
        # may already name another session's new partial.
        if self.owner.same_inode(self.part, self.fd):
            self.owner.unlink(self.part)
        self.owner.unlink(self.meta)
        os.close(self.fd)
        self.fd = -1
        self.owner.tidy()

    def release(self) -> None:
        """Unlock the partial, left as it was kept."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def keep(self, checkpoint: tuple[int, bytes] | None) -> bool:
        """The session ended before END: keep the bytes up to ``checkpoint`` for a resume."""
        if self.fd < 0:
            return False
        if checkpoint is None or checkpoint[0] <= 0:
            self.drop()
            return False
        offset, digest = checkpoint
        try:
            os.ftruncate(self.fd, offset)
            os.fsync(self.fd)
            self.owner.write_json(self.meta, {"offset": offset, "sha256": digest.hex(),
                                              "size": self.size})
        except OSError:
            self.drop()
            return False
        os.close(self.fd)
        self.fd = -1
        return True


class Partials:
    """The hidden area of one box, seen by one key."""

    def __init__(self, store: BoxStore, fingerprint: str, ttl: float,
                 records: Path | None = None) -> None:
        """``records``: the directory of this box's stored-transfer records (None: none kept)."""
        self.store = store
        self.fp = fingerprint.encode("utf-8")
        self.ttl = ttl
        self.done_ttl = max(ttl, DONE_MIN_TTL)
        self.records = records

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    # -- the directory --

    def _dir(self, *, create: bool, done: bool = False) -> int | None:
        """The partials directory (relative to the box), or the records directory."""
        if done and self.records is None:
            return None
        parent, name = ((str(self.records.parent), self.records.name) if done and self.records
                        else (None, PARTIALS_DIR))
        try:
            base = self.store.dir_fd if parent is None else os.open(parent, _DIR_FLAGS)
        except FileNotFoundError:
            if not create or parent is None:
                return None
            try:
                os.makedirs(parent, 0o700, exist_ok=True)
                base = os.open(parent, _DIR_FLAGS)
            except OSError:
                return None
        except OSError:
            return None
        try:
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=base)
            except FileNotFoundError:
                if not create:
                    return None
            try:
                os.mkdir(name, 0o700, dir_fd=base)
            except FileExistsError:
                pass
            return os.open(name, _DIR_FLAGS, dir_fd=base)
        except OSError:
            return None
        finally:
            if parent is not None:
                os.close(base)

    def tidy(self) -> None:
        """Remove the partials directory once it is empty: a box shows it only while needed."""
        with contextlib.suppress(OSError):
            os.rmdir(PARTIALS_DIR, dir_fd=self.store.dir_fd)

    def same_inode(self, name: str, fd: int) -> bool:
        dfd = self._dir(create=False)
        if dfd is None:
            return False
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            own = os.fstat(fd)
        except OSError:
            return False
        finally:
            os.close(dfd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def unlink(self, name: str, *, done: bool = False) -> None:
        fd = self._dir(create=False, done=done)
        if fd is None:
            return
        try:
            os.unlink(name, dir_fd=fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def write_json(self, name: str, data: dict[str, Any], *, done: bool = False) -> None:
        """Write ``name`` whole or not at all (temp, fsync, rename)."""
        fd = self._dir(create=True, done=done)
        if fd is None:
            raise OSError("cannot open the partials directory")
        try:
            write_private(fd, name, json.dumps(data).encode("ascii"),
                          f"{name}.{secrets.token_hex(8)}.tmp")
        finally:
            os.close(fd)

    def read_json(self, name: str, *, done: bool = False) -> tuple[dict[str, Any], float] | None:
        """(content, age in seconds) of a small regular file, or None."""
        fd = self._dir(create=False, done=done)
        if fd is None:
            return None
        try:
            rfd = os.open(name, _READ_FLAGS, dir_fd=fd)
        except OSError:
            return None
        finally:
            os.close(fd)
        try:
            st = os.fstat(rfd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
                return None
            data = json.loads(os.read(rfd, 4096))
        except (OSError, ValueError):
            return None
        finally:
            os.close(rfd)
        return (data, time.time() - st.st_mtime) if isinstance(data, dict) else None

    # -- stored transfers --

    def _done_name(self, tid: bytes) -> str:
        return _digest_id(b"done", self.fp, tid) + ".done"

    def already(self, tid: bytes, name: bytes, size: int | None) -> tuple[bytes, bytes] | None:
        """(final name, SHA-256) when this key stored transfer ``tid`` of ``name`` and ``size``."""
        if not self.enabled or size is None:
            return None
        found = self.read_json(self._done_name(tid), done=True)
        if found is None or found[1] > self.done_ttl:
            return None
        rec = found[0]
        try:
            if bytes.fromhex(rec["name"]) != name or rec["size"] != size:
                return None
            return bytes.fromhex(rec["final"]), bytes.fromhex(rec["sha256"])
        except (KeyError, TypeError, ValueError):
            return None

    def remember(self, tid: bytes, name: bytes, size: int, final: bytes, sha256: bytes) -> None:
        """Record a stored transfer; a failure costs only a later 550 instead of 251."""
        if not self.enabled:
            return
        try:
            self.write_json(self._done_name(tid), {"name": name.hex(), "size": size,
                                                   "final": final.hex(), "sha256": sha256.hex()},
                            done=True)
        except OSError:
            pass

    # -- partials --

    def open(self, tid: bytes, name: bytes, size: int) -> Partial | None:
        """Lock this key's partial of (tid, name, size), creating it empty when none is kept.

        None when another session holds it (it then gets a transfer of its own)
        or the directory is unusable. A kept prefix is re-read once and checked
        against its recorded digest before it is offered."""
        ident = _digest_id(b"part", self.fp, tid, name, struct.pack(">Q", size))
        part, meta = f"{ident}.{size}.part", f"{ident}.meta"
        dfd = self._dir(create=True)
        if dfd is None:
            return None
        try:
            fd = os.open(part, _PART_FLAGS, 0o600, dir_fd=dfd)
        except OSError:
            return None
        finally:
            os.close(dfd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
        except OSError:
            os.close(fd)
            return None
        p = Partial(self, fd, part, meta, size)
        offset, digest = self._kept(meta, size)
        if offset:
            prefix = self._rehash(fd, offset)
            if prefix is not None and prefix.digest() == digest:
                p.offset, p.prefix = offset, prefix
        if not p.offset:
            os.ftruncate(fd, 0)
            self.unlink(meta)
        return p

    def _kept(self, meta: str, size: int) -> tuple[int, bytes]:
        found = self.read_json(meta)
        if found is None or found[1] > self.ttl:
            return 0, b""
        rec = found[0]
        try:
            offset, digest = int(rec["offset"]), bytes.fromhex(rec["sha256"])
        except (KeyError, TypeError, ValueError):
            return 0, b""
        return (offset, digest) if 0 < offset < size and len(digest) == 32 else (0, b"")

    @staticmethod
    def _rehash(fd: int, offset: int) -> Any:
        """SHA-256 state of the first ``offset`` bytes: the one read a resume costs."""
        return sha256_prefix(fd, offset, CHUNK)

    # -- expiry --

    def _entries(self, *, done: bool = False) -> Iterator[tuple[int, str]]:
        fd = self._dir(create=False, done=done)
        if fd is None:
            return
        try:
            for n in os.listdir(fd):
                if _ENTRY_RE.match(n):
                    yield fd, n
        finally:
            os.close(fd)

    def expired(self) -> list[tuple[str, int, float]]:
        """(name, bytes, age) of every partial older than resume_ttl (--check-config)."""
        out = []
        now = time.time()
        for fd, n in self._entries():
            try:
                st = os.stat(n, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            age = now - st.st_mtime
            if PART_RE.match(n) and age > self.ttl:
                out.append((n, st.st_size, age))
        return out

    def sweep(self) -> list[str]:
        """Remove expired partials no session holds, and expired or surplus records."""
        removed: list[str] = []
        now = time.time()
        done: list[tuple[float, str]] = []
        for dfd, n in (e for records in (False, True) for e in self._entries(done=records)):
            try:
                rfd = os.open(n, _READ_FLAGS, dir_fd=dfd)
            except OSError:
                continue
            try:
                st = os.fstat(rfd)
                age = now - st.st_mtime
                if n.endswith(".done"):
                    done.append((st.st_mtime, n))
                    if age <= self.done_ttl:
                        continue
                elif age <= self.ttl:
                    continue
                fcntl.flock(rfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(n, dir_fd=dfd)
                removed.append(n)
            except OSError:
                continue
            finally:
                os.close(rfd)
        live = sorted(d for d in done if d[1] not in removed)
        for _mtime, n in live[:max(len(live) - MAX_DONE, 0)]:
            self.unlink(n, done=True)
            removed.append(n)
        self.tidy()
        return removed
