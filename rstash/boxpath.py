"""Opening a box directory so that no one but root and the service user can redirect it.

``O_NOFOLLOW`` protects only the last component of a path: whoever may write
an ancestor directory can rename the box away and put another directory (a
second box, or one of their own with an ACL that lets them read everything
delivered) under its name. This module owns the rule that closes that, the
one OpenSSH applies to authorized_keys under ``StrictModes``: every ancestor
of a box must be owned by root or the service user and writable by no one
else (a sticky directory owned by root or the service user, such as /tmp,
is fine: others may create entries in it but not rename ours), and the box
itself must be owned by root or the service user and not world-writable.

:func:`open_box_dir` walks the path from ``/`` with ``openat(O_DIRECTORY |
O_NOFOLLOW)`` one component at a time and judges each descriptor it holds,
so what is checked is what is used: there is no check-then-open window.
:func:`box_path_findings` is the same walk for ``--check-config``, which
reports instead of raising.

This module must never create, change or remove anything.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable

from rstash.errors import StoreError
from rstash.statedir import may_be_shared

_WALK_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: POSIX ACL xattr format (Linux, acl/include/acl_ea.h): a 4-byte version, then
#: 8-byte entries (tag u16, perm u16, id u32). Named users and groups and the
#: mask are the entries beyond what the mode bits say.
_ACL_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP = 0x08
_ACL_MASK = 0x10
ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"


def acl_entries(raw: bytes) -> list[tuple[int, int, int]]:
    """(tag, perm, id) of every entry of a POSIX ACL xattr value; [] when unreadable."""
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != _ACL_VERSION:
        return []
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw) - 7, 8)]


def _acl(fd: int, name: str) -> list[tuple[int, int, int]]:
    try:
        return acl_entries(os.getxattr(fd, name))
    except OSError:
        return []  # no ACL (ENODATA), or a file system without xattrs


def extended_acl(fd: int) -> list[str]:
    """Which ACLs of a directory grant more than its mode bits (``access``, ``default``)."""
    found = []
    for label, xattr in (("access", ACL_ACCESS), ("default", ACL_DEFAULT)):
        if any(tag in (_ACL_USER, _ACL_GROUP, _ACL_MASK) for tag, _p, _i in _acl(fd, xattr)):
            found.append(label)
    return found


def _writers(st: os.stat_result, trusted: frozenset[int]) -> str | None:
    """Who besides ``trusted`` may add, rename or remove entries of this directory."""
    sticky_ok = bool(st.st_mode & stat.S_ISVTX) and st.st_uid in trusted
    if st.st_uid not in trusted:
        return f"owned by uid {st.st_uid}"
    # With an ACL, the group bits are its mask: a named user or group granted
    # write shows here as group-writable, so the mode bits are the whole test.
    if st.st_mode & 0o022 and not sticky_ok:
        return f"writable by {'everyone' if st.st_mode & 0o002 else 'its group (or its ACL)'}"
    return None


def _walk(path: str, trusted: frozenset[int]) -> tuple[int, list[str]]:
    """Open ``path`` component by component; (its descriptor or -1, the problems met)."""
    if not os.path.isabs(path):
        return -1, [f"{path} is not an absolute path"]
    parts = [p for p in path.split("/") if p not in ("", ".")]
    problems: list[str] = []
    fd = os.open("/", _WALK_FLAGS)
    here = "/"
    try:
        for part in parts:
            st = os.fstat(fd)
            who = _writers(st, trusted)
            if who is not None:
                problems.append(
                    f"its ancestor {here} is {who} (mode {stat.S_IMODE(st.st_mode):04o}): "
                    "whoever can write it can swap the box for another directory")
            try:
                nxt = os.open(part, _WALK_FLAGS, dir_fd=fd)
            except OSError as exc:
                what = os.path.join(here, part)
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    reason = "is a symbolic link or not a directory"
                else:
                    reason = exc.strerror or str(exc)
                problems.append(f"{what} {reason}")
                os.close(fd)
                return -1, problems
            os.close(fd)
            fd = nxt
            here = os.path.join(here, part)
        st = os.fstat(fd)
        if st.st_uid not in trusted:
            problems.append(f"it is owned by uid {st.st_uid}, not by the service user or "
                            "root: whoever owns it can read everything delivered")
        if stat.S_IMODE(st.st_mode) & stat.S_IWOTH:
            problems.append(f"it is world-writable (mode {stat.S_IMODE(st.st_mode):04o}): "
                            "anyone could plant or take names")
    except BaseException:
        os.close(fd)
        raise
    return fd, problems


def trusted_uids(service_uid: int, extra: Iterable[int] = ()) -> frozenset[int]:
    return frozenset({0, service_uid, *extra})


def open_box_dir(path: str, service_uid: int | None = None) -> int:
    """The box directory's descriptor, after judging every component on the way to it.

    Raises :class:`StoreError` naming the first problem.
    """
    uid = os.geteuid() if service_uid is None else service_uid
    try:
        fd, problems = _walk(path, trusted_uids(uid))
    except OSError as exc:
        raise StoreError(f"cannot open box directory {path}: {exc.strerror}") from exc
    if problems:
        if fd >= 0:
            os.close(fd)
        raise StoreError(f"box directory {path} refused: {problems[0]}")
    return fd


def box_path_findings(path: str, service_uid: int) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a box path for ``--check-config``; never raises."""
    try:
        fd, errors = _walk(path, trusted_uids(service_uid))
    except OSError as exc:
        return [f"cannot open: {exc.strerror}"], []
    warnings: list[str] = []
    if fd >= 0:
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) & stat.S_IWGRP:
                warnings.append(
                    f"it is group-writable (mode {stat.S_IMODE(st.st_mode):04o}): a member of "
                    f"gid {st.st_gid} can take names ahead of the backups and swap entries; "
                    "hooks get the stored file as RSTASH_FD and skip a {path} that changed")
            acls = extended_acl(fd)
            if acls:
                warnings.append(f"it has an extended {' and '.join(acls)} ACL granting "
                                "access beyond its mode bits: check it with getfacl")
        finally:
            os.close(fd)
    if may_be_shared(path):
        warnings.append("it is on a network or cluster file system: --status and --metrics show "
                        "only this receiver's deliveries, and pipe mode is refused for it (a replay "
                        "through another receiver would not be seen; rstash-recv(8) SCALING)")
    return errors, warnings
