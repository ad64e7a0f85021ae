"""Two rstash-recv receivers serving one box on a real GlusterFS volume (rstash-recv(8) SCALING).

One ``rstash-recv --listen`` per FUSE mount, each as the service user with its own config,
state_dir and log, the box at the same place of the volume: what a DNS round-robin or TCP
balancer in front of two hosts gives. Senders alternate between the two receivers. Run on the
``distribute`` layout only, the one where ``link()`` alone is not atomic and unlocked renames
onto one name hang: every claim there is arbitrated by the box lock (``.rstash-lock``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from e2e_support import (
    Box,
    Proc,
    ProcGroup,
    free_port,
    make_box,
    service_user,
    venv_bin,
    wait_for_port,
    write_config,
)
from gluster_support import GlusterVolume
from test_serve import STEP, client_env, start_recv, unique

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("gluster", ["distribute"], indirect=True)]

TEMP_PREFIX = ".rstash-tmp-"
#: Concurrent senders of one name, alternating between the receivers.
RACERS = 20
#: Senders of distinct files, and how many run at once.
MANY, WAVE = 100, 20


@dataclasses.dataclass
class Pair:
    """The box as each receiver sees it (through its own mount), and each receiver's port."""

    boxes: tuple[Box, Box]
    ports: tuple[int, int]
    procs: tuple[Proc, Proc]
    logs: tuple[Path, Path]

    def url(self, i: int) -> str:
        return self.boxes[i % 2].url(self.ports[i % 2])


def _eventually(check: Callable[[], Any], timeout: float = STEP) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except OSError:
            pass  # ENOENT/ESTALE through a mount whose caches have not expired yet
        if time.monotonic() > deadline:
            return got if "got" in locals() else None
        time.sleep(0.05)


def _pair(gluster: GlusterVolume, venv: Path, e2e_dir: Path, spawn: ProcGroup, name: str,
          **settings: Any) -> Pair:
    user = service_user()
    made = make_box(e2e_dir, name, **settings)
    shared = gluster.mounts[0] / "boxes"
    shared.mkdir(mode=0o755, exist_ok=True)
    (shared / name).mkdir(mode=0o755)
    user.chown(shared / name)
    boxes, ports, procs, logs = [], [], [], []
    for i, mount in enumerate(gluster.mounts[:2]):
        tag = "ab"[i]
        box = dataclasses.replace(made, path=mount / "boxes" / name)
        assert _eventually(box.path.is_dir), f"{box.path} not seen through mount {tag}"
        state = e2e_dir / f"state-{tag}"
        state.mkdir(mode=0o700)
        user.chown(state)
        log = e2e_dir / f"recv-{tag}.log"
        log.touch(mode=0o640)
        user.chown(log)
        # Every sender comes from 127.0.0.1: room for all of them before authentication.
        conf = write_config(e2e_dir, [box], path=e2e_dir / f"recv-{tag}.toml",
                            state_dir=str(state), log=str(log), max_preauth_per_peer=WAVE)
        port = free_port()
        proc = start_recv(spawn, venv, conf, f"127.0.0.1:{port}", name=f"recv-{tag}")
        wait_for_port("127.0.0.1", port, proc=proc)
        boxes.append(box)
        ports.append(port)
        procs.append(proc)
        logs.append(log)
    return Pair((boxes[0], boxes[1]), (ports[0], ports[1]), (procs[0], procs[1]), (logs[0], logs[1]))


def _send(spawn: ProcGroup, venv: Path, e2e_dir: Path, pair: Pair, i: int, src: Path,
          name: str | None = None, stdin: Any = subprocess.DEVNULL) -> Proc:
    argv = [venv_bin(venv, "rstash-send"), "-k", str(pair.boxes[0].client_key), "--no-progress",
            "--busy-wait", str(int(STEP))]
    if name is not None:
        argv += ["--name", name]
    return spawn([*argv, pair.url(i), str(src)], name=unique("send"), env=client_env(e2e_dir),
                 stdin=stdin)


def _sources(e2e_dir: Path, n: int, name: str, size: int = 200_000) -> list[Path]:
    out = []
    for i in range(n):
        d = e2e_dir / f"src-{name}-{i}"
        d.mkdir()
        (d / name).write_bytes(secrets.token_bytes(size))
        out.append(d / name)
    return out


def _stored(box: Box) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in box.path.iterdir()
            if p.is_file() and not p.name.startswith(".")}


def _temps(box: Box) -> list[str]:
    return sorted(n for n in os.listdir(box.path) if n.startswith(TEMP_PREFIX))


def _logs(pair: Pair) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in pair.logs)


