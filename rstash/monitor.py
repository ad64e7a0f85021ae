"""Monitoring: ``--status`` as a Nagios plugin and ``--metrics`` as OpenMetrics text.

This module owns what Nagios or Icinga (through NRPE or sudo) and Prometheus
(through node_exporter's textfile collector) see of a server, as rstash-recv(8)
MONITORING describes it: the check's first line ``RSTASH STATE - text | perfdata``
and its exit status (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, the Monitoring
Plugins development guidelines), the ``--expect BOX:PATTERN>=SIZE`` rules, and
the ``rstash_*`` metric families.

It must never change the server's state: the delivery log is opened read-only,
boxes are only listed and stat'ed, and the one file written is ``--output``
(through a temporary file beside it and a rename, so node_exporter never reads
half a file). Metric labels come from the configuration, never from a box name a
peer sent, so a stranger cannot add time series. No pydantic import here: the
configuration is loaded through rstash.config like every admin command.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from fnmatch import fnmatchcase
from typing import Any, TextIO

from rstash import admin
from rstash.config import Config, load_config
from rstash.errors import DELIVERY_OUTCOMES, ConfigError, Exit, RstashError
from rstash.names import is_box_name
from rstash.state import StateDB
from rstash.units import human_age, human_size, parse_duration, parse_size

__all__ = ["Expectation", "State", "check", "metrics", "parse_expect", "render_metrics"]

PROG = "rstash-recv"
#: The window of the per-outcome delivery counts, as in --status.
WINDOW = 86400.0


class State(IntEnum):
    """A Monitoring Plugins service state; the value is the exit status."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


#: How bad a state is: a check reports the worst of its items.
_SEVERITY = {State.OK: 0, State.WARNING: 1, State.UNKNOWN: 2, State.CRITICAL: 3}


def _err(line: str) -> None:
    sys.stderr.write(f"{PROG}: {line}\n")


def _plain(text: str) -> str:
    """Printable ASCII without ``|`` (which starts perfdata): a peer's name cannot forge it."""
    return "".join(c if " " <= c <= "~" and c != "|" else f"\\u{ord(c):04x}" for c in text)


# --- --expect -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """``--expect BOX:PATTERN>=SIZE``: the newest file matching PATTERN has at least SIZE bytes."""

    box: str
    pattern: str
    min_bytes: int
    text: str

    def matches(self, name: str, _size: int = 0) -> bool:
        return fnmatchcase(name, self.pattern)

    def met_by(self, name: str, size: int) -> bool:
        return size >= self.min_bytes and self.matches(name)


def parse_expect(text: str) -> Expectation:
    """``BOX[:PATTERN][>=SIZE]``; PATTERN defaults to ``*``, SIZE to 1 byte.

    PATTERN is a glob as in ``allow_names``; SIZE is a size as in the config
    (``1MiB``). Raises ValueError with a message fit for a user.
    """
    rest, sep, size = text.rpartition(">=")
    if not sep:
        rest, size = text, ""
    box, colon, pattern = rest.partition(":")
    example = "write BOX:PATTERN>=SIZE, e.g. 'vm1:db-*.sql.zst>=1MiB'"
    if not is_box_name(box):
        raise ValueError(f"{text!r}: {box!r} is not a box name ({example})")
    if colon and not pattern:
        raise ValueError(f"{text!r}: empty name pattern ({example})")
    if sep and not size.strip():
        raise ValueError(f"{text!r}: no size after >= ({example})")
    pattern = pattern if colon else "*"
    # Written out whole ("vm1" is "vm1:*>=1"): a label never equals one of a box's own.
    return Expectation(box, pattern, parse_size(size) if sep else 1,
                       f"{box}:{pattern}>={size.strip() if sep else 1}")


# --- the Nagios check ---------------------------------------------------------------------


class _Unknown(Exception):
    """The check cannot run: UNKNOWN, with this one line."""


@dataclass
class _Item:
    state: State
    problem: str | None


def _age_item(age: float | None, warn: float | None, crit: float | None, what: str) -> _Item:
    """OK, WARNING or CRITICAL by the age of the newest file; never stored is older than any limit."""
    if warn is None and crit is None:
        return _Item(State.OK, None) if age is not None else _Item(State.CRITICAL, f"no {what} stored")
    if age is None:
        return _Item(State.CRITICAL if crit is not None else State.WARNING, f"no {what} stored")
    if crit is not None and age > crit:
        return _Item(State.CRITICAL, f"{what} stored {human_age(age)} ago (critical after {human_age(crit)})")
    if warn is not None and age > warn:
        return _Item(State.WARNING, f"{what} stored {human_age(age)} ago (stale after {human_age(warn)})")
    return _Item(State.OK, None)


