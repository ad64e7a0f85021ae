"""Monitoring (rstash/monitor.py): --status as a Nagios check, --metrics as OpenMetrics text.

Unit tests run the command line in-process against a delivery log of real StateDB rows and
real box files; the metrics are read back with prometheus_client's OpenMetrics parser. The
e2e tests run the installed rstash-recv as the service user after a real delivery, the
shipped cron line and systemd timer literally (paths moved), and systemd-analyze verify.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as prometheus_text

from e2e_support import (
    ProcGroup,
    ServiceUser,
    as_service,
    free_port,
    is_ci,
    make_box,
    need,
    need_program,
    service_env,
    venv_bin,
    wait_for_port,
    write_config,
)
from rstash import monitor, recv
from rstash.auth import fingerprint, format_key, generate_key
from rstash.config import BoxConfig, Config
from rstash.state import StateDB

CHECKOUT = Path(__file__).resolve().parent.parent
CONFIG = CHECKOUT / "config"
#: The Monitoring Plugins first line: SERVICE STATE - text | perfdata.
FIRST_LINE = re.compile(r"RSTASH (OK|WARNING|CRITICAL|UNKNOWN) - ([^|\n]*?)(?: \| (.*))?\Z")
#: One perfdata item: 'label'=value[UOM];[warn];[crit];[min];[max] (value U: unknown).
PERF_ITEM = re.compile(r"'((?:[^']|'')+)'=(U|-?[0-9.]+)(s|B|%|c|)((?:;[^; ]*){0,4})")


# --- a server directory with a delivery log ---------------------------------------------------


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.state.mkdir(mode=0o700)
        self.config = root / "rstash-recv.toml"
        self.fps: dict[str, str] = {}
        for name in ("vm1", "vm2"):
            (root / "boxes" / name).mkdir(parents=True)
            secret = generate_key()
            key = root / f"{name}.key"
            key.write_text(format_key(secret, f"{name} key"))
            key.chmod(0o600)
            self.fps[name] = fingerprint(secret)
        self.config.write_text(f"""\
state_dir = "{self.state}"

[box.vm1]
path = "{root}/boxes/vm1"
keys = ["{root}/vm1.key"]
quota = "1GiB"

[box.vm2]
path = "{root}/boxes/vm2"
keys = ["{root}/vm2.key"]
""")

    def deliver(self, box: str, name: str, size: int, *, age: float, outcome: str = "stored",
                code: int = 250, write: bool = True) -> None:
        """A delivery-log row and, for a stored file, the file itself in the box."""
        if outcome == "stored" and write:
            (self.root / "boxes" / box / name).write_bytes(b"x" * size)
        with StateDB(self.state) as db:
            assert db.log_event(box=box, name=name, outcome=outcome, code=code, bytes=size,
                                key=f"{self.fps.get(box, 'SHA256:none')} {box} key",
                                peer="192.0.2.7", when=time.time() - age)


@pytest.fixture
def site() -> Iterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="rstash-monitor-"))
    yield Site(root)
    shutil.rmtree(root, ignore_errors=True)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], site: Site) -> Run:
    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = recv.main(["-c", str(site.config), *args])
        out, err = capsys.readouterr()
        return rc, out, err

    return call


def nagios(out: str) -> tuple[str, str, dict[str, tuple[str, str, list[str]]]]:
    """(state, text, {label: (value, uom, [warn, crit, min, ...])}) of a check's first line."""
    first = out.split("\n", 1)[0]
    m = FIRST_LINE.match(first)
    assert m is not None, first
    perf: dict[str, tuple[str, str, list[str]]] = {}
    rest = m.group(3) or ""
    for item in PERF_ITEM.finditer(rest):
        perf[item.group(1).replace("''", "'")] = (item.group(2), item.group(3),
                                                  item.group(4).split(";")[1:])
    assert " ".join(i.group(0) for i in PERF_ITEM.finditer(rest)) == rest, rest
    return m.group(1), m.group(2), perf


# --- the Nagios check -------------------------------------------------------------------------


