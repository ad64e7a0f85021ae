"""Resume and re-runs end to end: the real rstash-send against the real rstash-recv on loopback
(rstash(7) RESUME AND RE-RUNS, rstash-send(1) RESUME).

Transfers are cut by the sender's death or by a proxy that closes the connection, then run
again through a proxy that counts the bytes on the wire. Files are just over the 64 MiB from
which a file waits for its first line, so a run takes about a second on loopback.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e_support import ProcGroup, ServiceUser, make_box, venv_bin, wait_until
from test_e2e_client import (
    RUN_TIMEOUT,
    Background,
    Env,
    StartBackground,
    json_lines,
    make_file,
    out,
    proxied,
    send_env,
    stored,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser, spawn: ProcGroup) -> Env:
    return Env(e2e_dir, e2e_venv, service_user, spawn)


@pytest.fixture
def src(e2e_dir: Path) -> Path:
    d = e2e_dir / "src"
    d.mkdir()
    return d


@pytest.fixture
def background() -> Iterator[StartBackground]:
    made: list[Background] = []

    def start(handler: Callable[[socket.socket], None]) -> Background:
        made.append(Background(handler))
        return made[-1]

    yield start
    for b in made:
        b.close()

MiB = 1024 * 1024
SIZE = 80 * MiB
CHECKPOINT = 16 * MiB  # rstash-recv's checkpoint step (rstash/partials.py)


def relay(upstream_port: int, *, up_limit: int | None = None,
          drop_down: bytes | None = None) -> Callable[[socket.socket], None]:
    """A proxy that closes both sides after ``up_limit`` client bytes, or when the server
    sends a line starting with ``drop_down`` (which it swallows)."""

    def handle(client: socket.socket) -> None:
        with socket.create_connection(("127.0.0.1", upstream_port), timeout=10) as server:
            up = 0
            pending = b""
            deadline = time.monotonic() + RUN_TIMEOUT
            while time.monotonic() < deadline:
                ready, _, _ = select.select([client, server], [], [], 0.5)
                for s in ready:
                    data = s.recv(256 * 1024)
                    if not data:
                        return
                    if s is client:
                        if up_limit is not None and up + len(data) >= up_limit:
                            server.sendall(data[:up_limit - up])
                            return
                        up += len(data)
                        server.sendall(data)
                        continue
                    pending += data
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if drop_down is not None and line.startswith(drop_down):
                            return
                        client.sendall(line + b"\n")

    def guarded(client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            handle(client)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)

    return guarded


def kept_parts(box_path: Path) -> list[Path]:
    d = box_path / ".rstash-partials"
    return [p for p in d.iterdir() if p.name.endswith(".part")] if d.exists() else []


def state_env(tmp: Path) -> dict[str, str]:
    return send_env(XDG_STATE_HOME=str(tmp / "state"))


@pytest.mark.parametrize("cut", [20 * MiB, 50 * MiB, 75 * MiB])
def test_a_transfer_cut_by_a_proxy_resumes_and_sends_only_the_rest(
        env: Env, src: Path, background: StartBackground, cut: int) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    f = make_file(src, "db.tar", SIZE)
    senv = state_env(env.e2e_dir)
    cutter = background(relay(port, up_limit=cut))
    p = env.send("-k", box.client_key, "--json", box.url(cutter.port), f, env=senv)
    assert p.returncode == 4, out(p)
    wait_until(lambda: len(kept_parts(box.path)) == 1, timeout=10, what="the partial kept")
    held = (cut - 4096) // CHECKPOINT * CHECKPOINT
    again, counter = proxied(background, port)
    p = env.send("-k", box.client_key, "--json", box.url(again), f, env=senv)
    assert p.returncode == 0, out(p)
    (rec,) = json_lines(p)
    assert rec["status"] == "stored" and rec["already"] is False, out(p)
    assert rec["resumed_from"] == held, out(p)
    assert stored(box) == {"db.tar": f.read_bytes()}
    # The rest, its frame headers and the handshake: about size - offset on the wire.
    assert SIZE - held <= counter.up < SIZE - held + 64 * 1024, counter.up
    assert kept_parts(box.path) == []


def test_a_killed_sender_resumes(env: Env, src: Path, background: StartBackground) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    f = make_file(src, "db.tar", SIZE)
    senv = state_env(env.e2e_dir)
    first, counter = proxied(background, port)
    argv = [venv_bin(env.venv, "rstash-send"), "-k", str(box.client_key), "--bwlimit", "40MiB",
            box.url(first), str(f)]
    proc = subprocess.Popen(argv, env=senv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: counter.up > 40 * MiB, timeout=30, what="40 MiB sent")
    finally:
        proc.kill()
        proc.wait(10)
    wait_until(lambda: len(kept_parts(box.path)) == 1, timeout=10, what="the partial kept")
    again, counter2 = proxied(background, port)
    p = env.send("-k", box.client_key, "--json", box.url(again), f, env=senv)
    assert p.returncode == 0, out(p)
    (rec,) = json_lines(p)
    resumed_from = rec["resumed_from"]
    assert isinstance(resumed_from, int), out(p)
    assert resumed_from >= 32 * MiB, out(p)
    assert counter2.up < SIZE - resumed_from + 64 * 1024
    assert stored(box) == {"db.tar": f.read_bytes()}


def test_a_file_changed_in_place_between_runs_is_sent_again_whole(
        env: Env, src: Path, background: StartBackground) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    f = make_file(src, "db.tar", SIZE)
    senv = state_env(env.e2e_dir)
    cutter = background(relay(port, up_limit=50 * MiB))
    assert env.send("-k", box.client_key, box.url(cutter.port), f, env=senv).returncode == 4
    # Same inode, size and mtime (so the same transfer id), other first bytes.
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(b"changed!")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again, counter = proxied(background, port)
    p = env.send("-k", box.client_key, "--json", box.url(again), f, env=senv)
    assert p.returncode == 0, out(p)
    (rec,) = json_lines(p)
    assert rec["resumed_from"] == 0, out(p)
    assert counter.up > SIZE
    assert stored(box) == {"db.tar": f.read_bytes()}


def test_a_lost_receipt_then_the_rerun_exits_0_without_sending_the_data(
        env: Env, src: Path, background: StartBackground) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    f = make_file(src, "db.tar", SIZE)
    senv = state_env(env.e2e_dir)
    dropper = background(relay(port, drop_down=b"250 stored"))
    p = env.send("-k", box.client_key, "--json", box.url(dropper.port), f, env=senv)
    assert p.returncode != 0, out(p)
    wait_until(lambda: "db.tar" in stored(box), timeout=10, what="the file stored")
    again, counter = proxied(background, port)
    p = env.send("-k", box.client_key, "--json", box.url(again), f, env=senv)
    assert p.returncode == 0, out(p)
    (rec,) = json_lines(p)
    assert (rec["status"], rec["code"], rec["already"]) == ("stored", 251, True), out(p)
    assert counter.up < 4096, counter.up
    assert stored(box) == {"db.tar": f.read_bytes()}
    # Another file under the name is still refused: exit 1.
    (src / "other").mkdir()
    other = make_file(src / "other", "db.tar", 10)
    p = env.send("-k", box.client_key, "--json", box.url(port), other, env=senv)
    assert p.returncode == 1, out(p)
    assert [r["code"] for r in json_lines(p)] == [550]


def test_no_resume_and_streams_carry_no_transfer_id(env: Env, src: Path) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    f = make_file(src, "a", 10)
    senv = state_env(env.e2e_dir)
    assert env.send("-k", box.client_key, box.url(port), f, env=senv).returncode == 0
    # A small file's re-run: its data is pipelined, the 251 still makes it stored.
    p = env.send("-k", box.client_key, "--json", box.url(port), f, env=senv)
    assert p.returncode == 0 and json_lines(p)[0]["already"] is True, out(p)
    p = env.send("-k", box.client_key, "--json", "--no-resume", box.url(port), f, env=senv)
    assert p.returncode == 1 and json_lines(p)[0]["code"] == 550, out(p)
    p = env.send("-k", box.client_key, "--json", "--name", "s", box.url(port), "-", stdin=b"x",
                 env=senv)
    assert p.returncode == 0, out(p)
    p = env.send("-k", box.client_key, "--json", "--name", "s", box.url(port), "-", stdin=b"x",
                 env=senv)
    assert p.returncode == 1 and json_lines(p)[0]["code"] == 550, out(p)
