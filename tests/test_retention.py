"""Retention (rstash-recv.toml(5) RETENTION): groups, the plan, and removal from a real box.

The default group rule is checked against the table of examples in the man page itself,
so the page and the code cannot drift apart. Ages are set with os.utime (the mtime is
what the rules read); "now" is passed in, so no test waits for time to pass.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from rstash import retention
from rstash.config import load_config
from rstash.retention import Entry, Rules, default_group, plan
from rstash.settings import BoxPolicy
from rstash.store import BoxStore
from test_session import _files, _interactive, _run, _site

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "man" / "rstash-recv.toml.5"
DAY = 86400.0
NOW = 1_800_000_000.0


def _page_examples() -> list[tuple[str, str]]:
    text = PAGE.read_text(encoding="utf-8")
    m = re.search(r'\.\\" The table below is read by tests/test_retention\.py: name, then group\.\n'
                  r"\.EX\n(.*?)\.EE\n", text, re.S)
    assert m is not None, "the example table of RETENTION is missing from rstash-recv.toml(5)"
    rows = []
    for line in m.group(1).splitlines():
        name, group = line.replace("\\-", "-").split()
        rows.append((name, group))
    return rows


EXAMPLES = _page_examples()


def test_the_page_has_examples_of_every_stamp_shape() -> None:
    names = " ".join(n for n, _ in EXAMPLES)
    assert len(EXAMPLES) >= 20
    for shape in ("2026-11-26", "20261126", "T03:00:00Z", "+01:00", "_0300", "-03-00",
                  "1764115200", "~1.", "~3."):
        assert shape in names, shape


@pytest.mark.parametrize(("name", "group"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_default_group_matches_the_table_in_the_man_page(name: str, group: str) -> None:
    assert default_group(name) == group


def test_explicit_groups_take_the_first_pattern_and_leave_the_rest_ungrouped() -> None:
    rules = Rules(keep_last=1, groups=("db-*.sql.gz", "*.sql.gz"))
    assert rules.group("db-2026-11-26.sql.gz") == "db-*.sql.gz"
    assert rules.group("web.sql.gz") == "*.sql.gz"
    assert rules.group("notes.txt") is None


# --- the plan (pure) ------------------------------------------------------------------------


def daily(prefix: str, days: range, ext: str = ".sql.gz") -> list[Entry]:
    """One file per day, ``d`` days old, named by its date."""
    out = []
    for d in days:
        t = NOW - d * DAY
        out.append(Entry(f"{prefix}-{time.strftime('%Y-%m-%d', time.gmtime(t))}{ext}", t, 100))
    return out


def names(removals: list[retention.Removal]) -> set[str]:
    return {r.entry.name for r in removals}


def test_keep_last_alone_removes_all_but_the_newest_n_of_each_group() -> None:
    db = daily("db", range(8, 18))  # 8 ... 17 days old
    etc = daily("etc", range(8, 12), ".tar.zst")
    got = plan(db + etc, Rules(keep_last=3), NOW)
    assert names(got) == {e.name for e in db[3:]} | {e.name for e in etc[3:]}
    assert {r.group for r in got} == {"db-*.sql.gz", "etc-*.tar.zst"}
    assert all("not among the 3 newest" in r.reason for r in got)


def test_keep_days_alone_removes_what_is_older() -> None:
    db = daily("db", range(0, 40))
    got = plan(db, Rules(keep_days=30 * DAY), NOW)
    assert names(got) == {e.name for e in db[30:]}


def test_together_a_file_stays_while_either_rule_keeps_it() -> None:
    # Every 3 days for 60 days: keep_last 5 keeps days 0..12; keep_days 20 keeps days 0..18.
    db = daily("db", range(0, 60, 3))
    got = plan(db, Rules(keep_last=5, keep_days=20 * DAY, keep_min_age=0), NOW)
    assert names(got) == {e.name for e in db if NOW - e.mtime >= 20 * DAY}
    # Sparse files: keep_last keeps what keep_days would drop.
    sparse = daily("db", range(25, 100, 25))  # 25, 50, 75 days old
    got = plan(sparse, Rules(keep_last=2, keep_days=20 * DAY, keep_min_age=0), NOW)
    assert names(got) == {sparse[2].name}


def test_the_newest_file_of_a_group_is_never_removed() -> None:
    old = daily("db", range(400, 410))
    got = plan(old, Rules(keep_days=1 * DAY, keep_min_age=0), NOW)
    assert names(got) == {e.name for e in old[1:]}
    single = daily("lonely", range(900, 901))
    assert plan(single, Rules(keep_days=1 * DAY, keep_min_age=0), NOW) == []


def test_a_protected_name_stays_and_only_the_named_groups_are_planned() -> None:
    db = daily("db", range(10, 20))
    etc = daily("etc", range(10, 20), ".tar.zst")
    got = plan(db + etc, Rules(keep_last=1, keep_min_age=0), NOW, only={"db-*.sql.gz"},
               protect={db[5].name})
    assert names(got) == {e.name for e in db[1:]} - {db[5].name}


def test_keep_min_age_stops_a_flood_of_look_alike_names_from_evicting_the_backups() -> None:
    real = daily("db", range(1, 7))  # the six real nightly dumps, 1 ... 6 days old
    flood = [Entry(f"db-2099-01-{i:02d}.sql.gz", NOW - 60, 1) for i in range(1, 29)]
    flood += [Entry(f"db~{i}.sql.gz", NOW - 30, 1) for i in range(1, 200)]
    flood += [Entry(f"db-{1_700_000_000 + i}.sql.gz", NOW - 10, 1) for i in range(100)]
    assert all(default_group(e.name) in {"db-*.sql.gz", "db.sql.gz"} for e in flood)
    rules = Rules(keep_last=3)  # keep_min_age: 7 days by default
    got = plan(real + flood, rules, NOW)
    assert names(got) & {e.name for e in real} == set()
    assert all(NOW - r.entry.mtime >= 7 * DAY for r in got)
    # Without the floor the same flood evicts every real dump: the floor is what saves them.
    bare = plan(real + flood, Rules(keep_last=3, keep_min_age=0), NOW)
    assert {e.name for e in real} <= names(bare)


def test_keep_min_age_alone_removes_nothing() -> None:
    assert plan(daily("db", range(100, 200)), Rules(keep_min_age=0), NOW) == []


def test_ties_keep_the_greater_name() -> None:
    same = [Entry("a-2026-11-25.x", NOW - 9 * DAY, 1), Entry("a-2026-11-26.x", NOW - 9 * DAY, 1)]
    assert names(plan(same, Rules(keep_last=1), NOW)) == {"a-2026-11-25.x"}


# --- a real box -----------------------------------------------------------------------------


def put(box: Path, name: str, days_old: float, data: bytes = b"x") -> Path:
    p = box / name
    p.write_bytes(data)
    t = time.time() - days_old * DAY
    os.utime(p, (t, t))
    return p


@pytest.fixture
def box(tmp_path: Path) -> Path:
    b = tmp_path / "box"
    b.mkdir(mode=0o750)
    return b


def apply(box: Path, rules: Rules, **kw: object) -> retention.Applied:
    fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return retention.apply(fd, rules, owner=os.geteuid(), **kw)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def test_apply_removes_what_the_plan_names_and_nothing_else(box: Path) -> None:
    for d in range(10, 20):
        put(box, f"db-2026-10-{d:02d}.sql.gz", 30 - d)
    put(box, "etc-2026-10-01.tar.zst", 40)
    put(box, "etc-2026-10-02.tar.zst", 39)
    done = apply(box, Rules(keep_last=4), only={"db-*.sql.gz"}, protect=())
    assert done.problems == []
    assert names(done.removed) == {f"db-2026-10-{d:02d}.sql.gz" for d in range(10, 16)}
    assert sorted(os.listdir(box)) == sorted(
        [f"db-2026-10-{d:02d}.sql.gz" for d in range(16, 20)]
        + ["etc-2026-10-01.tar.zst", "etc-2026-10-02.tar.zst", retention.LOCK_NAME])


def test_symlinks_hard_links_hidden_files_and_refused_names_are_never_touched(
        box: Path, tmp_path: Path) -> None:
    precious = put(tmp_path, "precious-2020-01-01.sql.gz", 2000, b"precious")
    os.symlink(precious, box / "db-2020-01-01.sql.gz")
    os.symlink("db-2020-01-03.sql.gz", box / "db-2020-01-02.sql.gz")  # to a file in the box
    put(box, "db-2020-01-03.sql.gz", 1900)
    linked = put(box, "db-2020-01-04.sql.gz", 1800)
    os.link(linked, tmp_path / "outside-link")
    in_box = put(box, "db-2020-01-05.sql.gz", 1700)
    os.link(in_box, box / "db-2020-01-06.sql.gz")
    # Two of each, old: the newest of a group stays anyway, so one alone would prove nothing.
    for day in (7, 8):
        put(box, f".rstash-tmp-{day:032d}.5", 1600 + day)
        put(box, f".db-2020-01-0{day}.sql.gz", 1600 + day)
        put(box, f"db-2020-01-1{day}.sql.gz.tmp", 1600 + day)
    (box / ".rstash-partials").mkdir()
    put(box / ".rstash-partials", "db-2020-01-08.sql.gz", 1600)
    put(box, "db-2026-11-26.sql.gz", 1)
    before = sorted(os.listdir(box))
    done = apply(box, Rules(keep_last=1, keep_min_age=0, deny_names=("*.tmp",)),
                 only=None, protect=())
    assert names(done.removed) == {"db-2020-01-03.sql.gz"}  # the one plain old file
    assert sorted(os.listdir(box)) == sorted(set(before) - {"db-2020-01-03.sql.gz"}
                                             | {retention.LOCK_NAME})
    assert precious.read_bytes() == b"precious"
    assert os.stat(linked).st_nlink == 2 and os.stat(in_box).st_nlink == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file another owner")
def test_a_file_of_another_owner_is_never_touched(box: Path) -> None:
    theirs = put(box, "db-2020-01-01.sql.gz", 100)
    os.chown(theirs, 65534, 65534)
    put(box, "db-2020-01-02.sql.gz", 99)
    put(box, "db-2026-11-26.sql.gz", 1)
    done = apply(box, Rules(keep_last=1, keep_min_age=0), only=None)
    assert names(done.removed) == {"db-2020-01-02.sql.gz"}
    assert theirs.exists()


def test_a_file_changed_since_the_listing_is_not_removed(box: Path) -> None:
    p = put(box, "db-2020-01-01.sql.gz", 100)
    st = p.stat()
    stale = retention.Removal(Entry(p.name, st.st_mtime + 1, 1, st.st_dev, st.st_ino), "g", 1.0, "")
    fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert retention._remove(fd, stale, Rules(keep_last=1), os.geteuid()) == ""
        fresh = retention.Removal(Entry(p.name, st.st_mtime, 1, st.st_dev, st.st_ino), "g", 1.0, "")
        assert retention._remove(fd, fresh, Rules(keep_last=1), os.geteuid()) is None
    finally:
        os.close(fd)
    assert not p.exists()


def _hold_lock(box: Path, ready: Any, release: Any) -> None:
    fd = os.open(box / retention.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    ready.set()
    release.wait(30)
    os.close(fd)


def test_apply_waits_for_the_boxs_fcntl_lock_and_gives_up_without_removing(box: Path) -> None:
    for d in range(1, 6):
        put(box, f"db-2020-01-0{d}.sql.gz", 100 - d)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(box, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        done = apply(box, Rules(keep_last=1, keep_min_age=0), only=None, lock_wait=0.3)
        assert done.removed == [] and "held" in done.problems[0]
        assert len([n for n in os.listdir(box) if n.startswith("db-")]) == 5
    finally:
        release.set()
        holder.join(30)
    done = apply(box, Rules(keep_last=1, keep_min_age=0), only=None)
    assert len(done.removed) == 4


def test_the_lock_belongs_to_the_open_file_not_the_process(box: Path) -> None:
    """An OFD lock: a lock this very process holds through another descriptor excludes it
    (a classic POSIX lock would be the process's own and pass, and any close() of another
    descriptor of the file would drop it)."""
    for d in range(1, 4):
        put(box, f"db-2020-01-0{d}.sql.gz", 100 - d)
    fd = os.open(box / retention.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        done = apply(box, Rules(keep_last=1, keep_min_age=0), only=None, lock_wait=0.2)
        assert done.removed == [] and "held" in done.problems[0]
    finally:
        os.close(fd)
    assert len(apply(box, Rules(keep_last=1, keep_min_age=0), only=None).removed) == 2


def _store_and_apply(box: str, name: str, start: Any, out: Any) -> None:
    start.wait(30)
    with BoxStore(box) as s:
        up = s.begin(name, 1)
        up.write(b"n")
        up.commit()
        done = retention.apply(s.dir_fd, Rules(keep_last=3, keep_min_age=0), owner=os.geteuid(),
                               only={"db-*.sql.gz"}, protect={name})
    out.put([r.entry.name for r in done.removed])


def test_two_processes_storing_at_once_remove_no_more_than_the_rules_allow(box: Path) -> None:
    for i in range(20):
        put(box, f"db-2020-01-{i + 1:02d}.sql.gz", 100 - i)
    ctx = multiprocessing.get_context("fork")
    removed: list[str] = []
    for rnd in range(3):
        start, out = ctx.Barrier(2), ctx.Queue()
        new = [f"db-2026-11-{rnd * 2 + 10}.sql.gz", f"db-2026-11-{rnd * 2 + 11}.sql.gz"]
        procs = [ctx.Process(target=_store_and_apply, args=(str(box), n, start, out)) for n in new]
        for p in procs:
            p.start()
        removed += out.get(timeout=60) + out.get(timeout=60)
        for p in procs:
            p.join(30)
        left = sorted(n for n in os.listdir(box) if n.startswith("db-"))
        assert len(left) == 3 and set(new) <= set(left), left  # never fewer than keep_last
    assert len(removed) == len(set(removed)) == 20 + 6 - 3, removed  # none counted twice
    assert retention.LOCK_NAME in os.listdir(box)


def test_dry_run_lists_without_removing_or_creating_anything(box: Path) -> None:
    for d in range(1, 6):
        put(box, f"db-2020-01-0{d}.sql.gz", 100 - d)
    got = retention.dry_run(box, BoxPolicy(keep_last=2), os.geteuid())
    assert names(got) == {f"db-2020-01-0{d}.sql.gz" for d in (1, 2, 3)}
    assert sorted(os.listdir(box)) == [f"db-2020-01-0{d}.sql.gz" for d in range(1, 6)]


# --- the server session -----------------------------------------------------------------------


def test_a_session_removes_old_files_of_the_stored_group_after_its_replies_and_records_them(
        tmp_path: Path) -> None:
    key, conf, log = _site(tmp_path, keep_last="2", keep_min_age='"1d"')
    box = tmp_path / "box"
    for d in range(1, 6):
        put(box, f"db-2026-10-0{d}.sql.gz", 30 - d, b"old")
    put(box, "etc-2020-01-01.tar.zst", 400)
    put(box, "etc-2020-01-02.tar.zst", 399)
    lines = _run(conf, log, _interactive(key, lambda c: _files(c, ["db-2026-11-26.sql.gz"]) + c.bye()))
    assert lines[2].startswith(b"250 stored")
    left = sorted(os.listdir(box))
    assert left == [retention.LOCK_NAME, "db-2026-10-05.sql.gz", "db-2026-11-26.sql.gz",
                    "etc-2020-01-01.tar.zst", "etc-2020-01-02.tar.zst"]
    text = log.read_text()
    gone = [ln for ln in text.splitlines() if "event=retention" in ln]
    assert len(gone) == 4, text
    assert all("outcome=removed" in ln and 'group="db-*.sql.gz"' in ln and "bytes=3" in ln
               and "peer=192.0.2.1" in ln for ln in gone)
    # Removals come after the stored file's line.
    assert text.index("outcome=stored") < text.index("event=retention")
    from rstash.state import StateDB

    with StateDB(tmp_path / "state") as db:
        counts = db.outcome_counts(0)
    assert ("vm1", "removed", 4) in counts and ("vm1", "stored", 1) in counts


def test_retention_runs_after_the_sessions_hooks(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    box = tmp_path / "box"
    key, conf, log = _site(tmp_path, keep_last="1", keep_min_age="0",
                           on_receive=f'["/bin/sh", "-c", "ls {box} > {seen}"]')
    put(box, "db-2026-10-01.sql.gz", 30)
    lines = _run(conf, log, _interactive(key, lambda c: _files(c, ["db-2026-11-26.sql.gz"]) + c.bye()))
    assert lines[2].startswith(b"250 stored")
    assert seen.read_text().split() == ["db-2026-10-01.sql.gz", "db-2026-11-26.sql.gz"]
    assert sorted(os.listdir(box)) == [retention.LOCK_NAME, "db-2026-11-26.sql.gz"]


def test_a_session_that_stores_nothing_removes_nothing(tmp_path: Path) -> None:
    key, conf, log = _site(tmp_path, keep_last="1", keep_min_age="0", overwrite='"refuse"')
    box = tmp_path / "box"
    put(box, "db-2026-10-01.sql.gz", 30)
    put(box, "db-2026-10-02.sql.gz", 29)
    lines = _run(conf, log, _interactive(key, lambda c: _files(c, ["db-2026-10-02.sql.gz"]) + c.bye()))
    assert lines[2].startswith(b"550")
    assert sorted(os.listdir(box)) == ["db-2026-10-01.sql.gz", "db-2026-10-02.sql.gz"]


def test_the_quota_never_counts_space_retention_has_not_freed_yet(tmp_path: Path) -> None:
    key, conf, log = _site(tmp_path, keep_last="1", keep_min_age="0", quota="4")
    box = tmp_path / "box"
    put(box, "db-2026-10-01.sql.gz", 30, b"ab")
    put(box, "db-2026-10-02.sql.gz", 29, b"cd")
    # The new file would fit once retention removed an old one: it is refused all the same.
    lines = _run(conf, log, _interactive(key, lambda c: _files(c, ["db-2026-11-26.sql.gz"]) + c.bye()))
    assert lines[2].startswith(b"552 quota"), lines
    assert sorted(os.listdir(box)) == ["db-2026-10-01.sql.gz", "db-2026-10-02.sql.gz"]
    assert "event=retention" not in log.read_text()


# --- configuration, --check-config, --status, --metrics ------------------------------------------


def _config(tmp_path: Path, box_lines: str) -> Path:
    box = tmp_path / "box"
    box.mkdir(mode=0o750, exist_ok=True)
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    k = tmp_path / "k.key"
    k.write_text(f"rstash-key-v1 {secrets.token_hex(32)} # t\n")
    k.chmod(0o600)
    conf = tmp_path / "recv.toml"
    conf.write_text(f'state_dir = "{tmp_path / "state"}"\n[box.b]\npath = "{box}"\n'
                    f'keys = ["{k}"]\n{box_lines}\n')
    return conf


@pytest.mark.parametrize(("line", "seconds"), [
    ("keep_days = 30", 30 * DAY), ("keep_days = 1.5", 1.5 * DAY), ('keep_days = "36h"', 36 * 3600.0)])
def test_keep_days_is_days_or_a_duration_with_its_unit(tmp_path: Path, line: str, seconds: float) -> None:
    box = load_config(_config(tmp_path, line)).boxes["b"]
    assert box.keep_days == seconds and box.keep_min_age == 7 * DAY


@pytest.mark.parametrize(("line", "message"), [
    ('keep_days = "30"', "keep_days: write a number of days"),
    ("keep_days = 0", "keep_days: must be longer than 0"),
    ("keep_last = 0", "keep_last: must be at least 1"),
    ('keep_min_age = "-1d"', "keep_min_age:"),
    ('groups = ["db/*.gz"]', "groups: item 1: must be a file name pattern"),
])
def test_bad_retention_settings_name_the_field(tmp_path: Path, line: str, message: str) -> None:
    from rstash.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, line))
    assert message in e.value.message


def test_dump_config_shows_keep_days_in_days(tmp_path: Path) -> None:
    from rstash.config import dump_config

    data = dump_config(load_config(_config(tmp_path, 'keep_days = "36h"\nkeep_last = 3')))
    box = data["boxes"]["b"]
    assert (box["keep_days"], box["keep_last"], box["keep_min_age"], box["groups"]) == (1.5, 3, 7 * DAY, [])


def test_check_config_lists_what_retention_would_remove_and_removes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rstash import admin

    conf = _config(tmp_path, "keep_last = 2")
    for d in range(1, 6):
        put(tmp_path / "box", f"db-2020-01-0{d}.sql.gz", 100 - d)
    put(tmp_path / "box", "db-2026-11-26.sql.gz", 1)
    before = sorted(os.listdir(tmp_path / "box"))
    admin.check_config(str(conf), as_json=True, user=None)
    records = json.loads(capsys.readouterr().out)
    listed = [r["message"] for r in records if r["message"].startswith("retention would remove")]
    assert sorted(m.split()[3] for m in listed) == [f"db-2020-01-0{d}.sql.gz" for d in range(1, 5)]
    assert any(r["message"].startswith("retention keep_last 2, keep_days none, keep_min_age 7d")
               for r in records)
    assert sorted(os.listdir(tmp_path / "box")) == before


def test_status_and_metrics_count_removals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rstash import admin, monitor
    from rstash.errors import Outcome
    from rstash.state import StateDB

    conf = _config(tmp_path, "keep_last = 2")
    with StateDB(tmp_path / "state") as db:
        for i in range(3):
            assert db.log_event(box="b", name=f"old{i}", outcome=Outcome.REMOVED.log, code=0)
    admin.status(str(conf), None, as_json=True, stale_after=None)
    status = json.loads(capsys.readouterr().out)
    assert status["boxes"][0]["removed_24h"] == 3
    admin.status(str(conf), None, as_json=False, stale_after=None)
    assert "0 stored, 0 refused, 3 removed by retention" in capsys.readouterr().out
    monitor.metrics(str(conf), None)
    assert 'rstash_box_deliveries{box="b",outcome="removed"} 3' in capsys.readouterr().out
