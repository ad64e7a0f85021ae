#!/usr/bin/env python3
"""rstash resume benchmark: a transfer cut at half, then resumed (rstash-send(1), RESUME).

A file (default 1 GiB, random) is sent over rstash:// on loopback through a proxy that closes
the connection once half of it has passed; the same command then runs again through a proxy
that counts. It prints the bytes on the wire of both runs (target: at most 1.05 x the file in
total), the offset the server resumed from, and what the resume cost the server in reads
beyond the bytes it received (rstash-recv re-reads the kept prefix once, to check it against
its recorded SHA-256 and to continue the whole file's hash). It reports; the exit status is 0
unless a transfer or the set-up failed.

As root: the service user of the test suite (``rstash-e2e``) or ``rstash-bench``, a venv under
/var/tmp/rstash-bench-resume with the checkout installed non-editable, ``rstash-recv --listen``
as that user (setpriv). The server's read bytes come from /proc/PID/io of its session process,
sampled until it exits (``rchar``: everything it read, the socket included).

Usage: ``sudo python3 bench/resume.py [--size 1GiB] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent
BASE = Path("/var/tmp/rstash-bench-resume")
USERS = ("rstash-e2e", "rstash-bench")
GiB = 1 << 30


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * mult)
    return int(text)


def service_user() -> pwd.struct_passwd:
    for name in USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    USERS[1]], check=True)
    return pwd.getpwnam(USERS[1])


def venv() -> Path:
    v = BASE / "venv"
    if not (v / "bin" / "rstash-recv").exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(v)], check=True)
        subprocess.run([str(v / "bin" / "pip"), "install", "-q", str(CHECKOUT)], check=True,
                       timeout=600)
    return v


class Proxy:
    """127.0.0.1 relay to ``upstream``; counts client bytes and closes after ``limit`` of them."""

    def __init__(self, upstream: int, limit: int | None = None) -> None:
        self.upstream, self.limit, self.up = upstream, limit, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.sock.accept()
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as server:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                ready, _, _ = select.select([client, server], [], [], 1)
                for s in ready:
                    data = s.recv(1 << 20)
                    if not data:
                        return
                    other = server if s is client else client
                    if s is client:
                        if self.limit is not None and self.up + len(data) >= self.limit:
                            other.sendall(data[:self.limit - self.up])
                            self.up = self.limit
                            return
                        self.up += len(data)
                    other.sendall(data)


def session_reads(server_pid: int, stop: threading.Event, out: dict[str, int]) -> None:
    """Sample /proc/CHILD/io of the server's session processes until ``stop``."""
    while not stop.is_set():
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{server_pid}/task").iterdir():
                for child in (task / "children").read_text().split():
                    with contextlib.suppress(OSError):
                        io = dict(line.split(": ") for line in
                                  Path(f"/proc/{child}/io").read_text().splitlines())
                        out[child] = int(io["rchar"])
        time.sleep(0.02)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/resume.py: run as root (the server runs as its service user)", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    user = service_user()
    v = venv()
    work = BASE / f"run-{secrets.token_hex(4)}"
    box = work / "box"
    box.mkdir(parents=True)
    os.chown(box, user.pw_uid, user.pw_gid)
    os.chmod(work, 0o755)
    key = secrets.token_bytes(32)
    keyfile = work / "vm1.key"
    keyfile.write_text(f"rstash-key-v1 {key.hex()} # bench\n")
    os.chmod(keyfile, 0o640)
    os.chown(keyfile, 0, user.pw_gid)
    client_key = work / "client.key"
    client_key.write_text(f"rstash-key-v1 {key.hex()} # bench\n")
    os.chmod(client_key, 0o600)
    state = work / "state"
    state.mkdir(mode=0o700)
    os.chown(state, user.pw_uid, user.pw_gid)
    conf = work / "recv.toml"
    conf.write_text(f'state_dir = "{state}"\nlog = "{work / "recv.log"}"\n'
                    f'[box.vm1]\npath = "{box}"\nkeys = ["{keyfile}"]\n')
    (work / "recv.log").touch()
    os.chown(work / "recv.log", user.pw_uid, user.pw_gid)
    src = work / "src.bin"
    with open(src, "wb") as fh:
        for _ in range(0, size, 1 << 24):
            fh.write(os.urandom(1 << 24))
        fh.truncate(size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         str(v / "bin" / "rstash-recv"), "--listen", f"127.0.0.1:{port}", "-c", str(conf)],
        stdin=subprocess.DEVNULL)
    result: dict[str, Any] = {"size": size}
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("rstash-recv did not listen")
            time.sleep(0.1)
        send = [str(v / "bin" / "rstash-send"), "-q", "--json", "-k", str(client_key)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)}
        cut = Proxy(port, limit=size // 2)
        t0 = time.monotonic()
        first = subprocess.run([*send, f"rstash://127.0.0.1:{cut.port}/vm1", str(src)], env=env,
                               capture_output=True, text=True, timeout=600, check=False)
        result["first_exit"], result["first_s"] = first.returncode, time.monotonic() - t0
        result["first_up"] = cut.up
        time.sleep(1)  # the cut session keeps its partial as it ends
        count = Proxy(port)
        reads: dict[str, int] = {}
        stop = threading.Event()
        sampler = threading.Thread(target=session_reads, args=(server.pid, stop, reads), daemon=True)
        sampler.start()
        t0 = time.monotonic()
        second = subprocess.run([*send, f"rstash://127.0.0.1:{count.port}/vm1", str(src)], env=env,
                                capture_output=True, text=True, timeout=600, check=False)
        result["second_exit"], result["second_s"] = second.returncode, time.monotonic() - t0
        stop.set()
        sampler.join(5)
        result["second_up"] = count.up
        rec = json.loads(second.stdout.splitlines()[-1]) if second.stdout.strip() else {}
        result["resumed_from"] = rec.get("resumed_from")
        result["stored"] = rec.get("status") == "stored"
        result["identical"] = (box / "src.bin").exists() and \
            (box / "src.bin").read_bytes() == src.read_bytes()
        rchar = max(reads.values(), default=0)
        result["server_rchar"] = rchar
        result["server_extra_reads"] = max(rchar - count.up, 0)
    finally:
        server.terminate()
        server.wait(10)
    total = result["first_up"] + result["second_up"]
    result["total_up"] = total
    result["total_ratio"] = total / size
    print(f"file                 {size / GiB:.2f} GiB")
    print(f"first run (cut)      {result['first_up'] / GiB:.3f} GiB up, exit {result['first_exit']}")
    print(f"second run (resume)  {result['second_up'] / GiB:.3f} GiB up, exit {result['second_exit']},"
          f" resumed from {result['resumed_from']}, {result['second_s']:.1f} s")
    print(f"total on the wire    {total / GiB:.3f} GiB = {result['total_ratio']:.3f} x file"
          f" (target <= 1.05): {'ok' if result['total_ratio'] <= 1.05 else 'MISSED'}")
    print(f"server extra reads   {result['server_extra_reads'] / GiB:.3f} GiB"
          f" (the kept prefix, re-read once)")
    print(f"stored, identical    {result['stored']}, {result['identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result["stored"] and result["identical"] and result["second_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
