"""The README's first command: ./demo.sh installs rstash, serves the shipped example
config on loopback and stores a file with a verified receipt."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from e2e_support import free_port

pytestmark = pytest.mark.e2e

CHECKOUT = Path(__file__).resolve().parent.parent


def test_demo_stores_the_readme_with_a_verified_receipt() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["RSTASH_DEMO_PORT"] = str(free_port())
    proc = subprocess.run(["bash", str(CHECKOUT / "demo.sh")], env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    receipts = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(receipts) == 1
    receipt = receipts[0]
    assert receipt["status"] == "stored" and receipt["code"] == 250
    import hashlib

    assert receipt["sha256"] == hashlib.sha256((CHECKOUT / "README.md").read_bytes()).hexdigest()
    assert "outcome=stored" in proc.stdout


def test_a_busy_demo_port_names_rstash_demo_port() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["RSTASH_DEMO_PORT"] = str(s.getsockname()[1])
        proc = subprocess.run(["bash", str(CHECKOUT / "demo.sh")], env=env, capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert f"port {env['RSTASH_DEMO_PORT']} on 127.0.0.1 is busy" in proc.stderr
    assert "RSTASH_DEMO_PORT=" in proc.stderr and "==> installing" not in proc.stdout


def test_installed_programs_print_the_protocol_version(e2e_venv: Path) -> None:
    from e2e_support import venv_bin

    for prog in ("rstash-send", "rstash-recv"):
        proc = subprocess.run([venv_bin(e2e_venv, prog), "--version"], capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().startswith(f"{prog} ") and "rstash/1" in proc.stdout
    # The man pages are installed with the package.
    for page in ("man1/rstash-send.1", "man5/rstash-recv.toml.5", "man7/rstash.7", "man8/rstash-recv.8"):
        assert (e2e_venv / "share" / "man" / page).is_file(), page
