"""Retention on a real GlusterFS volume: two receivers, one box (rstash-recv.toml(5) RETENTION).

Each FUSE mount of the volume stands for one receiver host. The box lock is an OFD lock on
``.rstash-lock``: a lock taken through one mount must stop retention through the other, and
processes storing and pruning through both mounts at once must never leave fewer files than
keep_last, nor count one removal twice.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gluster_support import GlusterVolume
from rstash import retention
from rstash.retention import Rules
from rstash.store import BoxStore

DAY = 86400
#: Bound on every wait for the other mount or a process.
WAIT = 30.0
RULES = Rules(keep_last=3, keep_min_age=0)


@pytest.fixture
def box(gluster: GlusterVolume, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """One fresh box directory of the volume, as seen through mount A and through mount B."""
    sub = request.node.name.replace("[", "-").replace("]", "")
    a = gluster.mounts[0] / sub
    a.mkdir(mode=0o750)
    b = gluster.mounts[1] / sub
    deadline = time.monotonic() + WAIT
    while not b.is_dir():
        assert time.monotonic() < deadline, f"{b}: made through mount A, not seen through B"
        time.sleep(0.05)
    for i in range(10):
        p = a / f"db-2020-01-{i + 1:02d}.sql.gz"
        p.write_bytes(b"old")
        t = time.time() - (100 - i) * DAY
        os.utime(p, (t, t))
    return a, b


def _apply(d: Path, **kw: Any) -> retention.Applied:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return retention.apply(fd, RULES, owner=os.geteuid(), only={"db-*.sql.gz"}, **kw)
    finally:
        os.close(fd)


def _hold(d: Path, ready: Any, release: Any) -> None:
    fd = os.open(d / retention.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, retention._WHOLE_FILE)
    ready.set()
    release.wait(WAIT)
    os.close(fd)


def test_the_box_lock_taken_through_one_mount_stops_retention_through_the_other(
        box: tuple[Path, Path]) -> None:
    a, b = box
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(a, ready, release))
    holder.start()
    try:
        assert ready.wait(WAIT)
        done = _apply(b, lock_wait=1.0)
        assert done.removed == [] and "held" in done.problems[0], done
    finally:
        release.set()
        holder.join(WAIT)
    assert len(_apply(b).removed) == 7


def _racer(d: Path, names: list[str], barrier: Any, out: Any) -> None:
    removed: list[str] = []
    for name in names:
        barrier.wait(WAIT)
        with BoxStore(d) as s:
            up = s.begin(name, 1)
            up.write(b"n")
            up.commit()
            done = retention.apply(s.dir_fd, RULES, owner=os.geteuid(), only={"db-*.sql.gz"},
                                   protect={name})
        assert not done.problems, done.problems
        removed += [r.entry.name for r in done.removed]
    out.put(removed)


def test_receivers_on_two_mounts_storing_at_once_keep_what_the_rules_keep(
        box: tuple[Path, Path]) -> None:
    racers, rounds = 4, 5
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(
        box[i % 2], [f"db-2026-11-{r + 10:02d}T00{i:02d}.sql.gz" for r in range(rounds)],
        barrier, out)) for i in range(racers)]
    for p in procs:
        p.start()
    try:
        removed = [n for _ in procs for n in out.get(timeout=120)]
    finally:
        for p in procs:
            p.join(WAIT)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * racers
    left = sorted(n for n in os.listdir(box[0]) if n.startswith("db-"))
    # The last pass keeps the 3 newest and its own file: never fewer than keep_last.
    assert 3 <= len(left) <= 4, left
    assert len(removed) == len(set(removed)), removed  # no removal counted twice
    assert len(removed) + len(left) == 10 + racers * rounds
    assert not set(removed) & set(left)
