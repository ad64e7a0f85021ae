"""rstash-recv's command line (rstash/recv.py): --version, --gen-key, --fingerprint, LISTEN_FDS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rstash import PROTOCOL, __version__, recv
from rstash.auth import load_key_file


def test_version_names_program_and_protocol(capsys: pytest.CaptureFixture[str]) -> None:
    assert recv.main(["-V"]) == 0
    assert capsys.readouterr().out == f"rstash-recv {__version__} (protocol {PROTOCOL})\n"


def test_gen_key_writes_a_0600_key_and_prints_its_fingerprint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "vm1.key"
    assert recv.main(["--gen-key", str(target), "--comment", "vm1"]) == 0
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert capsys.readouterr().out == load_key_file(target).describe() + "\n"
    assert recv.main(["--fingerprint", str(target)]) == 0
    assert capsys.readouterr().out == load_key_file(target).describe() + "\n"


def test_gen_key_never_overwrites_and_says_so_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "vm1.key"
    target.write_text("precious")
    assert recv.main(["--gen-key", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"rstash-recv: {target}: already exists: not overwritten\n"
    assert target.read_text() == "precious"


def test_gen_key_refuses_a_multi_line_comment(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert recv.main(["--gen-key", str(tmp_path / "k"), "--comment", "a\nb"]) == 2
    assert "one line" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_gen_key_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert recv.main(["--gen-key", "-"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("rstash-key-v1 ") and err.strip()


def test_listen_fds_are_ours_only_when_listen_pid_is_us(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert recv._listen_fds() == [3, 4]
    assert "LISTEN_FDS" not in os.environ  # not inherited by hooks
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert recv._listen_fds() == []
