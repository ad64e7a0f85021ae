"""rstash-recv's admin commands: ``-t``, ``--check-config``, ``--dump-config``, ``--status``.

This module owns what an administrator, Ansible or Nagios sees of a server's
configuration and delivery log (rstash-recv(8), ADMINISTRATION): the reports of
the checks of rstash.checks, human and JSON, and the
exit statuses 0 (all is well) and 1 (a problem was found).

It must never change anything: no box is opened for writing, no key is
written, no directory is created, and the state database is opened read-only
(``--status`` run as root must never leave a file the service user cannot
write). It never switches users: the service user (``--user``, else the
``service_user`` setting) is judged from permission bits.
It is imported only for these commands (rstash-recv imports it lazily).

Every function returns an exit status and prints its own problems: a config
that fails to load is exit 1 here, not the serving path's 2.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal, TextIO

from rstash.checks import (
    Report,
    ServiceUser,
    _run_checks,
    _seconds,
    _text,
    _word,
    _words,
    resolve_user,
)
from rstash.config import Config, load_config, parse_duration
from rstash.errors import ConfigError, Exit, KeyFileError, RstashError
from rstash.settings import empty_means
from rstash.units import human_age, human_size

__all__ = ["ServiceUser", "check_config", "dump_config", "resolve_user", "status", "test_config"]

Level = Literal["error", "warning", "info"]
PROG = "rstash-recv"


def _err(line: str) -> None:
    sys.stderr.write(f"{PROG}: {line}\n")


def config_or_report(path: str) -> Config | None:
    """The configuration at ``path``, or None once each of its problems is on stderr."""
    try:
        return load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            _err(problem)
        return None


def test_config(path: str, user: str | None = None) -> int:
    """``-t``: silent; exit 0 when every box can receive, else 1 and the errors on stderr.

    One warning is printed too: run as root with no service user to check for.
    """
    if not _user_exists(user):
        return Exit.LOCAL
    _, report = _run_checks(path, user)
    for line in report.problem_lines(("error",)):
        _err(line)
    if report.root_warning is not None:
        _err(f"warning: {report.root_warning}")
    return Exit.REFUSED if report.errors else Exit.OK


def _user_exists(user: str | None) -> bool:
    """``--user`` names an account (a typo is a usage error, exit 2, like before any check)."""
    if user is None:
        return True
    try:
        resolve_user(user)
    except KeyError as e:
        _err(str(e.args[0]))
        return False
    return True


def check_config(path: str, *, as_json: bool, user: str | None) -> int:
    """``--check-config``: every box, key and problem; exit 0 when every box can receive."""
    if not _user_exists(user):
        return Exit.LOCAL
    cfg, report = _run_checks(path, user)
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

    cfg = config_or_report(path)
    if cfg is None:
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
                shown = empty_means(key) if value == [] else _dump_value(value)
                out.write(f"  {key} {shown}\n")
    for warning in warnings:
        _err(f"warning: {warning}")
    return Exit.OK


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
    cfg = config_or_report(path)
    if cfg is None:
        return Exit.REFUSED
    state = StateDB(cfg.state_dir, readonly=True)
    try:
        db = state.status(box)
        has_log = state.log_exists()
        removed = {b: n for b, o, n in state.outcome_counts(float(db["since"])) if o == "removed"}
    except RstashError as e:
        _err(e.message)
        return Exit.REFUSED
    logged = {b["box"]: b for b in db["boxes"]}
    if box is not None and box not in cfg.boxes and box not in logged:
        _err(f"--status {box}: no such box in {cfg.source} or in the delivery log")
        return Exit.REFUSED
    now = float(db["now"])
    names = sorted(set(cfg.boxes) | set(logged)) if box is None else [box]
    boxes = [_box_status(name, cfg, logged.get(name), now, limit, removed.get(name, 0))
             for name in names]
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
                limit: float | None, removed: int = 0) -> dict[str, Any]:
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
        "removed_24h": removed,
        "retention": conf is not None and (conf.keep_last is not None or conf.keep_days is not None),
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


def _last_line(what: str, event: dict[str, Any] | None, never: str, now: float,
               detail: str | None) -> str:
    """One "last stored" or "last refused" line of the status."""
    if event is None:
        return f"  last {what:<9}{never}\n"
    name = event["name"] or ("" if what == "stored" else "-")
    return (f"  last {what:<9}{_word(name)} {event['time']} "
            f"({human_age(now - event['timestamp'])} ago) {detail}{_from(event)}\n")


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
        s, r = b["last_stored"], b["last_refused"]
        out.write(_last_line("stored", s, never, now, s and human_size(int(s["bytes"]))))
        out.write(_last_line("refused", r, never, now, r and f"{r['code']} {r['outcome']}"))
        removed = f", {b['removed_24h']} removed by retention" \
            if b.get("removed_24h") or b.get("retention") else ""
        out.write(f"  last 24 h     {b['stored_24h']} stored, {b['refused_24h']} refused{removed}\n")
    if result["keys"]:
        out.write("\nkeys\n")
    for k in result["keys"]:
        what = k["fingerprint"] or f"{k['path']} (unreadable here)"
        if k["comment"]:
            what += f" {_text(k['comment'])}"
        where = f"box {_word(k['box'])}" + ("" if k["configured"] else " (no longer configured)")
        when = never if k["last_used"] is None else (
            f"{k['last_used']} ({human_age(now - k['last_used_timestamp'])} ago)")
        out.write(f"  {what}  {where}  last used {when}\n")
    if result["stale_after"] is not None:
        stale = [b["box"] for b in result["boxes"] if b["stale"]]
        limit = human_age(result["stale_after"])
        out.write(f"\nSTALE (nothing stored for {limit}): {', '.join(stale)}\n" if stale
                  else f"\nok: every box stored a file in the last {limit}\n")


def _from(event: dict[str, Any]) -> str:
    parts = []
    if event.get("peer"):
        parts.append(f" from {_word(event['peer'])}")
    if event.get("key"):
        parts.append(f" key {_fingerprint_of(event['key'])}")
    return "".join(parts)
