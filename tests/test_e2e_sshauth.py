"""Boxes opened by the SSH key alone, end to end (rstash-recv(8) SSH, rstash(7) CONSTRUCTION 11).

The real rstash-send through the real ssh into a real sshd, whose forced command starts the real
rstash-recv as the service user; and the ways an attacker might try to get a keyless session on
such a box instead: a TCP peer of an inetd line or of ``--listen`` started from a shell where
``SSH_CONNECTION`` is set, an SSH login whose forced command has no ``--box``, two of them, or
another box. Those are tried with a raw method-0 HELLO (key_id and proof all zeros), which a
client that checks the greeting would never send: the server alone must refuse it with 535.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

import test_e2e_ssh
from e2e_support import (
    Box,
    as_service,
    free_port,
    make_box,
    need_program,
    service_env,
    wait_for_port,
    write_config,
)
from rstash import wire
from test_e2e_ssh import AUTH, OK, PROTOCOL, Sshd, SshEnv, forced, payload, recv_log

pytestmark = pytest.mark.e2e

#: The real sshd and ssh of test_e2e_ssh.py.
ssh_env = test_e2e_ssh.ssh_env

#: What a shell inside an ssh login has, and what an inetd line started from it inherits.
SSH_CONNECTION = "127.0.0.1 50000 127.0.0.1 22"
REFUSED = "535 authentication failed"


def keyless_hello(box: str = "vm1") -> bytes:
    """A method-ssh HELLO: it needs no greeting, since it proves nothing."""
    signed = wire.hello_without_proof(mode=wire.MODE_INTERACTIVE, box=box.encode(), key_id=bytes(8),
                                      nonce=os.urandom(32), time=int(time.time()),
                                      method=wire.METHOD_SSH)
    return wire.frame(wire.FrameType.HELLO, signed + bytes(32))


def lines(data: bytes) -> list[str]:
    return data.decode("ascii", "replace").splitlines()


def over_ssh(env: SshEnv, sshd: Sshd, box: str = "vm1", key: Path | None = None) -> list[str]:
    """The server's lines for a raw keyless HELLO sent through ssh."""
    argv = [*shlex.split(env.rsh(key)), "-p", str(sshd.port), "-l", env.user.name, "-T",
            "-o", "BatchMode=yes", "--", "127.0.0.1", "rstash-recv"]
    out = subprocess.run(argv, input=keyless_hello(box), capture_output=True, timeout=60, check=False)
    return lines(out.stdout)


def over_tcp(port: int, box: str = "vm1") -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(keyless_hello(box))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return lines(data)


def ssh_box(e2e_dir: Path, name: str = "vm1", auth: str = "ssh") -> Box:
    box = make_box(e2e_dir, name, auth=auth)
    if auth == "ssh":
        box.settings["keys"] = []  # the SSH key is the only secret
    return box


def boxes(e2e_dir: Path) -> tuple[Box, Box, Box, Path]:
    vm1, vm2, both = ssh_box(e2e_dir), ssh_box(e2e_dir, "vm2"), ssh_box(e2e_dir, "both", "key+ssh")
    conf = write_config(e2e_dir, [vm1, vm2, both], idle_timeout=10, preauth_timeout=10)
    return vm1, vm2, both, conf


