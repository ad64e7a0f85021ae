"""End to end: retention in the real rstash-recv (rstash-recv.toml(5) RETENTION).

The server is the installed rstash-recv, run as the service user per connection under
systemd-socket-activate --inetd; the client is the real rstash-send. Old backups are made
old with os.utime (the mtime is what the rules read) and owned by the service user, as
files the server stored would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_support import Box, ProcGroup, ServiceUser, is_root, make_box, need, wait_until
from test_e2e_server import Rig

pytestmark = pytest.mark.e2e
DAY = 86400


@pytest.fixture
def rig(e2e_dir: Path, e2e_venv: Path, spawn: ProcGroup, service_user: ServiceUser) -> Iterator[Rig]:
    r = Rig(e2e_dir, e2e_venv, spawn, service_user)
    try:
        yield r
    finally:
        r.close()


def old_file(rig: Rig, box: Box, name: str, days: float, *, owner: int | None = None) -> Path:
    p = box.path / name
    p.write_bytes(b"old backup\n")
    os.chown(p, rig.user.uid if owner is None else owner, -1)
    t = time.time() - days * DAY
    os.utime(p, (t, t))
    return p


def admin(rig: Rig, conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([rig.recv, "-c", str(conf), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_server_removes_an_old_file_after_a_new_one_is_stored_and_logs_it(rig: Rig) -> None:
    need(is_root(), "files owned by the service user and by root in one box need root")
    box = make_box(rig.dir, "vm1", keep_last=2, keep_min_age="1d")
    outside = rig.dir / "outside-2020-01-01.sql.gz"
    outside.write_bytes(b"not the box's\n")
    os.utime(outside, (0, 0))
    for name, days in (("db-2026-11-01.sql.gz", 25), ("db-2026-11-02.sql.gz", 24),
                       ("db-2026-11-03.sql.gz", 23)):
        old_file(rig, box, name, days)
    os.symlink(outside, box.path / "db-2020-01-01.sql.gz")
    linked = old_file(rig, box, "db-2020-01-02.sql.gz", 2000)
    os.link(linked, rig.dir / "second-link")
    old_file(rig, box, "db-2020-01-03.sql.gz", 2000, owner=0)  # not the service user's
    conf = rig.config([box])

    # The dry listing names the plain old dump beyond keep_last, and removes nothing; the
    # root-owned, symlinked and hard-linked ones are not the server's to remove.
    before = sorted(os.listdir(box.path))
    check = admin(rig, conf, "--check-config", "--user", rig.user.name)
    listed = [ln.split()[3] for ln in check.stdout.splitlines() if "retention would remove" in ln]
    assert listed == ["db-2026-11-01.sql.gz"], check.stdout
    assert sorted(os.listdir(box.path)) == before

    port = rig.inetd(conf)
    src = rig.src("db-2026-11-26.sql.gz", b"tonight's dump\n")
    proc = rig.send(box, port, src)
    assert proc.wait(30) == 0, proc.describe()
    # Removal follows the session's last reply: wait for it, bounded.
    wait_until(lambda: rig.log().count("event=retention") >= 2, timeout=20,
               what=f"two retention lines in the log:\n{rig.log()}")
    assert sorted(os.listdir(box.path)) == sorted(
        {*before, "db-2026-11-26.sql.gz", ".rstash-lock"}
        - {"db-2026-11-01.sql.gz", "db-2026-11-02.sql.gz"})
    assert outside.read_bytes() == b"not the box's\n" and linked.stat().st_nlink == 2
    lines = [ln for ln in rig.log().splitlines() if "event=retention" in ln]
    assert sorted(ln.split("name=")[1].split()[0] for ln in lines) == [
        "db-2026-11-01.sql.gz", "db-2026-11-02.sql.gz"], lines
    assert all("outcome=removed" in ln and "box=vm1" in ln and "bytes=11" in ln for ln in lines)
    log = rig.log()
    assert log.index("outcome=stored") < log.index("event=retention")

    status = subprocess.run(rig.user.wrap([rig.recv, "-c", str(conf), "--status", "--json"]),
                            capture_output=True, text=True, timeout=60, check=False,
                            env=rig.user.env())
    assert status.returncode == 0, status.stderr
    (vm1,) = json.loads(status.stdout)["boxes"]
    assert (vm1["stored_24h"], vm1["removed_24h"]) == (1, 2)


def test_a_flood_of_look_alike_names_does_not_evict_backups_younger_than_keep_min_age(
        rig: Rig) -> None:
    need(is_root(), "backups owned by the service user need root")
    box = make_box(rig.dir, "vm1", keep_last=2)  # keep_min_age: 7 days
    real = [f"db-2026-11-2{d}.sql.gz" for d in range(6)]
    for d, name in enumerate(real):
        old_file(rig, box, name, 6 - d)  # 6 ... 1 days old
    old_file(rig, box, "db-2026-10-27.sql.gz", 30)  # older than keep_min_age: the flood can evict it
    port = rig.inetd(rig.config([box]))
    flood = [rig.src(f"db-2099-01-{i:02d}.sql.gz", b"x") for i in range(1, 11)]
    proc = rig.send(box, port, *flood)
    assert proc.wait(60) == 0, proc.describe()
    # One pass removes, then logs every removal: its line means the pass is over.
    wait_until(lambda: "event=retention" in rig.log(), timeout=20,
               what=f"a retention line in the log:\n{rig.log()}")
    lines = [ln for ln in rig.log().splitlines() if "event=retention" in ln]
    assert len(lines) == 1 and "name=db-2026-10-27.sql.gz" in lines[0], lines
    assert set(real) <= set(os.listdir(box.path))
