"""An active attacker between the real rstash-send and the real rstash-recv (inetd, loopback).

A proxy parses the client's frames and the server's reply lines and flips, drops, injects and
reorders them mid-session, injects a FILE captured from another session, forges ``250`` and
``221`` lines and replays an old greeting. Each attack must be detected: rstash-send exits
non-zero, and whatever the box holds is byte for byte what the sender meant to store. A false
success is rstash-send exiting 0 while the box does not hold every file exactly.

Figure: ``mitm N/N detected; 0 false successes reported by rstash-send``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from adversarial.adv_support import Site, record, temps
from e2e_support import free_port, make_box, wait_until

pytestmark = pytest.mark.e2e

DATA, FILE, END, BYE, HELLO = 3, 2, 4, 6, 1


@dataclass
class Ctx:
    """What the proxy has seen in the current connection, and across connections."""

    session: int = 0
    frames: dict[int, int] = field(default_factory=dict)
    lines: int = 0
    #: frames and lines of earlier sessions, for injection and replay
    seen_frames: list[tuple[int, int, bytes]] = field(default_factory=list)
    seen_lines: list[tuple[int, bytes]] = field(default_factory=list)
    pending: list[bytes] = field(default_factory=list)


Frames = Callable[[Ctx, int, int, bytes], list[bytes]]
Lines = Callable[[Ctx, int, bytes], list[bytes]]


def keep_frame(ctx: Ctx, ftype: int, nth: int, f: bytes) -> list[bytes]:
    return [f]


def keep_line(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
    return [line]


class Proxy:
    """One loopback port; each connection goes to ``upstream`` through the attack."""

    def __init__(self, upstream: int, on_frame: Frames = keep_frame,
                 on_line: Lines = keep_line) -> None:
        self.upstream = upstream
        self.on_frame, self.on_line = on_frame, on_line
        self.ctx = Ctx()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        self.thread.join(10)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            c, _ = self.sock.accept()
            if self.stop.is_set():
                c.close()
                return
            with c, socket.create_connection(("127.0.0.1", self.upstream), timeout=10) as s:
                self.ctx.session += 1
                self.ctx.frames, self.ctx.lines = {}, 0
                with contextlib.suppress(OSError):
                    self._pump(c, s)

    def _pump(self, c: socket.socket, s: socket.socket) -> None:
        cbuf, sbuf = bytearray(), bytearray()
        open_c = open_s = True
        while open_c or open_s:
            ready, _, _ = select.select([x for x, o in ((c, open_c), (s, open_s)) if o], [], [],
                                        30)
            if not ready:
                return
            for r in ready:
                data = r.recv(1 << 20)
                if r is c:
                    if not data:
                        open_c = False
                        s.shutdown(socket.SHUT_WR)
                    cbuf += data
                    while len(cbuf) >= 5:
                        n = struct.unpack(">I", cbuf[1:5])[0]
                        if len(cbuf) < 5 + n:
                            break
                        f = bytes(cbuf[:5 + n])
                        del cbuf[:5 + n]
                        t = f[0]
                        nth = self.ctx.frames.get(t, 0) + 1
                        self.ctx.frames[t] = nth
                        self.ctx.seen_frames.append((self.ctx.session, t, f))
                        for out in self.on_frame(self.ctx, t, nth, f):
                            s.sendall(out)
                else:
                    if not data:
                        open_s = False
                        if sbuf:
                            c.sendall(bytes(sbuf))
                        c.shutdown(socket.SHUT_WR)
                    sbuf += data
                    while b"\n" in sbuf:
                        i = sbuf.index(b"\n") + 1
                        line = bytes(sbuf[:i])
                        del sbuf[:i]
                        self.ctx.lines += 1
                        self.ctx.seen_lines.append((self.ctx.session, line))
                        for out in self.on_line(self.ctx, self.ctx.lines, line):
                            c.sendall(out)


def flip(b: bytes, at: int) -> bytes:
    x = bytearray(b)
    x[at] ^= 0x01
    return bytes(x)


def fake_mac() -> bytes:
    return b"mac=" + (secrets.token_urlsafe(16)[:22].encode())


# --------------------------------------------------------------------------- the attacks


def frame_attack(kind: str, at_type: int, nth: int) -> Frames:
    def attack(ctx: Ctx, t: int, i: int, f: bytes) -> list[bytes]:
        if ctx.session < 2 or t != at_type or i != nth:
            if ctx.pending and t in (at_type, END):
                out, ctx.pending = [f, *ctx.pending], []
                return out
            return [f]
        if kind == "flip-payload":
            return [flip(f, len(f) - 1)]
        if kind == "flip-header":
            return [flip(f, 5)]
        if kind == "drop":
            return []
        if kind == "duplicate":
            return [f, f]
        if kind == "swap":
            ctx.pending = [f]
            return []
        if kind == "truncate-tag":
            body = f[5:-1]
            return [struct.pack(">BI", t, len(body)) + body]
        if kind == "extend-tag":
            body = f[5:] + b"\0"
            return [struct.pack(">BI", t, len(body)) + body]
        if kind == "inject-other-file":
            old = [g for s, tt, g in ctx.seen_frames if s == 1 and tt == FILE]
            return [old[0], f]
        if kind == "inject-garbage-data":
            junk = os.urandom(64)
            return [f, struct.pack(">BI", DATA, len(junk)) + junk]
        if kind == "replay-hello":
            old = [g for s, tt, g in ctx.seen_frames if s == 1 and tt == HELLO]
            return [old[0]]
        raise AssertionError(kind)
    return attack


def tamper_data_and(line_attack: Lines) -> tuple[Frames, Lines]:
    """Flip the second session's first DATA (the server answers 554) and forge its reply."""
    return frame_attack("flip-payload", DATA, 1), line_attack


