"""Deployment under the real openbsd-inetd (rstash-recv(8) DEPLOYMENT): ``nowait`` and ``wait`` lines.

inetd runs as root in the foreground (``-d -i``, with a high ``-R`` so that its rate limit never
switches the service off mid-suite) and starts rstash-recv as the unprivileged service user
named in the line's user field: files stored are owned by that user. ``nowait`` hands each
process a connected socket on fd 0/1/2 (one session); ``wait`` hands one process the listening
socket on fd 0, which then runs the accept loop for every later connection.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_support import (
    Box,
    Proc,
    ProcGroup,
    ServiceUser,
    free_port,
    is_root,
    make_box,
    need,
    need_program,
    venv_bin,
    wait_for_port,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e

STEP = 15.0
_names = itertools.count(1)


def _name(base: str) -> str:
    # Proc de-duplicates NAME as NAME.2, which with_suffix() maps back to NAME.out: never reuse one.
    return f"{base}-{next(_names)}"


def log_text(e2e_dir: Path) -> str:
    path = e2e_dir / "rstash-recv.log"
    return path.read_text(errors="replace") if path.exists() else ""


def make_file(e2e_dir: Path, name: str, size: int = 4000) -> Path:
    d = e2e_dir / "src"
    d.mkdir(exist_ok=True)
    path = d / name
    path.write_bytes(secrets.token_bytes(size))
    return path


def send(spawn: ProcGroup, venv: Path, e2e_dir: Path, key: Path, url: str, *files: Path) -> Proc:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
           "HOME": str(e2e_dir)}
    argv = [venv_bin(venv, "rstash-send"), "-k", str(key), "--no-progress", url, *map(str, files)]
    return spawn(argv, name=_name("send"), env=env)


@contextlib.contextmanager
def inetd(spawn: ProcGroup, e2e_dir: Path, lines: list[str]) -> Iterator[Proc]:
    """openbsd-inetd in the foreground with ``lines`` as its whole configuration.

    An accept loop started by a ``wait`` line may leave inetd's process group, so it is
    found by its log line and ended explicitly.
    """
    need(is_root(), "inetd must run as root to start rstash-recv as the service user")
    program = need_program("inetd")
    conf = e2e_dir / "inetd.conf"
    conf.write_text("".join(line + "\n" for line in lines))
    proc = spawn([program, "-d", "-i", "-R", "100000", str(conf)], name=_name("inetd"))
    try:
        yield proc
    finally:
        proc.signal(signal.SIGTERM)
        for pid in re.findall(r"rstash-recv\[(\d+)\]: info event=serve outcome=listening",
                              log_text(e2e_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def inetd_line(port: int, mode: str, user: ServiceUser, venv: Path, conf: Path) -> str:
    recv = venv_bin(venv, "rstash-recv")
    return f"127.0.0.1:{port} stream tcp {mode} {user.name} {recv} rstash-recv -c {conf}"


def assert_owned_by(box: Box, user: ServiceUser, *files: Path) -> None:
    for f in files:
        stored = box.path / f.name
        assert stored.read_bytes() == f.read_bytes(), f"{f.name} not stored intact"
        st = stored.stat()
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid), f"{f.name}: {st.st_uid}:{st.st_gid}"


def test_inetd_nowait_one_process_per_connection(
        e2e_venv: Path, e2e_dir: Path, service_user: ServiceUser, spawn: ProcGroup) -> None:
    box = make_box(e2e_dir, "vm1")
    conf = write_config(e2e_dir, [box])
    port = free_port()
    with inetd(spawn, e2e_dir, [inetd_line(port, "nowait", service_user, e2e_venv, conf)]) as d:
        wait_for_port("127.0.0.1", port, proc=d)
        files = [make_file(e2e_dir, f"nightly-{i}.tar") for i in range(2)]
        for f in files:
            p = send(spawn, e2e_venv, e2e_dir, box.client_key, box.url(port), f)
            assert p.wait(STEP * 2) == 0, p.describe() + "\n--- log\n" + log_text(e2e_dir)
        assert_owned_by(box, service_user, *files)
        log = log_text(e2e_dir)
        assert "outcome=listening" not in log  # no accept loop in this shape
        pids = set(re.findall(r"rstash-recv\[(\d+)\]: info event=file ", log))
        assert len(pids) == 2

        # A wrong key: 535 on the wire, exit 3, one auth line with the peer in the log.
        wrong = e2e_dir / "send" / "wrong.key"
        wrong.write_text(f"rstash-key-v1 {secrets.token_bytes(32).hex()}\n")
        os.chmod(wrong, 0o600)
        bad = make_file(e2e_dir, "intruder.tar")
        p = send(spawn, e2e_venv, e2e_dir, wrong, box.url(port), bad)
        assert p.wait(STEP * 2) == 3, p.describe()
        assert "535" in p.stderr()
        # The line names the key and every cause a 535 can hide, and where to look.
        from rstash.keys import load_key_file

        fp = load_key_file(wrong, client=True).fingerprint
        assert f"key {fp} was refused for box 'vm1': wrong key for the box, box name " \
               "misspelt, or this address not in the box's allow_from" in p.stderr(), p.describe()
        assert not (box.path / bad.name).exists()
        wait_until(lambda: "outcome=auth_failed code=535" in log_text(e2e_dir), timeout=STEP,
                   what="auth failure logged")
        assert re.search(r"event=auth outcome=auth_failed code=535 peer=127\.0\.0\.1",
                         log_text(e2e_dir))


def test_a_server_that_cannot_start_under_inetd_is_reported_as_such(
        e2e_venv: Path, e2e_dir: Path, service_user: ServiceUser, spawn: ProcGroup) -> None:
    box = make_box(e2e_dir, "vm1")
    conf = write_config(e2e_dir, [box])
    conf.write_text(conf.read_text() + "\n[box.vm1\n")  # does not parse: rstash-recv exits
    port = free_port()
    with inetd(spawn, e2e_dir, [inetd_line(port, "nowait", service_user, e2e_venv, conf)]) as d:
        wait_for_port("127.0.0.1", port, proc=d)
        f = make_file(e2e_dir, "nightly.tar")
        p = send(spawn, e2e_venv, e2e_dir, box.client_key, box.url(port), f)
        assert p.wait(STEP * 2) == 4, p.describe()
        assert p.stderr() == (
            "rstash-send: the server closed the connection before its greeting: rstash-recv "
            "could not start there (a configuration that does not load, the wrong user, a "
            "missing program); on the server, run rstash-recv --check-config and read the "
            "inetd or system log\n"), p.describe()
        assert not (box.path / f.name).exists()


def test_inetd_wait_runs_the_accept_loop_as_the_service_user(
        e2e_venv: Path, e2e_dir: Path, service_user: ServiceUser, spawn: ProcGroup) -> None:
    box = make_box(e2e_dir, "vm1")
    conf = write_config(e2e_dir, [box])
    port = free_port()
    with inetd(spawn, e2e_dir, [inetd_line(port, "wait", service_user, e2e_venv, conf)]) as d:
        wait_for_port("127.0.0.1", port, proc=d)
        files = [make_file(e2e_dir, f"db-{i}.sql.gz") for i in range(4)]
        procs = [send(spawn, e2e_venv, e2e_dir, box.client_key, box.url(port), f) for f in files]
        for p in procs:
            assert p.wait(STEP * 2) == 0, p.describe() + "\n--- log\n" + log_text(e2e_dir)
        assert_owned_by(box, service_user, *files)
        log = log_text(e2e_dir)
        # One rstash-recv accepted them all, each session in a child of its own.
        loops = re.findall(r"rstash-recv\[(\d+)\]: info event=serve outcome=listening", log)
        assert len(loops) == 1, log
        loop_pid = int(loops[0])
        with open(f"/proc/{loop_pid}/status", encoding="ascii") as f:
            uid_line = next(line for line in f if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(service_user.uid)] * 4
        pids = set(re.findall(r"rstash-recv\[(\d+)\]: info event=file ", log))
        assert len(pids) == 4 and str(loop_pid) not in pids
        # SIGTERM ends the loop; inetd takes the port back and starts a new loop on demand.
        os.kill(loop_pid, signal.SIGTERM)
        wait_until(lambda: "event=serve outcome=stopped" in log_text(e2e_dir), timeout=STEP,
                   what="the accept loop stopped")
        wait_until(lambda: not os.path.exists(f"/proc/{loop_pid}/status"), timeout=STEP,
                   what="the accept loop exited")
        again = make_file(e2e_dir, "after-restart.sql.gz")
        p = send(spawn, e2e_venv, e2e_dir, box.client_key, box.url(port), again)
        assert p.wait(STEP * 2) == 0, p.describe() + "\n--- log\n" + log_text(e2e_dir)
        assert_owned_by(box, service_user, again)
        loops = re.findall(r"rstash-recv\[(\d+)\]: info event=serve outcome=listening",
                           log_text(e2e_dir))
        assert len(loops) == 2 and loops[1] != str(loop_pid)