@pytest.mark.parametrize("policy", ["refuse", "rename", "replace"])
def test_concurrent_senders_of_one_name_through_both_receivers(
        gluster: GlusterVolume, e2e_venv: Path, e2e_dir: Path, spawn: ProcGroup, policy: str) -> None:
    pair = _pair(gluster, e2e_venv, e2e_dir, spawn, f"race-{policy}", overwrite=policy)
    sources = _sources(e2e_dir, RACERS, "race.bin")
    procs = [_send(spawn, e2e_venv, e2e_dir, pair, i, src) for i, src in enumerate(sources)]
    codes = [p.wait(STEP * 8) for p in procs]
    contents = {src.read_bytes() for src in sources}
    stored = _eventually(lambda: _stored(pair.boxes[1]) if not _temps(pair.boxes[1]) else None)
    assert stored, f"temps left: {_temps(pair.boxes[1])}\n{_logs(pair)}"
    assert _stored(pair.boxes[0]) == stored  # the same files through either mount
    ok = [src.read_bytes() for src, rc in zip(sources, codes, strict=True) if rc == 0]
    if policy == "refuse":
        assert codes.count(0) == 1, (codes, _logs(pair))
        assert list(stored) == ["race.bin"] and stored["race.bin"] == ok[0]
    elif policy == "rename":
        assert codes == [0] * RACERS, _logs(pair)
        # Every candidate claimed once: twenty whole files, no two under one name.
        assert len(stored) == RACERS and set(stored.values()) == contents
        assert "race.bin" in stored and all(n.startswith("race") for n in stored)
    else:
        assert codes == [0] * RACERS, _logs(pair)
        assert list(stored) == ["race.bin"] and stored["race.bin"] in contents  # one whole file