def test_without_a_database_the_check_is_unknown_and_status_says_no_delivery_log_yet(
        site: Site, run: Run) -> None:
    rc, out, err = run("--status", "--stale-after", "26h")
    assert (rc, err) == (3, "")
    state, text, _ = nagios(out)
    assert state == "UNKNOWN" and "no delivery log yet" in text and "never" not in text
    rc, out, _ = run("--status")
    assert rc == 0 and "last stored   no delivery log yet" in out and "never" not in out
    assert list(site.state.iterdir()) == []


def test_fresh_deliveries_are_ok_with_perfdata(site: Site, run: Run) -> None:
    site.deliver("vm1", "a.tar.zst", 5000, age=3600)
    site.deliver("vm2", "b.tar.zst", 7, age=60)
    site.deliver("vm2", "b.tar.zst", 0, age=30, outcome="exists", code=550)
    rc, out, _ = run("--status", "--stale-after", "26h", "--critical-after", "2d")
    assert rc == 0
    state, text, perf = nagios(out)
    assert state == "OK" and text == "2 boxes stored a file in the last 26 h"
    value, uom, rest = perf["vm1 age"]
    assert uom == "s" and 3590 <= int(value) <= 3700 and rest[:3] == ["93600", "172800", "0"]
    assert perf["vm1 size"][:2] == ("5000", "B")
    assert perf["vm2 stored 24h"][0] == "1" and perf["vm2 refused 24h"][0] == "1"
    # The plain --status report follows as long text.
    assert "\nbox vm1\n" in out and "550 exists" in out


def test_stale_is_warning_and_older_than_critical_after_is_critical(site: Site, run: Run) -> None:
    site.deliver("vm1", "a", 10, age=30 * 3600)
    site.deliver("vm2", "b", 10, age=60)
    rc, out, _ = run("--status", "--stale-after", "26h", "--critical-after", "2d")
    state, text, _ = nagios(out)
    assert (rc, state) == (1, "WARNING") and text == "vm1: file stored 30 h ago (stale after 26 h)"
    assert "box vm1 STALE" in out  # the old report's flag, for scripts that grep it
    rc, out, _ = run("--status", "--stale-after", "1h", "--critical-after", "1d")
    state, text, _ = nagios(out)
    assert (rc, state) == (2, "CRITICAL") and text.startswith("vm1: file stored 30 h ago (critical after 24 h)")


def test_a_box_that_never_stored_is_as_old_as_the_worst_limit(site: Site, run: Run) -> None:
    site.deliver("vm1", "a", 10, age=60)
    rc, out, _ = run("--status", "--stale-after", "26h")
    assert rc == 1 and nagios(out)[1] == "vm2: no file stored"
    assert nagios(out)[2]["vm2 age"][0] == "U"
    rc, out, _ = run("--status", "--stale-after", "26h", "--critical-after", "2d")
    assert rc == 2 and nagios(out)[0] == "CRITICAL"
    rc, out, _ = run("--status", "vm1", "--stale-after", "26h")
    assert rc == 0 and "vm2" not in nagios(out)[1]


def test_a_33_byte_dump_is_critical_under_an_expectation(site: Site, run: Run) -> None:
    site.deliver("vm1", "db-1.sql.zst", 5 << 20, age=26 * 3600)
    site.deliver("vm1", "etc.tar.zst", 10 << 20, age=120)  # another name: not what is expected
    site.deliver("vm1", "db-2.sql.zst", 33, age=60)
    rc, out, _ = run("--status", "vm1", "--stale-after", "26h", "--expect", "vm1:db-*.sql.zst>=1MiB")
    state, text, perf = nagios(out)
    assert (rc, state) == (2, "CRITICAL")
    assert text == "vm1:db-*.sql.zst>=1MiB: newest db-2.sql.zst is 33 B, expected at least 1.0 MiB"
    assert perf["vm1:db-*.sql.zst>=1MiB size"] == ("33", "B", ["", "1048576:", "0"])
    assert 26 * 3600 - 10 <= int(perf["vm1:db-*.sql.zst>=1MiB age"][0]) <= 26 * 3600 + 60
    assert "newest good db-1.sql.zst 5.0 MiB" in out
    # The next night's healthy dump clears it.
    site.deliver("vm1", "db-3.sql.zst", 2 << 20, age=1)
    rc, out, _ = run("--status", "vm1", "--stale-after", "26h", "--expect", "vm1:db-*.sql.zst>=1MiB")
    assert rc == 0 and nagios(out)[1] == "1 box stored a file in the last 26 h; 1 expectation met"


