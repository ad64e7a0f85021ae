"""rstash.statedir: the replay cache only in a 0700 directory of its user on a local file system."""

from __future__ import annotations

import os
from pathlib import Path

from rstash.statedir import check_state_dir, fstype_of, parse_mountinfo

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "30 22 0:40 / /var/lib rw shared:2 master:1 - nfs4 srv:/export rw\n"
    "31 30 8:2 / /var/lib/local\\040dir rw - xfs /dev/sdb1 rw\n"
    "malformed line without separator\n"
    "32 22 0:41 / /var/lib rw - tmpfs tmpfs rw\n"
)


def test_mountinfo_lines_give_mount_point_and_type_unescaped() -> None:
    assert parse_mountinfo(MOUNTINFO) == [
        ("/", "ext4"), ("/var/lib", "nfs4"), ("/var/lib/local dir", "xfs"), ("/var/lib", "tmpfs")]


def test_the_longest_mount_point_wins_and_a_later_equal_one_is_on_top() -> None:
    assert fstype_of("/var/lib/local dir/rstash", MOUNTINFO) == "xfs"
    assert fstype_of("/var/lib/rstash", MOUNTINFO) == "tmpfs"
    assert fstype_of("/var/libx", MOUNTINFO) == "ext4"
    assert fstype_of("/srv", "") is None


def _dir(tmp_path: Path, mode: int = 0o700) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(mode)
    return d


def test_a_private_directory_on_a_local_file_system_is_fit(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    assert check_state_dir(d, mountinfo="1 0 8:1 / / rw - ext4 /dev/sda1 rw\n") is None


def test_a_network_file_system_is_refused(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    info = f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 0:9 / {os.path.realpath(tmp_path)} rw - nfs s:/e rw\n"
    assert check_state_dir(d, mountinfo=info) == f"{d}: on a nfs file system, must be local"


def test_a_directory_no_mount_holds_is_refused(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    assert check_state_dir(d, mountinfo="") == f"{d}: no mount found for it in /proc/self/mountinfo"


def test_mode_owner_and_kind_are_checked(tmp_path: Path) -> None:
    d = _dir(tmp_path, 0o750)
    assert check_state_dir(d, mountinfo="") == f"{d}: mode 0750, must be 0700"
    d.chmod(0o700)
    other = os.geteuid() + 1
    assert check_state_dir(d, mountinfo="", uid=other) == (
        f"{d}: owned by uid {os.geteuid()}, not by the service user (uid {other})")
    link = tmp_path / "link"
    link.symlink_to(d)
    assert check_state_dir(link, mountinfo="") == f"{link}: is a symbolic link"
    assert check_state_dir(tmp_path / "absent", mountinfo="") == f"{tmp_path / 'absent'}: No such file or directory"
