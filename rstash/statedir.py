"""Whether a directory may hold the replay cache: state_dir's mode, owner and file system.

This module owns the rule of rstash(7) rule 2 and rstash-recv(8) FILES that
the replay cache lives only in a 0700 directory of the service user on a
local file system, judged from /proc/self/mountinfo. It must never create or
change the directory, and never open the database (rstash.state does).
"""

from __future__ import annotations

import os
import re
import stat

#: File systems on which the replay cache is refused: SQLite's WAL needs
#: shared memory and POSIX locks that hold across every writer, which network
#: file systems do not promise (rstash(7) rule 2).
NETWORK_FSTYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "9p",
    # Cluster file systems several receivers share (rstash-recv(8) SCALING).
    "fuse.glusterfs", "glusterfs", "ceph", "fuse.ceph", "lustre", "gpfs", "beegfs",
})
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape_mountinfo(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \040 \011 \012 \134.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, fstype) of every line of a /proc/self/mountinfo text, in order.

    Format (proc(5)): ``id parent maj:min root MOUNTPOINT options [optional...] - FSTYPE
    source superoptions``; the optional fields end at a lone ``-``. Malformed lines are
    skipped.
    """
    mounts: list[tuple[str, str]] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) <= sep + 1:
            continue
        mounts.append((_unescape_mountinfo(fields[4]), _unescape_mountinfo(fields[sep + 1])))
    return mounts


def fstype_of(path: str, mountinfo: str) -> str | None:
    """The fstype of the mount holding absolute ``path`` (already resolved), or None.

    The mount whose mount point is the longest prefix of ``path`` wins; of equal
    mount points the later line wins (it was mounted on top).
    """
    best: tuple[int, str] | None = None
    for point, fstype in parse_mountinfo(mountinfo):
        prefix = point.rstrip("/") + "/"
        if path == point or path.startswith(prefix):
            if best is None or len(point) >= best[0]:
                best = (len(point), fstype)
    return None if best is None else best[1]


def read_mountinfo() -> str | None:
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return os.fsdecode(f.read())
    except OSError:
        return None


def may_be_shared(path: str | os.PathLike[str], mountinfo: str | None = None) -> bool:
    """Whether another host may mount the file system holding ``path``: a network or
    cluster file system, any FUSE one, or one we cannot tell (fails towards shared)."""
    text = read_mountinfo() if mountinfo is None else mountinfo
    if text is None:
        return True
    fstype = fstype_of(os.path.realpath(os.fspath(path)), text)
    return fstype is None or fstype in NETWORK_FSTYPES or fstype.startswith("fuse")


def check_state_dir(path: str | os.PathLike[str], *, mountinfo: str | None = None,
                    uid: int | None = None, check_owner: bool = True) -> str | None:
    """Why ``path`` is unfit to hold the replay cache, or None when it is fit.

    Fit: an existing directory (not a symlink), mode exactly 0700, owned by
    ``uid`` (default: the effective uid; ``check_owner=False`` when the service
    user is unknown), on a local file system. ``mountinfo`` replaces the text of
    /proc/self/mountinfo (tests); when that cannot be read the answer is "unfit":
    a cache we cannot prove local is refused.
    """
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path}: is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path}: not a directory"
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        return f"{path}: mode {mode:04o}, must be 0700"
    owner = os.geteuid() if uid is None else uid
    if check_owner and st.st_uid != owner:
        return f"{path}: owned by uid {st.st_uid}, not by the service user (uid {owner})"
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", "rb") as f:
                mountinfo = os.fsdecode(f.read())
        except OSError as exc:
            return f"{path}: cannot tell whether it is local (/proc/self/mountinfo: {exc.strerror})"
    fstype = fstype_of(os.path.realpath(path), mountinfo)
    if fstype is None:
        return f"{path}: no mount found for it in /proc/self/mountinfo"
    if fstype in NETWORK_FSTYPES:
        return f"{path}: on a {fstype} file system, must be local"
    return None