def test_an_expectation_follows_its_pattern_and_the_age_limits(site: Site, run: Run) -> None:
    site.deliver("vm1", "db-1.sql.zst", 2 << 20, age=30 * 3600)
    site.deliver("vm1", "etc.tar.zst", 10, age=60)
    site.deliver("vm2", "db-9.sql.zst", 2 << 20, age=60)  # another box
    args = ("--status", "--stale-after", "26h", "--expect", "vm1:db-*.sql.zst>=1MiB")
    rc, out, _ = run(*args)
    assert rc == 1
    assert nagios(out)[1] == "vm1:db-*.sql.zst>=1MiB: matching file stored 30 h ago (stale after 26 h)"
    rc, out, _ = run("--status", "--expect", "vm2:*.tar.zst")
    assert rc == 2 and nagios(out)[1] == "vm2:*.tar.zst>=1: no matching file stored"
    rc, out, _ = run("--status", "--expect", "vm1:etc.tar.zst>=10", "--expect", "vm2")
    assert rc == 0 and nagios(out)[1] == "2 expectations met"
    perf = nagios(out)[2]
    assert perf["vm2 size"][0] == perf["vm2:*>=1 size"][0] == str(2 << 20)


@pytest.mark.parametrize(("args", "says"), [
    (("--stale-after", "soon"), "--stale-after: 'soon' is not a duration"),
    (("--stale-after", "2d", "--critical-after", "1d"), "--critical-after 1d is shorter than"),
    (("--expect", "vm1:db-*>=lots"), "--expect 'lots' is not a size"),
    (("--expect", "no/box:x"), "is not a box name"),
    (("--expect", "vm9:x>=1"), "--expect vm9:x>=1: no box vm9 in"),
    (("vm2", "--expect", "vm1:x"), "names box vm1, but only box vm2 is checked"),
    (("nosuchbox", "--stale-after", "1h"), "--status nosuchbox: no such box in"),
])
def test_bad_arguments_are_unknown_with_one_line(site: Site, run: Run, args: tuple[str, ...],
                                                  says: str) -> None:
    site.deliver("vm1", "a", 10, age=60)
    rc, out, err = run("--status", *args)
    assert (rc, err) == (3, "")
    assert out.count("\n") == 1 and nagios(out)[0] == "UNKNOWN" and says in out


def test_a_config_that_does_not_load_is_unknown_and_names_its_file(site: Site, run: Run) -> None:
    site.config.write_text(site.config.read_text() + "\nbogus = 1\n")
    rc, out, err = run("--status", "--stale-after", "26h")
    assert (rc, err) == (3, "") and out.count("\n") == 1
    assert nagios(out)[0] == "UNKNOWN" and str(site.config) in out and "bogus" in out


def test_an_unreadable_delivery_log_is_unknown_and_names_the_fix(site: Site, run: Run) -> None:
    site.deliver("vm1", "a", 10, age=60)
    (site.state / "rstash.db").write_bytes(b"not a database, at least 100 bytes " * 10)
    for extra in ("-wal", "-shm"):
        (site.state / f"rstash.db{extra}").unlink(missing_ok=True)
    rc, out, _ = run("--status", "--stale-after", "26h")
    assert rc == 3 and "cannot read the delivery log" in out and "sudo -u rstash" in out


def test_a_peers_name_cannot_forge_perfdata_or_a_second_line(site: Site, run: Run) -> None:
    site.deliver("vm1", "x | 'evil'=1;2;3\nRSTASH OK - fine", 1, age=60, write=False)
    rc, out, _ = run("--status", "--stale-after", "26h", "--expect", "vm1>=1KiB")
    assert rc == 2
    first, long_text = out.split("\n", 1)
    assert first.count("|") == 1 and "evil" not in nagios(out)[2]
    assert "|" not in long_text and "\nRSTASH" not in long_text


