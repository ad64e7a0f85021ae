"""rstash-recv's admin commands: ``-t``, ``--check-config``, ``--dump-config``, ``--status``.

This module owns what an administrator, Ansible or Nagios sees of a server's
configuration and delivery log (brief sections 2, 3 and 6): the checks of every
box and key against the service user, their human and JSON reports, and the
exit statuses 0 (all is well) and 1 (a problem was found).

It must never change anything: no box is opened for writing, no key is
written, no directory is created, and the state database is opened read-only
(``--status`` run as root must never leave a file the service user cannot
write). It never switches users: ``--user`` is judged from permission bits.
It is imported only for these commands (rstash-recv imports it lazily).

Every function returns an exit status and prints its own problems: a config
that fails to load is exit 1 here, not the serving path's 2.
"""

from __future__ import annotations

import datetime
import grp
import json
import os
import pwd
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from rstash.config import BoxConfig, Config, load_config, parse_duration
from rstash.errors import ConfigError, Exit, KeyFileError, RstashError
from rstash.units import human_size

__all__ = ["check_config", "dump_config", "status", "test_config"]

Level = Literal["error", "warning", "info"]
PROG = "rstash-recv"


def _err(line: str) -> None:
    sys.stderr.write(f"{PROG}: {line}\n")


# ---------------------------------------------------------------------------
# The service user, judged from permission bits (no setuid, no access(2)).


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
    if box.on_receive:
        report.add(name, "info", f"on_receive {_words(box.on_receive)}")
    for key in box.keys:
        _check_key(name, key, user, report)


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
    _check_temps(box, cfg, report)


def _check_temps(box: BoxConfig, cfg: Config, report: Report) -> None:
    from rstash.store import BoxStore

    try:
        with BoxStore(box.path) as store:  # opens the directory read-only; no sweep
            temps = store.stale_temps()
    except (RstashError, OSError) as e:
        report.add(box.name, "warning", f"cannot look for stale temp files: {e}")
        return
    for temp, size, age in sorted(temps):
        if age > cfg.idle_timeout:
            report.add(box.name, "warning",
                       f"stale temp file {box.path / temp} ({human_size(size)}, "
                       f"{_age(age)} old): a later session's sweep removes it")


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


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
        unchecked = " (owner not checked: pass --user)" if user.guessed_root else ""
        report.add(None, "info", f"state_dir {cfg.state_dir}: ok{unchecked}")
    elif pipe_boxes:
        report.add(None, "error", f"state_dir {problem}: pipe mode needs it "
                                  f"(box {', '.join(pipe_boxes)})")
    else:
        report.add(None, "warning", f"state_dir {problem}: the delivery log (--status) is off "
                                    "and pipe mode would be refused")


def _state_dir_problem(path: Path, user: ServiceUser) -> str | None:
    """Why state_dir is unfit for ``user`` (root without --user: any owner)."""
    from rstash.state import check_state_dir

    return check_state_dir(path, uid=user.uid, check_owner=not user.guessed_root)


def _run_checks(path: str, user: ServiceUser) -> tuple[Config | None, Report]:
    report = Report()
    try:
        cfg = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            report.add(None, "error", problem)
        return None, report
    report.add(None, "info", f"config {cfg.source}")
    report.add(None, "info", f"service user {user.name} (uid {user.uid})")
    if user.guessed_root:
        report.add(None, "info", "checked as root, who can read and write anything; "
                                 "rstash-recv refuses to serve as root: pass --user NAME "
                                 "to check for the service user")
    for warning in cfg.warnings:
        report.add(None, "warning", warning)
    _check_state_dir(cfg, user, report)
    for box in sorted(cfg.boxes.values(), key=lambda b: b.name):
        _check_box(box, cfg, user, report)
    return cfg, report


# ---------------------------------------------------------------------------
# The commands.


def test_config(path: str) -> int:
    """``-t``: silent; exit 0 when every box can receive, else 1 and the errors on stderr."""
    try:
        user = resolve_user(None)
    except KeyError as e:
        _err(str(e.args[0]))
        return Exit.REFUSED
    _, report = _run_checks(path, user)
    for line in report.problem_lines(("error",)):
        _err(line)
    return Exit.REFUSED if report.errors else Exit.OK


def check_config(path: str, *, as_json: bool, user: str | None) -> int:
    """``--check-config``: every box, key and problem; exit 0 when every box can receive."""
    try:
        who = resolve_user(user)
    except KeyError as e:
        _err(str(e.args[0]))
        return Exit.LOCAL
    cfg, report = _run_checks(path, who)
    out = sys.stdout
    if as_json:
        json.dump(report.records, out, ensure_ascii=True, indent=1)
        out.write("\n")
    else:
        _print_check(cfg, report, out)
    return Exit.REFUSED if report.errors else Exit.OK


