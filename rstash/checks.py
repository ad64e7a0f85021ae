"""--check-config's checks: every box, key, the state_dir and the log judged for the service user.

This module owns what ``-t`` and ``--check-config`` find (rstash-recv(8),
ADMINISTRATION): box directories, key files, stale temps, state_dir and
the log target, judged from permission bits for the service user (``--user``,
else the ``service_user`` setting), collected in a
:class:`Report`. It must never change anything and never switch users.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rstash.config import BoxConfig, Config, load_config
from rstash.errors import ConfigError, KeyFileError, RstashError
from rstash.sshlogin import reached_by
from rstash.units import human_age, human_size

Level = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class ServiceUser:
    """Who rstash-recv runs as: the account whose rights every check is about."""

    name: str
    uid: int
    groups: frozenset[int]
    #: True when no --user was given and we run as root: ownership is not judged
    guessed_root: bool = False

    def may(self, st: os.stat_result, want: int) -> bool:
        """Whether this user has every bit of ``want`` (a mask of 4 r, 2 w, 1 x).

        POSIX picks exactly one class (owner, else group, else other); root may
        read and write anything and search any directory. ACLs are not judged.
        """
        if self.uid == 0:
            return not (want & 1) or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.groups:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want


def resolve_user(name: str | None) -> ServiceUser:
    """The ``--user`` account (a name or a numeric uid), or the current euid's.

    Raises KeyError with a message when the account does not exist.
    """
    if name is None:
        uid = os.geteuid()
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            groups = {os.getegid(), *os.getgroups()}
            return ServiceUser(str(uid), uid, frozenset(groups), guessed_root=uid == 0)
        return ServiceUser(pw.pw_name, uid, _groups_of(pw), guessed_root=uid == 0)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if not name.isdigit():
            raise KeyError(f"--user {name}: no such user") from None
        try:
            pw = pwd.getpwuid(int(name))
        except KeyError:
            raise KeyError(f"--user {name}: no such user") from None
    return ServiceUser(pw.pw_name, pw.pw_uid, _groups_of(pw))


def _groups_of(pw: pwd.struct_passwd) -> frozenset[int]:
    """Primary and supplementary groups of an account, as the login would get them."""
    try:
        return frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        return frozenset({pw.pw_gid})


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _group_members(gid: int) -> set[int]:
    """Uids of every account in a group (listed members and primary-group users)."""
    uids = {pw.pw_uid for pw in pwd.getpwall() if pw.pw_gid == gid}
    try:
        members = grp.getgrgid(gid).gr_mem
    except KeyError:
        members = []
    for member in members:
        try:
            uids.add(pwd.getpwnam(member).pw_uid)
        except KeyError:
            continue
    return uids


def _unreachable(path: Path, user: ServiceUser) -> str | None:
    """The first ancestor of ``path`` the user cannot search, or None."""
    real = Path(os.path.realpath(path))
    for parent in reversed(real.parents):
        try:
            st = os.stat(parent)
        except OSError:
            return None  # reported by the caller's own stat
        if not user.may(st, 1):
            return str(parent)
    return None


# ---------------------------------------------------------------------------
# Records: the one report that the human and the JSON forms both print.


@dataclass
class Report:
    """Every finding of a check, in order."""

    records: list[dict[str, Any]] = field(default_factory=list)
    #: whom the checks judged for (None when the config did not load or the user is unknown)
    user: ServiceUser | None = None
    #: the warning that no service user was named and root checked for itself
    root_warning: str | None = None

    def add(self, box: str | None, level: Level, message: str) -> None:
        self.records.append({"box": box, "level": level, "message": " ".join(message.split())})

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["level"] == "error"]

    def problem_lines(self, levels: Iterable[str] = ("error", "warning")) -> list[str]:
        wanted = set(levels)
        return [
            f"{r['level']}: " + (f"box {r['box']}: " if r["box"] is not None else "") + r["message"]
            for r in self.records if r["level"] in wanted
        ]


def _size(n: int | None) -> str:
    """An exact size in the config's own units (``50GiB``), or ``none``."""
    if n is None:
        return "none"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def _word(text: str) -> str:
    """A value printable on one line: as is when plain, else JSON-quoted (ASCII)."""
    if text and text.isprintable() and not any(c.isspace() or c in "\"'\\" for c in text):
        return text
    return json.dumps(text, ensure_ascii=True)


