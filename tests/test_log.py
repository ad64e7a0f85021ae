"""Log lines (rstash/log.py): one line per event, peer strings escaped and cut."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rstash.log import PEER_CUT, Logger, format_fields, quote


def test_a_hostile_name_cannot_forge_a_second_line() -> None:
    text = quote("x\nrstash-recv[1]: info event=file outcome=stored")
    assert "\n" not in text and text.startswith('"')


def test_safe_values_are_bare_and_others_quoted() -> None:
    assert quote("vm1") == "vm1" and quote(True) == "yes" and quote(1.5) == "1.500"
    assert quote("a b") == '"a b"' and quote(b"\xff") == '"\\\\xff"'


def test_long_peer_strings_are_cut() -> None:
    assert quote("a" * 1000) == '"' + "a" * PEER_CUT + '\\u2026"'


def test_none_fields_are_left_out() -> None:
    assert format_fields({"event": "file", "final": None, "code": 250}) == "event=file code=250"


def test_a_file_target_gets_one_line_per_event_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "recv.log"
    log = Logger(str(path), "info")
    log.debug(event="hidden")
    log.info(event="one")
    os.rename(path, tmp_path / "recv.log.1")  # logrotate
    log.warning(event="two")
    assert "event=one" in (tmp_path / "recv.log.1").read_text()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and "warning event=two" in lines[0]
    assert "hidden" not in (tmp_path / "recv.log.1").read_text()


def test_auto_with_no_syslog_and_stderr_on_dev_null_writes_the_fallback_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under inetd without a syslog daemon, stderr (the connection) is /dev/null.
    from rstash import log as logmod

    monkeypatch.setattr(logmod, "DEV_LOG", str(tmp_path / "no-dev-log"))
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    fallback = tmp_path / "state" / "rstash-recv.log"
    fallback.parent.mkdir()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        log = logmod.Logger("auto", fallback=logmod.fallback_path(fallback.parent))
        log.info(event="session", outcome="complete")
        assert log.target == str(fallback)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    assert "info event=session outcome=complete" in fallback.read_text()
    # With a usable stderr (a terminal, a file) auto stays on stderr.
    assert logmod.Logger("auto", fallback=str(fallback)).target == "stderr"


def test_a_config_that_does_not_load_is_logged_to_its_state_dirs_fallback_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server under inetd, no syslog daemon: its stderr is /dev/null.
    from rstash import log as logmod
    from rstash.recv import log_config_problems

    monkeypatch.setattr(logmod, "DEV_LOG", str(tmp_path / "no-dev-log"))
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    state = tmp_path / "state"
    state.mkdir()
    conf = tmp_path / "rstash-recv.toml"
    conf.write_text(f'state_dir = "{state}"\nidle_timeout = 0\n')
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        log_config_problems(str(conf), [f"{conf}: idle_timeout: must be longer than 0 seconds"])
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    text = (state / "rstash-recv.log").read_text()
    assert "error event=config outcome=error detail=" in text and "idle_timeout" in text
