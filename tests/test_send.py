"""rstash-send's command line without a server: refused destinations, the ssh command line
it runs, options, key files, the name checker, exit statuses. The pieces are tested in
tests/client/; the real sessions are in test_e2e_client.py."""

from __future__ import annotations

import json
import os
import pty
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rstash import send
from rstash.client.destinations import Dest
from rstash.errors import Exit, outcome_of, worst_exit

CHECKOUT = Path(__file__).resolve().parent.parent
KEY_HEX = "00" * 31 + "01"


def run(*args: str | os.PathLike[str]) -> int:
    """rstash-send's main() in this process; argparse's own exits count too."""
    try:
        return send.main([os.fspath(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "vm1.key"
    path.write_text(f"rstash-key-v1 {KEY_HEX} # test key\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def afile(tmp_path: Path) -> Path:
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello\n")
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fails the test if rstash-send tries to reach a server; records the attempts."""
    calls: list[Any] = []

    def connect(dest: Dest, opts: Any) -> Any:
        calls.append(dest)
        raise AssertionError(f"tried to connect to {dest}")

    monkeypatch.setattr(send, "connect", connect)
    return calls


def test_an_injection_attempt_exits_2_before_any_connection(key: Path, afile: Path,
                                                           no_network: list[Any]) -> None:
    assert run("-k", key, "ssh://-oProxyCommand=touch${IFS}x/vm1", afile) == Exit.LOCAL
    assert run("-k", key, "--proxy-command", "nc %h %p", "rstash://$(id)/vm1", afile) == Exit.LOCAL
    assert no_network == []


def fake_ssh(tmp_path: Path, name: str = "fake-ssh") -> tuple[Path, Path]:
    """An "ssh" that records its argv and fails the way ssh does when it cannot connect."""
    record = tmp_path / f"{name}.argv"
    script = tmp_path / name
    script.write_text(f"""#!{sys.executable}
import json, sys
open({str(record)!r}, "w").write(json.dumps(sys.argv[1:]))
sys.stderr.write("ssh: connect to host h port 22: Connection refused\\n")
sys.exit(255)
""")
    script.chmod(0o755)
    return script, record


def test_rsh_option_and_environment(tmp_path: Path, key: Path, afile: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    by_env, env_record = fake_ssh(tmp_path, "env-ssh")
    by_opt, opt_record = fake_ssh(tmp_path, "opt-ssh")
    monkeypatch.setenv("RSTASH_RSH", f"{by_env} -o 'IdentityFile=/k 1'")
    # RSTASH_RSH when no -e; ssh failing before any protocol byte is exit 4 quoting ssh.
    assert run("-k", key, "ssh://backup@h:2222/vm1", afile) == Exit.TRANSPORT
    assert json.loads(env_record.read_text()) == [
        "-o", "IdentityFile=/k 1", "-p", "2222", "-l", "backup", "-T", "-o", "BatchMode=yes",
        "--", "h", "rstash-recv"]
    err = capfd.readouterr().err
    assert "Connection refused" in err
    # -e wins over RSTASH_RSH; --remote-path and --subsystem.
    assert run("-k", key, "-e", f"{by_opt} -v", "--remote-path", "/opt/rstash-recv --box vm1",
               "ssh://h/vm1", afile) == Exit.TRANSPORT
    assert json.loads(opt_record.read_text()) == [
        "-v", "-T", "-o", "BatchMode=yes", "--", "h", "/opt/rstash-recv --box vm1"]
    opt_record.unlink()
    assert run("-k", key, "--rsh", str(by_opt), "--subsystem", "ssh://h/vm1", afile) == Exit.TRANSPORT
    assert json.loads(opt_record.read_text()) == ["-T", "-o", "BatchMode=yes", "-s", "--", "h", "rstash"]


# --------------------------------------------------------------------------- options and names


@pytest.mark.parametrize("name", [
    "../etc/passwd", "a/b", ".", "..", ".hidden", "-rf", " lead", "trail ", "tab\there",
    "bell\x07", "soft\u00adhyphen", "e\u0301", "x" * 256, "",
])
def test_a_bad_name_is_refused_before_sending(name: str, key: Path, afile: Path,
                                              no_network: list[Any],
                                              capfd: pytest.CaptureFixture[str]) -> None:
    assert run("-k", key, "--name", name, "rstash://127.0.0.1:1/vm1", afile) == Exit.LOCAL
    assert "name" in capfd.readouterr().err
    # The same for stdin and for a command, which must not even be started.
    assert run("-k", key, "--name", name, "rstash://127.0.0.1:1/vm1", "-") == Exit.LOCAL
    marker = afile.parent / "ran"
    assert run("-k", key, "--name", name, "--from-command", "rstash://127.0.0.1:1/vm1", "--",
               "touch", marker) == Exit.LOCAL
    assert not marker.exists()


def test_a_bad_file_base_name_is_refused_before_sending(tmp_path: Path, key: Path,
                                                        no_network: list[Any]) -> None:
    hidden = tmp_path / ".profile"
    hidden.write_bytes(b"x")
    assert run("-k", key, "rstash://127.0.0.1:1/vm1", hidden) == Exit.LOCAL


@pytest.mark.parametrize("args", [
    ["--name", "x", "{dest}", "{file}", "{file}"],        # --name takes one FILE
    ["{dest}", "-"],                                       # stdin needs --name
    ["--from-command", "{dest}", "--", "true"],            # --from-command needs --name
    ["--name", "x", "--from-command", "{dest}"],           # ... and a command
    ["{dest}"],                                            # no FILE
    ["{dest}", "{missing}"],                               # unreadable file
    ["{dest}", "{dir}"],                                   # not a regular file
    ["--no-such-option", "{dest}", "{file}"],
    ["--bwlimit", "fast", "{dest}", "{file}"],
    ["--timeout", "soon", "{dest}", "{file}"],
    ["--progress", "--no-progress", "{dest}", "{file}"],
    [],
])
def test_usage_and_local_errors_exit_2(args: list[str], tmp_path: Path, key: Path, afile: Path,
                                       no_network: list[Any]) -> None:
    subst = {"{dest}": "rstash://127.0.0.1:1/vm1", "{file}": str(afile),
             "{missing}": str(tmp_path / "missing"), "{dir}": str(tmp_path)}
    assert run("-k", key, *[subst.get(a, a) for a in args]) == Exit.LOCAL


def test_json_with_stdout_is_a_usage_error(key: Path, afile: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    assert run("-k", key, "--json", "--stdout", "vm1", afile) == Exit.LOCAL
    captured = capfd.readouterr()
    assert captured.out == ""  # nothing on the stream, not even a JSON error object
    assert "--json" in captured.err


def test_stdout_mode_refuses_a_bad_box_and_reply_modes(key: Path, afile: Path) -> None:
    assert run("-k", key, "--stdout", "rstash://h/vm1", afile) == Exit.LOCAL
    assert run("-k", key, "--stdout", "--dry-run", "vm1", afile) == Exit.LOCAL
    assert run("-k", key, "--stdout", "--test", "vm1") == Exit.LOCAL


def python_send(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "rstash.send", *[os.fspath(a) for a in args]]


def child_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(CHECKOUT),
            "LANG": "C.UTF-8"}


def test_stdout_mode_refuses_a_terminal(key: Path, afile: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(python_send("-k", key, "--stdout", "vm1", afile), stdout=slave,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=child_env())
    finally:
        os.close(slave)
    try:
        _, err = proc.communicate(timeout=30)
        shown = b""
        while select.select([master], [], [], 0.1)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            shown += data
    finally:
        os.close(master)
    assert proc.returncode == Exit.LOCAL, err
    assert b"terminal" in err
    assert b"\x01" not in shown and len(shown) == 0  # not one byte of a HELLO on the terminal


def test_stdout_mode_writes_a_stream_to_a_pipe(key: Path, afile: Path) -> None:
    proc = subprocess.run(python_send("-k", key, "--stdout", "vm1", afile), capture_output=True,
                          timeout=30, env=child_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout[:1] == b"\x01"  # a HELLO frame first
    assert proc.stdout.endswith(b"") and b"a.txt" in proc.stdout and b"hello\n" in proc.stdout


def test_stdout_mode_waits_for_a_slow_reader(tmp_path: Path, key: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    proc = subprocess.Popen(python_send("-k", key, "--stdout", "vm1", big), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=child_env())
    assert proc.stdout is not None
    try:
        time.sleep(1.0)  # the pipe fills up; the writer must wait, not fail
        got = 0
        while chunk := proc.stdout.read(65536):
            got += len(chunk)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait(5)
    assert proc.returncode == 0, err
    assert got > 3 * 1024 * 1024


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620, 0o602])
def test_a_key_readable_by_others_is_refused_like_ssh(mode: int, key: Path, afile: Path,
                                                      no_network: list[Any],
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    key.chmod(mode)
    assert run("--fingerprint", "-k", key) == Exit.LOCAL
    assert run("-k", key, "rstash://127.0.0.1:1/vm1", afile) == Exit.LOCAL
    err = capfd.readouterr().err
    # ssh: "Permissions 0644 for 'id_ed25519' are too open."
    assert f"{mode:04o}" in err and "too open" in err and str(key) in err
    # One message whatever the bits, with its fix.
    assert err.count(f"rstash-send: {key}: permissions {mode:04o} are too open: a client key "
                     f"must be readable by its owner only (chmod 600 {key})\n") == 2, err


def test_key_file_checks(tmp_path: Path, key: Path, monkeypatch: pytest.MonkeyPatch,
                         capfd: pytest.CaptureFixture[str]) -> None:
    assert run("--fingerprint", "-k", key) == 0
    line = capfd.readouterr().out.strip()
    assert line.startswith("256 SHA256:") and line.endswith(" test key (rstash-hmac)")
    monkeypatch.setenv("RSTASH_KEY_FILE", str(key))
    assert run("--fingerprint") == 0
    assert capfd.readouterr().out.strip() == line
    link = tmp_path / "link.key"
    link.symlink_to(key)
    assert run("--fingerprint", "-k", link) == Exit.LOCAL
    assert run("--fingerprint", "-k", tmp_path / "none.key") == Exit.LOCAL
    monkeypatch.delenv("RSTASH_KEY_FILE")
    assert run("--fingerprint") == Exit.LOCAL
    bad = tmp_path / "bad.key"
    bad.write_text("ssh-ed25519 AAAA\n")
    bad.chmod(0o600)
    assert run("--fingerprint", "-k", bad) == Exit.LOCAL
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- exit statuses


@pytest.mark.parametrize(("statuses", "want"), [
    ((), 0),
    ((0, 0), 0),
    ((0, 75), 75),
    ((75, 1), 1),
    ((1, 75, 0), 1),
    ((1, 2), 2),
    ((75, 2, 1), 2),
    ((2, 3), 3),
    ((2, 4), 4),
    ((2, 5), 5),
    ((5, 1, 75, 0, 2), 5),
    ((4, 75), 4),
])
def test_exit_status_precedence(statuses: tuple[int, ...], want: int) -> None:
    # rstash-send(1): 3, 4, 5 (session) > 2 > 1 > 75 > 0
    assert worst_exit(*statuses) == want


def test_session_failures_outrank_every_per_file_status() -> None:
    for session in (3, 4, 5):
        for other in (0, 1, 2, 75):
            assert worst_exit(other, session) == session == worst_exit(session, other)


@pytest.mark.parametrize(("code", "dry", "status"), [
    (250, False, "stored"), (250, True, "would_store"), (550, False, "exists"),
    (550, True, "exists"), (553, False, "refused"), (552, False, "refused"),
    (452, False, "temporary"), (451, False, "temporary"), (426, False, "error"),
])
def test_reply_codes_map_to_json_statuses(code: int, dry: bool, status: str) -> None:
    assert outcome_of(code, dry_run=dry) == status


def test_connection_refused_is_exit_4_and_not_retried(key: Path, afile: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        assert run("-k", key, "--json", f"rstash://127.0.0.1:{port}/vm1", afile) == Exit.TRANSPORT
    assert time.monotonic() - t0 < 5
    last = json.loads(capfd.readouterr().out.splitlines()[-1])
    assert last["status"] == "error" and last["message"]


def fake_keyless_server(tmp_path: Path, line: str) -> Path:
    """A --proxy-command "server" without the key: greets like rstash-recv, reads the HELLO,
    answers ``line`` instead of a 235 it cannot make, then waits for the client to leave."""
    script = tmp_path / "keyless.py"
    reply = (line + "\r\n").encode()
    script.write_text(f"""import base64, os, select
challenge = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")
os.write(1, b"220 rstash/1 methods=hmac-sha256 challenge=" + challenge + b"\\r\\n")
select.select([0], [], [], 20)
os.read(0, 65536)
os.write(1, {reply!r})
while select.select([0], [], [], 20)[0] and os.read(0, 65536):
    pass
""")
    return script


@pytest.mark.parametrize("line", [
    "250 stored 5 sha256:" + "0" * 64 + " a.txt mac=AAAAAAAAAAAAAAAAAAAAAA",
    "221 bye 1 mac=AAAAAAAAAAAAAAAAAAAAAA",
    "250 ok",
    "200 fine",
])
def test_a_success_line_before_235_is_a_protocol_error(line: str, tmp_path: Path, key: Path, afile: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    # rstash-send(1), EXIT STATUS: a session is refused by a 4xx or 5xx line; a 2xx line from a
    # server that has not proved the key (235) is the peer speaking nonsense: exit 5, never 1.
    proxy = f"{shlex.quote(sys.executable)} {shlex.quote(str(fake_keyless_server(tmp_path, line)))}"
    assert run("-k", key, "--json", "--proxy-command", proxy, "rstash://127.0.0.1/vm1", afile) \
        == Exit.PROTOCOL
    captured = capfd.readouterr()
    last = json.loads(captured.out.splitlines()[-1])
    assert last["status"] == "error" and last["code"] is None, captured
    assert "stored" not in captured.err.replace(line, ""), captured.err
