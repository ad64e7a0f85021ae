#!/usr/bin/env python3
"""What a shared GlusterFS volume costs rstash: one receiver on local disk, one receiver on the
volume, two receivers on the volume (rstash-recv(8) SCALING).

For each set-up it times one large file (throughput) and 1000 small files sent by rstash-send on
loopback; with two receivers the same work is split between two senders at once, one per
receiver. It reports; it does not gate (exit 1 only when a transfer fails).

It uses the test suite's helpers: the e2e venv and service user (tests/e2e_support.py) and a
throw-away volume with its own glusterd, two bricks on loopback and two FUSE mounts
(tests/gluster_support.py), all removed at the end. Needs root.

Usage: ``sudo python3 bench/cluster.py [--size 256MiB] [--small 1000] [--layout replica]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from e2e_support import (
    Box,
    ProcGroup,
    as_service,
    ensure_e2e_venv,
    free_port,
    make_box,
    make_e2e_dir,
    remove_tree,
    service_env,
    service_user,
    venv_bin,
    wait_for_port,
    write_config,
)
from gluster_support import gluster_volume

MIB = 2**20


def _receiver(spawn: ProcGroup, venv: Path, work: Path, box: Box, tag: str) -> int:
    user = service_user()
    state = work / f"state-{tag}"
    state.mkdir(mode=0o700)
    user.chown(state)
    log = work / f"recv-{tag}.log"
    log.touch(mode=0o640)
    user.chown(log)
    conf = write_config(work, [box], path=work / f"recv-{tag}.toml", state_dir=str(state), log=str(log))
    port = free_port()
    proc = spawn(as_service([venv_bin(venv, "rstash-recv"), "-c", str(conf), "--listen",
                             f"127.0.0.1:{port}"]), name=f"recv-{tag}", env=service_env())
    wait_for_port("127.0.0.1", port, proc=proc)
    return port


def _timed(spawn: ProcGroup, venv: Path, work: Path, box: Box, ports: list[int],
           batches: list[list[Path]]) -> float:
    """Seconds for every batch sent at once, batch i through receiver i % len(ports)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)}
    start = time.monotonic()
    procs = [spawn([venv_bin(venv, "rstash-send"), "-k", str(box.client_key), "--no-progress",
                    box.url(ports[i % len(ports)]), *map(str, files)], name=f"send-{secrets.token_hex(3)}",
                   env=env) for i, files in enumerate(batches)]
    for p in procs:
        if p.wait(1800) != 0:
            sys.exit(f"a transfer failed: {p.describe()}")
    return time.monotonic() - start


def _clear(box: Box) -> None:
    for p in box.path.iterdir():
        if not p.name.startswith("."):
            p.unlink()
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="large file, MiB (default 256)")
    ap.add_argument("--small", type=int, default=1000, help="small files (default 1000)")
    ap.add_argument("--layout", default="replica", choices=["replica", "distribute"])
    args = ap.parse_args()
    venv, _ = ensure_e2e_venv()
    user = service_user()
    work = make_e2e_dir(user)
    src = Path(tempfile.mkdtemp(dir=work))
    big = [src / "big-0.bin", src / "big-1.bin"]
    for b in big:
        with open(b, "wb") as f:
            for _ in range(args.size // 2):
                f.write(secrets.token_bytes(MIB))
    small = []
    for i in range(args.small):
        (src / f"s{i:05}.dat").write_bytes(secrets.token_bytes(1024))
        small.append(src / f"s{i:05}.dat")
    half = len(small) // 2
    rows = []
    spawn = ProcGroup(work)
    try:
        local = make_box(work, "local")
        with gluster_volume(layout=args.layout) as vol:
            shared = vol.mounts[0] / "boxes"
            shared.mkdir(mode=0o755)
            (shared / "vol").mkdir(mode=0o755)
            user.chown(shared / "vol")
            made = make_box(work, "vol")
            on_vol = [dataclasses.replace(made, path=m / "boxes" / "vol") for m in vol.mounts[:2]]
            setups = [("one receiver, local disk", local, [_receiver(spawn, venv, work, local, "local")]),
                      (f"one receiver, {args.layout} volume", on_vol[0],
                       [_receiver(spawn, venv, work, on_vol[0], "va")])]
            setups.append((f"two receivers, {args.layout} volume", on_vol[0],
                           [setups[1][2][0], _receiver(spawn, venv, work, on_vol[1], "vb")]))
            for label, box, ports in setups:
                _clear(box)
                t_big = _timed(spawn, venv, work, box, ports, [big] if len(ports) == 1 else [[big[0]], [big[1]]])
                _clear(box)
                t_small = _timed(spawn, venv, work, box, ports,
                                 [small] if len(ports) == 1 else [small[:half], small[half:]])
                _clear(box)
                rows.append((label, args.size / t_big, t_small))
    finally:
        spawn.close()
        remove_tree(work)
    print(f"{'set-up':38} {'MiB/s (' + str(args.size) + ' MiB)':>18} {str(args.small) + ' small files, s':>22}")
    for label, rate, t in rows:
        print(f"{label:38} {rate:18.1f} {t:22.2f}")


if __name__ == "__main__":
    main()