def test_json_with_limits_carries_the_state(site: Site, run: Run) -> None:
    import json

    site.deliver("vm1", "db-1.sql.zst", 33, age=60)
    rc, out, _ = run("--status", "--json", "--stale-after", "26h", "--expect", "vm1:db-*>=1MiB")
    data = json.loads(out)
    assert rc == 2 and data["state"] == "CRITICAL" and data["ok"] is False
    assert [b["state"] for b in data["boxes"]] == ["OK", "WARNING"]
    [e] = data["expectations"]
    assert e["min_bytes"] == 1 << 20 and e["newest"]["bytes"] == 33 and e["newest_good"] is None


def test_options_of_the_check_and_the_metrics_need_their_command(run: Run) -> None:
    for args in (("--output", "x.prom"), ("--expect", "vm1"), ("--critical-after", "1d")):
        with pytest.raises(SystemExit) as exit_:
            run(*args)
        assert exit_.value.code == 2


def test_parse_expect() -> None:
    e = monitor.parse_expect("vm1:db-*.sql.zst>=1MiB")
    assert (e.box, e.pattern, e.min_bytes) == ("vm1", "db-*.sql.zst", 1 << 20)
    whole = monitor.parse_expect("vm1")
    assert (whole.pattern, whole.min_bytes, whole.text) == ("*", 1, "vm1:*>=1")
    assert monitor.parse_expect("vm1:a>=b>=0").pattern == "a>=b"
    assert monitor.parse_expect("vm1:x>=0").min_bytes == 0
    for bad in ("", ":x", "vm1:", "vm1:x>=", "vm 1:x"):
        with pytest.raises(ValueError):
            monitor.parse_expect(bad)


# --- OpenMetrics ------------------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    assert text.endswith("# EOF\n")
    # prometheus_client's OpenMetrics parser has no annotations.
    return {f.name: f for f in text_string_to_metric_families(text)}  # type: ignore[no-untyped-call]


def samples(fams: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in fams[name].samples}


def test_metrics_match_the_delivery_log_and_the_boxes(site: Site, run: Run) -> None:
    site.deliver("vm1", "old.tar.zst", 100, age=30 * 3600)
    site.deliver("vm1", "db.sql.zst", 4096, age=600)
    site.deliver("vm1", "db.sql.zst", 0, age=300, outcome="exists", code=550)
    site.deliver("vm1", "x", 0, age=200, outcome="refused", code=553)
    site.deliver("vm1", "y", 0, age=100, outcome="refused", code=553)
    site.deliver("evil\"box\n", "z", 0, age=50, outcome="auth_failed", code=535)
    (site.root / "boxes" / "vm2" / "by-hand.txt").write_bytes(b"12345")
    rc, out, err = run("--metrics")
    assert (rc, err) == (0, "")
    fams = families(out)
    assert all(f.type == "gauge" for f in fams.values())
    assert fams["rstash_box_last_stored_timestamp_seconds"].unit == "seconds"
    with StateDB(site.state, readonly=True) as db:
        [vm1] = db.status("vm1")["boxes"]
    assert samples(fams, "rstash_box_last_stored_timestamp_seconds") == {
        (("box", "vm1"),): vm1["last_stored"]["time"]}
    assert samples(fams, "rstash_box_last_stored_bytes") == {(("box", "vm1"),): 4096}
    assert samples(fams, "rstash_box_used_bytes") == {(("box", "vm1"),): 4196, (("box", "vm2"),): 5}
    assert samples(fams, "rstash_box_quota_bytes") == {(("box", "vm1"),): 1 << 30}
    deliveries = samples(fams, "rstash_box_deliveries")
    assert deliveries[(("box", "vm1"), ("outcome", "stored"))] == 1  # the 30 h old one is out
    assert deliveries[(("box", "vm1"), ("outcome", "refused"))] == 2
    assert deliveries[(("box", "vm1"), ("outcome", "exists"))] == 1
    assert deliveries[(("box", "vm2"), ("outcome", "stored"))] == 0
    assert {dict(k)["box"] for k in deliveries} == {"vm1", "vm2"}  # never a peer's box name
    [(labels, used)] = samples(fams, "rstash_key_last_used_timestamp_seconds").items()
    assert dict(labels) == {"box": "vm1", "key": site.fps["vm1"]}
    assert used == pytest.approx(time.time() - 100, abs=30)
    assert samples(fams, "rstash_box_configured") == {(("box", "vm1"),): 1, (("box", "vm2"),): 1}
    # node_exporter's textfile collector reads the Prometheus text format: the same samples.
    classic = {f.name: f for f in prometheus_text(out)}
    assert set(classic) == set(fams)
    for name, fam in fams.items():
        assert [(s.labels, s.value) for s in classic[name].samples] == \
            [(s.labels, s.value) for s in fam.samples], name


