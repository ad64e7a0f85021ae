"""rstash-send through a profile (rstash-send(1), PROFILES), end to end: the real client
finds its profile in $XDG_CONFIG_HOME/rstash/send.toml and stores into the real rstash-recv
(as the service user, behind systemd-socket-activate --inetd, as in test_e2e_client.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from e2e_support import ProcGroup, ServiceUser, make_box, write_key
from test_e2e_client import Env, json_lines, make_file, out, send_env, sha256sum, stored

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(e2e_dir: Path, e2e_venv: Path, service_user: ServiceUser, spawn: ProcGroup) -> Env:
    return Env(e2e_dir, e2e_venv, service_user, spawn)


def test_a_profile_name_sends_to_its_url_with_its_key_and_the_command_line_wins(env: Env) -> None:
    box = make_box(env.e2e_dir, "vm1")
    port = env.server([box])
    src = env.e2e_dir / "src"
    src.mkdir()
    wrong = write_key(env.e2e_dir / "wrong.key", os.urandom(32), mode=0o600)
    cfg = env.e2e_dir / "cfg"
    (cfg / "rstash").mkdir(parents=True)
    conf = cfg / "rstash" / "send.toml"
    # The key is relative: beside the file. A second profile holds a key the server does not.
    (cfg / "rstash" / "vm1.key").write_bytes(box.client_key.read_bytes())
    (cfg / "rstash" / "vm1.key").chmod(0o600)
    conf.write_text(f'[dest.nightly]\nurl = "{box.url(port)}"\nkey = "vm1.key"\ntimeout = 60\n'
                    f'[dest.wrongkey]\nurl = "{box.url(port)}"\nkey = "{wrong}"\n', encoding="utf-8")
    conf.chmod(0o600)
    run_env = send_env(XDG_CONFIG_HOME=str(cfg), RSTASH_KEY_FILE=str(wrong))

    # The profile's url and key (RSTASH_KEY_FILE, a wrong key, does not replace it).
    a = make_file(src, "db.sql.gz", 100_000)
    p = env.send("--json", "nightly", a, env=run_env)
    assert p.returncode == 0, out(p)
    (rec,) = json_lines(p)
    assert rec["status"] == "stored" and rec["sha256"] == sha256sum(a)
    # -k on the command line wins over the profile's key, both ways.
    b = make_file(src, "b.bin", 10)
    p = env.send("-k", box.client_key, "wrongkey", b, env=run_env)
    assert p.returncode == 0, out(p)
    c = make_file(src, "c.bin", 10)
    p = env.send("-k", wrong, "nightly", c, env=run_env)
    assert p.returncode == 3, out(p)
    assert stored(box) == {"db.sql.gz": a.read_bytes(), "b.bin": b.read_bytes()}

    p = env.send("--profiles", env=run_env)
    assert p.returncode == 0, out(p)
    assert p.stdout.splitlines()[0].split() == ["nightly", box.url(port), str(cfg / "rstash/vm1.key")]

    # Made writable by its group, the file is refused and nothing is sent.
    conf.chmod(0o660)
    p = env.send("nightly", c, env=run_env)
    assert p.returncode == 2 and f"chmod go-w {conf}" in p.stderr, out(p)
    assert "c.bin" not in stored(box)