def _text(text: str) -> str:
    """Free text (a key comment) as is when printable, else JSON-quoted (ASCII)."""
    return text if text.isprintable() else json.dumps(text, ensure_ascii=True)


def _words(items: Iterable[object]) -> str:
    out = [_word(str(i)) for i in items]
    return " ".join(out) if out else "none"


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


# ---------------------------------------------------------------------------
# The checks.


def _check_box(box: BoxConfig, cfg: Config, user: ServiceUser, report: Report) -> None:
    name = box.name
    _check_box_dir(box, cfg, user, report)
    allow = _words(box.allow_names) if box.allow_names else "any valid name"
    report.add(name, "info", f"names allow {allow}; deny {_words(box.deny_names)}")
    report.add(name, "info", f"overwrite {box.overwrite}, file_mode {box.file_mode:04o}")
    report.add(name, "info", f"limits max_file_size {_size(box.max_file_size)}, "
                             f"quota {_size(box.quota)}, min_free {_size(box.min_free)}")
    report.add(name, "info", f"allow_from {_words(box.allow_from) if box.allow_from else 'any'}")
    report.add(name, "info", f"pipe_mode {'on' if box.pipe_mode else 'off'}")
    report.add(name, "info", reached_by(box))
    if box.auth != "key" and box.pipe_mode and not box.keys:
        report.add(name, "warning", "pipe_mode is on but a pipe stream needs a box key, and the box has none")
    if box.on_receive:
        report.add(name, "info", f"on_receive {_words(box.on_receive)}")
    _check_retention(box, user, report)
    for key in box.keys:
        _check_key(name, key, user, report)


#: --check-config names at most this many files retention would remove, per box.
MAX_LISTED = 50


def _check_retention(box: BoxConfig, user: ServiceUser, report: Report) -> None:
    """The rules, and what they would remove from the box as it is now."""
    from rstash import retention

    rules = retention.Rules.of(box)
    if not rules.active:
        return
    report.add(box.name, "info", f"retention {rules.describe()}")
    try:
        # Root without --user: the box's owner stands in for the service user, as above.
        owner = os.lstat(box.path).st_uid if user.guessed_root else user.uid
        plan = retention.dry_run(box.path, box, owner)
    except OSError as e:
        report.add(box.name, "warning", f"cannot list the box for retention: {e.strerror or e}")
        return
    for r in plan[:MAX_LISTED]:
        report.add(box.name, "info", f"retention would remove {_word(r.entry.name)} ({human_size(r.entry.size)}, "
                   f"{human_age(r.age)} old, group {_word(r.group)}: {r.reason})")
    if len(plan) > MAX_LISTED:
        report.add(box.name, "info", f"retention would remove {len(plan) - MAX_LISTED} more files")
    if not plan:
        report.add(box.name, "info", "retention would remove nothing now")


