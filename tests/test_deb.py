"""The Debian package, from a fresh clone to a delivery under the real openbsd-inetd and a purge.

In a fresh ``git clone`` of this repository (its committed state), as root, the README's
commands run as written: ``packaging/build-deb`` builds ``dist/rstash_<version>_<arch>.deb``,
``apt-get install ./dist/...deb`` installs it, then the deployment recipe (box, key, box table,
``-t``, inetd line, the ssh account step, the client's key and checks). Paths are moved only
where the recipe would change the machine beyond the package: the box lives in the test's
directory, the inetd line goes to a private inetd on a loopback port (not /etc/inetd.conf,
and its service name becomes that address), the client's key directory is the test's, ``scp``
from the backup host is ``cp``. The server is the installed /usr/bin/rstash-recv, run by inetd
as the user the package created, with the installed /etc/rstash/rstash-recv.toml. Then
``apt-get purge rstash`` must leave nothing of the package behind but the box.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from e2e_support import (
    ProcGroup,
    free_port,
    is_root,
    locked,
    need,
    need_program,
    wait_for_port,
)
from test_readme import readme_commands

pytestmark = pytest.mark.e2e

CHECKOUT = Path(__file__).resolve().parent.parent
PASSED_ENV = {"http_proxy", "https_proxy", "no_proxy", "ssl_cert_file", "requests_ca_bundle"}
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_virtualenv", "apt-get", "git")
INSTALLED = [Path("/usr/bin/rstash-recv"), Path("/usr/bin/rstash-send"), Path("/opt/venvs/rstash"),
             Path("/usr/share/man/man8/rstash-recv.8.gz"), Path("/usr/share/man/man1/rstash-send.1.gz"),
             Path("/usr/share/man/man5/rstash-recv.toml.5.gz"), Path("/usr/share/man/man7/rstash.7.gz"),
             Path("/usr/share/doc/rstash/examples/inetd.conf"),
             Path("/usr/share/doc/rstash/examples/systemd/rstash@.service"),
             Path("/usr/share/doc/rstash/examples/xinetd.d/rstash"),
             Path("/etc/rstash/rstash-recv.toml"), Path("/etc/rstash/keys"), Path("/var/lib/rstash")]


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode == 0 and proc.stdout not in ("", "not-installed")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _sh(line: str, *, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["/bin/sh", "-ec", line], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"$ {line}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def _moved(line: str, e2e_dir: Path, port: int) -> str | None:
    """The recipe line with its paths moved, or None for a line this test does not run."""
    if line.startswith("systemctl ") or "sshd_config.d" in line:
        return None  # the private inetd below stands for the system's; test_e2e_ssh.py covers sshd
    if line.startswith("echo 'rstash stream tcp"):
        line = line.replace("echo 'rstash stream", f"echo '127.0.0.1:{port} stream")
    line = (line.replace("/srv/rstash", f"{e2e_dir}/srv").replace("/etc/services", f"{e2e_dir}/services")
            .replace("/etc/inetd.conf", f"{e2e_dir}/inetd.conf")
            .replace("/etc/ssh/authorized_keys", f"{e2e_dir}/ssh-authorized_keys")
            .replace("/etc/rstash/send", f"{e2e_dir}/send")
            .replace("scp root@backup-host:", "cp ")
            .replace("rstash://backup-host/", f"rstash://127.0.0.1:{port}/"))
    return line


def _purge(env: dict[str, str], cwd: Path) -> None:
    _sh("apt-get purge rstash", cwd=cwd, env=env)


def test_the_deb_from_a_fresh_clone_serves_under_inetd_and_purges_clean(
        e2e_dir: Path, spawn: ProcGroup, tmp_path: Path) -> None:
    need(is_root(), "installing a Debian package needs root")
    for tool in BUILD_TOOLS:
        need_program(tool)
    inetd = need_program("inetd")
    # The box's ancestors must be root's or the service user's (rstash-recv(8) SECURITY): the
    # package's user is `rstash`, not the e2e account that owns e2e_dir.
    os.chown(e2e_dir, 0, 0)
    e2e_dir.chmod(0o755)
    # apt waits for a lock held by another apt instead of failing, and never asks.
    apt_conf = tmp_path / "apt.conf"
    apt_conf.write_text('DPkg::Lock::Timeout "600";\nAPT::Get::Assume-Yes "true";\n')
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": os.environ.get("HOME", "/root"), "DEBIAN_FRONTEND": "noninteractive",
           "APT_CONFIG": str(apt_conf)}
    # The build's pip finds its index as this machine's pip does (pip.conf, PIP_*, proxies).
    env.update({k: v for k, v in os.environ.items()
                if k.startswith(("PIP_", "TMPDIR", "XDG_CONFIG")) or k.lower() in PASSED_ENV})

    with locked(Path("/var/tmp/rstash-test-deb.lock"), timeout=1800):
        # Never purge an installation this test did not make: it would take its keys with it.
        need(not _installed("rstash"), "the rstash package is installed here (dpkg -s rstash); this test "
             "installs and purges it: run it where it is not installed")
        need(not _user_exists("rstash"), "a user 'rstash' exists here; this test creates and removes it")
        clone = tmp_path / "clone"
        subprocess.run(["git", "clone", "--quiet", str(CHECKOUT), str(clone)], check=True, timeout=120)
        port = free_port()
        try:
            started = time.monotonic()
            ran = []
            for line in readme_commands("## Install"):
                if line.startswith("apt-get install pipx"):
                    break  # the pipx way: tests/test_install.py
                _sh(line, cwd=clone, env=env, timeout=1200)
                ran.append(line)
            assert any("packaging/build-deb" in line for line in ran), ran
            print(f"build and install: {time.monotonic() - started:.0f} s")
            # The build leaves nothing in the clone but dist/.
            status = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                                    cwd=clone, capture_output=True, text=True, check=True).stdout
            assert [s for s in status.splitlines() if not s.startswith("!! dist/")] == [], status
            debs = list((clone / "dist").glob("rstash_*_*.deb"))
            assert len(debs) == 1, debs
            _check_installed()

            deploy = readme_commands("## Deploying it")
            assert any("/etc/inetd.conf" in line for line in deploy)
            for line in deploy:
                moved = _moved(line, e2e_dir, port)
                if moved is None:
                    continue
                if moved.startswith("rstash-send --test"):
                    proc = spawn([inetd, "-d", "-i", "-R", "100000", str(e2e_dir / "inetd.conf")],
                                 name="inetd")
                    wait_for_port("127.0.0.1", port, proc=proc)
                out = _sh(moved, cwd=clone, env=env)
                if line.startswith("rstash-recv --gen-key"):
                    fingerprint = re.search(r"SHA256:\S+", out.stdout + out.stderr)
                    assert fingerprint, out
                if line.startswith("rstash-send --fingerprint"):
                    assert fingerprint is not None
                    assert fingerprint.group(0) in out.stdout + out.stderr
            rstash = pwd.getpwnam("rstash")
            shadow = subprocess.run(["getent", "shadow", "rstash"], capture_output=True, text=True, check=True)
            assert rstash.pw_shell == "/bin/sh" and shadow.stdout.split(":")[1] == "*"

            # A real delivery through inetd to the installed /usr/bin/rstash-recv, run as rstash.
            payload = e2e_dir / "nightly.tar"
            payload.write_bytes(secrets.token_bytes(70_000))
            send = subprocess.run(["/usr/bin/rstash-send", "-k", f"{e2e_dir}/send/vm1.key", "--no-progress",
                                   f"rstash://127.0.0.1:{port}/vm1", str(payload)],
                                  capture_output=True, text=True, timeout=60, env=env)
            assert send.returncode == 0, send.stdout + send.stderr
            stored = e2e_dir / "srv/vm1/nightly.tar"
            assert stored.read_bytes() == payload.read_bytes()
            assert (stored.stat().st_uid, stored.stat().st_gid) == (rstash.pw_uid, rstash.pw_gid)
            proc.signal(signal.SIGTERM)
        finally:
            if _installed("rstash"):
                _purge(env, tmp_path)

        # A clean purge: nothing of the package, its configuration, its state or its user is left.
        assert not _installed("rstash")
        left = [p for p in [*INSTALLED, Path("/etc/rstash"), Path("/usr/share/doc/rstash")] if os.path.lexists(p)]
        assert not left, left
        assert not _user_exists("rstash")
        assert subprocess.run(["getent", "group", "rstash"], capture_output=True).returncode == 2
        assert (e2e_dir / "srv/vm1/nightly.tar").exists()  # boxes are data: kept


def _check_installed() -> None:
    for path in INSTALLED:
        assert os.path.lexists(path), path
    for prog in ("rstash-recv", "rstash-send"):
        assert os.readlink(f"/usr/bin/{prog}") == f"/opt/venvs/rstash/bin/{prog}"
        version = subprocess.run([f"/usr/bin/{prog}", "--version"], capture_output=True, text=True, timeout=60)
        assert version.returncode == 0, version.stderr
    user = pwd.getpwnam("rstash")
    assert user.pw_dir == "/var/lib/rstash" and user.pw_shell == "/usr/sbin/nologin" and user.pw_uid < 1000
    st = os.stat("/var/lib/rstash")
    assert (st.st_uid, st.st_mode & 0o7777) == (user.pw_uid, 0o700)
    st = os.stat("/etc/rstash/keys")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, user.pw_gid, 0o750)
    conffiles = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", "rstash"], capture_output=True,
                               text=True, check=True).stdout
    assert "/etc/rstash/rstash-recv.toml" in conffiles
    # The examples are documentation only: no unit or inetd line is active.
    assert not Path("/lib/systemd/system/rstash.socket").exists()
    inetd_conf = Path("/etc/inetd.conf")
    assert not inetd_conf.exists() or "rstash-recv" not in inetd_conf.read_text()
    # The shipped configuration serves no box until one is added.
    check = subprocess.run(["/usr/bin/rstash-recv", "-t"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert shutil.which("rstash-recv", path="/usr/bin") == "/usr/bin/rstash-recv"
