"""Load: 100 concurrent real rstash-send processes into one box, under inetd nowait and --listen.

Every sender must exit 0 and every file must be stored with the SHA-256 it was sent with, while
the memory and open descriptors of every rstash-recv process stay bounded (sampled from /proc
during the run). ``--busy-wait`` lets a sender turned away with ``421 busy`` try again.

Figure: ``load 100/100`` (per deployment shape).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from adversarial.adv_support import Site, count, record, temps
from e2e_support import make_box

pytestmark = pytest.mark.e2e

#: Bounds for one rstash-recv process, measured about 35 MiB and 10 descriptors at rest.
MAX_RSS_KIB = 150 * 1024
MAX_FDS = 64


def recv_pids(conf: Path) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"rstash-recv") for c in cmd) and os.fsencode(conf) in cmd \
                and b"setpriv" not in cmd[0]:
            pids.append(int(d))
    return pids


class Sampler:
    """Peak RSS and descriptor count of the server's processes, every 100 ms."""

    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.peak_rss = self.peak_fds = self.peak_procs = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            pids = recv_pids(self.conf)
            self.peak_procs = max(self.peak_procs, len(pids))
            for pid in pids:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    fds = len(os.listdir(f"/proc/{pid}/fd"))
                except OSError:
                    continue
                rss = next((int(x.split()[1]) for x in status.splitlines()
                            if x.startswith("VmRSS:")), 0)
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_fds = max(self.peak_fds, fds)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.mark.parametrize("shape", ["inetd", "listen"])
def test_a_hundred_concurrent_senders_all_store_with_bounded_resources(
        site: Site, shape: str) -> None:
    n = count(100, floor=10)
    box = make_box(site.dir, "load")
    conf = site.config([box], max_sessions=2 * n, max_preauth_per_peer=n,
                       preauth_timeout=60, idle_timeout=60)
    if shape == "inetd":
        port = site.inetd(conf)
    else:
        port, _ = site.listen(conf)
    contents = {f"f{i:03d}.bin": os.urandom(32 * 1024 + i) for i in range(n)}
    srcs = {name: site.src(name, data) for name, data in contents.items()}
    sampler = Sampler(conf)
    t0 = time.monotonic()
    try:
        procs = [site.send(box, port, path, args=["--busy-wait", "240", "--connect-timeout", "200",
                                 "--timeout", "200"],
                           name=f"send-{name}") for name, path in srcs.items()]
        rcs = [p.wait(400) for p in procs]
    finally:
        sampler.close()
    took = time.monotonic() - t0
    stored = 0
    for name, data in contents.items():
        path = box.path / name
        if path.is_file() and hashlib.sha256(path.read_bytes()).digest() == \
                hashlib.sha256(data).digest():
            stored += 1
    record("load", stored=stored, senders=n, shape=shape)
    failed = [p.describe() for p, rc in zip(procs, rcs, strict=True) if rc != 0]
    assert failed == [], failed[:3]
    assert stored == n, f"{stored}/{n} stored in {took:.1f} s"
    assert temps(box.path) == []
    assert sampler.peak_procs >= 1, "the sampler never saw the server"
    assert sampler.peak_rss < MAX_RSS_KIB, f"peak RSS {sampler.peak_rss} KiB"
    assert sampler.peak_fds < MAX_FDS, f"peak open fds {sampler.peak_fds}"