def _duration(option: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _Unknown(f"{option}: {e}") from None


def _num(value: float) -> str:
    return str(int(value))  # whole seconds and bytes


def _perf(label: str, value: float | None, uom: str = "", warn: str = "", crit: str = "") -> str:
    """``'label'=value[UOM];[warn];[crit];0``; ``U`` when the value is unknown."""
    shown = "U" if value is None else _num(value) + uom
    fields = [f"'{_plain(label).replace(chr(39), chr(39) * 2)}'={shown}", warn, crit, "0"]
    return ";".join(fields)


def check(path: str, box: str | None, *, as_json: bool, stale_after: str | None,
          critical_after: str | None = None, expect: Sequence[str] = ()) -> int:
    """``--status [BOX]`` with ``--stale-after``, ``--critical-after`` or ``--expect``.

    Prints the Nagios first line, perfdata and the ``--status`` report as long
    text (or one JSON object); returns the state as the exit status.
    """
    try:
        warn = _duration("--stale-after", stale_after)
        crit = _duration("--critical-after", critical_after)
        if warn is not None and crit is not None and crit < warn:
            raise _Unknown(f"--critical-after {critical_after} is shorter than --stale-after {stale_after}")
        rules: list[Expectation] = []
        for text in expect:
            try:
                rules.append(parse_expect(text))
            except ValueError as e:
                raise _Unknown(f"--expect {e}") from None
        return _check(path, box, as_json, warn, crit, rules)
    except _Unknown as e:
        line = f"RSTASH UNKNOWN - {_plain(str(e))}"
        if as_json:
            json.dump({"state": "UNKNOWN", "summary": str(e), "ok": False}, sys.stdout,
                      ensure_ascii=True, indent=1)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(line + "\n")
        return State.UNKNOWN


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        more = f" (and {len(e.problems) - 1} more: run rstash-recv --check-config)" \
            if len(e.problems) > 1 else ""
        raise _Unknown(f"{e.problems[0] if e.problems else e.message}{more}") from None


def _check(path: str, box: str | None, as_json: bool, warn: float | None, crit: float | None,
           rules: list[Expectation]) -> int:
    cfg = _load(path)
    for rule in rules:
        if rule.box not in cfg.boxes:
            raise _Unknown(f"--expect {rule.text}: no box {rule.box} in {cfg.source}")
        if box is not None and rule.box != box:
            raise _Unknown(f"--expect {rule.text}: names box {rule.box}, but only box {box} is checked")
    db = StateDB(cfg.state_dir, readonly=True)
    try:
        if not db.log_exists():
            raise _Unknown(f"no delivery log yet: {db.path} does not exist (the server's first "
                           f"session creates it; is state_dir the server's? rstash-recv --check-config)")
        data = db.status(box)
        removed = {b: n for b, o, n in db.outcome_counts(float(data["since"])) if o == "removed"}
        newest = [(db.newest_stored(r.box, r.matches), db.newest_stored(r.box, r.met_by))
                  for r in rules]
    except RstashError as e:
        raise _Unknown(f"cannot read the delivery log: {e.message} (run as the service user, "
                       "e.g. sudo -u rstash rstash-recv --status)") from None
    logged = {b["box"]: b for b in data["boxes"]}
    if box is not None and box not in cfg.boxes and box not in logged:
        raise _Unknown(f"--status {box}: no such box in {cfg.source} or in the delivery log")
    now = float(data["now"])
    limit = warn if warn is not None else crit
    names = sorted(set(cfg.boxes) | set(logged)) if box is None else [box]
    # The report of plain --status, so that its long text and JSON stay what they were.
    boxes = [admin._box_status(n, cfg, logged.get(n), now, limit, removed.get(n, 0)) for n in names]
    items: list[tuple[str, _Item]] = []
    perf: list[str] = []
    limits = (_num(warn) if warn is not None else "", _num(crit) if crit is not None else "")
    for b in boxes:
        if not b["configured"]:
            b["state"] = State.OK.name
            continue
        s = b["last_stored"]
        age = None if s is None else max(now - float(s["timestamp"]), 0.0)
        item = _age_item(age, warn, crit, "file") if limit is not None else _Item(State.OK, None)
        b["state"] = item.state.name
        items.append((b["box"], item))
        perf += [_perf(f"{b['box']} age", age, "s", *limits),
                 _perf(f"{b['box']} size", None if s is None else s["bytes"], "B"),
                 _perf(f"{b['box']} stored 24h", b["stored_24h"]),
                 _perf(f"{b['box']} refused 24h", b["refused_24h"])]
    expectations = []
    for rule, (last, good) in zip(rules, newest, strict=True):
        item = _expectation_item(rule, last, now, warn, crit)
        items.append((rule.text, item))
        perf += [_perf(f"{rule.text} age", None if good is None else max(now - float(good["time"]), 0.0),
                       "s", *limits),
                 _perf(f"{rule.text} size", None if last is None else last["bytes"], "B", "",
                       f"{rule.min_bytes}:")]
        expectations.append({"expect": rule.text, "box": rule.box, "pattern": rule.pattern,
                             "min_bytes": rule.min_bytes, "state": item.state.name,
                             "problem": item.problem, "newest": admin._event(last),
                             "newest_good": admin._event(good)})
    if not items:
        raise _Unknown(f"no box to check in {cfg.source}")
    state = max((i.state for _, i in items), key=_SEVERITY.__getitem__)
    summary = _summary(items, sum(1 for b in boxes if b["configured"]), limit, len(rules))
    result = {
        "state": state.name, "summary": summary,
        "config": str(cfg.source), "state_db": db.path, "now": admin._iso(now),
        "since": admin._iso(float(data["since"])), "stale_after": limit, "critical_after": crit,
        "ok": state == State.OK, "boxes": boxes, "expectations": expectations,
        "keys": admin._key_status(cfg, data["keys"], box),
    }
    out = sys.stdout
    if as_json:
        json.dump(result, out, ensure_ascii=True, indent=1)
        out.write("\n")
        return state
    out.write(f"RSTASH {state.name} - {_plain(summary)} | {' '.join(perf)}\n")
    # Long text: a "|" there would start more perfdata, and names come from peers.
    long_text = io.StringIO()
    admin._print_status(result, long_text)
    _print_expectations(expectations, now, long_text)
    out.write(long_text.getvalue().replace("|", "\\u007c"))
    return state


def _expectation_item(rule: Expectation, last: dict[str, Any] | None, now: float,
                      warn: float | None, crit: float | None) -> _Item:
    """CRITICAL when the newest matching file is too small, else judged by its age."""
    if last is not None and last["bytes"] < rule.min_bytes:
        return _Item(State.CRITICAL, f"newest {_plain(last['name'] or '')} is "
                                     f"{human_size(int(last['bytes']))}, expected at least "
                                     f"{human_size(rule.min_bytes)}")
    age = None if last is None else max(now - float(last["time"]), 0.0)
    return _age_item(age, warn, crit, "matching file")


def _summary(items: list[tuple[str, _Item]], boxes: int, limit: float | None, rules: int) -> str:
    """The first line's text: every problem, worst first; else what was found fine."""
    problems = sorted(((w, i) for w, i in items if i.problem and i.state != State.OK),
                      key=lambda p: -_SEVERITY[p[1].state])
    if problems:
        return "; ".join(f"{w}: {i.problem}" for w, i in problems)
    parts = [f"{boxes} box{'es' * (boxes != 1)} stored a file in the last {human_age(limit)}"] \
        if limit is not None else []
    if rules:
        parts.append(f"{rules} expectation{'s' * (rules != 1)} met")
    return "; ".join(parts)


def _print_expectations(expectations: list[dict[str, Any]], now: float, out: TextIO) -> None:
    if expectations:
        out.write("\nexpectations\n")
    for e in expectations:
        line = f"  {_plain(e['expect'])}  {e['state']}"
        for what in ("newest", "newest_good"):
            s = e[what]
            if s is not None and (what == "newest" or s != e["newest"]):
                line += (f"  {what.replace('_', ' ')} {_plain(s['name'] or '')} "
                         f"{human_size(int(s['bytes']))} {human_age(now - s['timestamp'])} ago")
        out.write(line + (f"  ({_plain(e['problem'])})" if e["problem"] else "") + "\n")


# --- OpenMetrics --------------------------------------------------------------------------

#: name -> (help, unit or "", label names). Every family is a gauge, which the
#: Prometheus text format of node_exporter's textfile collector reads as well.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rstash_box_configured": ("1 for every box in the configuration", "", ("box",)),
    "rstash_box_last_stored_timestamp_seconds": (
        "Unix time of the newest file stored in the box (delivery log)", "seconds", ("box",)),
    "rstash_box_last_stored_bytes": ("Size of the newest file stored in the box", "bytes", ("box",)),
    "rstash_box_used_bytes": ("Bytes in the box directory, as its quota counts them", "bytes", ("box",)),
    "rstash_box_quota_bytes": ("The box's quota (boxes with one)", "bytes", ("box",)),
    "rstash_box_deliveries": ("Delivery-log rows of the last 24 hours, by outcome", "",
                              ("box", "outcome")),
    "rstash_key_last_used_timestamp_seconds": (
        "Unix time a key last opened the box (key = its SHA256 fingerprint)", "seconds", ("box", "key")),
    "rstash_metrics_timestamp_seconds": ("Unix time these metrics were read", "seconds", ()),
}