def _check_box_dir(box: BoxConfig, cfg: Config, user: ServiceUser, report: Report) -> None:
    name, path = box.name, box.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        report.add(name, "info", f"path {path} missing")
        report.add(name, "error", f"path {path} does not exist (rstash-recv never creates it)")
        return
    except OSError as e:
        report.add(name, "info", f"path {path} unknown")
        report.add(name, "error", f"path {path}: {e.strerror}")
        return
    if stat.S_ISLNK(st.st_mode):
        report.add(name, "info", f"path {path} is a symbolic link")
        report.add(name, "error", f"path {path} is a symbolic link: box directories are "
                                  "opened with O_NOFOLLOW (name the real directory)")
        return
    if not stat.S_ISDIR(st.st_mode):
        report.add(name, "info", f"path {path} is not a directory")
        report.add(name, "error", f"path {path} is not a directory")
        return
    ok = True
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        report.add(name, "error", f"path {path} is world-writable (mode {mode:04o}): "
                                  "anyone could plant or take names")
        ok = False
    blocked = _unreachable(path, user)
    if blocked is not None:
        report.add(name, "error", f"path {path} cannot be reached by {user.name}: "
                                  f"{blocked} is not searchable")
        ok = False
    elif not user.may(st, 2 | 1):
        report.add(name, "error", f"path {path} is not writable by {user.name} (owner "
                                  f"{_user_name(st.st_uid)}, group {_group_name(st.st_gid)}, "
                                  f"mode {mode:04o})")
        ok = False
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            report.add(name, "error", f"path {path} is on a read-only file system")
            ok = False
    except OSError:
        pass
    owner = f"owner {_user_name(st.st_uid)}:{_group_name(st.st_gid)}, mode {mode:04o}"
    if ok:
        report.add(name, "info", f"path {path} exists, writable by {user.name} ({owner})")
    else:
        report.add(name, "info", f"path {path} exists, NOT usable by {user.name} ({owner})")
    _check_box_path(box, user, report)
    _check_temps(box, cfg, report)


def _check_box_path(box: BoxConfig, user: ServiceUser, report: Report) -> None:
    """Owner and ancestors of the box the way rstash-recv judges them when it opens it."""
    from rstash.boxpath import box_path_findings

    uid = user.uid
    if user.guessed_root:
        # Root without --user does not know the service user: the box's owner stands
        # in for it (its ancestors are still judged), as for state_dir.
        try:
            uid = os.lstat(box.path).st_uid
        except OSError:
            pass
    errors, warnings = box_path_findings(str(box.path), uid)
    for problem in errors:
        if "world-writable" not in problem:  # reported above with the mode
            report.add(box.name, "error", f"path {box.path}: {problem} (rstash-recv refuses to serve it)")
    for problem in warnings:
        report.add(box.name, "warning", f"path {box.path}: {problem}")


def _check_temps(box: BoxConfig, cfg: Config, report: Report) -> None:
    from rstash.partials import PARTIALS_DIR, Partials
    from rstash.store import BoxStore

    try:
        # Read-only, no sweep; the path's ownership is _check_box_path's finding.
        with BoxStore(box.path, check_path=False) as store:
            temps = store.stale_temps()
            expired = Partials(store, "", box.resume_ttl).expired()
    except (RstashError, OSError) as e:
        report.add(box.name, "warning", f"cannot look for stale temp files: {e}")
        return
    for temp, size, age in sorted(temps):
        if age > cfg.idle_timeout:
            report.add(box.name, "warning", f"stale temp file {box.path / temp} ({human_size(size)}, "
                       f"{human_age(age)} old): a later session's sweep removes it")
    for part, size, age in sorted(expired):
        report.add(box.name, "warning", f"expired partial transfer {box.path / PARTIALS_DIR / part}"
                   f" ({human_size(size)}, {human_age(age)} old): a later session removes it")