def _print_check(cfg: Config | None, report: Report, out: TextIO) -> None:
    for r in report.records:
        if r["box"] is None and r["level"] == "info":
            out.write(r["message"] + "\n")
    if cfg is not None:
        for name in sorted(cfg.boxes):
            out.write(f"\nbox {name}\n")
            for r in report.records:
                if r["box"] == name and r["level"] == "info":
                    out.write(f"  {r['message']}\n")
    lines = report.problem_lines()
    if lines:
        out.write("\n")
        for line in lines:
            out.write(line + "\n")
    errors = len(report.errors)
    warnings = len(report.records) - errors - sum(r["level"] == "info" for r in report.records)
    if cfg is None:
        verdict = "the configuration does not load"
    elif errors:
        bad = sorted({r["box"] for r in report.errors if r["box"] is not None})
        verdict = "cannot receive: " + (", ".join(f"box {b}" for b in bad) or "see above")
    else:
        verdict = f"ok: {len(cfg.boxes)} box{'es' if len(cfg.boxes) != 1 else ''} can receive"
    out.write(f"\n{errors} error{'s' * (errors != 1)}, {warnings} "
              f"warning{'s' * (warnings != 1)}; {verdict}\n")


def dump_config(path: str, *, as_json: bool) -> int:
    """``--dump-config``: the effective settings, like ``sshd -T``; exit 1 on a bad config."""
    from rstash import config

    try:
        cfg = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            _err(problem)
        return Exit.REFUSED
    data = config.dump_config(cfg)
    out = sys.stdout
    if as_json:
        json.dump(data, out, ensure_ascii=True, indent=1)
        out.write("\n")
        return Exit.OK
    boxes: dict[str, dict[str, Any]] = data.pop("boxes")
    warnings: list[str] = data.pop("warnings")
    for key, value in data.items():
        out.write(f"{key} {_dump_value(value)}\n")
    for name, box in boxes.items():
        out.write(f"\nbox {_word(name)}\n")
        for key, value in box.items():
            if key != "name":
                shown = _EMPTY_MEANS.get(key, "none") if value == [] else _dump_value(value)
                out.write(f"  {key} {shown}\n")
    for warning in warnings:
        _err(f"warning: {warning}")
    return Exit.OK


#: What an empty list means, where it is not "none".
_EMPTY_MEANS = {"allow_names": "any", "allow_from": "any"}


def _dump_value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _seconds(value)
    if isinstance(value, list):
        return _words(value)
    return _word(str(value))


# --- --status -----------------------------------------------------------------------------


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _fingerprint_of(logged_key: str) -> str:
    """The fingerprint of a delivery-log key field (``SHA256:… comment``)."""
    return logged_key.split(" ", 1)[0]


def status(path: str, box: str | None, *, as_json: bool, stale_after: str | None) -> int:
    """``--status``: recent deliveries and refusals per box, last use per key.

    Exit 1 when a box is STALE (``--stale-after``), BOX is unknown, the config
    does not load or the database cannot be read; else 0.
    """
    from rstash.state import StateDB

    limit: float | None = None
    if stale_after is not None:
        try:
            limit = parse_duration(stale_after)
        except ValueError as e:
            _err(f"--stale-after: {e}")
            return Exit.LOCAL
    try:
        cfg = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            _err(problem)
        return Exit.REFUSED
    state = StateDB(cfg.state_dir, readonly=True)
    try:
        db = state.status(box)
        has_log = state.log_exists()
    except RstashError as e:
        _err(e.message)
        return Exit.REFUSED
    logged = {b["box"]: b for b in db["boxes"]}
    if box is not None and box not in cfg.boxes and box not in logged:
        _err(f"--status {box}: no such box in {cfg.source} or in the delivery log")
        return Exit.REFUSED
    now = float(db["now"])
    names = sorted(set(cfg.boxes) | set(logged)) if box is None else [box]
    boxes = [_box_status(name, cfg, logged.get(name), now, limit) for name in names]
    keys = _key_status(cfg, db["keys"], box)
    result = {
        "config": str(cfg.source),
        "state_db": str(Path(cfg.state_dir) / "rstash.db"),
        "now": _iso(now),
        "since": _iso(float(db["since"])),
        "stale_after": limit,
        "ok": not any(b["stale"] for b in boxes),
        "delivery_log": has_log,
        "boxes": boxes,
        "keys": keys,
    }
    if as_json:
        json.dump(result, sys.stdout, ensure_ascii=True, indent=1)
        sys.stdout.write("\n")
    else:
        _print_status(result, sys.stdout)
    return Exit.OK if result["ok"] else Exit.REFUSED


