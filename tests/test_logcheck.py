"""rstash.logcheck: --check-config's judgement of where the service user's log lines go."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rstash.checks import Report, ServiceUser
from rstash.config import Config, load_config
from rstash.logcheck import check_log_target

#: A non-root user, so that file modes decide (root may write anything).
NOBODY = ServiceUser(name="nobody-e", uid=65534, groups=frozenset({65534}))


@pytest.fixture
def public(tmp_path: Path) -> Iterator[Path]:
    """A directory every user can search (pytest's tmp_path is private to its owner)."""
    d = Path(tempfile.mkdtemp(prefix="rstash-logcheck-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _config(tmp_path: Path, log: str) -> Config:
    conf = tmp_path / "rstash-recv.toml"
    conf.write_text(f'state_dir = "{tmp_path}"\nlog = "{log}"\n')
    return load_config(conf)


def _findings(cfg: Config, user: ServiceUser) -> list[tuple[str, str]]:
    report = Report()
    check_log_target(cfg, user, report)
    return [(r["level"], r["message"]) for r in report.records]


def test_stderr_is_reported_as_lost_under_inetd_and_ssh(tmp_path: Path) -> None:
    levels = [level for level, _ in _findings(_config(tmp_path, "stderr"), NOBODY)]
    assert levels == ["info", "warning"]


def test_a_log_file_the_user_cannot_write_is_an_error(tmp_path: Path, public: Path) -> None:
    log = public / "rstash.log"
    log.write_text("")
    log.chmod(0o644)
    [(level, message)] = _findings(_config(tmp_path, str(log)), NOBODY)
    assert level == "error"
    assert message.startswith(f"log {log} is not writable by nobody-e")


def test_a_log_file_the_user_may_append_to_is_fine(tmp_path: Path, public: Path) -> None:
    log = public / "rstash.log"
    log.write_text("")
    log.chmod(0o666)
    assert _findings(_config(tmp_path, str(log)), NOBODY) == [("info", f"log {log}: writable by nobody-e")]


def test_a_missing_log_file_needs_a_writable_directory(tmp_path: Path, public: Path) -> None:
    d = public / "logs"
    d.mkdir(mode=0o755)
    [(level, message)] = _findings(_config(tmp_path, str(d / "new.log")), NOBODY)
    assert level == "error"
    assert f"{d / 'new.log'} does not exist and its directory {d} is not writable by nobody-e" in message
    d.chmod(0o777)
    assert _findings(_config(tmp_path, str(d / "new.log")), NOBODY)[0][0] == "info"


