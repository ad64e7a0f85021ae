"""min_free is about the file system: reservations of every box on it count (rstash/fsreserve.py).

Two processes upload into two boxes on one small tmpfs that this test mounts
(as root; never skipped under CI=true).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_support import need
from rstash.errors import Outcome
from rstash.store import BoxStore, Refused

MiB = 2**20
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    need(os.geteuid() == 0, "needs root to mount a tmpfs")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        (mnt / "a").mkdir(mode=0o750)
        (mnt / "b").mkdir(mode=0o750)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


HOLDER = textwrap.dedent("""
    import sys
    from rstash.store import BoxStore
    box, other, size, min_free = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with BoxStore(box, min_free=min_free, siblings=[box, other]) as s:
        up = s.begin("held", size)
        print("reserved", flush=True)
        sys.stdin.read()  # hold the reservation until the test closes stdin
        up.write(b"x" * size)
        up.commit()
    print("stored", flush=True)
""")


def test_two_boxes_on_one_file_system_share_min_free(small_fs: Path) -> None:
    a, b = small_fs / "a", small_fs / "b"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    size = 3 * MiB
    # Room for one upload above min_free, not for two.
    min_free = free - 2 * size + MiB
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(a), str(b), str(size),
                               str(min_free)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "reserved"
        with BoxStore(b, min_free=min_free, siblings=[a, b]) as s, \
                pytest.raises(Refused) as e:
            s.begin("second", size)
        assert e.value.outcome is Outcome.INSUFFICIENT_STORAGE
        assert "reservations" in (e.value.detail or "")
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "stored"
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
    vfs = os.statvfs(small_fs)
    assert vfs.f_bavail * vfs.f_frsize >= min_free


def test_a_box_on_another_file_system_is_not_a_sibling(small_fs: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with BoxStore(small_fs / "a", min_free=1, siblings=[elsewhere, small_fs / "b"]) as s:
        assert len(s._fs.others) == 1
        assert os.path.samestat(os.fstat(s._fs.others[0][1]), os.stat(small_fs / "b"))


def test_the_reservation_check_locks_every_box_of_the_file_system(small_fs: Path) -> None:
    # While another process holds box a's lock, a min_free check for box b must wait.
    import fcntl

    a, b = small_fs / "a", small_fs / "b"
    fd = os.open(a, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        probe = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                import fcntl, os
                from rstash.store import BoxStore
                with BoxStore({str(b)!r}, min_free=1, siblings=[{str(a)!r}]) as s:
                    for fd in s._dir_lock().fds:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        except BlockingIOError:
                            print("waits", os.path.samestat(os.fstat(fd), os.stat({str(a)!r})))
            """)], capture_output=True, text=True, timeout=30, cwd=REPO)
    finally:
        os.close(fd)
    assert probe.stdout.strip() == "waits True", probe.stderr