def _event(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    out["timestamp"] = row["time"]
    out["time"] = _iso(row["time"])
    return out


def _box_status(name: str, cfg: Config, row: dict[str, Any] | None, now: float,
                limit: float | None) -> dict[str, Any]:
    conf = cfg.boxes.get(name)
    last_stored = _event(row["last_stored"] if row else None)
    stale = False
    if limit is not None and conf is not None:
        stale = last_stored is None or now - float(last_stored["timestamp"]) > limit
    return {
        "box": name,
        "configured": conf is not None,
        "path": str(conf.path) if conf is not None else None,
        "last_stored": last_stored,
        "last_refused": _event(row["last_refused"] if row else None),
        "stored_24h": int(row["stored_count"]) if row else 0,
        "refused_24h": int(row["refused_count"]) if row else 0,
        "stale": stale,
    }


def _key_status(cfg: Config, rows: list[dict[str, Any]], only: str | None) -> list[dict[str, Any]]:
    """Every configured key (its fingerprint when readable) and every key in the log."""
    from rstash.auth import load_key_file

    used: dict[tuple[str, str], dict[str, Any]] = {
        (r["box"], _fingerprint_of(r["key"])): r for r in rows}
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for conf in sorted(cfg.boxes.values(), key=lambda b: b.name):
        if only is not None and conf.name != only:
            continue
        for path in conf.keys:
            try:
                key = load_key_file(path)
            except KeyFileError:
                fp, comment = None, None  # e.g. an admin who may not read it: shown as unknown
            else:
                fp, comment = key.fingerprint, key.comment or None
            row = used.get((conf.name, fp)) if fp is not None else None
            if fp is not None:
                seen.add((conf.name, fp))
            out.append({
                "box": conf.name, "fingerprint": fp, "comment": comment, "path": str(path),
                "configured": True,
                "last_used": _iso(row["last_used"]) if row else None,
                "last_used_timestamp": row["last_used"] if row else None,
            })
    for (box_name, fp), row in sorted(used.items()):
        if (box_name, fp) in seen:
            continue
        comment = row["key"][len(fp) + 1:] or None
        out.append({
            "box": box_name, "fingerprint": fp, "comment": comment, "path": None,
            "configured": False,
            "last_used": _iso(row["last_used"]), "last_used_timestamp": row["last_used"],
        })
    return out


def _print_status(result: dict[str, Any], out: TextIO) -> None:
    now = time.time()
    # Before the server's first session there is no database: not the same as "never".
    never = "never" if result.get("delivery_log", True) else "no delivery log yet"
    for i, b in enumerate(result["boxes"]):
        if i:
            out.write("\n")
        flags = []
        if b["stale"]:
            flags.append("STALE")
        if not b["configured"]:
            flags.append("(not in the config)")
        out.write(f"box {_word(b['box'])}{''.join(' ' + f for f in flags)}\n")
        s = b["last_stored"]
        if s is None:
            out.write(f"  last stored   {never}\n")
        else:
            out.write(f"  last stored   {_word(s['name'] or '')} {s['time']} "
                      f"({_age(now - s['timestamp'])} ago) {human_size(int(s['bytes']))}"
                      f"{_from(s)}\n")
        r = b["last_refused"]
        if r is None:
            out.write(f"  last refused  {never}\n")
        else:
            out.write(f"  last refused  {_word(r['name'] or '-')} {r['time']} "
                      f"({_age(now - r['timestamp'])} ago) {r['code']} {r['outcome']}"
                      f"{_from(r)}\n")
        out.write(f"  last 24 h     {b['stored_24h']} stored, {b['refused_24h']} refused\n")
    if result["keys"]:
        out.write("\nkeys\n")
    for k in result["keys"]:
        what = k["fingerprint"] or f"{k['path']} (unreadable here)"
        if k["comment"]:
            what += f" {_text(k['comment'])}"
        where = f"box {_word(k['box'])}" + ("" if k["configured"] else " (no longer configured)")
        when = never if k["last_used"] is None else (
            f"{k['last_used']} ({_age(now - k['last_used_timestamp'])} ago)")
        out.write(f"  {what}  {where}  last used {when}\n")
    if result["stale_after"] is not None:
        stale = [b["box"] for b in result["boxes"] if b["stale"]]
        limit = _age(result["stale_after"])
        out.write(f"\nSTALE (nothing stored for {limit}): {', '.join(stale)}\n" if stale
                  else f"\nok: every box stored a file in the last {limit}\n")


def _from(event: dict[str, Any]) -> str:
    parts = []
    if event.get("peer"):
        parts.append(f" from {_word(event['peer'])}")
    if event.get("key"):
        parts.append(f" key {_fingerprint_of(event['key'])}")
    return "".join(parts)