def _label(value: str) -> str:
    """An OpenMetrics label value: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(cfg: Config, data: dict[str, Any] | None, counts: list[tuple[str, str, int]],
                   used: dict[str, int | None], now: float) -> str:
    """The OpenMetrics text of configured boxes; ``data`` is StateDB.status() (None: no log)."""
    samples: dict[str, list[tuple[tuple[str, ...], float]]] = {name: [] for name in FAMILIES}
    configured = sorted(cfg.boxes)
    logged = {b["box"]: b for b in (data or {}).get("boxes", [])}
    for name in configured:
        box = cfg.boxes[name]
        samples["rstash_box_configured"].append(((name,), 1))
        last = (logged.get(name) or {}).get("last_stored")
        if last is not None:
            samples["rstash_box_last_stored_timestamp_seconds"].append(((name,), float(last["time"])))
            samples["rstash_box_last_stored_bytes"].append(((name,), int(last["bytes"])))
        if used.get(name) is not None:
            samples["rstash_box_used_bytes"].append(((name,), int(used[name] or 0)))
        if box.quota is not None:
            samples["rstash_box_quota_bytes"].append(((name,), box.quota))
        # Every known outcome, zero included, so that a rule can compare with 0.
        per = dict.fromkeys(sorted(DELIVERY_OUTCOMES), 0) | {o: n for b, o, n in counts if b == name}
        for outcome, n in sorted(per.items()):
            samples["rstash_box_deliveries"].append(((name, outcome), n))
    keys: dict[tuple[str, str], float] = {}
    for row in (data or {}).get("keys", []):
        fp = str(row["key"]).split(" ", 1)[0]
        if row["box"] in cfg.boxes:
            keys[(row["box"], fp)] = max(keys.get((row["box"], fp), 0.0), float(row["last_used"]))
    for (name, fp), used_at in sorted(keys.items()):
        samples["rstash_key_last_used_timestamp_seconds"].append(((name, fp), used_at))
    samples["rstash_metrics_timestamp_seconds"].append(((), now))
    lines: list[str] = []
    for family, (help_text, unit, labels) in FAMILIES.items():
        lines += [f"# HELP {family} {help_text}", f"# TYPE {family} gauge"]
        if unit:
            lines.append(f"# UNIT {family} {unit}")
        for values, value in samples[family]:
            pairs = ",".join(f'{k}="{_label(v)}"' for k, v in zip(labels, values, strict=True))
            lines.append(f"{family}{{{pairs}}} {_metric_value(value)}" if pairs
                         else f"{family} {_metric_value(value)}")
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _metric_value(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(float(value))


def metrics(path: str, output: str | None) -> int:
    """``--metrics [--output FILE]``: exit 0; 1 when a box could not be measured
    (FILE is still written); 2 when nothing could be read or written."""
    from rstash.store import BoxStore

    cfg = admin.config_or_report(path)
    if cfg is None:
        return Exit.LOCAL
    db = StateDB(cfg.state_dir, readonly=True)
    try:
        now = float(db.now())
        data = db.status() if db.log_exists() else None
        counts = db.outcome_counts(now - WINDOW) if data is not None else []
    except RstashError as e:
        _err(f"{e.message}: nothing written (run as the service user or root)")
        return Exit.LOCAL
    used: dict[str, int | None] = {}
    status = Exit.OK
    for name, box in sorted(cfg.boxes.items()):
        try:
            with BoxStore(box.path, check_path=False) as store:
                # The quota's own count (temp files included), so the gauge equals what
                # a "552 quota" refusal compares.
                used[name] = store._usage()[0]
        except (RstashError, OSError) as e:
            _err(f"box {name}: cannot measure its size: {e}")
            used[name] = None
            status = Exit.REFUSED
    text = render_metrics(cfg, data, counts, used, now)
    if output is None:
        sys.stdout.write(text)
        return status
    try:
        write_atomic(output, text)
    except OSError as e:
        _err(f"--output {output}: {e.strerror or e}: nothing written")
        return Exit.LOCAL
    return status


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` in one rename: a temporary file in the same
    directory (not ending in .prom, which the textfile collector would read), fsync, rename."""
    target = os.path.abspath(path)
    directory, base = os.path.split(target)
    fd, temp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
