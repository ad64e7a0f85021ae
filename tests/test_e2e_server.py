"""End to end: the real rstash-recv, run as the service user, against real and hostile clients.

One test per rule of rstash(7) RULES and rstash-recv(8) that a unit test cannot show: the server is the
installed ``rstash-recv`` from the e2e venv, started per connection by ``systemd-socket-activate
--inetd`` (TCP on loopback) or spawned with pipes on stdin/stdout for crafted sessions. Clients
are the real ``rstash-send``, ``nc``, or a :class:`rstash.wire.ClientConnection` driven by
the test, which can flip bits, stall, cut the connection or lie about the time.

Every wait is bounded; every process is killed at teardown (the ``spawn`` fixture for
:class:`Proc`, the ``rig`` fixture for the pipe sessions it starts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e_support import (
    Box,
    Proc,
    ProcGroup,
    ServiceUser,
    as_service,
    free_port,
    is_root,
    make_box,
    need,
    need_program,
    service_env,
    venv_bin,
    wait_for_port,
    wait_until,
    write_config,
)
from rstash import auth
from rstash import wire as protocol  # the crafted byte pipe is `wire` here
from rstash.durable import kernel_reports_errors

pytestmark = pytest.mark.e2e

TEMP_PREFIX = ".rstash-tmp-"
REPLY_LINE = re.compile(rb"[2-5][0-9]{2} [\x20-\x7e]*\r\n\Z")


# --------------------------------------------------------------------------- a crafted wire


class Wire:
    """Bytes to and lines from one rstash-recv, every wait bounded (pipes or a socket)."""

    def __init__(self, rfd: int, wfd: int, shut: Any = None) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._shut = shut
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self.buf = bytearray()
        self.eof = False

    def send(self, data: bytes, timeout: float = 10.0) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                n = os.write(self.wfd, view)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the server stopped reading") from None
                p = select.poll()
                p.register(self.wfd, select.POLLOUT)
                p.poll(left * 1000)
                continue
            view = view[n:]

    def close_write(self) -> None:
        """End of our stream (after BYE): the server's last read sees EOF."""
        if self._shut is not None:
            self._shut()
        else:
            os.close(self.wfd)

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no reply in time; have {bytes(self.buf)!r}")
        p = select.poll()
        p.register(self.rfd, select.POLLIN)
        if not p.poll(left * 1000):
            raise TimeoutError(f"no reply in time; have {bytes(self.buf)!r}")
        try:
            data = os.read(self.rfd, 65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if data:
            self.buf += data
        else:
            self.eof = True

    def line(self, timeout: float = 10.0) -> bytes:
        """The next line with its line end; b"" at end of stream."""
        deadline = time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                out = bytes(self.buf[:nl + 1])
                del self.buf[:nl + 1]
                return out
            if self.eof:
                out = bytes(self.buf)
                self.buf.clear()
                return out
            self._fill(deadline)

    def rest(self, timeout: float = 10.0) -> bytes:
        """Everything until the server closes."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            self._fill(deadline)
        out = bytes(self.buf)
        self.buf.clear()
        return out


def greet(wire: Wire, key: bytes, box: str, *, pipe: bool = False,
          t: int | None = None) -> protocol.ClientConnection:
    """Read the greeting and send a HELLO for ``box`` proved with ``key``."""
    conn = protocol.ClientConnection(auth.Key(key, "test"), box, pipe=pipe)
    greeting = wire.line()
    assert greeting.startswith(b"220 rstash/1 "), greeting
    if not pipe:
        conn.receive_data(greeting)
        assert isinstance(conn.next_event(), protocol.Greeting)
    wire.send(conn.hello(secrets.token_bytes(32), int(time.time()) if t is None else t))
    return conn


def event(wire: Wire, conn: protocol.ClientConnection) -> protocol.ClientEvent:
    """The client protocol's verdict on the server's next line."""
    raw = wire.line()
    conn.receive_data(raw)
    if not raw:
        conn.receive_data(b"")
    ev = conn.next_event()
    assert ev is not protocol.NEED_DATA, raw
    return ev


def login(wire: Wire, key: bytes, box: str) -> protocol.ClientConnection:
    conn = greet(wire, key, box)
    ev = event(wire, conn)
    assert isinstance(ev, protocol.AuthOk), ev
    return conn


def put(wire: Wire, conn: protocol.ClientConnection, name: bytes, content: bytes,
        mtime: int = 1_700_000_000) -> None:
    wire.send(conn.file(name, len(content), mtime))
    if content:
        wire.send(conn.data(content))
    wire.send(conn.end())


# --------------------------------------------------------------------------- the rig


@dataclass
class Served:
    """One rstash-recv started with pipes (or a socket) for a crafted client."""

    popen: subprocess.Popen[bytes]
    wire: Wire
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            raise TimeoutError(f"rstash-recv still running after {timeout} s; killed\n"
                               f"{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@dataclass
class Rig:
    dir: Path
    venv: Path
    spawn: ProcGroup
    user: ServiceUser
    served: list[Served] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)

    @property
    def recv(self) -> str:
        return venv_bin(self.venv, "rstash-recv")

    @property
    def send_bin(self) -> str:
        return venv_bin(self.venv, "rstash-send")

    @property
    def log_path(self) -> Path:
        return self.dir / "rstash-recv.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def config(self, boxes: Sequence[Box], **top: Any) -> Path:
        return write_config(self.dir, boxes, **top)

    def src(self, name: str, content: bytes) -> Path:
        d = self.dir / "src"
        d.mkdir(mode=0o755, exist_ok=True)
        path = d / name
        path.write_bytes(content)
        return path

    def inetd(self, conf: Path, *extra: str) -> int:
        """A TCP port on loopback where every connection gets its own rstash-recv (inetd nowait)."""
        ssa = need_program("systemd-socket-activate")
        port = free_port()
        proc = self.spawn([ssa, "-a", "--inetd", "-l", f"127.0.0.1:{port}",
                           *as_service([self.recv, "-c", str(conf), *extra])],
                          name="socket-activate", env=service_env())
        wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
        return port

    def send(self, box: Box, port: int, *files: Path, args: Sequence[str] = (),
             name: str = "rstash-send") -> Proc:
        return self.spawn([self.send_bin, "-k", str(box.client_key), "--no-progress",
                           "--timeout", "30", *args, box.url(port), *map(str, files)],
                          name=name)

    def piped(self, conf: Path, *extra: str, env: dict[str, str] | None = None,
              prefix: Sequence[str] = (), as_user: bool = True) -> Served:
        """rstash-recv serving one session on pipes: fd 0 reads, fd 1 writes, stderr to a file."""
        argv = [self.recv, "-c", str(conf), *extra]
        argv = [*prefix, *(as_service(argv) if as_user else argv)]
        n = len(self.served) + 1
        err_path = self.dir / f"recv-piped.{n}.err"
        with open(err_path, "wb") as err:
            popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err, env=env if env is not None else service_env(),
                                     start_new_session=True)
        assert popen.stdin is not None and popen.stdout is not None
        served = Served(popen, Wire(popen.stdout.fileno(), popen.stdin.fileno(),
                                    shut=popen.stdin.close), err_path)
        self.served.append(served)
        return served

    def on_socket(self, conf: Path, *extra: str) -> tuple[Served, socket.socket]:
        """rstash-recv with fds 0, 1 AND 2 all one end of a socketpair (inetd without care)."""
        ours, theirs = socket.socketpair()
        n = len(self.served) + 1
        err_path = self.dir / f"recv-socket.{n}.err"  # stays empty: fd 2 is the socket
        err_path.touch()
        try:
            popen = subprocess.Popen(as_service([self.recv, "-c", str(conf), *extra]),
                                     stdin=theirs.fileno(), stdout=theirs.fileno(),
                                     stderr=theirs.fileno(),
                                     env=service_env(), start_new_session=True)
        finally:
            theirs.close()
        self.closers.append(ours.close)
        served = Served(popen, Wire(ours.fileno(), ours.fileno(),
                                    shut=lambda: ours.shutdown(socket.SHUT_WR)), err_path)
        self.served.append(served)
        return served, ours

    def close(self) -> None:
        for s in self.served:
            if s.popen.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(s.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.popen.wait(5)
            for f in (s.popen.stdin, s.popen.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                close()


@pytest.fixture
def rig(e2e_dir: Path, e2e_venv: Path, spawn: ProcGroup, service_user: ServiceUser) -> Iterator[Rig]:
    r = Rig(e2e_dir, e2e_venv, spawn, service_user)
    try:
        yield r
    finally:
        r.close()


def temps(box: Box) -> list[str]:
    return [n for n in os.listdir(box.path) if n.startswith(TEMP_PREFIX)]


def entries(box: Box) -> list[str]:
    return sorted(os.listdir(box.path))


def wait_box_clean(box: Box, timeout: float = 10.0) -> None:
    wait_until(lambda: not os.listdir(box.path), timeout=timeout,
               what=f"an empty box (have {entries(box)})")


# --------------------------------------------------------------------------- store: symlinks, races


@pytest.mark.parametrize("policy", ["refuse", "rename", "replace"])
def test_a_symlink_planted_at_the_target_name_is_never_followed(rig: Rig, policy: str) -> None:
    box = make_box(rig.dir, "vm1", overwrite=policy)
    # The target is writable by the service user: following the link would succeed.
    target = rig.dir / "precious.txt"
    target.write_bytes(b"precious\n")
    rig.user.chown(target)
    os.chmod(target, 0o666)
    link = box.path / "f.txt"
    link.symlink_to(target)
    port = rig.inetd(rig.config([box]))
    src = rig.src("f.txt", b"new content\n")

    proc = rig.send(box, port, src)
    rc = proc.wait(30)

    assert target.read_bytes() == b"precious\n"
    if policy == "refuse":
        assert rc == 1, proc.describe()
        assert "exists" in proc.stderr()
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert entries(box) == ["f.txt"]
    elif policy == "rename":
        assert rc == 0, proc.describe()
        assert link.is_symlink() and os.readlink(link) == str(target)
        renamed = box.path / "f~1.txt"
        assert not renamed.is_symlink() and renamed.read_bytes() == b"new content\n"
        assert entries(box) == ["f.txt", "f~1.txt"]
    else:
        assert rc == 0, proc.describe()
        assert not link.is_symlink() and link.is_file()
        assert link.read_bytes() == b"new content\n"
        assert entries(box) == ["f.txt"]


@pytest.mark.parametrize("policy", ["refuse", "rename"])
def test_ten_concurrent_senders_of_one_name(rig: Rig, policy: str) -> None:
    box = make_box(rig.dir, "vm1", overwrite=policy)
    port = rig.inetd(rig.config([box]))
    contents = [bytes([i]) * 16 + secrets.token_bytes(512 * 1024) for i in range(10)]
    srcs = []
    for i, content in enumerate(contents):
        d = rig.dir / "src" / str(i)
        d.mkdir(parents=True)
        (d / "same.bin").write_bytes(content)
        srcs.append(d / "same.bin")

    procs = [rig.send(box, port, src, name=f"send-{i}") for i, src in enumerate(srcs)]
    rcs = [p.wait(60) for p in procs]

    stored = box.files()
    assert not temps(box)
    if policy == "refuse":
        assert sorted(rcs) == [0] + [1] * 9, [p.describe() for p in procs]
        for p, rc in zip(procs, rcs, strict=True):
            if rc == 1:
                assert "exists" in p.stderr(), p.describe()
        assert list(stored) == ["same.bin"]
        winner = rcs.index(0)
        assert stored["same.bin"] == contents[winner]  # one whole file, the winner's
    else:
        assert rcs == [0] * 10, [p.describe() for p in procs if p.returncode]
        assert set(stored) == {"same.bin", *(f"same~{n}.bin" for n in range(1, 10))}
        assert sorted(stored.values()) == sorted(contents)  # 10 distinct whole files


def test_two_concurrent_senders_cannot_overshoot_the_quota(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1", quota="1MiB")
    port = rig.inetd(rig.config([box]))
    a = rig.src("a.bin", secrets.token_bytes(900 * 1024))
    b = rig.src("b.bin", secrets.token_bytes(200 * 1024))

    # A is slow (256 KiB chunks, 150 KiB/s): while it is in flight, its temp holds at most
    # 768 KiB, so only its reservation of 900 KiB (not its bytes) can make B break the quota.
    slow = rig.send(box, port, a, args=["--bwlimit", "150KiB"], name="send-slow")
    wait_until(lambda: bool(temps(box)) or not slow.running(), timeout=15, what="A's temp")
    assert slow.running(), slow.describe()
    fast = rig.send(box, port, b, name="send-fast")
    assert fast.wait(30) == 1, fast.describe()
    assert slow.running(), "A finished too early for the race to mean anything"
    assert slow.wait(30) == 0, slow.describe()

    assert "quota" in fast.stderr()
    assert box.files() == {"a.bin": a.read_bytes()}
    assert re.search(r"outcome=refused code=552 .*quota", rig.log()), rig.log()


# --------------------------------------------------------------------------- interrupted transfers


def test_a_sender_killed_mid_file_leaves_no_partial_and_no_temp(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    port = rig.inetd(rig.config([box]))
    big = rig.src("big.bin", secrets.token_bytes(8 * 2**20))
    proc = rig.send(box, port, big, args=["--bwlimit", "1MiB"])

    def temp_has_bytes() -> bool:
        return any((box.path / t).stat().st_size > 0 for t in temps(box) if (box.path / t).exists())

    wait_until(temp_has_bytes, timeout=15, what="a temp with data")
    proc.signal(signal.SIGKILL)
    proc.wait(5)
    wait_box_clean(box, timeout=10)
    wait_until(lambda: "truncated" in rig.log(), timeout=5, what="a truncated session logged")


def test_a_connection_cut_mid_file_leaves_no_partial_and_no_temp(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    port = rig.inetd(rig.config([box]))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    rig.closers.append(sock.close)
    wire = Wire(sock.fileno(), sock.fileno())
    conn = login(wire, box.key, "vm1")
    wire.send(conn.file(b"cut.bin", 4 * 2**20, 0))
    wire.send(conn.data(secrets.token_bytes(2**20)))
    wait_until(lambda: bool(temps(box)), timeout=10, what="a temp")
    # RST, not FIN: the rudest cut a network can deliver.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    wait_box_clean(box, timeout=10)
    wait_until(lambda: "truncated after 1" in rig.log(), timeout=5, what="truncated logged")


@pytest.fixture
def small_tmpfs_box(rig: Rig) -> Iterator[Box]:
    need(is_root(), "mounting a tmpfs needs root")
    mount = need_program("mount")
    umount = need_program("umount")
    box = make_box(rig.dir, "tiny")
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m,mode=0755", "rstash-e2e-tiny",
                    str(box.path)], check=True, timeout=30, capture_output=True)
    try:
        rig.user.chown(box.path)
        os.chmod(box.path, 0o755)
        yield box
    finally:
        if subprocess.run([umount, str(box.path)], timeout=30,
                          capture_output=True).returncode != 0:
            subprocess.run([umount, "-l", str(box.path)], timeout=30, capture_output=True)


def test_disk_full_is_452_the_temp_is_removed_and_the_box_still_works(
        rig: Rig, small_tmpfs_box: Box) -> None:
    box = small_tmpfs_box
    port = rig.inetd(rig.config([box]))
    big = rig.src("big.bin", secrets.token_bytes(3 * 2**20))
    proc = rig.send(box, port, big)
    assert proc.wait(30) == 75, proc.describe()
    assert "insufficient storage" in proc.stderr()
    assert entries(box) == []
    assert "code=452" in rig.log()

    small = rig.src("small.bin", b"fits\n" * 1000)
    proc = rig.send(box, port, small, name="send-small")
    assert proc.wait(30) == 0, proc.describe()
    assert box.files() == {"small.bin": small.read_bytes()}


# --------------------------------------------------------------------------- pipe mode


def test_a_replayed_pipe_stream_is_refused_and_stores_nothing_twice(rig: Rig) -> None:
    nc = need_program("nc")
    box = make_box(rig.dir, "vm1", pipe_mode=True)
    port = rig.inetd(rig.config([box]))
    warm = rig.send(box, port, rig.src("warm.txt", b"warm\n"), name="send-warm")
    assert warm.wait(30) == 0, warm.describe()
    src = rig.src("once.bin", b"only once\n")
    maker = rig.spawn([rig.send_bin, "--stdout", "-k", str(box.client_key), "vm1", str(src)],
                      name="stream")
    assert maker.wait(15) == 0, maker.describe()
    stream = maker.stdout_path
    assert stream.stat().st_size > 0

    replies = []
    for i in range(2):
        with open(stream, "rb") as f:
            p = rig.spawn([nc, "-N", "127.0.0.1", str(port)], stdin=f, name=f"nc-{i}")
        p.wait(20)
        replies.append(p.stdout_path.read_bytes().decode("ascii", "replace"))
    first, second = replies
    assert re.search(r"^250 stored 10 sha256:[0-9a-f]{64} once\.bin mac=", first, re.M), first
    assert re.search(r"^221 bye 1 mac=", first, re.M), first
    assert "532 replayed session\r\n" in second, second
    assert not re.search(r"^(235|250) ", second, re.M), second
    files = box.files()
    assert int(files.pop(".rstash-pipe-mark")) <= time.time()  # rstash-recv(8) FILES
    assert files == {"warm.txt": b"warm\n", "once.bin": b"only once\n"}
    assert re.search(r"code=532 .*nonce already seen", rig.log()), rig.log()


def test_pipe_mode_off_is_530(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")  # pipe_mode defaults to false
    s = rig.piped(rig.config([box]))
    greet(s.wire, box.key, "vm1", pipe=True)
    assert s.wire.rest() == b"530 pipe mode off\r\n"
    assert s.wait() == 0
    assert entries(box) == []


def test_clock_skew_beyond_the_replay_window_is_531(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1", pipe_mode=True)
    s = rig.piped(rig.config([box], replay_window=30))
    greet(s.wire, box.key, "vm1", pipe=True, t=int(time.time()) - 60)
    reply = s.wire.rest()
    m = re.fullmatch(rb"531 clock skew -([0-9]+) s\r\n", reply)
    assert m is not None, reply
    assert 59 <= int(m.group(1)) <= 62
    assert s.wait() == 0
    assert entries(box) == []


# --------------------------------------------------------------------------- integrity


def test_a_bit_flipped_in_data_is_554_and_nothing_is_stored(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    s = rig.piped(rig.config([box]))
    conn = login(s.wire, box.key, "vm1")
    content = secrets.token_bytes(100_000)
    s.wire.send(conn.file(b"flip.bin", len(content), 0))
    frames = bytearray(conn.data(content))  # END's tag covers the unflipped content
    frames[5 + 4242] ^= 0x10
    s.wire.send(bytes(frames))
    s.wire.send(conn.end())
    assert s.wire.rest() == b"554 integrity check failed flip.bin\r\n"
    assert s.wait() == 1
    assert entries(box) == []
    flipped = bytearray(content)
    flipped[4242] ^= 0x10
    # The server logs the SHA-256 of what it actually received.
    assert hashlib.sha256(flipped).hexdigest() in rig.log()


def test_a_bit_flipped_in_a_file_tag_is_554_and_nothing_is_stored(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    s = rig.piped(rig.config([box]))
    conn = login(s.wire, box.key, "vm1")
    frame = bytearray(conn.file(b"tag.bin", 10, 0))
    frame[-1] ^= 0x01
    s.wire.send(bytes(frame))
    reply = s.wire.rest()
    assert reply.startswith(b"554 integrity check failed"), reply
    assert REPLY_LINE.match(reply)
    assert s.wait() == 1
    assert entries(box) == []


def test_bytes_beyond_the_announced_size_end_the_session_and_leave_no_temp(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    s = rig.piped(rig.config([box]))
    conn = login(s.wire, box.key, "vm1")
    s.wire.send(conn.file(b"short.bin", 10, 0))
    # A DATA frame longer than the announced size, built by hand (the client refuses to).
    s.wire.send(struct.pack(">BI", protocol.FrameType.DATA, 20) + b"y" * 20)
    assert s.wire.rest() == b"500 protocol error\r\n"
    assert s.wait() == 1
    assert entries(box) == []


def test_a_file_sequence_number_out_of_order_is_554(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    s = rig.piped(rig.config([box]))
    conn = login(s.wire, box.key, "vm1")
    assert conn.keys is not None
    hdr = protocol.encode_file_header(1, b"skip.bin", 3, 0)  # index 0 never sent
    s.wire.send(protocol.frame(protocol.FrameType.FILE, hdr + auth.file_tag(conn.keys.k_c2s, hdr)))
    assert s.wire.rest() == b"554 integrity check failed skip.bin\r\n"
    assert s.wait() == 1
    assert entries(box) == []


def test_a_refused_file_is_discarded_to_its_end_and_the_session_goes_on(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1", deny_names=["*.tmp"])
    s = rig.piped(rig.config([box]))
    conn = login(s.wire, box.key, "vm1")
    # Pipelined like a pipe-mode client: the refused file's DATA and END still follow it.
    put(s.wire, conn, b"junk.tmp", secrets.token_bytes(300_000))
    put(s.wire, conn, b"-dash.txt", b"dash\n")
    put(s.wire, conn, b"good.txt", b"good\n")
    s.wire.send(conn.bye())
    s.wire.close_write()
    codes = []
    for _ in range(3):
        ev = event(s.wire, conn)
        assert isinstance(ev, protocol.Receipt), ev
        codes.append((ev.index, ev.code))
    assert codes == [(0, 553), (1, 553), (2, 250)]
    done = event(s.wire, conn)
    assert isinstance(done, protocol.Done) and done.stored == 1
    assert s.wait() == 0
    assert box.files() == {"good.txt": b"good\n"}


def test_an_abort_gets_426_and_removes_the_temp(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    s = rig.piped(rig.config([box]))
    conn = login(s.wire, box.key, "vm1")
    s.wire.send(conn.file(b"gone.bin", 1000, 0))
    s.wire.send(conn.data(b"z" * 500))
    wait_until(lambda: bool(temps(box)), timeout=5, what="a temp")
    s.wire.send(conn.abort())
    ev = event(s.wire, conn)
    assert isinstance(ev, protocol.Receipt) and ev.code == 426, ev
    assert entries(box) == []
    put(s.wire, conn, b"gone.bin", b"second try\n")  # the name is still free
    ev = event(s.wire, conn)
    assert isinstance(ev, protocol.Receipt) and ev.ok, ev
    assert box.files() == {"gone.bin": b"second try\n"}


def test_a_stored_file_has_file_mode_the_service_user_the_box_group_and_arrival_mtime(
        rig: Rig) -> None:
    box = make_box(rig.dir, "vm1", file_mode="0604")
    group = os.getgid() if not is_root() else 0  # a group the service user is not in
    if is_root():
        os.chown(box.path, rig.user.uid, group)
        os.chmod(box.path, 0o2755)  # setgid: new files take the box dir's group
    port = rig.inetd(rig.config([box]))
    src = rig.src("meta.txt", b"meta\n")
    os.utime(src, (1_000_000_000, 1_000_000_000))
    before = time.time()
    proc = rig.send(box, port, src)
    assert proc.wait(30) == 0, proc.describe()
    st = (box.path / "meta.txt").stat()
    assert st.st_mode & 0o7777 == 0o604
    assert st.st_uid == rig.user.uid
    assert st.st_gid == (group if is_root() else box.path.stat().st_gid)
    assert st.st_mtime >= before - 1  # arrival time, not the client's mtime


class FlipProxy:
    """A one-connection TCP proxy that flips one bit of the server's first ``250 stored`` line."""

    def __init__(self, upstream: int, needle: bytes) -> None:
        self.upstream = upstream
        self.needle = needle
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flipped: bytes | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(30)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
        pending = bytearray()
        deadline = time.monotonic() + 60
        with client, server:
            open_ends = {client: server, server: client}
            while open_ends and time.monotonic() < deadline:
                ready, _, _ = select.select(list(open_ends), [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    dst = open_ends[src]
                    if not data:
                        del open_ends[src]
                        with contextlib.suppress(OSError):
                            if src is server and pending:
                                dst.sendall(bytes(pending))
                            dst.shutdown(socket.SHUT_WR)
                        continue
                    if src is client:
                        dst.sendall(data)
                        continue
                    pending += data
                    while (nl := pending.find(b"\n")) >= 0:
                        line = bytearray(pending[:nl + 1])
                        del pending[:nl + 1]
                        at = line.find(self.needle)
                        if self.flipped is None and line.startswith(b"250 stored") and at >= 0:
                            line[at + 1] ^= 0x01  # one bit of the stored name
                            self.flipped = bytes(line)
                        dst.sendall(bytes(line))

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def test_a_bit_flipped_in_a_receipt_makes_rstash_send_exit_5(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    port = rig.inetd(rig.config([box]))
    proxy = FlipProxy(port, b" receipt.txt mac=")
    rig.closers.append(proxy.close)
    src = rig.src("receipt.txt", b"receipt\n")
    proc = rig.spawn([rig.send_bin, "-k", str(box.client_key), "--no-progress", "--timeout", "20",
                      f"rstash://127.0.0.1:{proxy.port}/vm1", str(src)])
    rc = proc.wait(30)
    assert proxy.flipped is not None and b" seceipt.txt mac=" in proxy.flipped
    assert rc == 5, proc.describe()
    assert "MAC" in proc.stderr(), proc.describe()


# --------------------------------------------------------------------------- authentication


def test_unknown_box_and_wrong_key_are_indistinguishable(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    conf = rig.config([box])
    outcomes = []
    cases = [("nosuchbox", box.key, "192.0.2.7"), ("vm1", secrets.token_bytes(32), "198.51.100.9")]
    for box_name, key, peer in cases:
        s = rig.piped(conf, env=service_env(SSH_CONNECTION=f"{peer} 50000 127.0.0.1 22"))
        greet(s.wire, key, box_name)
        outcomes.append((s.wire.rest(), s.wait()))
    assert outcomes[0] == outcomes[1] == (b"535 authentication failed\r\n", 0)
    log = rig.log()
    for _box, _key, peer in cases:
        assert re.search(rf"outcome=auth_failed .*peer={re.escape(peer)}|"
                         rf"peer={re.escape(peer)} .*outcome=auth_failed", log), log
    assert entries(box) == []


def test_a_box_outside_the_box_allow_list_gets_535(rig: Rig) -> None:
    vm1 = make_box(rig.dir, "vm1")
    vm2 = make_box(rig.dir, "vm2")
    conf = rig.config([vm1, vm2])

    s = rig.piped(conf, "--box", "vm1")
    greet(s.wire, vm2.key, "vm2")
    assert s.wire.rest() == b"535 authentication failed\r\n"
    assert s.wait() == 0

    s = rig.piped(conf, "--box", "vm1")
    conn = login(s.wire, vm1.key, "vm1")  # the listed box still works
    put(s.wire, conn, b"ok.txt", b"ok\n")
    assert isinstance(event(s.wire, conn), protocol.Receipt)
    assert entries(vm2) == [] and entries(vm1) == ["ok.txt"]


def test_allow_from_is_matched_against_the_tcp_peer(rig: Rig) -> None:
    far = make_box(rig.dir, "far", allow_from=["10.0.0.0/8"])
    near = make_box(rig.dir, "near", allow_from=["127.0.0.0/8"])
    port = rig.inetd(rig.config([far, near]))
    src = rig.src("f.txt", b"hello\n")

    refused = rig.send(far, port, src, name="send-far")
    assert refused.wait(30) == 3, refused.describe()
    allowed = rig.send(near, port, src, name="send-near")
    assert allowed.wait(30) == 0, allowed.describe()

    assert entries(far) == [] and near.files() == {"f.txt": b"hello\n"}
    assert re.search(r"outcome=auth_failed .*peer=127\.0\.0\.1 .*box=far|"
                     r"peer=127\.0\.0\.1 .*box=far .*allow_from", rig.log()), rig.log()


def test_rstash_recv_refuses_to_serve_as_root(rig: Rig) -> None:
    need(is_root(), "only meaningful when the tests run as root")
    box = make_box(rig.dir, "vm1")
    conf = rig.config([box])
    proc = rig.spawn([rig.recv, "-c", str(conf)], name="recv-as-root", env=service_env())
    assert proc.wait(15) == 2, proc.describe()
    lines = proc.stderr().splitlines()
    assert len(lines) == 1 and "root" in lines[0], proc.describe()
    assert proc.stdout() == ""


# --------------------------------------------------------------------------- timeouts


def test_preauth_timeout_cuts_a_silent_client_with_421(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    port = rig.inetd(rig.config([box], preauth_timeout=2, idle_timeout=30))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        wire = Wire(sock.fileno(), sock.fileno())
        assert wire.line().startswith(b"220 ")
        assert wire.line(timeout=8) == b"421 timeout\r\n"
        assert wire.rest(timeout=5) == b""
    assert 1.5 <= time.monotonic() - started < 6


def test_preauth_timeout_is_absolute_even_for_a_trickling_client(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    s = rig.piped(rig.config([box], preauth_timeout=2, idle_timeout=30))
    started = time.monotonic()
    assert s.wire.line().startswith(b"220 ")
    conn = protocol.ClientConnection(auth.Key(box.key), "vm1", pipe=True)
    hello = conn.hello(secrets.token_bytes(32), int(time.time()))
    got = b""
    for i in range(len(hello)):  # one byte every 0.2 s: never idle, never done
        if s.wire.eof or select.select([s.wire.rfd], [], [], 0.2)[0]:
            got = s.wire.rest(timeout=5)
            break
        try:
            s.wire.send(hello[i:i + 1])
        except BrokenPipeError:
            got = s.wire.rest(timeout=5)
            break
    assert got == b"421 timeout\r\n"
    assert time.monotonic() - started < 6
    assert s.wait() == 1


def test_idle_timeout_bounds_a_stalled_transfer(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    s = rig.piped(rig.config([box], idle_timeout=2))
    conn = login(s.wire, box.key, "vm1")
    s.wire.send(conn.file(b"stall.bin", 100_000, 0))
    s.wire.send(conn.data(b"x" * 1000))
    wait_until(lambda: bool(temps(box)), timeout=5, what="a temp")
    stalled = time.monotonic()
    assert s.wire.rest(timeout=10) == b"421 timeout\r\n"
    assert 1.5 <= time.monotonic() - stalled < 6
    assert s.wait() == 1
    assert entries(box) == []


# --------------------------------------------------------------------------- fd hygiene, start-up


def _reply_lines(data: bytes) -> list[bytes]:
    lines = data.splitlines(keepends=True)
    for ln in lines:
        assert REPLY_LINE.match(ln), f"non-reply bytes reached the client: {data!r}"
    return lines


def test_with_fd_2_the_socket_a_config_error_sends_nothing_but_reply_lines(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1", overwrite="sometimes")
    s, _sock = rig.on_socket(rig.config([box]), "--debug")
    got = s.wire.rest(timeout=15)
    assert s.wait() == 2
    _reply_lines(got)
    assert b"overwrite" not in got and b"Traceback" not in got


def test_with_fd_2_the_socket_debug_logs_never_reach_the_client(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    conf = rig.config([box])
    s, _sock = rig.on_socket(conf, "--debug")
    conn = login(s.wire, box.key, "vm1")
    put(s.wire, conn, b"debug.txt", b"debug\n")
    s.wire.send(conn.bye())
    s.wire.close_write()
    lines = _reply_lines(s.wire.rest(timeout=15))
    assert [ln[:4] for ln in lines] == [b"250 ", b"221 "], lines
    assert s.wait() == 0
    assert box.files() == {"debug.txt": b"debug\n"}

    # A refused session under --debug: still exactly the greeting and one line.
    s, _sock = rig.on_socket(conf, "--debug")
    greet(s.wire, box.key, "nosuchbox")
    assert s.wire.rest(timeout=15) == b"535 authentication failed\r\n"
    assert s.wait() == 0


def test_python_environment_variables_do_not_reach_the_serving_interpreter(rig: Rig) -> None:
    box = make_box(rig.dir, "vm1")
    conf = rig.config([box])
    # Modules the serving path imports only after start-up: shadowed here, they would break
    # every session unless the server re-executes itself under `python -I`.
    fakes = rig.dir / "fakes"
    fakes.mkdir(mode=0o755)
    for mod in ("ipaddress", "secrets", "sqlite3", "hmac"):
        (fakes / f"{mod}.py").write_text(f"raise ImportError('shadowed {mod} was imported')\n")
    env = service_env(PYTHONPATH=str(fakes), PYTHONWARNINGS="error", PYTHONDONTWRITEBYTECODE="1")
    s = rig.piped(conf, env=env)
    conn = login(s.wire, box.key, "vm1")
    cmdline = Path(f"/proc/{s.pid}/cmdline").read_bytes().split(b"\0")
    environ = Path(f"/proc/{s.pid}/environ").read_bytes().split(b"\0")
    assert b"-I" in cmdline, cmdline
    assert not [v for v in environ if v.startswith(b"PYTHON")], environ
    put(s.wire, conn, b"isolated.txt", b"isolated\n")
    assert isinstance(event(s.wire, conn), protocol.Receipt)
    s.wire.send(conn.bye())
    s.wire.close_write()
    assert isinstance(event(s.wire, conn), protocol.Done)
    assert s.wait() == 0, s.stderr()
    assert box.files() == {"isolated.txt": b"isolated\n"}


BAD_CONFIGS = [
    ("box.vm1.overwrite", {"overwrite": "sometimes"}, {}),
    ("box.vm1.file_mode", {"file_mode": "0755"}, {}),
    ("box.vm1.quota", {"quota": "lots"}, {}),
    ("box.vm1.allow_from", {"allow_from": ["not-a-network"]}, {}),
    ("box.vm1.colour", {"colour": "blue"}, {}),
    ("idle_timeout", {}, {"idle_timeout": "soon"}),
]


@pytest.mark.parametrize(("field_path", "box_settings", "top"), BAD_CONFIGS,
                         ids=[c[0] for c in BAD_CONFIGS])
def test_every_config_error_names_its_file_and_field(
        rig: Rig, field_path: str, box_settings: dict[str, Any], top: dict[str, Any]) -> None:
    box = make_box(rig.dir, "vm1", **box_settings)
    conf = rig.config([box], **top)
    proc = rig.spawn(as_service([rig.recv, "-c", str(conf)]), name="recv-bad-config",
                     env=service_env())
    assert proc.wait(15) == 2, proc.describe()
    err = proc.stderr()
    assert "Traceback" not in err, err
    assert re.search(rf"^(rstash-recv: )?{re.escape(str(conf))}: {re.escape(field_path)}: \S",
                     err, re.M), err
    assert proc.stdout() == ""


# --------------------------------------------------------------------------- durability order


HOOK_RECORDER = """\
#!/usr/bin/python3 -I
import json, os, sys, time
out = {out!r}
rec = {{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(), "t": time.time()}}
try:
    with open(sys.argv[3], "rb") as f:
        rec["content"] = f.read().decode("latin-1")
except OSError as e:
    rec["content"] = None
if "RSTASH_FD" in os.environ:
    rec["fd_content"] = os.pread(int(os.environ["RSTASH_FD"]), 1 << 20, 0).decode("latin-1")
with open(out + "/record.tmp", "w") as f:
    json.dump(rec, f)
os.rename(out + "/record.tmp", out + "/record.json")
time.sleep({sleep})
"""


def _hook(rig: Rig, text: str) -> tuple[Path, Path]:
    out = rig.dir / "hook-out"
    out.mkdir(mode=0o755)
    rig.user.chown(out)
    script = rig.dir / "hook.py"
    script.write_text(text)
    os.chmod(script, 0o755)
    return script, out


@pytest.mark.parametrize("policy", ["refuse", "replace"])
def test_strace_shows_fsync_temp_then_link_then_fsync_dir_then_250(rig: Rig, policy: str) -> None:
    strace = need_program("strace")
    script, _out = _hook(rig, HOOK_RECORDER.format(out=str(rig.dir / "hook-out"), sleep=0))
    box = make_box(rig.dir, "vm1", overwrite=policy,
                   on_receive=[str(script), "{box}", "{name}", "{path}"])
    conf = rig.config([box])
    trace = rig.dir / "strace.txt"
    calls = "fsync,fdatasync,link,linkat,rename,renameat,renameat2,write,sendto,execve"
    s = rig.piped(conf, prefix=[strace, "-f", "-y", "-s", "64", "-o", str(trace), "-e",
                                f"trace={calls}"])
    conn = login(s.wire, box.key, "vm1")
    put(s.wire, conn, b"durable.txt", b"durable\n")
    assert isinstance(event(s.wire, conn), protocol.Receipt)
    s.wire.send(conn.bye())
    s.wire.close_write()
    assert isinstance(event(s.wire, conn), protocol.Done)
    assert s.wait(30) == 0, s.stderr()

    lines = trace.read_text(errors="replace").splitlines()
    box_dir = re.escape(str(box.path))

    def first(pattern: str) -> int:
        rx = re.compile(pattern)
        for i, ln in enumerate(lines):
            if rx.search(ln):
                return i
        raise AssertionError(f"no {pattern!r} in strace output:\n" + "\n".join(lines[-80:]))

    # The bytes are in an unnamed O_TMPFILE (strace -y: "<BOX/#INODE>(deleted)"), or, on
    # file systems without it, in the named temp.
    data = r"(\.rstash-tmp-[0-9a-f]{32}\.8>|#\d+>\(deleted\))"
    fsync_temp = first(rf"\b(fsync|fdatasync)\(\d+<{box_dir}/{data}")
    if policy == "replace":
        claim = first(r"\brename(at2?)?\(.*\.rstash-tmp-[0-9a-f]{32}\.8\".*\"durable\.txt\"")
    else:
        claim = first(r"\blink(at)?\(.*(\.rstash-tmp-[0-9a-f]{32}\.8|/proc/self/fd/\d+)\""
                      r".*\"durable\.txt\"")
    fsync_dir = first(rf"\bfsync\(\d+<{box_dir}>\)")
    reply = first(r"\b(write|sendto)\(1<[^>]*>, \"250 stored 8 ")
    hook = first(rf"\bexecve\(\"{re.escape(str(script))}\"")
    assert fsync_temp < claim < fsync_dir < reply < hook, (fsync_temp, claim, fsync_dir, reply,
                                                           hook)
    assert box.files() == {"durable.txt": b"durable\n"}


def test_pipelined_files_share_a_directory_fsync_that_precedes_every_250(rig: Rig) -> None:
    strace = need_program("strace")
    box = make_box(rig.dir, "vm1")
    conf = rig.config([box])
    trace = rig.dir / "strace.txt"
    s = rig.piped(conf, prefix=[strace, "-f", "-y", "-s", "200", "-o", str(trace), "-e",
                                "trace=fsync,syncfs,link,linkat,write"])
    conn = login(s.wire, box.key, "vm1")
    n = 30
    # One write: every frame is already buffered when the server reads the first END.
    s.wire.send(b"".join(conn.file(f"f{i:02}".encode(), 3, 0) + conn.data(b"abc") + conn.end()
                         for i in range(n)) + conn.bye())
    s.wire.close_write()
    receipts = [event(s.wire, conn) for _ in range(n)]
    assert all(isinstance(r, protocol.Receipt) and r.ok for r in receipts), receipts
    assert [r.index for r in receipts if isinstance(r, protocol.Receipt)] == list(range(n))
    assert isinstance(event(s.wire, conn), protocol.Done)
    assert s.wait(30) == 0, s.stderr()
    lines = trace.read_text(errors="replace").splitlines()
    box_dir = re.escape(str(box.path))
    dir_syncs = [i for i, ln in enumerate(lines) if re.search(rf"\bfsync\(\d+<{box_dir}>\)", ln)]
    fs_syncs = [i for i, ln in enumerate(lines) if re.search(rf"\bsyncfs\(\d+<{box_dir}>\) = 0", ln)]
    assert dir_syncs
    temp_fsyncs = 0
    for i in range(n):
        name = f"f{i:02}"
        link_at, link = next((k, ln) for k, ln in enumerate(lines)
                             if re.search(rf'\blink(at)?\(.*"{name}"', ln))
        # The file's data descriptor: an O_TMPFILE linked through /proc/self/fd/N, or a named temp.
        by_fd = re.search(r'"/proc/self/fd/(\d+)"', link)
        temp = re.search(r'"(\.rstash-tmp-[0-9a-f]{32}\.3)"', link)
        assert by_fd or temp, link
        data = (rf"\({by_fd.group(1)}<" if by_fd
                else rf"\(\d+<{re.escape(f'{box.path}/{temp.group(1)}')}>" if temp else "")
        last_write = max(k for k, ln in enumerate(lines[:link_at]) if re.search(rf"\bwrite{data}", ln))
        own = [k for k, ln in enumerate(lines[:link_at]) if re.search(rf"\bfsync{data}", ln)
               and k > last_write]
        temp_fsyncs += len(own)
        reply = next(k for k, ln in enumerate(lines) if re.search(rf'\bwrite\(1<[^>]*>, "250 stored 3 .* {name} ', ln))
        # The data on disk before the name exists: its own fsync, or a syncfs of the box's
        # file system, between its last write and its link.
        assert any(last_write < k < link_at for k in own + fs_syncs), (name, last_write, link_at)
        # Durable before acknowledged: a directory fsync between this file's link and its 250.
        assert any(link_at < d < reply for d in dir_syncs), (name, link_at, reply, dir_syncs)
    assert len(dir_syncs) < n  # the batch shared its fsyncs
    if kernel_reports_errors():
        # rstash-recv(8) DURABILITY: a batch's data goes to disk with one syncfs, not n fsyncs.
        assert fs_syncs and temp_fsyncs < n, (fs_syncs, temp_fsyncs)
    assert set(box.files()) == {f"f{i:02}" for i in range(n)}


# --------------------------------------------------------------------------- hooks


def test_a_hook_gets_a_nasty_name_as_one_argument_and_a_fixed_environment(rig: Rig) -> None:
    nasty = "a;b $(touch x) `id` c.txt"
    script, out = _hook(rig, HOOK_RECORDER.format(out=str(rig.dir / "hook-out"), sleep=3))
    box = make_box(rig.dir, "vm1", on_receive=[str(script), "{box}", "{name}", "{path}",
                                               "x{name}", "{Box}"])
    s = rig.piped(rig.config([box], hook_timeout=30))
    conn = login(s.wire, box.key, "vm1")
    content = b"nasty\n"
    put(s.wire, conn, nasty.encode(), content, mtime=1234567890)
    sent_end = time.monotonic()
    receipt = event(s.wire, conn)
    # The 250 line does not wait for the hook (which sleeps 3 s after recording).
    assert time.monotonic() - sent_end < 2.5
    assert isinstance(receipt, protocol.Receipt) and receipt.ok, receipt
    s.wire.send(conn.bye())
    s.wire.close_write()
    assert isinstance(event(s.wire, conn), protocol.Done)
    assert s.wait(20) == 0, s.stderr()

    rec = json.loads((out / "record.json").read_text())
    path = str(box.path / nasty)
    assert rec["argv"] == ["vm1", nasty, path, "x{name}", "{Box}"]
    assert rec["content"] == content.decode()  # stored before the hook ran
    assert rec["fd_content"] == content.decode()  # the stored file, as an open descriptor
    assert rec["env"].pop("RSTASH_FD").isdigit()
    assert rec["env"] == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "RSTASH_BOX": "vm1",
        "RSTASH_NAME": nasty,
        "RSTASH_PATH": path,
        "RSTASH_SIZE": str(len(content)),
        "RSTASH_SHA256": hashlib.sha256(content).hexdigest(),
        "RSTASH_CLIENT_MTIME": "1234567890",
        "RSTASH_REQUESTED_NAME": nasty,
    }
    assert not (Path(rec["cwd"]) / "x").exists()
    assert entries(box) == [nasty]
    assert not list(rig.dir.rglob("x"))


HOOK_SLEEPER = """\
#!/usr/bin/python3 -I
import os, signal, subprocess, sys, time
out = {out!r}
# Both children stay in the hook's process group; the second ignores SIGTERM.
child = subprocess.Popen(["/bin/sleep", "60"])
stubborn = subprocess.Popen(["/bin/sleep", "61"],
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
with open(out + "/pids.tmp", "w") as f:
    f.write(f"{{os.getpid()}} {{child.pid}} {{stubborn.pid}}\\n")
os.rename(out + "/pids.tmp", out + "/pids")

def term(signum, frame):
    with open(out + "/got-term", "w") as f:
        f.write("TERM\\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, term)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_hook_past_hook_timeout_gets_sigterm_to_its_group_then_sigkill(rig: Rig) -> None:
    script, out = _hook(rig, HOOK_SLEEPER.format(out=str(rig.dir / "hook-out")))
    box = make_box(rig.dir, "vm1", on_receive=[str(script)])
    s = rig.piped(rig.config([box], hook_timeout=2))
    conn = login(s.wire, box.key, "vm1")
    put(s.wire, conn, b"slow-hook.txt", b"x\n")
    assert isinstance(event(s.wire, conn), protocol.Receipt)
    s.wire.send(conn.bye())
    s.wire.close_write()
    assert isinstance(event(s.wire, conn), protocol.Done)
    wait_until(lambda: (out / "pids").exists(), timeout=10, what="the hook started")
    pids = [int(p) for p in (out / "pids").read_text().split()]
    hook_pid, child_pid, stubborn_pid = pids
    try:
        wait_until(lambda: (out / "got-term").exists(), timeout=10, what="SIGTERM to the hook")
        # SIGTERM went to the group: the child dies with the hook, well before the grace ends.
        wait_until(lambda: _gone(child_pid), timeout=2.5, what="the hook's child terminated")
        # A member that ignores SIGTERM gets SIGKILL when the 5 s grace ends.
        wait_until(lambda: _gone(stubborn_pid), timeout=10, what="the stubborn child killed")
        assert s.wait(15) == 0, s.stderr()
        assert _gone(hook_pid)
        assert re.search(r"event=hook .*outcome=timeout", rig.log()), rig.log()
        assert box.files() == {"slow-hook.txt": b"x\n"}
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- hardening


def test_a_box_under_a_directory_others_can_write_is_not_served(rig: Rig) -> None:
    # rstash-recv(8) SECURITY: anyone who may write an ancestor could rename another box
    # (or a directory of their own) to this box's name.
    vm1 = make_box(rig.dir, "vm1")
    os.chmod(vm1.path.parent, 0o777)
    try:
        s = rig.piped(rig.config([vm1]))
        conn = greet(s.wire, vm1.key, "vm1")
        assert isinstance(event(s.wire, conn), protocol.AuthOk)
        line = s.wire.line()
        assert line.startswith(b"451 "), line
        s.wait(20)
        assert f"its ancestor {vm1.path.parent} is writable by everyone" in rig.log()
        assert entries(vm1) == []
    finally:
        os.chmod(vm1.path.parent, 0o755)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_twenty_thousand_dry_runs_grow_state_and_log_by_well_under_a_mebibyte(rig: Rig) -> None:
    """rstash-recv(8) SECURITY: repeated outcomes are counted, delivery-log rows capped."""
    n = int(os.environ.get("RSTASH_DRY_RUNS", "20000"))
    box = make_box(rig.dir, "vm1")
    s = rig.piped(rig.config([box]))
    state = rig.dir / "state"
    state0, log0 = _dir_bytes(state), rig.log_path.stat().st_size
    conn = login(s.wire, box.key, "vm1")
    batch = 200  # replies of one batch fit in the pipe while we keep writing
    for start in range(0, n, batch):
        count = min(batch, n - start)
        s.wire.send(b"".join(conn.file(f"dry-{start + i}.bin".encode(), 1024, 0, dry_run=True)
                             for i in range(count)))
        for _ in range(count):
            r = event(s.wire, conn)
            assert isinstance(r, protocol.Receipt) and r.ok, r
    s.wire.send(conn.bye())
    s.wire.close_write()
    assert isinstance(event(s.wire, conn), protocol.Done)
    assert s.wait(60) == 0, s.stderr()
    grew_state = _dir_bytes(state) - state0
    grew_log = rig.log_path.stat().st_size - log0
    print(f"\n{n} dry runs in one session: state_dir +{grew_state} bytes, log +{grew_log} bytes")
    assert grew_state < 2**20 // 4, grew_state
    assert grew_log < 2**20 // 4, grew_log
    assert f"repeated={n - 20}" in rig.log()
    assert entries(box) == []
