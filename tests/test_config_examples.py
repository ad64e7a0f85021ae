"""The files under config/ are true: the example TOML passes --check-config, the systemd
units pass systemd-analyze verify, and the fail2ban filter matches a real auth-failure line."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from e2e_support import (
    ServiceUser,
    make_box,
    need_program,
    venv_bin,
    write_config,
)
from rstash import auth, wire

pytestmark = pytest.mark.e2e

CHECKOUT = Path(__file__).resolve().parent.parent
CONFIG = CHECKOUT / "config"


def _example_box_table(text: str) -> str:
    """The [box.vm1] example under "No box is active", uncommented."""
    lines = text[text.index("# No box is active"):].splitlines()[1:]
    table: list[str] = []
    for line in lines:
        if line == "#" and table:
            break
        if line != "#":
            table.append(line.removeprefix("# "))
    return "\n".join(table) + "\n"


def test_the_example_config_has_no_box_and_takes_the_documented_one(
        e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser) -> None:
    recv = venv_bin(e2e_venv, "rstash-recv")
    for sub in ("srv/vm1", "keys", "state"):
        (e2e_dir / sub).mkdir(parents=True, exist_ok=True)
    subprocess.run([recv, "--gen-key", str(e2e_dir / "keys/vm1.key"), "--comment", "vm1"],
                   check=True, capture_output=True, timeout=30)
    os.chown(e2e_dir / "keys/vm1.key", 0 if os.geteuid() == 0 else -1, service_user.gid)
    os.chmod(e2e_dir / "keys/vm1.key", 0o640)
    service_user.chown(e2e_dir / "srv/vm1")
    service_user.chown(e2e_dir / "state")
    os.chmod(e2e_dir / "state", 0o700)

    def moved(text: str) -> str:
        return (text.replace("/srv/rstash", f"{e2e_dir}/srv").replace("/etc/rstash/keys", f"{e2e_dir}/keys")
                .replace("/var/lib/rstash", f"{e2e_dir}/state")
                .replace('# service_user = "rstash"', f'service_user = "{service_user.name}"'))

    shipped = (CONFIG / "rstash-recv.toml").read_text(encoding="utf-8")
    conf = e2e_dir / "rstash-recv.toml"
    conf.write_text(moved(shipped), encoding="utf-8")
    # The shipped example has no active box: a fresh install serves nothing by accident.
    from rstash.config import load_config

    assert load_config(conf).boxes == {}
    assert load_config(conf).service_user == service_user.name  # the line to uncomment
    proc = subprocess.run([recv, "-c", str(conf), "-t"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # "Copy it and add a [box.vm1] table": the table shown in its own comment.
    table = _example_box_table(shipped)
    assert table.startswith("[box.vm1]\n") and "keys = " in table, table
    conf.write_text(moved(shipped + "\n" + table), encoding="utf-8")
    assert set(load_config(conf).boxes) == {"vm1"}
    proc = subprocess.run([recv, "-c", str(conf), "-t"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr
    proc = subprocess.run([recv, "-c", str(conf), "--check-config", "--user", service_user.name],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 errors" in proc.stdout and "1 box" in proc.stdout, proc.stdout


def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path: Path, e2e_venv: Path) -> None:
    analyze = need_program("systemd-analyze")
    recv = venv_bin(e2e_venv, "rstash-recv")
    units = []
    for unit in sorted((CONFIG / "systemd").iterdir()):
        text = unit.read_text(encoding="utf-8").replace("/usr/bin/rstash-recv", recv)
        (tmp_path / unit.name).write_text(text, encoding="utf-8")
        units.append(str(tmp_path / unit.name))
    assert {Path(u).name for u in units} >= {"rstash.socket", "rstash@.service",
                                            "rstash-listen.socket", "rstash-listen.service"}
    proc = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_the_fail2ban_filter_matches_a_real_auth_failure_line(
        e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser) -> None:
    regex = need_program("fail2ban-regex")
    box = make_box(e2e_dir, "vm1")
    conf = write_config(e2e_dir, [box])
    log = e2e_dir / "rstash-recv.log"
    # A forced-command session (pipes): the peer comes from SSH_CONNECTION.
    env = service_user.env(SSH_CONNECTION="192.0.2.77 40000 127.0.0.1 22")
    proc = subprocess.Popen(service_user.wrap([venv_bin(e2e_venv, "rstash-recv"), "-c", str(conf)]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        greeting = proc.stdout.readline()
        assert greeting.startswith(b"220 rstash/1 ")
        wrong = wire.ClientConnection(auth.Key(secrets.token_bytes(32)), "vm1")
        wrong.receive_data(greeting)
        assert isinstance(wrong.next_event(), wire.Greeting)
        proc.stdin.write(wrong.hello(secrets.token_bytes(32), 1767225600))
        proc.stdin.flush()
        assert proc.stdout.readline() == b"535 authentication failed\r\n"
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        proc.stdout.close()
    lines = log.read_text(encoding="utf-8").splitlines()
    auth_lines = [line for line in lines if "event=auth" in line]
    assert len(auth_lines) == 1 and "peer=192.0.2.77" in auth_lines[0], lines
    out = subprocess.run([regex, str(log), str(CONFIG / "fail2ban/filter.d/rstash.conf")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"Lines: (\d+) lines, \d+ ignored, (\d+) matched", out.stdout)
    assert m is not None, out.stdout
    assert int(m.group(2)) == 1, out.stdout


def test_the_fail2ban_filter_does_not_count_an_unusable_server_key(
        e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser) -> None:
    # The client holds the right key; the server refuses its own copy (mode 0644).
    regex = need_program("fail2ban-regex")
    box = make_box(e2e_dir, "vm1")
    os.chmod(box.server_key, 0o644)
    conf = write_config(e2e_dir, [box])
    log = e2e_dir / "rstash-recv.log"
    env = service_user.env(SSH_CONNECTION="192.0.2.78 40000 127.0.0.1 22")
    proc = subprocess.Popen(service_user.wrap([venv_bin(e2e_venv, "rstash-recv"), "-c", str(conf)]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        greeting = proc.stdout.readline()
        client = wire.ClientConnection(auth.Key(box.key), "vm1")
        client.receive_data(greeting)
        assert isinstance(client.next_event(), wire.Greeting)
        proc.stdin.write(client.hello(secrets.token_bytes(32), 1767225600))
        proc.stdin.flush()
        assert proc.stdout.readline() == b"535 authentication failed\r\n"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
    text = log.read_text(encoding="utf-8")
    assert f'reason="key file unusable" path={box.server_key}' in text, text
    out = subprocess.run([regex, str(log), str(CONFIG / "fail2ban/filter.d/rstash.conf")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched", out.stdout)
    assert m is not None, out.stdout
    assert (int(m.group(2)), int(m.group(3))) == (1, 0), out.stdout


def test_the_inetd_lines_name_the_service_user_and_the_program() -> None:
    # Service lines, and the commented alternative (the wait shape) that an admin uncomments.
    lines = [line.lstrip("#").split() for line in (CONFIG / "inetd.conf").read_text(encoding="utf-8").splitlines()
             if line.lstrip("#").startswith("rstash")]
    assert lines, "config/inetd.conf has no service line"
    for fields in lines:
        # service socket-type protocol wait/nowait[.max] user server-program argv0 args...
        assert fields[1] == "stream" and fields[2] in ("tcp", "tcp6", "tcp4")
        assert re.fullmatch(r"(no)?wait(\.\d+)?", fields[3])
        assert fields[4] == "rstash" and fields[5] == "/usr/bin/rstash-recv" and fields[6] == "rstash-recv"
    assert any(f[3].startswith("nowait") for f in lines) and any(f[3].startswith("wait") for f in lines)
    services = (CONFIG / "services").read_text(encoding="utf-8")
    assert re.search(r"^rstash\s+7370/tcp", services, re.M)


def _fail2ban_matches(regex: str, log: Path, filter_name: str) -> int:
    out = subprocess.run([regex, str(log), str(CONFIG / "fail2ban/filter.d" / filter_name)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"Lines: (\d+) lines, \d+ ignored, (\d+) matched", out.stdout)
    assert m is not None, out.stdout
    return int(m.group(2))


def test_the_silent_filter_matches_real_silent_sessions_and_the_auth_filter_does_not(
        e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser) -> None:
    regex = need_program("fail2ban-regex")
    box = make_box(e2e_dir, "vm1")
    conf = write_config(e2e_dir, [box], preauth_timeout=1)
    log = e2e_dir / "rstash-recv.log"
    env = service_user.env(SSH_CONNECTION="192.0.2.78 40000 127.0.0.1 22")
    argv = service_user.wrap([venv_bin(e2e_venv, "rstash-recv"), "-c", str(conf)])
    # One peer closes after the greeting (a health check), one says nothing until the deadline.
    for close_at_once in (True, False):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline().startswith(b"220 rstash/1 ")
            if not close_at_once:
                assert proc.stdout.readline() == b"421 timeout\r\n"
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
            proc.stdout.close()
    lines = log.read_text(encoding="utf-8").splitlines()
    silent = [line for line in lines if "outcome=silent" in line]
    assert len(silent) == 2 and all("peer=192.0.2.78" in line for line in silent), lines
    assert _fail2ban_matches(regex, log, "rstash-silent.conf") == 2
    assert _fail2ban_matches(regex, log, "rstash.conf") == 0