def test_metrics_without_a_database_still_describe_the_boxes(site: Site, run: Run) -> None:
    rc, out, _ = run("--metrics")
    fams = families(out)
    assert rc == 0 and samples(fams, "rstash_box_last_stored_timestamp_seconds") == {}
    assert set(samples(fams, "rstash_box_configured")) == {(("box", "vm1"),), (("box", "vm2"),)}
    assert list(site.state.iterdir()) == []


def test_label_values_are_escaped() -> None:
    box = BoxConfig(name='we"ird\\box\nname', path=Path("/nonexistent"), keys=(), quota=5)
    cfg = Config(source=Path("/x.toml"), boxes={box.name: box})
    text = monitor.render_metrics(cfg, None, [], {box.name: 7}, 1.5)
    fams = families(text)
    assert samples(fams, "rstash_box_used_bytes") == {(("box", box.name),): 7}
    assert samples(fams, "rstash_metrics_timestamp_seconds") == {(): 1.5}


def test_metrics_output_replaces_the_file_atomically_with_mode_0644(site: Site, run: Run) -> None:
    site.deliver("vm1", "a", 10, age=60)
    out_dir = site.root / "textfile"
    out_dir.mkdir()
    target = out_dir / "rstash.prom"
    target.write_text("old\n")
    old_inode = target.stat().st_ino
    old = os.umask(0o077)  # cron's umask may be anything: the file is 0644 all the same
    try:
        rc, out, err = run("--metrics", "--output", str(target))
    finally:
        os.umask(old)
    assert (rc, out, err) == (0, "", "")
    assert os.listdir(out_dir) == ["rstash.prom"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.stat().st_ino != old_inode
    assert samples(families(target.read_text()), "rstash_box_last_stored_bytes") == {(("box", "vm1"),): 10}


def test_metrics_output_failure_keeps_the_old_file(site: Site, run: Run) -> None:
    rc, out, err = run("--metrics", "--output", str(site.root / "no-such-dir" / "rstash.prom"))
    assert (rc, out) == (2, "") and "--output" in err and "nothing written" in err
    site.deliver("vm1", "a", 10, age=60)
    (site.state / "rstash.db").write_bytes(b"not a database, at least 100 bytes " * 10)
    for extra in ("-wal", "-shm"):
        (site.state / f"rstash.db{extra}").unlink(missing_ok=True)
    kept = site.root / "kept.prom"
    kept.write_text("old\n")
    rc, out, err = run("--metrics", "--output", str(kept))
    assert (rc, out) == (2, "") and "nothing written" in err and kept.read_text() == "old\n"
    shutil.rmtree(site.state)
    site.state.mkdir(mode=0o700)
    shutil.rmtree(site.root / "boxes" / "vm2")
    target = site.root / "rstash.prom"
    rc, out, err = run("--metrics", "--output", str(target))
    assert rc == 1 and "box vm2: cannot measure its size" in err
    assert samples(families(target.read_text()), "rstash_box_used_bytes") == {(("box", "vm1"),): 10}


def test_the_alert_rules_use_only_metrics_that_exist() -> None:
    text = (CONFIG / "prometheus" / "rstash.rules.yml").read_text(encoding="utf-8")
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        need(not is_ci(), "PyYAML is not installed")
        pytest.skip("PyYAML is not installed: the rule file's YAML is not checked")
    rules = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"RstashBackupStale", "RstashBackupNeverStored",
                                           "RstashBoxNearlyFull", "RstashMetricsStale"}
    used = {m for r in rules for m in re.findall(r"\brstash_[a-z_]+", r["expr"])}
    assert used and used <= set(monitor.FAMILIES), used - set(monitor.FAMILIES)
    promtool = shutil.which("promtool")
    if promtool:
        done = subprocess.run([promtool, "check", "rules", str(CONFIG / "prometheus" / "rstash.rules.yml")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


# --- end to end: the installed program, the shipped cron line and timer -----------------------


def _admin(recv_bin: str, conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed rstash-recv with an admin option, as the service user (as NRPE runs it)."""
    return subprocess.run(as_service([recv_bin, "-c", str(conf), *args]), capture_output=True,
                          text=True, env=service_env(), timeout=60)


@pytest.mark.e2e
def test_installed_status_and_metrics_as_the_service_user_after_a_real_delivery(
        e2e_dir: Path, e2e_venv: Path, spawn: ProcGroup, service_user: ServiceUser) -> None:
    from rstash.auth import fingerprint as fp_of

    ssa = need_program("systemd-socket-activate")
    recv_bin = venv_bin(e2e_venv, "rstash-recv")
    box = make_box(e2e_dir, "vm1")
    conf = write_config(e2e_dir, [box])
    before = _admin(recv_bin, conf, "--status", "--stale-after", "1h")
    assert before.returncode == 3 and "no delivery log yet" in before.stdout, before
    port = free_port()
    server = spawn([ssa, "-a", "--inetd", "-l", f"127.0.0.1:{port}",
                    *as_service([recv_bin, "-c", str(conf)])], name="socket-activate", env=service_env())
    wait_for_port("127.0.0.1", port, timeout=10, proc=server)
    src = e2e_dir / "src"
    src.mkdir()
    dump = src / "db-1.sql.zst"
    dump.write_bytes(os.urandom(3000))
    sent = spawn([venv_bin(e2e_venv, "rstash-send"), "-k", str(box.client_key), "--no-progress",
                  "--timeout", "30", box.url(port), str(dump)], name="rstash-send")
    assert sent.wait(60) == 0, sent.describe()
    assert box.files() == {"db-1.sql.zst": dump.read_bytes()}

    ok = _admin(recv_bin, conf, "--status", "--stale-after", "1h", "--expect", "vm1:db-*.sql.zst>=1KiB")
    assert (ok.returncode, ok.stderr) == (0, ""), ok
    state, text, perf = nagios(ok.stdout)
    assert state == "OK" and text == "1 box stored a file in the last 60 min; 1 expectation met"
    assert perf["vm1 size"][:2] == ("3000", "B")
    small = _admin(recv_bin, conf, "--status", "--stale-after", "1h", "--expect", "vm1:db-*.sql.zst>=1MiB")
    assert small.returncode == 2 and nagios(small.stdout)[0] == "CRITICAL", small

    shown = _admin(recv_bin, conf, "--metrics")
    assert (shown.returncode, shown.stderr) == (0, ""), shown
    fams = families(shown.stdout)
    assert samples(fams, "rstash_box_last_stored_bytes") == {(("box", "vm1"),): 3000}
    assert samples(fams, "rstash_box_used_bytes") == {(("box", "vm1"),): 3000}
    assert samples(fams, "rstash_box_deliveries")[(("box", "vm1"), ("outcome", "stored"))] == 1
    [(labels, used)] = samples(fams, "rstash_key_last_used_timestamp_seconds").items()
    assert dict(labels) == {"box": "vm1", "key": fp_of(box.key)}
    assert used == pytest.approx(time.time(), abs=120)
    textfile = e2e_dir / "textfile"
    textfile.mkdir(mode=0o755)
    service_user.chown(textfile)
    written = _admin(recv_bin, conf, "--metrics", "--output", str(textfile / "rstash.prom"))
    assert (written.returncode, written.stdout, written.stderr) == (0, "", ""), written
    assert os.listdir(textfile) == ["rstash.prom"]
    assert samples(families((textfile / "rstash.prom").read_text()),
                   "rstash_box_last_stored_bytes") == {(("box", "vm1"),): 3000}


@pytest.mark.e2e
def test_a_check_run_by_another_user_is_unknown_and_says_whom_to_run_it_as(
        e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser) -> None:
    need(os.geteuid() == 0 and not service_user.is_current, "needs root and a service user")
    box = make_box(e2e_dir, "vm1")
    conf = write_config(e2e_dir, [box])
    state = e2e_dir / "state"
    with StateDB(state) as db:
        assert db.log_event(box="vm1", name="a", outcome="stored", code=250, bytes=1)
    for p in [state, *state.iterdir()]:
        os.chown(p, 0, 0)  # the service user's state_dir, seen by a user who is not its owner
    done = _admin(venv_bin(e2e_venv, "rstash-recv"), conf, "--status", "--stale-after", "26h")
    assert (done.returncode, done.stderr) == (3, ""), done
    assert done.stdout.startswith("RSTASH UNKNOWN - cannot read the delivery log: ")
    assert "Permission denied" in done.stdout and "sudo -u rstash" in done.stdout
    metrics = _admin(venv_bin(e2e_venv, "rstash-recv"), conf, "--metrics")
    assert metrics.returncode == 2 and metrics.stdout == "" and "nothing written" in metrics.stderr


def _shipped_command(source: str) -> str:
    if source == "cron":
        lines = [line for line in (CONFIG / "cron" / "rstash-metrics").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]
        [line] = lines
        fields = line.split(None, 6)
        assert fields[:6] == ["*/5", "*", "*", "*", "*", "root"], fields
        return fields[6]
    unit = (CONFIG / "systemd" / "rstash-metrics.service").read_text()
    [command] = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    return str(command)


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["cron", "systemd"])
def test_the_shipped_metrics_command_runs_as_written_with_its_paths_moved(
        source: str, e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser) -> None:
    box = make_box(e2e_dir, "vm1", quota="1GiB")
    conf = write_config(e2e_dir, [box])
    state = e2e_dir / "state"
    with StateDB(state) as db:  # a log the service user owns, as after real sessions
        assert db.log_event(box="vm1", name="a.tar.zst", outcome="stored", code=250, bytes=12)
    (box.path / "a.tar.zst").write_bytes(b"x" * 12)
    for p in [state, *state.iterdir()]:
        service_user.chown(p)
    textfile = e2e_dir / "node-exporter"
    textfile.mkdir()
    command = _shipped_command(source)
    moves = {"/usr/bin/rstash-recv": venv_bin(e2e_venv, "rstash-recv"),
             "/etc/rstash/rstash-recv.toml": str(conf),
             "/var/lib/prometheus/node-exporter": str(textfile)}
    for old, new in moves.items():
        assert old in command, (old, command)
        command = command.replace(old, new)
    # As written: root runs it (the service user when the tests do not run as root).
    done = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done
    assert os.listdir(textfile) == ["rstash.prom"]
    assert stat.S_IMODE((textfile / "rstash.prom").stat().st_mode) == 0o644
    fams = families((textfile / "rstash.prom").read_text())
    assert samples(fams, "rstash_box_last_stored_bytes") == {(("box", "vm1"),): 12}
    assert samples(fams, "rstash_box_quota_bytes") == {(("box", "vm1"),): 1 << 30}
    # Read as root, the service user's database is still the service user's.
    assert {p.stat().st_uid for p in state.iterdir()} == {service_user.uid}


@pytest.mark.e2e
def test_the_metrics_timer_and_service_pass_systemd_analyze_verify(tmp_path: Path, e2e_venv: Path) -> None:
    analyze = need_program("systemd-analyze")
    units = []
    for name in ("rstash-metrics.service", "rstash-metrics.timer"):
        text = (CONFIG / "systemd" / name).read_text().replace(
            "/usr/bin/rstash-recv", venv_bin(e2e_venv, "rstash-recv"))
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    done = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert (done.returncode, done.stdout.strip(), done.stderr.strip()) == (0, "", ""), done