def ssh_fingerprint(env: SshEnv) -> str:
    out = subprocess.run([need_program("ssh-keygen"), "-lf", f"{env.client_key}.pub"],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.split()[1]


def test_an_ssh_box_is_reached_with_only_the_ssh_key(ssh_env: SshEnv, e2e_dir: Path) -> None:
    vm1, _vm2, _both, conf = boxes(e2e_dir)
    keys = ssh_env.authorized_keys(ssh_env.key_line(forced(ssh_env.recv, conf, "--box", "vm1")))
    sshd = ssh_env.start_sshd(authorized_keys=keys, extra=["ExposeAuthInfo yes"])
    src = payload(e2e_dir)

    sent = ssh_env.run_send(ssh_env.url(sshd, "vm1"), src)  # no -k, no RSTASH_KEY_FILE
    assert sent.returncode == OK, sent.describe()
    assert (vm1.path / src.name).read_bytes() == src.read_bytes()
    assert "stored backup.tar" in sent.stderr()

    # The log, --status and --metrics name the SSH key that authorised it.
    fp = ssh_fingerprint(ssh_env)
    log = recv_log(e2e_dir)
    assert re.search(rf"event=session box=vm1 .*key=\"?{re.escape(fp)} \(ssh ssh-ed25519\).*"
                     r"outcome=authenticated.*method=ssh", log), log
    status = subprocess.run(as_service([ssh_env.recv, "-c", str(conf), "--status", "vm1"]),
                            capture_output=True, text=True, env=service_env(), timeout=60, check=False)
    assert fp in status.stdout, status.stdout + status.stderr
    metrics = subprocess.run(as_service([ssh_env.recv, "-c", str(conf), "--metrics"]),
                             capture_output=True, text=True, env=service_env(), timeout=60, check=False)
    assert re.search(rf'rstash_key_last_used_timestamp_seconds\{{box="vm1",key="{re.escape(fp)}"\}}',
                     metrics.stdout), metrics.stdout + metrics.stderr

    # The raw keyless HELLO is what the client sent: accepted here, refused everywhere below.
    assert over_ssh(ssh_env, sshd)[1] == "235 ok"
    check = subprocess.run(as_service([ssh_env.recv, "-c", str(conf), "--check-config"]),
                           capture_output=True, text=True, env=service_env(), timeout=60, check=False)
    assert "auth ssh: reached with the SSH key alone" in check.stdout + check.stderr


@pytest.mark.parametrize("box_args,offered", [((), False), (("--box", "vm1", "--box", "vm2"), False),
                                              (("--box", "vm2"), True)],
                         ids=["without --box", "two --box", "another box"])
def test_an_ssh_login_without_exactly_this_box_is_refused(ssh_env: SshEnv, e2e_dir: Path,
                                                          box_args: tuple[str, ...], offered: bool) -> None:
    vm1, _vm2, _both, conf = boxes(e2e_dir)
    keys = ssh_env.authorized_keys(ssh_env.key_line(forced(ssh_env.recv, conf, *box_args)))
    sshd = ssh_env.start_sshd(authorized_keys=keys)
    got = over_ssh(ssh_env, sshd)
    # A login pinned to vm2 offers method ssh, for vm2 only.
    assert (",ssh " in got[0]) is offered
    assert got[1:] == [REFUSED]
    sent = ssh_env.run_send(ssh_env.url(sshd, "vm1"), payload(e2e_dir))
    assert sent.returncode == (AUTH if offered else PROTOCOL), sent.describe()
    assert ("authentication failed" if offered else "does not offer method ssh") in sent.stderr()
    assert list(vm1.path.iterdir()) == []


def test_an_inetd_line_started_from_an_ssh_shell_is_refused(ssh_env: SshEnv, e2e_dir: Path) -> None:
    vm1, _vm2, _both, conf = boxes(e2e_dir)
    ssa = need_program("systemd-socket-activate")
    port = free_port()
    proc = ssh_env.spawn([ssa, "-a", "--inetd", "-l", f"127.0.0.1:{port}",
                          "-E", f"SSH_CONNECTION={SSH_CONNECTION}",
                          *as_service([ssh_env.recv, "-c", str(conf), "--box", "vm1"])],
                         name="socket-activate", env=service_env(SSH_CONNECTION=SSH_CONNECTION))
    wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
    got = over_tcp(port)
    assert ",ssh" not in got[0] and got[1:] == [REFUSED]
    assert list(vm1.path.iterdir()) == []
    assert re.search(r"event=auth .*box=vm1 .*reason=\"method ssh not offered", recv_log(e2e_dir))


def test_listen_started_from_an_ssh_shell_is_refused(ssh_env: SshEnv, e2e_dir: Path) -> None:
    vm1, _vm2, _both, conf = boxes(e2e_dir)
    port = free_port()
    proc = ssh_env.spawn(as_service([ssh_env.recv, "-c", str(conf), "--box", "vm1",
                                     "--listen", f"127.0.0.1:{port}"]),
                         name="listen", env=service_env(SSH_CONNECTION=SSH_CONNECTION))
    wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
    got = over_tcp(port)
    assert ",ssh" not in got[0] and got[1:] == [REFUSED]
    assert list(vm1.path.iterdir()) == []


def test_key_plus_ssh_needs_both(ssh_env: SshEnv, e2e_dir: Path) -> None:
    _vm1, _vm2, both, conf = boxes(e2e_dir)
    keys = ssh_env.authorized_keys(ssh_env.key_line(forced(ssh_env.recv, conf, "--box", "both")))
    sshd = ssh_env.start_sshd(authorized_keys=keys)
    src = payload(e2e_dir, "both.tar")

    # The SSH login alone: not offered, and a raw keyless HELLO is refused.
    alone = ssh_env.run_send(ssh_env.url(sshd, "both"), src, name="send-alone")
    assert alone.returncode != OK and "does not offer method ssh" in alone.stderr()
    assert over_ssh(ssh_env, sshd, "both")[1:] == [REFUSED]
    assert list(both.path.iterdir()) == []

    # The box key alone, without the SSH login (a TCP listener): refused.
    port = free_port()
    proc = ssh_env.spawn(as_service([ssh_env.recv, "-c", str(conf), "--listen", f"127.0.0.1:{port}"]),
                         name="listen-both", env=service_env())
    wait_for_port("127.0.0.1", port, timeout=10, proc=proc)
    tcp = ssh_env.run_send("-k", both.client_key, both.url(port), src, rsh=None, name="send-tcp")
    assert tcp.returncode == AUTH, tcp.describe()
    assert list(both.path.iterdir()) == []

    # Both: stored.
    ok = ssh_env.run_send("-k", both.client_key, ssh_env.url(sshd, "both"), src, name="send-both")
    assert ok.returncode == OK, ok.describe()
    assert (both.path / src.name).read_bytes() == src.read_bytes()
