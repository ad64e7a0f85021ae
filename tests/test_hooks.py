"""on_receive hooks (rstash/hooks.py): argv and environment, output logged, runner order."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from rstash.hooks import Delivery, HookRunner, hook_argv, hook_env, run_hook
from rstash.log import Logger

D = Delivery(box="vm1", name="a~1.txt", requested_name="a.txt", path="/srv/vm1/a~1.txt",
             size=3, sha256="ab" * 32, client_mtime=1700000000)


def test_only_whole_placeholders_are_substituted() -> None:
    assert hook_argv(("/bin/x", "{box}", "{name}", "{path}", "-{name}"), D) == [
        "/bin/x", "vm1", "a~1.txt", "/srv/vm1/a~1.txt", "-{name}"]


def test_the_environment_is_fixed_and_describes_the_delivery() -> None:
    env = hook_env(D)
    assert env["PATH"] == "/usr/bin:/bin" and env["RSTASH_REQUESTED_NAME"] == "a.txt"
    assert env["RSTASH_SIZE"] == "3" and env["RSTASH_CLIENT_MTIME"] == "1700000000"
    assert not any(k.startswith("SSH_") for k in env)


def test_a_hook_runs_with_its_status_and_output_in_the_log(tmp_path: Path) -> None:
    log_path = tmp_path / "log"
    rc = run_hook(("/bin/sh", "-c", 'echo "$RSTASH_BOX $1"; exit 3', "sh", "{name}"), D, 30,
                  Logger(str(log_path)))
    assert rc == 3
    text = log_path.read_text()
    assert "event=hook" in text and "outcome=failed" in text and "code=3" in text
    assert 'output="vm1 a~1.txt\\n"' in text


def test_a_missing_program_is_logged_not_raised(tmp_path: Path) -> None:
    log_path = tmp_path / "log"
    assert run_hook((str(tmp_path / "nope"),), D, 30, Logger(str(log_path))) is None
    assert "outcome=error" in log_path.read_text()


def test_the_runner_runs_hooks_one_at_a_time_in_order(tmp_path: Path) -> None:
    out = tmp_path / "order"
    runner = HookRunner(30, Logger(str(tmp_path / "log")))
    for name in ("1", "2", "3"):
        runner.submit(("/bin/sh", "-c", f'echo {name} >> "{out}"'), D)
    runner.close()
    assert out.read_text().split() == ["1", "2", "3"]


def _stored(tmp_path: Path) -> tuple[Delivery, int, Path]:
    from rstash.store import BoxStore

    box = tmp_path / "box"
    box.mkdir(mode=0o770)
    store = BoxStore(box, keep_readers=True)
    up = store.begin("a.txt", 4)
    up.write(b"data")
    up.commit()
    d = Delivery.of_upload(SimpleNamespace(name="vm1", path=box),  # type: ignore[arg-type]
                           up, "a.txt", SimpleNamespace(n=4, sha256=b"\xab" * 32),  # type: ignore[arg-type]
                           0)
    return d, store.dir_fd, box


def test_a_hook_reads_the_stored_file_through_rstash_fd(tmp_path: Path) -> None:
    d, _dir_fd, _box = _stored(tmp_path)
    assert d.fd is not None
    out = tmp_path / "copy"
    rc = run_hook(("/bin/sh", "-c", 'cat "/proc/self/fd/$RSTASH_FD" >"$1"', "sh", str(out)), d, 30,
                  Logger(str(tmp_path / "log")))
    assert rc == 0 and out.read_bytes() == b"data"
    with pytest.raises(OSError):
        os.fstat(d.fd)  # the runner closed it


def test_a_stored_name_swapped_for_a_symlink_skips_the_hook(tmp_path: Path) -> None:
    # A group member replaced the stored file by a link to the box key: a `cp {path}`
    # hook would copy the key where she can read it.
    d, _dir_fd, box = _stored(tmp_path)
    secret = tmp_path / "box.key"
    secret.write_text("secret")
    os.rename(box / "a.txt", box / "hers")
    (box / "a.txt").symlink_to(secret)
    out = tmp_path / "copy"
    log_path = tmp_path / "log"
    rc = run_hook(("/bin/cp", "{path}", str(out)), d, 30, Logger(str(log_path)))
    assert rc is None and not out.exists()
    text = log_path.read_text()
    assert "outcome=skipped" in text and "no longer holds the stored file" in text


def test_a_skipped_hook_for_a_full_queue_closes_the_descriptor(tmp_path: Path) -> None:
    import rstash.hooks as hooks_mod

    d, _dir_fd, _box = _stored(tmp_path)
    runner = HookRunner(30, Logger(str(tmp_path / "log")))
    old = hooks_mod.MAX_QUEUED
    hooks_mod.MAX_QUEUED = 0
    try:
        runner.submit(("/bin/true",), d)
    finally:
        hooks_mod.MAX_QUEUED = old
    assert d.fd is not None
    with pytest.raises(OSError):
        os.fstat(d.fd)