def forge_250(src: bytes, name: str) -> Lines:
    def attack(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
        if ctx.session >= 2 and line.startswith(b"554 "):
            sha = hashlib.sha256(src).hexdigest().encode()
            return [b"250 stored %d sha256:%s %s %s\r\n" % (len(src), sha, name.encode(),
                                                             fake_mac())]
        return [line]
    return attack


def replay_250(ctx_line: bytes = b"250 ") -> Lines:
    def attack(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
        if ctx.session >= 2 and line.startswith(b"554 "):
            old = [x for s, x in ctx.seen_lines if s == 1 and x.startswith(ctx_line)]
            return [old[0]]
        return [line]
    return attack


def forge_221(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
    if ctx.session >= 2 and line.startswith(b"221 "):
        return [b"221 bye 2 " + fake_mac() + b"\r\n"]
    return [line]


def replay_221(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
    if ctx.session >= 2 and line.startswith(b"221 "):
        return [next(x for s, x in ctx.seen_lines if s == 1 and x.startswith(b"221 "))]
    return [line]


def replay_greeting(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
    if ctx.session >= 2 and nth == 1:
        return [next(x for s, x in ctx.seen_lines if s == 1 and x.startswith(b"220 "))]
    return [line]


def replay_235(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
    if ctx.session >= 2 and line.startswith(b"235 "):
        return [next(x for s, x in ctx.seen_lines if s == 1 and x.startswith(b"235 "))]
    return [line]


def flip_line(prefix: bytes) -> Lines:
    def attack(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
        if ctx.session >= 2 and line.startswith(prefix):
            return [line[:-4] + bytes([line[-4] ^ 0x02]) + line[-3:]]
        return [line]
    return attack


def inject_line(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
    if ctx.session >= 2 and line.startswith(b"235 "):
        return [line, b"250 stored 1 sha256:" + b"0" * 64 + b" x " + fake_mac() + b"\r\n"]
    return [line]


def drop_receipts(ctx: Ctx, nth: int, line: bytes) -> list[bytes]:
    if ctx.session >= 2 and line.startswith(b"250 "):
        return []
    return [line]


def attacks(src: bytes, name: str) -> dict[str, tuple[Frames, Lines]]:
    a: dict[str, tuple[Frames, Lines]] = {}
    for kind in ("flip-payload", "flip-header", "drop", "duplicate", "truncate-tag",
                 "extend-tag"):
        for t, n in ((HELLO, 1), (FILE, 1), (DATA, 2), (END, 1), (BYE, 1), (FILE, 2)):
            if kind == "flip-header" and t in (END, BYE):
                continue
            a[f"{kind} {t}#{n}"] = (frame_attack(kind, t, n), keep_line)
    a["swap DATA#1/#2"] = (frame_attack("swap", DATA, 1), keep_line)
    a["swap FILE#2/END"] = (frame_attack("swap", FILE, 2), keep_line)
    a["inject FILE of another session"] = (frame_attack("inject-other-file", FILE, 1), keep_line)
    a["inject FILE of another session mid-file"] = (frame_attack("inject-other-file", DATA, 2),
                                                    keep_line)
    a["inject a DATA frame"] = (frame_attack("inject-garbage-data", DATA, 2), keep_line)
    a["replay an old HELLO"] = (frame_attack("replay-hello", HELLO, 1), keep_line)
    a["forge 250 over 554"] = tamper_data_and(forge_250(src, name))
    a["replay old 250 over 554"] = tamper_data_and(replay_250())
    a["forge 221"] = (keep_frame, forge_221)
    a["replay old 221"] = (keep_frame, replay_221)
    a["replay old greeting"] = (keep_frame, replay_greeting)
    a["replay old 235"] = (keep_frame, replay_235)
    a["flip a bit in 235"] = (keep_frame, flip_line(b"235 "))
    a["flip a bit in 250"] = (keep_frame, flip_line(b"250 "))
    a["flip a bit in 221"] = (keep_frame, flip_line(b"221 "))
    a["inject a 250 before any file"] = (keep_frame, inject_line)
    a["drop the receipts"] = (keep_frame, drop_receipts)
    return a


ATTACKS = sorted(attacks(b"", "x"))
#: Tampering after the client's last frame, which no server reads: harmless, not detected.
AFTER_THE_LAST_FRAME = {"duplicate 6#1"}
assert AFTER_THE_LAST_FRAME <= set(ATTACKS)


@pytest.fixture(scope="module")
def tally() -> Iterator[dict[str, int]]:
    t = {"tried": 0, "detected": 0, "false_success": 0}
    yield t
    record("mitm", **t)


@pytest.mark.parametrize("name", ATTACKS)
def test_an_active_attacker_is_detected_and_never_a_false_success(
        site: Site, name: str, tally: dict[str, int]) -> None:
    box = make_box(site.dir, "mitm")
    port = site.inetd(site.config([box], preauth_timeout=5, idle_timeout=5))
    big = os.urandom(600 * 1024)  # three DATA frames of rstash-send's 256 KiB
    small = os.urandom(1000)
    f1, f2 = site.src("big.bin", big), site.src("small.bin", small)
    frames, lines = attacks(big, "big.bin")[name]
    proxy = Proxy(port, frames, lines)
    try:
        # --no-resume: the second session must send its data again for the attack to act on.
        first = site.send(box, proxy.port, f1, f2, args=["--timeout", "8", "--no-resume"], name="first")
        assert first.wait(30) == 0, first.describe()  # session 1 is clean: the material
        for n in ("big.bin", "small.bin"):
            (box.path / n).unlink()
        second = site.send(box, proxy.port, f1, f2, args=["--timeout", "8", "--no-resume"],
                           name="second")
        rc = second.wait(40)
    finally:
        proxy.close()
    held = {n: (box.path / n).read_bytes() for n in os.listdir(box.path)
            if not n.startswith(".rstash")}
    intact = held == {"big.bin": big, "small.bin": small}
    if name in AFTER_THE_LAST_FRAME:
        # rstash(7) "Closing the connection": the server reads no frame after BYE, so a copy
        # of BYE changes nothing; the session's files and lines are all genuine.
        tally["false_success"] += rc == 0 and not intact
        assert rc == 0 and intact, f"{name}\n{second.describe()}"
        return
    tally["tried"] += 1
    tally["detected"] += rc != 0
    tally["false_success"] += rc == 0 and not intact
    assert rc != 0, f"{name}: not detected\n{second.describe()}"
    assert all(held[n] == {"big.bin": big, "small.bin": small}.get(n) for n in held), \
        f"{name}: the box holds something the sender did not send: {sorted(held)}"
    assert "Traceback" not in second.stderr(), second.describe()
    assert len(second.stderr().strip().splitlines()) >= 1
    wait_until(lambda: temps(box.path) == [], timeout=10, what="no temp left")


def test_the_proxy_itself_is_transparent(site: Site) -> None:
    """Without an attack the same two sessions succeed: detection above is the attack's."""
    box = make_box(site.dir, "clean")
    port = site.inetd(site.config([box]))
    # the attack machinery itself, aimed at a frame type that never occurs
    proxy = Proxy(port, frame_attack("duplicate", 99, 1), flip_line(b"999 "))
    try:
        for n in range(2):
            content = os.urandom(600 * 1024)
            f = site.src(f"f{n}", content)
            p = site.send(box, proxy.port, f, name=f"clean{n}")
            assert p.wait(30) == 0, p.describe()
            assert (box.path / f"f{n}").read_bytes() == content
    finally:
        proxy.close()
    assert proxy.ctx.session == 2 and free_port() > 0
