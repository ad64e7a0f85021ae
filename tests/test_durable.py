"""syncfs(2) for a batch (rstash-recv(8) DURABILITY): when it is trusted, and the order
of a batch commit with it and without it, against real files."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from rstash import durable
from rstash.store import BoxStore


@pytest.mark.parametrize(("release", "trusted"), [
    ("4.19.0-27-amd64", False), ("5.7.19", False), ("5.8.0", True), ("5.10.0-30-amd64", True),
    ("6.1.0-13-amd64", True), ("10.0", True), ("garbage", False),
])
def test_syncfs_is_trusted_only_where_it_reports_writeback_errors(release: str, trusted: bool) -> None:
    assert durable.kernel_reports_errors(release) is trusted


def test_syncfs_of_a_directory_succeeds_where_it_is_trusted(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert durable.syncfs(fd) is durable.kernel_reports_errors()
    finally:
        os.close(fd)


def test_a_failing_syncfs_is_never_success(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)
    assert durable.syncfs(fd) is False  # EBADF


def _record(monkeypatch: pytest.MonkeyPatch, syncfs_ok: bool) -> list[str]:
    calls: list[str] = []
    real_fsync, real_fchmod, real_link = os.fsync, os.fchmod, os.link
    real_syncfs = durable.syncfs

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def fchmod(fd: int, mode: int) -> None:
        calls.append("fchmod")
        real_fchmod(fd, mode)

    def link(*args: Any, **kwargs: Any) -> None:
        calls.append("link")
        real_link(*args, **kwargs)

    def syncfs(fd: int) -> bool:
        calls.append("syncfs")
        return real_syncfs(fd) and syncfs_ok

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fchmod", fchmod)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(durable, "syncfs", syncfs)
    return calls


def _batch(box: Path, names: list[str], calls: list[str]) -> list[str | Any]:
    with BoxStore(box, file_mode=0o640) as s:
        uploads = []
        for name in names:
            up = s.begin(name, 4)
            up.write(b"data")
            uploads.append(up)
        calls.clear()
        return s.commit_batch(uploads)


def test_a_batch_syncs_its_data_once_before_any_link_and_its_names_once_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not durable.kernel_reports_errors():
        pytest.skip("this kernel's syncfs() does not report writeback errors: never used")
    calls = _record(monkeypatch, syncfs_ok=True)
    assert _batch(tmp_path, ["a", "b", "c"], calls) == ["a", "b", "c"]
    assert calls == ["syncfs", "fchmod", "link", "fchmod", "link", "fchmod", "link", "fsync dir"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {n: b"data" for n in "abc"}


def test_without_a_trusted_syncfs_each_file_is_fsynced_before_its_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record(monkeypatch, syncfs_ok=False)
    assert _batch(tmp_path, ["a", "b"], calls) == ["a", "b"]
    assert calls == ["syncfs", "fsync file", "fchmod", "link", "fsync file", "fchmod", "link",
                     "fsync dir"]


def test_a_single_file_is_fsynced_and_the_file_system_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record(monkeypatch, syncfs_ok=True)
    assert _batch(tmp_path, ["a"], calls) == ["a"]
    assert calls == ["fsync file", "fchmod", "link", "fsync dir"]
