"""Fuzzing the server: hostile byte streams into the real session, store and box directory.

In process: hypothesis frame sequences, and flips, truncations, duplications, drops, reorderings
and splices of captured real streams (interactive, with the server's challenge fixed so the proof
still verifies and mutations reach the frames after it; and pipe mode). Against the real
process: mutated streams to the installed rstash-recv over pipes.

The oracle: the session never raises; it writes only reply lines; no temp is left; and a file
appears or changes in the box only when the mutated stream begins with the whole authentic
stream up to that file's END, and then holds exactly the authentic content.

Figure: ``fuzz N, 0 unhandled, 0 stored, 0 temps left`` (stored = stored without authority).
"""

from __future__ import annotations

import random
import re
import secrets
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adversarial.adv_inproc import Box, fixed_challenge, make_box
from adversarial.adv_support import Site, count, record, temps
from adversarial.adv_wire import wire
from e2e_support import make_box as make_e2e_box
from rstash import auth

REPLY_LINE = re.compile(rb"[2-5][0-9]{2} [\x20-\x7e]{0,1020}\Z")
CHALLENGE = bytes(range(32))


@dataclass
class Captured:
    stream: bytes
    #: (offset just past the file's END, name, content) of each authentic file
    files: list[tuple[int, str, bytes]]


def capture(box: Box, greeting: str | None, contents: list[tuple[str, bytes]],
            chunk: int = 700) -> Captured:
    """What the real client protocol sends for ``contents`` (pipe mode when no greeting)."""
    conn = wire.ClientConnection(auth.Key(box.key, "fuzz"), box.name, pipe=greeting is None)
    if greeting is not None:
        conn.receive_data(greeting.encode() + b"\r\n")
        assert isinstance(conn.next_event(), wire.Greeting)
    out = bytearray(conn.hello(secrets.token_bytes(32), int(time.time())))
    files = []
    for name, content in contents:
        out += conn.file(name.encode(), len(content), 1_700_000_000)
        for pos in range(0, len(content), chunk):
            out += conn.data(content[pos:pos + chunk])
        out += conn.end()
        files.append((len(out), name, content))
    out += conn.bye()
    return Captured(bytes(out), files)


def frames_of(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 5 <= len(stream):
        n = struct.unpack(">I", stream[pos + 1:pos + 5])[0]
        out.append(stream[pos:pos + 5 + n])
        pos += 5 + n
    assert pos == len(stream)
    return out


def mutate(rng: random.Random, cap: Captured, others: list[Captured]) -> bytes:
    s = bytearray(cap.stream)
    frames = frames_of(cap.stream)
    how = rng.randrange(8)
    if how == 0:  # bit flips
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(s))
            s[i] ^= 1 << rng.randrange(8)
        return bytes(s)
    if how == 1:  # truncation
        return bytes(s[:rng.randrange(len(s))])
    if how == 2:  # a frame duplicated somewhere
        f = rng.choice(frames)
        frames.insert(rng.randrange(len(frames) + 1), f)
    elif how == 3 and len(frames) > 1:  # a frame dropped
        del frames[rng.randrange(len(frames))]
    elif how == 4 and len(frames) > 2:  # two frames swapped
        i, j = rng.sample(range(len(frames)), 2)
        frames[i], frames[j] = frames[j], frames[i]
    elif how == 5:  # random bytes spliced in
        i = rng.randrange(len(s) + 1)
        return bytes(s[:i] + rng.randbytes(rng.randint(1, 16)) + s[i:])
    elif how == 6:  # a frame of another session
        f = rng.choice(frames_of(rng.choice(others).stream))
        frames.insert(rng.randrange(1, len(frames) + 1), f)
    else:  # a length field lies
        i = rng.randrange(len(frames))
        lying = bytearray(frames[i])
        lying[1:5] = struct.pack(">I", max(0, len(lying) - 5 + rng.choice([-2, -1, 1, 2, 1 << 20])))
        frames[i] = bytes(lying)
    return b"".join(frames)


@dataclass
class Tally:
    streams: int = 0
    unhandled: int = 0
    stored: int = 0
    temps: int = 0
    #: sessions that got past the proof: mutations must reach the frames after HELLO
    authed: int = 0


def judge(box: Box, stream: bytes, legit: dict[str, bytes], tally: Tally) -> None:
    """Run one stream and check the oracle; counts, then asserts."""
    before = box.entries()
    tally.streams += 1
    try:
        out, result = box.run(stream)
    except Exception as e:  # the figure counts it; the assertion below reports it
        tally.unhandled += 1
        raise AssertionError(f"session raised {e!r} on {stream[:200]!r}") from e
    after = box.entries()
    tally.authed += out.startswith(b"220 ") and b"\r\n235 " in out
    changed = [n for n, v in after.items() if before.get(n) != v and not n.startswith(".rstash")]
    forged = [n for n in changed
              if n not in legit or (box.path / n).read_bytes() != legit[n]]
    left = box.temps()
    tally.stored += len(forged)
    tally.temps += len(left)
    assert forged == [], (forged, stream[:300])
    assert left == [], (left, stream[:300])
    assert result.status in (0, 1, 2), result
    assert all(REPLY_LINE.match(line) for line in out.split(b"\r\n")[:-1]), out
    assert out == b"" or out.endswith(b"\r\n"), out


def end_counts(data: bytes) -> list[int]:
    """Offsets of the u64 n of each END frame: rstash(7) END has the server compute the tag
    from its own count, never the wire's, so a changed n there is not a forgery."""
    out, pos = [], 0
    for f in frames_of(data):
        if f[0] == wire.FrameType.END:
            out.append(pos + 5)
        pos += len(f)
    return out