def test_quota_holds_across_both_receivers(
        gluster: GlusterVolume, e2e_venv: Path, e2e_dir: Path, spawn: ProcGroup) -> None:
    size = 100_000
    pair = _pair(gluster, e2e_venv, e2e_dir, spawn, "quota", quota=5 * size + size // 2)
    sources = []
    for i in range(12):
        sources += _sources(e2e_dir, 1, f"q{i:02}.bin", size)
    procs = [_send(spawn, e2e_venv, e2e_dir, pair, i, src) for i, src in enumerate(sources)]
    codes = [p.wait(STEP * 8) for p in procs]
    stored = _eventually(lambda: _stored(pair.boxes[0]) if not _temps(pair.boxes[0]) else None)
    assert stored is not None, _logs(pair)
    # Five fit; the reservation scan under the box lock sees the other receiver's temps.
    assert len(stored) == codes.count(0) == 5, (codes, sorted(stored), _logs(pair))
    assert sum(len(v) for v in stored.values()) <= 5 * size + size // 2


def test_many_senders_through_both_receivers_are_all_stored_whole(
        gluster: GlusterVolume, e2e_venv: Path, e2e_dir: Path, spawn: ProcGroup) -> None:
    pair = _pair(gluster, e2e_venv, e2e_dir, spawn, "many")
    sources = []
    for i in range(MANY):
        sources += _sources(e2e_dir, 1, f"vm{i:03}.tar", 20_000 + i)
    codes: list[int] = []
    for start in range(0, MANY, WAVE):
        wave = [_send(spawn, e2e_venv, e2e_dir, pair, i, sources[i])
                for i in range(start, min(start + WAVE, MANY))]
        codes += [p.wait(STEP * 8) for p in wave]
    assert codes == [0] * MANY, _logs(pair)
    stored = _eventually(lambda: s if len(s := _stored(pair.boxes[1])) == MANY else None)
    assert stored, _logs(pair)
    for src in sources:
        assert hashlib.sha256(stored[src.name]).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()


def test_a_killed_receivers_temp_is_swept_through_the_other_and_a_live_one_never(
        gluster: GlusterVolume, e2e_venv: Path, e2e_dir: Path, spawn: ProcGroup) -> None:
    pair = _pair(gluster, e2e_venv, e2e_dir, spawn, "sweep")
    a, b = pair.boxes
    past = time.time() - 3600

    def streaming(i: int, name: str) -> tuple[Proc, int, str]:
        """A sender through receiver i streaming stdin, stalled after its first MiB."""
        r, w = os.pipe()
        proc = _send(spawn, e2e_venv, e2e_dir, pair, i, Path("-"), name=name, stdin=r)
        os.close(r)
        os.write(w, secrets.token_bytes(2**20))
        temp = _eventually(lambda: [t for t in _temps(a) if (a.path / t).stat().st_size > 0])
        assert temp, f"no temp with data\n{_logs(pair)}"
        return proc, w, temp[0]

    def session_through_b(tag: str) -> None:
        src = _sources(e2e_dir, 1, f"{tag}.bin", 1000)[0]
        assert _send(spawn, e2e_venv, e2e_dir, pair, 1, src).wait(STEP * 2) == 0, _logs(pair)

    # A live temp of receiver A, its mtime forced old: only its lock says alive, and a
    # session on B must not sweep it.
    live, live_w, live_temp = streaming(0, "live.bin")
    os.utime(b.path / live_temp, (past, past))
    session_through_b("while-live")
    assert live_temp in _temps(b), _logs(pair)
    os.close(live_w)  # end of stream: stored whole
    assert live.wait(STEP * 2) == 0, _logs(pair)
    assert _eventually(lambda: "live.bin" in _stored(b))

    # Receiver A is SIGKILLed mid-file while B serves; its temp stays until its lease is old.
    _dead, dead_w, dead_temp = streaming(0, "dead.bin")
    pair.procs[0].popen.send_signal(signal.SIGKILL)
    os.killpg(pair.procs[0].pid, signal.SIGKILL)
    pair.procs[0].wait(STEP)
    os.close(dead_w)
    session_through_b("lease-fresh")
    assert dead_temp in _temps(b), "swept while its mtime lease was still fresh"
    os.utime(b.path / dead_temp, (past, past))
    session_through_b("lease-old")
    assert _eventually(lambda: dead_temp not in _temps(b)), _logs(pair)
    assert "dead.bin" not in _stored(b)


# --------------------------------------------------------------------------- the store, raced


def _store_race(gluster: GlusterVolume, name: str, attempt: Callable[[Path, int, int], str],
                racers: int = 8, rounds: int = 15) -> list[list[str]]:
    """``attempt(box, round, racer)`` in ``racers`` processes at once (racer i through mount
    i % 2), ``rounds`` times, each round released by one barrier: the outcomes per round."""
    import multiprocessing

    (gluster.mounts[0] / name).mkdir(mode=0o755)
    dirs = [m / name for m in gluster.mounts[:2]]
    assert _eventually(dirs[1].is_dir)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(racers)
    results: Any = ctx.Queue()

    def racer(i: int) -> None:
        out = []
        for r in range(rounds):
            barrier.wait(STEP)
            try:
                out.append(attempt(dirs[i % 2], r, i))
            except Exception as exc:  # reported in the round, not lost in a child
                out.append(f"error {exc!r}")
        results.put(out)

    procs = [ctx.Process(target=racer, args=(i,)) for i in range(racers)]
    for p in procs:
        p.start()
    per_round: list[list[str]] = [[] for _ in range(rounds)]
    try:
        for _ in procs:
            for r, outcome in enumerate(results.get(timeout=120)):
                per_round[r].append(outcome)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return per_round


def test_reservations_raced_through_both_mounts_never_exceed_the_quota(gluster: GlusterVolume) -> None:
    from rstash.store import BoxStore, Refused

    def attempt(box: Path, r: int, i: int) -> str:
        try:
            (box / f"r{r}").mkdir(exist_ok=True)
            with BoxStore(box / f"r{r}", check_path=False, quota=3000) as s:
                s.begin(f"f{i}", 1000)  # reserved while the store is open
                time.sleep(0.5)  # every racer's temp exists at once
                return "reserved"
        except Refused as e:
            return f"refused {e.outcome.name}"
        except FileExistsError:
            return "raced mkdir"

    for r, outcomes in enumerate(_store_race(gluster, "quota-race", attempt)):
        assert outcomes.count("reserved") == 3, (r, outcomes)


def test_claims_raced_through_both_mounts_store_one_file_per_name(gluster: GlusterVolume) -> None:
    from rstash.store import BoxStore, Refused

    def attempt(box: Path, r: int, i: int) -> str:
        with BoxStore(box, check_path=False) as s:
            try:
                up = s.begin(f"n{r}", 8)
                up.write(f"racer{i:03}".encode())
                return f"stored {up.commit()}"
            except Refused as e:
                return f"refused {e.outcome.name}"

    for r, outcomes in enumerate(_store_race(gluster, "claim-race", attempt, rounds=40)):
        assert sum(o.startswith("stored") for o in outcomes) == 1, (r, outcomes)


def test_a_pipe_stream_through_either_receiver_is_refused_and_never_stored(
        gluster: GlusterVolume, e2e_venv: Path, e2e_dir: Path, spawn: ProcGroup) -> None:
    import shutil

    nc = shutil.which("nc")
    assert nc, "nc is needed"
    pair = _pair(gluster, e2e_venv, e2e_dir, spawn, "pipe", pipe_mode=True)
    src = _sources(e2e_dir, 1, "once.bin", 1000)[0]
    maker = spawn([venv_bin(e2e_venv, "rstash-send"), "--stdout", "-k", str(pair.boxes[0].client_key),
                   "pipe", str(src)], name=unique("stream"), env=client_env(e2e_dir))
    assert maker.wait(STEP) == 0, maker.describe()
    replies = []
    for i in (0, 1):  # delivered through A, replayed through B: neither may store it
        with open(maker.stdout_path, "rb") as f:
            p = spawn([nc, "-N", "127.0.0.1", str(pair.ports[i])], stdin=f, name=unique("nc"))
        p.wait(STEP)
        replies.append(p.stdout_path.read_bytes().decode("ascii", "replace"))
    for reply in replies:
        assert "451 local error" in reply and "250 " not in reply, reply
    assert _stored(pair.boxes[1]) == {}
    logs = _logs(pair)
    assert logs.count("pipe mode refused: the box is on a network or cluster file system") >= 2, logs