def _check_key(box: str, path: Path, user: ServiceUser, report: Report) -> None:
    from rstash.auth import load_key_file

    try:
        key = load_key_file(path)
    except KeyFileError as e:
        report.add(box, "error", e.message)
        return
    report.add(box, "info", f"key {path} {key.describe()}")
    try:
        st = os.stat(path)
    except OSError as e:  # vanished since it was read
        report.add(box, "error", f"key {path}: {e.strerror}")
        return
    mode = stat.S_IMODE(st.st_mode)
    blocked = _unreachable(path, user)
    if blocked is not None:
        report.add(box, "error", f"key {path} cannot be reached by {user.name}: "
                                 f"{blocked} is not searchable")
    elif not user.may(st, 4):
        report.add(box, "error", f"key {path} is not readable by {user.name} (owner "
                                 f"{_user_name(st.st_uid)}, group {_group_name(st.st_gid)}, "
                                 f"mode {mode:04o})")
    if mode & stat.S_IRGRP and st.st_gid not in user.groups:
        report.add(box, "warning", f"key {path} is readable by group {_group_name(st.st_gid)}, "
                                   f"which {user.name} is not in")
    writers: list[str] = []
    if mode & stat.S_IWUSR and st.st_uid not in (0, user.uid):
        writers.append(f"its owner {_user_name(st.st_uid)}")
    if mode & stat.S_IWGRP and _group_members(st.st_gid) - {0, user.uid}:
        writers.append(f"group {_group_name(st.st_gid)}")
    if mode & stat.S_IWOTH:
        writers.append("everyone")
    if writers:
        report.add(box, "warning", f"key {path} is writable by {' and '.join(writers)}: "
                                   "whoever can write it can replace the box's key")


def _check_state_dir(cfg: Config, user: ServiceUser, report: Report) -> None:
    problem = _state_dir_problem(cfg.state_dir, user)
    pipe_boxes = sorted(b.name for b in cfg.boxes.values() if b.pipe_mode)
    if problem is None:
        unchecked = " (owner not checked: set service_user)" if user.guessed_root else ""
        report.add(None, "info", f"state_dir {cfg.state_dir}: ok{unchecked}")
    elif pipe_boxes:
        report.add(None, "error", f"state_dir {problem}: pipe mode needs it "
                                  f"(box {', '.join(pipe_boxes)})")
    else:
        report.add(None, "warning", f"state_dir {problem}: the delivery log (--status) is off "
                                    "and pipe mode would be refused")


def _state_dir_problem(path: Path, user: ServiceUser) -> str | None:
    """Why state_dir is unfit for ``user`` (root without --user: any owner)."""
    from rstash.statedir import check_state_dir

    return check_state_dir(path, uid=user.uid, check_owner=not user.guessed_root)


def _run_checks(path: str, user_option: str | None) -> tuple[Config | None, Report]:
    """Load ``path`` and check it for the service user: ``--user`` (``user_option``),
    else the config's ``service_user``, else whoever runs the check."""
    report = Report()
    try:
        cfg = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            report.add(None, "error", problem)
        return None, report
    report.add(None, "info", f"config {cfg.source}")
    user = _service_user(cfg, user_option, report)
    if user is None:
        return cfg, report
    report.user = user
    for warning in cfg.warnings:
        report.add(None, "warning", warning)
    _check_state_dir(cfg, user, report)
    from rstash.logcheck import check_log_target

    check_log_target(cfg, user, report)
    for box in sorted(cfg.boxes.values(), key=lambda b: b.name):
        _check_box(box, cfg, user, report)
    return cfg, report


def _service_user(cfg: Config, user_option: str | None, report: Report) -> ServiceUser | None:
    """The account every check is about; None (and an error) when it does not exist."""
    if user_option is not None:
        name, origin = user_option, f"--user {user_option}"
    elif cfg.service_user:
        name, origin = cfg.service_user, f"service_user = {json.dumps(cfg.service_user)}"
    else:
        name, origin = None, ""
    try:
        user = resolve_user(name)
    except KeyError:
        report.add(None, "error", f"{origin}: no such user (create it, or correct "
                                  f"service_user in {cfg.source})")
        return None
    source = " from service_user" if user_option is None and cfg.service_user else ""
    report.add(None, "info", f"service user {user.name} (uid {user.uid}){source}")
    if user.guessed_root:
        report.root_warning = (f"checked as root, who can read and write anything, but "
                               f"rstash-recv never serves as root: set service_user in "
                               f"{cfg.source} (or pass --user NAME) to check box, state_dir, "
                               "log and key files for the service user")
        report.add(None, "warning", report.root_warning)
    return user


# ---------------------------------------------------------------------------
# The commands.


