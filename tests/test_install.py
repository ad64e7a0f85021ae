"""The README's other ways in, run as written in a fresh ``git clone`` (its committed state):
``./demo.sh`` and ``pipx install`` (from the directory, and from a wheel), as root and as an
ordinary user; the ordinary user then runs the deployment's box step up to ``rstash-recv -t``
and ``--check-config``, with itself as the service user and the system paths moved.

Only pipx's two directories are moved (``PIPX_HOME``, ``PIPX_BIN_DIR``: the README's
/opt/pipx and /usr/local/bin would change the machine). What pipx installs must be usable by
another, unprivileged user (the service user), which a venv under /root or made with a pyenv
Python is not. The Debian package's way is tests/test_deb.py's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from e2e_support import ServiceUser, e2e_root, free_port, is_root, need, need_program
from test_readme import readme_commands

pytestmark = pytest.mark.e2e

CHECKOUT = Path(__file__).resolve().parent.parent
PASSED_ENV = {"http_proxy", "https_proxy", "no_proxy", "ssl_cert_file", "requests_ca_bundle"}
README = (CHECKOUT / "README.md").read_text(encoding="utf-8")


def _workdir(name: str) -> Path:
    """A fresh directory the service user can reach (tmp_path's parents are private to root)."""
    base = e2e_root() / f"{name}-{os.getpid()}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o755)
    return base


def _clone(dest: Path, owner: ServiceUser | None) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(CHECKOUT), str(dest)], check=True, timeout=120)
    if owner is not None and is_root():
        subprocess.run(["chown", "-R", f"{owner.uid}:{owner.gid}", str(dest)], check=True)
    return dest


def _run(line: str, *, cwd: Path, home: Path, user: ServiceUser | None,
         extra: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home)}
    # pip finds its index as this machine's pip does: PIP_*, proxies, CA bundles, HOME's pip.conf
    env.update({k: v for k, v in os.environ.items()
                if k.startswith("PIP_") or k.lower() in PASSED_ENV})
    env.update(extra or {})
    argv = ["/bin/sh", "-ec", line]
    if user is not None and is_root():
        argv = user.wrap(argv)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"$ {line}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


def _pipx_lines() -> tuple[str, str]:
    """The README's `pipx install .` line and its wheel variant (with the command making the wheel)."""
    install = next(c for c in readme_commands() if "pipx install ." in c)
    wheel = re.search(r"\(`(python3 -m pip wheel [^`]+)`\):\s*`([^`]*pipx install ./dist/[^`]+)`", README)
    assert wheel, "the README's wheel command"
    return install, f"{wheel.group(1)} && {wheel.group(2)}"


def _moved_pipx(line: str, base: Path) -> str:
    return line.replace("PIPX_HOME=/opt/pipx", f"PIPX_HOME={base}/pipx").replace(
        "PIPX_BIN_DIR=/usr/local/bin", f"PIPX_BIN_DIR={base}/bin")


def _check_pipx_install(base: Path, home: Path, service_user: ServiceUser) -> None:
    for prog in ("rstash-recv", "rstash-send"):
        assert (base / "bin" / prog).exists(), prog
        # The service user, not only whoever installed it, can run it.
        out = _run(f"{base}/bin/{prog} --version", cwd=home, home=home, user=service_user)
        assert prog in out.stdout + out.stderr
    cfg = (base / "pipx/venvs/rstash/pyvenv.cfg").read_text()
    assert "pyenv" not in cfg and "/root" not in cfg, cfg
    assert (base / "pipx/venvs/rstash/share/man/man8/rstash-recv.8").exists()


@pytest.mark.parametrize("as_root", [True, False], ids=["root", "ordinary-user"])
def test_pipx_install_from_the_directory_and_from_a_wheel(
        as_root: bool, service_user: ServiceUser) -> None:
    need_program("pipx")
    if as_root:
        need(is_root(), "the README's commands as root: run the suite as root (CI does)")
    user = None if as_root else service_user
    base = _workdir(f"pipx-{'root' if as_root else 'user'}")
    home = base / "home"
    home.mkdir()
    if user is not None and is_root():
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(base)], check=True)
    try:
        clone = _clone(base / "clone", user)
        install, wheel = _pipx_lines()
        _run(_moved_pipx(install, base), cwd=clone, home=home, user=user)
        _check_pipx_install(base, home, service_user)
        _run(f"PIPX_HOME={base}/pipx PIPX_BIN_DIR={base}/bin pipx uninstall rstash", cwd=clone,
             home=home, user=user)
        assert not (base / "bin/rstash-recv").exists()
        _run(_moved_pipx(wheel, base), cwd=clone, home=home, user=user)
        _check_pipx_install(base, home, service_user)
        if not as_root:  # as root, with the real user rstash: tests/test_deb.py
            _box_recipe_as_ordinary_user(base, clone, home, user or service_user)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _box_recipe_as_ordinary_user(base: Path, clone: Path, home: Path, user: ServiceUser) -> None:
    """The README's box step up to the config check, by a user who can only be its own service user:
    /srv/rstash, /etc/rstash and /var/lib/rstash moved under ``base``, the user rstash is ``user``."""
    etc, state = base / "etc", base / "state"
    _run(f"install -d -m 0750 {etc}/keys && install -d -m 0700 {state} && "
         f"sed 's|/var/lib/rstash|{state}|' config/rstash-recv.toml > {etc}/rstash-recv.toml",
         cwd=clone, home=home, user=user)
    lines = readme_commands("## Deploying it")
    box_step = lines[:next(i for i, line in enumerate(lines) if "/etc/services" in line)]
    assert box_step[-1].startswith("rstash-recv -t"), box_step
    for line in box_step:
        line = (line.replace("/srv/rstash", f"{base}/srv").replace("/etc/rstash", str(etc))
                .replace("rstash-recv -t", f"rstash-recv -c {etc}/rstash-recv.toml -t")
                .replace("rstash-recv --check-config", f"rstash-recv -c {etc}/rstash-recv.toml --check-config"))
        line = re.sub(r"(?<=\s)rstash(?=\s|$)", user.name, line)
        _run(line, cwd=clone, home=home, user=user, extra={"PATH": f"{base}/bin:/usr/bin:/bin"})
    assert "[box.vm1]" in (etc / "rstash-recv.toml").read_text()


@pytest.mark.parametrize("as_root", [True, False], ids=["root", "ordinary-user"])
def test_the_demo_runs_in_a_fresh_clone(as_root: bool, service_user: ServiceUser) -> None:
    assert "./demo.sh" in README
    if as_root:
        need(is_root(), "the README's commands as root: run the suite as root (CI does)")
    user = None if as_root else service_user
    base = _workdir(f"demo-{'root' if as_root else 'user'}")
    home = base / "home"
    home.mkdir()
    if user is not None and is_root():
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(base)], check=True)
    try:
        clone = _clone(base / "clone", user)
        out = _run("./demo.sh", cwd=clone, home=home, user=user,
                   extra={"RSTASH_DEMO_PORT": str(free_port()), "TMPDIR": str(home)})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    receipts = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in receipts] == ["stored"], out.stdout
