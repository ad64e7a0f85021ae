"""Silent peers against the accept loop: the real rstash-recv --listen and rstash-send on loopback.

A peer that connects and says nothing holds a pre-auth slot; a few addresses doing that must
not lock a key holder out (rstash-recv(8) DESCRIPTION, Limits): the accept loop ends the oldest silent
session of the address group holding the most to make room, and logs it ``outcome=silent``
for fail2ban (rstash-recv(8) LOGGING).
"""

from __future__ import annotations

import re
import select
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from e2e_support import Box, ProcGroup, free_port, make_box, need_program, wait_for_port, write_config
from test_serve import (
    STEP,
    first_line,
    log_text,
    make_file,
    raw_client,
    sender,
    start_recv,
    wait_log,
)

pytestmark = pytest.mark.e2e

SILENT_FILTER = Path(__file__).resolve().parent.parent / "config/fail2ban/filter.d/rstash-silent.conf"

#: The attack's source addresses (all of 127/8 is loopback on Linux); the sender uses 127.0.0.1.
ATTACKERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
#: Bounds: connection attempts per attacker, the pause after a refused attempt.
MAX_ATTEMPTS = 5000
RETRY_PAUSE = 0.05
FILES = 20
#: rstash-send --busy-wait for each file: how long it retries "421 busy".
BUSY_WAIT = 5


class Attacker(threading.Thread):
    """Holds as many silent connections from ``source`` as the server accepts, reconnecting
    as soon as one is dropped, until stopped or out of attempts."""

    def __init__(self, port: int, source: str) -> None:
        super().__init__(daemon=True)
        self.port, self.source = port, source
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        self.attempts = self.greeted = self.dropped = 0

    def _connect(self) -> None:
        self.attempts += 1
        s = socket.socket()
        s.settimeout(STEP)
        try:
            s.bind((self.source, 0))
            s.connect(("127.0.0.1", self.port))
            if first_line(s).startswith(b"220 rstash/1 "):
                self.greeted += 1
                self.held.append(s)
                return
        except OSError:
            pass
        s.close()
        time.sleep(RETRY_PAUSE)

    def run(self) -> None:
        try:
            while not self.stop.is_set() and self.attempts < MAX_ATTEMPTS:
                readable = select.select(self.held, [], [], 0)[0] if self.held else []
                for s in readable:  # a "421 timeout" or the close: the slot is gone
                    self.held.remove(s)
                    s.close()
                    self.dropped += 1
                # Knock again at once, even when holding all it can, as a real attacker would.
                self._connect()
        finally:
            for s in self.held:
                s.close()


def test_a_key_holder_gets_through_while_four_addresses_hold_every_silent_slot(
        e2e_venv: Path, e2e_dir: Path, spawn: ProcGroup) -> None:
    box: Box = make_box(e2e_dir, "vm1")
    # The defaults: max_sessions 64 (16 before authentication), 4 per address.
    conf = write_config(e2e_dir, [box])
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    attackers = [Attacker(port, a) for a in ATTACKERS]
    for a in attackers:
        a.start()
    stored = 0
    try:
        deadline = time.monotonic() + STEP
        while sum(len(a.held) for a in attackers) < 16 and time.monotonic() < deadline:
            time.sleep(0.1)
        # Every pre-auth slot is held, and the sender's own address is as busy as can be.
        assert sum(min(len(a.held), 4) for a in attackers) == 16, [len(a.held) for a in attackers]
        time.sleep(1.5)
        files = [make_file(e2e_dir, f"legit-{i:02}.bin") for i in range(FILES)]
        results = []
        for f in files:
            proc = sender(spawn, e2e_venv, e2e_dir, box, box.url(port), f,
                          opts=("--busy-wait", str(BUSY_WAIT)))
            results.append(proc.wait(BUSY_WAIT + STEP * 2))
        have = box.files()
        stored = sum(1 for rc, f in zip(results, files, strict=True)
                     if rc == 0 and have.get(f.name) == f.read_bytes())
        assert all(a.is_alive() for a in attackers), "the attack ran out of attempts"
    finally:
        for a in attackers:
            a.stop.set()
        for a in attackers:
            a.join(STEP)
    attempts = sum(a.attempts for a in attackers)
    print(f"\nsilent-peer attack: {stored}/{FILES} sessions stored (--busy-wait {BUSY_WAIT}) "
          f"while {len(ATTACKERS)} addresses held every pre-auth slot "
          f"({attempts} attacker connections, {sum(a.dropped for a in attackers)} ended)")
    assert stored >= FILES * 9 // 10, results
    # The slots were taken from the attackers, and the log says so for fail2ban.
    wait_log(e2e_dir, r"peer=127\.0\.0\.[2-5] outcome=silent reason=evicted")
    assert "peer=127.0.0.1 outcome=silent reason=evicted" not in log_text(e2e_dir)
    # fail2ban's own reading of the log counts every silent line (the port probe's too).
    snapshot = e2e_dir / "snapshot.log"  # the attackers' last sessions are still ending
    snapshot.write_text(log_text(e2e_dir))
    silent = [line for line in snapshot.read_text().splitlines() if "outcome=silent" in line]
    out = subprocess.run([need_program("fail2ban-regex"), str(snapshot), str(SILENT_FILTER)],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"Lines: \d+ lines, \d+ ignored, (\d+) matched", out.stdout)
    assert m is not None and int(m.group(1)) == len(silent) > 0, out.stdout + out.stderr


def test_a_peer_outside_every_allow_from_is_closed_before_the_greeting(
        e2e_venv: Path, e2e_dir: Path, spawn: ProcGroup) -> None:
    vm1 = make_box(e2e_dir, "vm1", allow_from=["127.0.0.1"])
    vm2 = make_box(e2e_dir, "vm2", allow_from=["127.0.0.2/32"])
    conf = write_config(e2e_dir, [vm1, vm2])
    port = free_port()
    server = start_recv(spawn, e2e_venv, conf, f"127.0.0.1:{port}")
    wait_for_port("127.0.0.1", port, proc=server)
    for source in ("127.0.0.1", "127.0.0.2"):
        with raw_client(port, source=source) as s:
            assert first_line(s).startswith(b"220 rstash/1 "), source
    with raw_client(port, source="127.0.0.3") as s:
        assert first_line(s) == b"", "a peer outside every allow_from gets no greeting"
    wait_log(e2e_dir, r'peer=127\.0\.0\.3 outcome=refused reason="peer not in allow_from"')
    # ... and no process: no session line of its own.
    assert "peer=127.0.0.3 mode=" not in log_text(e2e_dir)
    f = make_file(e2e_dir, "allowed.bin")
    proc = sender(spawn, e2e_venv, e2e_dir, vm1, vm1.url(port), f)
    assert proc.wait(STEP * 2) == 0, proc.describe()