def legit_files(cap: Captured, stream: bytes) -> dict[str, bytes]:
    """The authentic files whose whole stream up to their END begins ``stream``."""
    masked = bytearray(stream)
    for at in end_counts(cap.stream):
        if len(masked) >= at + 8:
            masked[at:at + 8] = cap.stream[at:at + 8]
    return {name: content for end, name, content in cap.files
            if masked.startswith(cap.stream[:end])}


def test_mutated_real_streams_store_nothing_without_authority(tmp_path: Path) -> None:
    box = make_box(tmp_path, pipe_mode=True, overwrite="replace")
    rng = random.Random(0x5EED)
    tally = Tally()
    contents = [("a.txt", b"alpha\n" * 300), ("empty", b""), ("b.bin", bytes(range(256)) * 9)]
    with fixed_challenge(CHALLENGE) as greeting:
        caps = [capture(box, greeting, contents), capture(box, greeting, contents[:1]),
                capture(box, None, contents), capture(box, None, contents[2:])]
        for cap in caps[2:]:  # each pipe stream is used once as is: every later one is a replay
            judge(box, cap.stream, legit_files(cap, cap.stream), tally)
        try:
            for _ in range(count(8000, floor=200)):
                cap = rng.choice(caps)
                stream = mutate(rng, cap, caps)
                judge(box, stream, legit_files(cap, stream), tally)
        finally:
            record("fuzz", streams=tally.streams, unhandled=tally.unhandled,
                   stored=tally.stored, temps=tally.temps)
    assert tally.authed > tally.streams // 4, tally


_FRAME = st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 255]),
                   st.binary(max_size=96)).map(lambda t: struct.pack(">BI", t[0], len(t[1])) + t[1])


class _Rig:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rstash-fuzz-"))
        self.box = make_box(self.tmp, pipe_mode=True)
        self.tally = Tally()


@pytest.fixture(scope="module")
def hypo_rig() -> Iterator[_Rig]:
    rig = _Rig()
    yield rig
    record("fuzz", streams=rig.tally.streams, unhandled=rig.tally.unhandled,
           stored=rig.tally.stored, temps=rig.tally.temps)
    shutil.rmtree(rig.tmp, ignore_errors=True)


@settings(max_examples=count(2500, floor=50), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(lead=st.sampled_from(["none", "hello", "file"]), frames=st.lists(_FRAME, max_size=8),
       cut=st.integers(min_value=0, max_value=64))
def test_hypothesis_frame_sequences_after_a_real_hello(hypo_rig: _Rig, lead: str,
                                                       frames: list[bytes], cut: int) -> None:
    box = hypo_rig.box
    with fixed_challenge(CHALLENGE) as greeting:
        cap = capture(box, greeting, [("h.txt", b"hypothesis\n")])
        head = b""
        if lead == "hello":
            head = frames_of(cap.stream)[0]
        elif lead == "file":
            head = b"".join(frames_of(cap.stream)[:2])
        stream = head + b"".join(frames)
        if cut:
            stream = stream[:-cut] or stream
        judge(box, stream, legit_files(cap, stream), hypo_rig.tally)


@pytest.mark.e2e
def test_mutated_streams_against_the_real_process(site: Site) -> None:
    """The installed rstash-recv over pipes: pipe-mode streams (no greeting to read), mutated."""
    box = make_e2e_box(site.dir, "fuzz", pipe_mode=True, overwrite="replace")
    conf = site.config([box], idle_timeout=3, preauth_timeout=3)
    rng = random.Random(0xF022)
    inproc = make_box(site.dir / "scratch", "fuzz")  # only to build streams with box's key
    inproc.key = box.key
    contents = [("a.txt", b"alpha\n" * 200), ("b.bin", bytes(range(256)) * 5)]
    caps = [capture(inproc, None, contents), capture(inproc, None, contents[1:])]
    legit = dict(contents)
    n = count(500, floor=20)
    tally = Tally()
    try:
        for i in range(n):
            cap = caps[i % len(caps)]
            stream = cap.stream if i < len(caps) else mutate(rng, cap, caps)
            before = {p.name: p.stat().st_mtime_ns for p in box.path.iterdir()}
            served = site.piped(conf)
            try:
                served.pipe.send(stream, timeout=10)
            except (OSError, TimeoutError):
                pass  # the server may stop reading at the first bad frame
            served.pipe.close_write()
            out = served.pipe.rest(timeout=20)
            rc = served.wait()
            tally.streams += 1
            if rc not in (0, 1) or "Traceback" in served.stderr():
                tally.unhandled += 1
            allowed = legit_files(cap, stream)
            changed = [p.name for p in box.path.iterdir()
                       if before.get(p.name) != p.stat().st_mtime_ns
                       and not p.name.startswith(".rstash")]
            forged = [c for c in changed if c not in allowed or
                      (box.path / c).read_bytes() != legit[c]]
            tally.stored += len(forged)
            tally.temps += len(temps(box.path))
            assert rc in (0, 1) and "Traceback" not in served.stderr(), served.stderr()
            assert forged == [] and temps(box.path) == [], (forged, stream[:200])
            assert all(REPLY_LINE.match(x) for x in out.split(b"\r\n")[:-1]), out
    finally:
        record("fuzz", streams=tally.streams, unhandled=tally.unhandled, stored=tally.stored,
               temps=tally.temps)
