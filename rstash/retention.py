"""Retention: which stored files of a box the keep rules remove, and removing them.

This module owns the rules of rstash-recv.toml(5) RETENTION: the default
group of a name (:func:`default_group`), which files may ever be removed
(:func:`eligible`), the plan (:func:`plan`, a pure function of a listing, the
rules and the time) and applying a plan to a box (:func:`apply`) under the
box's lock. It is the one module that removes stored files.

It must never:

- run before the file that triggers it is durable under its final name (the
  session calls :func:`after_store` when it closes, after the replies);
- remove the newest file of a group, a file stored by the triggering session,
  or a file younger than ``keep_min_age``;
- remove anything but a regular file owned by the service user with one link
  whose name a client could have sent (so never a temp, a partial, a lock or
  any hidden file), or follow a symbolic link: every call is relative to the
  box's directory descriptor, with ``AT_SYMLINK_NOFOLLOW``;
- take an age from anything a client sends: ages come from the stored file's
  mtime, which the server sets by writing it and never from the client's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from rstash.errors import Outcome
from rstash.names import check_name
from rstash.settings import BoxPolicy

if TYPE_CHECKING:
    from rstash.config import BoxConfig
    from rstash.delivery import DeliveryLog
    from rstash.log import Logger
    from rstash.store import BoxStore

#: The box's lock file: an OFD lock (fcntl(2) F_OFD_SETLK) on it serialises retention
#: across every process, and across receivers on one shared volume wherever such
#: locks reach every node (rstash-recv.toml(5) RETENTION). Hidden: never a client's name.
LOCK_NAME = ".rstash-lock"
#: How long a session waits for another session's retention before leaving the
#: work to the next store of the group.
LOCK_WAIT = 30.0

_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: struct flock (Linux): a write lock on the whole file; l_pid 0, as OFD locks require.
_WHOLE_FILE = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)

# The default group rule (rstash-recv.toml(5) RETENTION, with its table of
# examples, which tests/test_retention.py reads from the page): a "~N" counter
# at the end of the part before the first dot is dropped (what overwrite =
# "rename" adds), then every stamp is replaced by "*". A stamp is a date
# YYYY-MM-DD or YYYYMMDD, optionally followed (after T, _, - or nothing) by a
# time HH:MM[:SS], HHMM[SS] or HH-MM[-SS] and a zone Z or +HH[:]MM/-HH[:]MM
# (not followed by a digit, "-" or ":" and a digit, so the next date is never
# read as a time); or ten digits beginning with 1 (Unix seconds, 2001 to 2033).
# Neither side of a stamp may be a digit, so a longer number is never cut into one.
_COUNTER_RE = re.compile(r"~[0-9]+\Z")
_HH = r"(?:[01][0-9]|2[0-3])"
_MM = r"[0-5][0-9]"
_DATE = (r"(?:19|20)[0-9]{2}(?P<d>-?)(?:0[1-9]|1[0-2])(?P=d)(?:0[1-9]|[12][0-9]|3[01])")
_TIME = (rf"[T_-]?{_HH}(?P<t>[:-]?){_MM}(?:(?P=t)(?:{_MM}|60))?(?:Z|[+-]{_HH}:?{_MM})?"
         r"(?![-:]?[0-9])")
_STAMP_RE = re.compile(rf"(?<![0-9])(?:{_DATE}(?:{_TIME})?|1[0-9]{{9}})(?![0-9])")


def default_group(name: str) -> str:
    """The group of ``name`` by the default rule: counter dropped, stamps made ``*``."""
    stem, dot, rest = name.partition(".")
    stem = _COUNTER_RE.sub("", stem) or stem  # "~1" alone stays a name of its own
    return _STAMP_RE.sub("*", stem + dot + rest)


@dataclass(frozen=True, slots=True)
class Rules:
    """A box's retention settings, with the name patterns that say who could have sent a name."""

    keep_last: int | None = None
    #: seconds (the setting is written in days)
    keep_days: float | None = None
    keep_min_age: float = 7 * 86400.0
    groups: tuple[str, ...] = ()
    allow_names: tuple[str, ...] = ()
    deny_names: tuple[str, ...] = ()

    @classmethod
    def of(cls, policy: BoxPolicy) -> Rules:
        return cls(policy.keep_last, policy.keep_days, policy.keep_min_age, policy.groups,
                   policy.allow_names, policy.deny_names)

    @property
    def active(self) -> bool:
        """Retention is on when a keep rule is set; keep_min_age alone removes nothing."""
        return self.keep_last is not None or self.keep_days is not None

    def group(self, name: str) -> str | None:
        """The group of ``name``: the first explicit pattern it matches (None when it
        matches none: such a file is never removed), else :func:`default_group`."""
        if self.groups:
            return next((p for p in self.groups if fnmatchcase(name, p)), None)
        return default_group(name)

    def describe(self) -> str:
        def days(s: float | None) -> str:
            return "none" if s is None else f"{s / 86400:g}d"
        groups = " ".join(self.groups) if self.groups else "by name"
        return (f"keep_last {self.keep_last or 'none'}, keep_days {days(self.keep_days)}, "
                f"keep_min_age {days(self.keep_min_age)}, groups {groups}")


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored file as listed: its name and what identifies and ages it."""

    name: str
    mtime: float
    size: int
    dev: int = 0
    ino: int = 0


@dataclass(frozen=True, slots=True)
class Removal:
    """A file the rules remove, and why."""

    entry: Entry
    group: str
    age: float
    reason: str


def eligible(name: str, st: os.stat_result, owner: int | None, rules: Rules) -> bool:
    """Whether retention may ever remove the entry ``name`` (lstat'ed as ``st``).

    A regular file (never a symbolic link, whose target is not the box's), with
    one link (a hard link made in the box keeps its file), owned by ``owner``
    (the service user; None: any owner), whose name passes every name rule and
    the box's patterns, so that temps, partials, the lock and anything an
    administrator put there under another name are never touched.
    """
    return (stat.S_ISREG(st.st_mode) and st.st_nlink == 1
            and (owner is None or st.st_uid == owner)
            and check_name(name, rules.allow_names, rules.deny_names) is None)


def plan(entries: Iterable[Entry], rules: Rules, now: float, *,
         only: Collection[str] | None = None, protect: Collection[str] = ()) -> list[Removal]:
    """What the rules remove from ``entries`` (eligible files) at time ``now``.

    ``only`` limits the plan to those groups (None: every group); names in
    ``protect`` (the files just stored) stay. A file goes when a keep rule is
    set, no keep rule keeps it, it is not the newest of its group and it is at
    least keep_min_age old. Newest means the latest mtime (ties: the greater name).
    """
    if not rules.active:
        return []
    by_group: dict[str, list[Entry]] = {}
    for e in entries:
        group = rules.group(e.name)
        if group is not None and (only is None or group in only):
            by_group.setdefault(group, []).append(e)
    out: list[Removal] = []
    for group, files in sorted(by_group.items()):
        files.sort(key=lambda e: (e.mtime, e.name), reverse=True)
        for rank, e in enumerate(files):
            age = now - e.mtime
            if rank == 0 or e.name in protect or age < rules.keep_min_age:
                continue
            if rules.keep_last is not None and rank < rules.keep_last:
                continue
            if rules.keep_days is not None and age < rules.keep_days:
                continue
            why = []
            if rules.keep_last is not None:
                why.append(f"not among the {rules.keep_last} newest")
            if rules.keep_days is not None:
                why.append(f"older than {rules.keep_days / 86400:g} days")
            out.append(Removal(e, group, age, " and ".join(why)))
    return out


def listing(dir_fd: int, rules: Rules, owner: int | None) -> list[Entry]:
    """The box's eligible files, each lstat'ed relative to ``dir_fd``."""
    found: list[Entry] = []
    with os.scandir(dir_fd) as it:
        for d in it:
            try:
                st = d.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since readdir
            if eligible(d.name, st, owner, rules):
                found.append(Entry(d.name, st.st_mtime, st.st_size, st.st_dev, st.st_ino))
    return found


@dataclass
class Applied:
    """What :func:`apply` did: the files removed, and one line per thing that went wrong."""

    removed: list[Removal]
    problems: list[str]


def apply(dir_fd: int, rules: Rules, *, owner: int, only: Collection[str] | None,
          protect: Collection[str] = (), now: float | None = None,
          lock_wait: float = LOCK_WAIT) -> Applied:
    """Plan under the box's lock and remove what the plan names; never raises OSError.

    Listing, planning and removing happen under one exclusive lock, so that two
    sessions never plan from one listing. Each file is lstat'ed again just
    before ``unlinkat``: a file that changed (another inode, more links, a new
    mtime) or is gone stays out of the result.
    """
    done = Applied([], [])
    try:
        lock = _lock(dir_fd, lock_wait)
    except OSError as e:
        done.problems.append(f"lock {LOCK_NAME}: {e.strerror or e}")
        return done
    if lock < 0:
        done.problems.append(f"{LOCK_NAME} held for {lock_wait:g} s by another session: "
                             "left to the next file stored in the group")
        return done
    try:
        try:
            removals = plan(listing(dir_fd, rules, owner), rules,
                            time.time() if now is None else now, only=only, protect=protect)
        except OSError as e:
            done.problems.append(f"list box: {e.strerror or e}")
            return done
        for r in removals:
            problem = _remove(dir_fd, r, rules, owner)
            if problem is None:
                done.removed.append(r)
            elif problem:
                done.problems.append(problem)
        if done.removed:
            try:
                os.fsync(dir_fd)
            except OSError as e:
                done.problems.append(f"fsync box: {e.strerror or e}")
    finally:
        os.close(lock)  # releases the OFD lock
    return done


def _remove(dir_fd: int, r: Removal, rules: Rules, owner: int) -> str | None:
    """Unlink one planned file: None when removed, "" when it changed or went, else why not."""
    e = r.entry
    try:
        st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"stat {e.name!r}: {exc.strerror or exc}"
    if ((st.st_dev, st.st_ino) != (e.dev, e.ino) or st.st_mtime != e.mtime
            or not eligible(e.name, st, owner, rules)):
        return ""
    try:
        # unlinkat(dir_fd, name, 0) removes the entry itself and never follows it. Only
        # someone who may write the box directory could swap the entry since the lstat,
        # and removing what they put there removes no data reachable another way.
        os.unlink(e.name, dir_fd=dir_fd)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"unlink {e.name!r}: {exc.strerror or exc}"
    return None


def _lock(dir_fd: int, wait: float) -> int:
    """The box's lock file, open and locked; -1 when it stayed locked for ``wait`` s.

    Closing the descriptor releases the lock.
    """
    fd = os.open(LOCK_NAME, _LOCK_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        deadline = time.monotonic() + wait
        while True:
            try:
                # An OFD lock: a record lock owned by this open file, so no other close()
                # in the process drops it (a classic POSIX lock would go), and shared file
                # systems (GlusterFS, NFSv4, CephFS) carry it between hosts, where flock(2)
                # on a directory stays local to one host on GlusterFS.
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WHOLE_FILE)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                os.close(fd)
                return -1
            time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise


def after_store(store: BoxStore, box: BoxConfig | None, names: Collection[str], log: Logger,
                deliveries: DeliveryLog, *, key: str | None, peer: str | None) -> None:
    """Apply the box's rules to the groups of ``names``, the files a session stored.

    Called once per session after its replies, when those files are durable.
    Every removal is a log line ``event=retention`` and a ``removed`` row of the
    delivery log; a failure is a warning and never reaches the client. Never raises.
    """
    if box is None or not names or not Rules.of(box).active:
        return
    rules = Rules.of(box)
    try:
        groups = {g for g in map(rules.group, names) if g is not None}
        if not groups:
            return
        done = apply(store.dir_fd, rules, owner=os.geteuid(), only=groups, protect=names)
        for r in done.removed:
            log.info(event="retention", box=box.name, name=r.entry.name, bytes=r.entry.size,
                     peer=peer, key=key, outcome="removed", reason=r.reason, group=r.group,
                     age=int(r.age))
            deliveries.record(box=box.name, name=r.entry.name, outcome=Outcome.REMOVED, key=key,
                              bytes_=r.entry.size)
        for problem in done.problems:
            log.warning(event="retention", box=box.name, outcome="error", detail=problem)
    except Exception as e:  # retention must never end a session badly
        log.error(event="retention", box=box.name, outcome="error",
                  detail=f"{type(e).__name__}: {e}")


def dry_run(path: os.PathLike[str] | str, policy: BoxPolicy, owner: int | None,
            now: float | None = None) -> list[Removal]:
    """What the rules, applied to the box at ``path`` as it is now, would remove.

    For ``--check-config``: opens the directory read-only, takes no lock, removes nothing.
    """
    rules = Rules.of(policy)
    if not rules.active:
        return []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return plan(listing(fd, rules, owner), rules, time.time() if now is None else now)
    finally:
        os.close(fd)
