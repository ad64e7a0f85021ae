"""The pipe-mode replay rule with each box's mark (rstash/replay.py): rstash(7) PIPE MODE AND REPLAY.

Real SQLite files and real box directories under tmp_path; time is injected.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from rstash.errors import ReplayRefused, StateUnavailable
from rstash.replay import MARK_NAME, MARK_TEMP, BelowFloor, BoxMark
from rstash.state import StateDB

T0 = 1_800_000_000
WINDOW = 300


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.t = now

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, BoxMark]:
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state").chmod(0o700)
    (tmp_path / "vm1").mkdir()
    return tmp_path / "state", BoxMark(tmp_path / "vm1")


def nonce(n: int) -> bytes:
    return n.to_bytes(32, "big")


def check(sdir: Path, mark: BoxMark, n: int, t: int, now: float = T0) -> None:
    with StateDB(sdir, now=Clock(now)) as db:
        db.check_replay("vm1", nonce(n), t, WINDOW, mark=mark)


def wipe(sdir: Path) -> None:
    shutil.rmtree(sdir)
    sdir.mkdir(mode=0o700)
    sdir.chmod(0o700)


def test_the_first_stream_to_a_new_cache_is_accepted_though_made_before_the_cache(
        site: tuple[Path, BoxMark]) -> None:
    sdir, mark = site
    # Made seconds before the server's first session creates the cache.
    check(sdir, mark, 1, T0 - 5, now=T0)
    assert mark.read() == T0 - 5
    with pytest.raises(ReplayRefused, match="nonce already seen"):
        check(sdir, mark, 1, T0 - 5, now=T0 + 1)


def test_a_stream_accepted_before_state_dir_was_lost_is_refused_even_dated_ahead(
        site: tuple[Path, BoxMark]) -> None:
    sdir, mark = site
    ahead = T0 + WINDOW // 2  # the client's clock runs ahead, within replay_window
    check(sdir, mark, 1, ahead)
    wipe(sdir)
    with pytest.raises(BelowFloor) as info:
        check(sdir, mark, 1, ahead, now=T0 + 10)
    assert info.value.floor == ahead
    assert re.search(r"streams made after \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ are accepted",
                     info.value.message)
    # A new stream made by a correct clock before that time is refused too, and says why ...
    with pytest.raises(BelowFloor):
        check(sdir, mark, 2, T0 + 20, now=T0 + 20)
    # ... and one made after it is accepted.
    check(sdir, mark, 3, ahead + 1, now=ahead + 1)


def test_the_mark_seeds_a_new_cache_once_and_does_not_refuse_streams_of_the_same_second(
        site: tuple[Path, BoxMark]) -> None:
    sdir, mark = site
    check(sdir, mark, 1, T0)
    check(sdir, mark, 2, T0)  # another client, same second: only its nonce tells it apart
    check(sdir, mark, 3, T0 - 30)  # made earlier, delivered later: still within the window
    assert mark.read() == T0


def test_the_mark_never_goes_down(site: tuple[Path, BoxMark]) -> None:
    _sdir, mark = site
    assert mark.read() == 0
    mark.raise_to(T0)
    mark.raise_to(T0 - 100)
    assert mark.read() == T0
    assert (Path(mark.box_dir) / MARK_NAME).read_bytes() == b"%d\n" % T0
    assert not (Path(mark.box_dir) / MARK_TEMP).exists()


def test_a_mark_that_cannot_be_raised_fails_closed_and_records_nothing(
        site: tuple[Path, BoxMark]) -> None:
    sdir, mark = site
    blocker = Path(mark.box_dir) / MARK_TEMP
    blocker.mkdir()  # the temp name is taken by a directory: the mark cannot be written
    with pytest.raises(StateUnavailable, match="pipe mark"):
        check(sdir, mark, 1, T0)
    blocker.rmdir()
    check(sdir, mark, 1, T0)  # the nonce was rolled back with the failed mark
    assert mark.read() == T0


@pytest.mark.parametrize("content", [b"", b"yesterday\n", b"12", b"-5\n", b"1\n2\n"])
def test_a_malformed_mark_fails_closed_for_a_new_cache(site: tuple[Path, BoxMark],
                                                       content: bytes) -> None:
    sdir, mark = site
    (Path(mark.box_dir) / MARK_NAME).write_bytes(content)
    with pytest.raises(StateUnavailable, match="malformed"):
        check(sdir, mark, 1, T0)


def test_a_mark_that_is_not_a_file_fails_closed(site: tuple[Path, BoxMark]) -> None:
    sdir, mark = site
    os.symlink("/etc/passwd", Path(mark.box_dir) / MARK_NAME)
    with pytest.raises(StateUnavailable, match="pipe mark"):
        check(sdir, mark, 1, T0)
