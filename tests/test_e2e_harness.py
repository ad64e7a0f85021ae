"""The e2e harness itself: service user, venv, directories, processes and the CI no-skip rule."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import rstash
from e2e_support import (
    ProcGroup,
    ServiceUser,
    as_service,
    config_text,
    free_port,
    make_box,
    need,
    service_env,
    untraversable_parent,
    venv_bin,
    wait_for_port,
    write_config,
)

pytestmark = pytest.mark.e2e

TESTS_DIR = Path(__file__).resolve().parent


def test_venv_python_imports_rstash_as_the_service_user(
    e2e_venv: Path, e2e_dir: Path, service_user: ServiceUser, spawn: ProcGroup
) -> None:
    code = "import os, rstash; print(rstash.__version__, os.geteuid(), rstash.__file__)"
    proc = spawn(as_service([venv_bin(e2e_venv, "python"), "-c", code]), name="python",
                 env=service_env(), cwd=e2e_dir)
    assert proc.wait() == 0, proc.describe()
    version, uid, path = proc.stdout().split()
    assert version == rstash.__version__
    assert int(uid) == service_user.uid
    # Installed into the venv, not imported from the checkout.
    assert path.startswith(str(e2e_venv))
    for program in ("rstash-recv", "rstash-send"):
        assert os.access(venv_bin(e2e_venv, program), os.X_OK)


def test_the_e2e_venv_is_reused(e2e_venv: Path) -> None:
    import e2e_support

    e2e_support.ensure_e2e_venv()  # may reinstall if the tree was edited since the fixture ran
    venv, what = e2e_support.ensure_e2e_venv()
    assert venv == e2e_venv
    assert what.startswith("reused"), what


def test_a_file_created_by_the_service_user_is_owned_by_it(
    e2e_dir: Path, service_user: ServiceUser, spawn: ProcGroup
) -> None:
    target = e2e_dir / "made-by-service"
    proc = spawn(as_service(["/bin/sh", "-c", 'echo "$HOME" > "$1"', "sh", str(target)]),
                 name="touch", env=service_env())
    assert proc.wait() == 0, proc.describe()
    st = target.stat()
    assert (st.st_uid, st.st_gid) == (service_user.uid, service_user.gid)
    assert target.read_text().strip() == str(service_user.home)


def test_e2e_dir_is_reachable_and_owned_by_the_service_user(
    e2e_dir: Path, service_user: ServiceUser
) -> None:
    assert untraversable_parent(e2e_dir) is None
    assert e2e_dir.stat().st_uid == service_user.uid
    assert e2e_dir.stat().st_mode & 0o777 == 0o755


def test_make_box_and_write_config(e2e_dir: Path, service_user: ServiceUser) -> None:
    box = make_box(e2e_dir, "vm1", overwrite="rename", allow_names=["*.tar"], pipe_mode=True)
    dotted = make_box(e2e_dir, "a.b")
    assert box.path.stat().st_uid == service_user.uid
    server, client = box.server_key.stat(), box.client_key.stat()
    assert server.st_mode & 0o777 == 0o640 and server.st_gid == service_user.gid
    assert client.st_mode & 0o777 == 0o600 and client.st_uid == os.geteuid()
    line = box.server_key.read_text()
    assert line == f"rstash-key-v1 {box.key.hex()} # e2e vm1\n"
    assert box.client_key.read_text() == line

    path = write_config(e2e_dir, [box, dotted], idle_timeout=5, defaults={"file_mode": "0640"})
    cfg = tomllib.loads(path.read_text())
    assert cfg["idle_timeout"] == 5
    assert cfg["defaults"] == {"file_mode": "0640"}
    assert cfg["box"]["vm1"] == {"path": str(box.path), "keys": [str(box.server_key)],
                                 "overwrite": "rename", "allow_names": ["*.tar"],
                                 "pipe_mode": True}
    assert cfg["box"]["a.b"]["path"] == str(dotted.path)
    state = Path(cfg["state_dir"])
    assert state.stat().st_mode & 0o777 == 0o700 and state.stat().st_uid == service_user.uid
    assert Path(cfg["log"]).parent == e2e_dir
    assert box.url(7370) == "rstash://127.0.0.1:7370/vm1"
    assert "[box.\"a.b\"]" in config_text(e2e_dir, [dotted])


def test_the_service_user_can_read_its_server_key_but_not_the_client_key(
    e2e_dir: Path, service_user: ServiceUser, spawn: ProcGroup
) -> None:
    need(not service_user.is_current, "needs root (a service user other than the runner)")
    box = make_box(e2e_dir, "vm1")
    reader = spawn(as_service(["/bin/cat", str(box.server_key)]), name="cat-server",
                   env=service_env())
    assert reader.wait() == 0, reader.describe()
    denied = spawn(as_service(["/bin/cat", str(box.client_key)]), name="cat-client",
                   env=service_env())
    assert denied.wait() != 0


def test_proc_group_kills_what_is_left_and_wait_for_port_is_bounded(e2e_dir: Path) -> None:
    group = ProcGroup(e2e_dir)
    port = free_port()
    server = group([sys.executable, "-c", textwrap.dedent(f"""
        import socket, time
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", {port})); s.listen(); print("listening", flush=True)
        time.sleep(3600)
    """)], name="sleeper")
    wait_for_port("127.0.0.1", port, timeout=10, proc=server)
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", free_port(), timeout=0.3)
    group.close()
    assert server.returncode is not None
    assert "listening" in server.stdout()
    assert (e2e_dir / "sleeper.err").exists()


def test_need_skips_normally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    need(True, "never raises")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="prerequisite is missing: no daemon"):
        need(False, "no daemon")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no daemon"):
        need(False, "no daemon")


def _run_inner_pytest(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    for name in ("conftest.py", "e2e_select.py", "e2e_plugin.py", "e2e_support.py"):
        (tmp_path / name).write_text((TESTS_DIR / name).read_text())
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    e2e: end to end\n")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent("""
        import pytest
        from e2e_support import need

        @pytest.mark.e2e
        def test_needs_a_daemon():
            need(False, "no such daemon")

        @pytest.mark.e2e
        def test_plain_skip():
            pytest.skip("plain skip")

        def test_unit_skip():
            pytest.skip("unit tests may skip")
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_skipped_e2e_tests_fail_under_ci(tmp_path: Path) -> None:
    proc = _run_inner_pytest(tmp_path, ci=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "2 failed, 1 skipped" in out, out
    assert "CI=true and a prerequisite is missing: no such daemon" in out
    assert "skipped under CI=true" in out


def test_skipped_e2e_tests_skip_outside_ci(tmp_path: Path) -> None:
    proc = _run_inner_pytest(tmp_path, ci=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "3 skipped" in out, out
