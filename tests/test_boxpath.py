"""Box paths judged like OpenSSH StrictModes (rstash/boxpath.py), at open and by --check-config."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from e2e_support import need
from rstash.boxpath import acl_entries, box_path_findings, extended_acl, open_box_dir
from rstash.errors import StoreError
from rstash.store import BoxStore

NOBODY = 65534


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (chown to another user)")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp_path/srv (root 0755) holding box vm1 (root 0750)."""
    srv = tmp_path / "srv"
    (srv / "vm1").mkdir(parents=True, mode=0o750)
    srv.chmod(0o755)
    return srv


def test_a_box_under_trusted_directories_opens(tree: Path) -> None:
    with BoxStore(tree / "vm1") as s:
        assert os.path.samestat(os.fstat(s.dir_fd), os.stat(tree / "vm1"))
    assert box_path_findings(str(tree / "vm1"), os.geteuid()) == ([], [])


def test_an_ancestor_writable_by_everyone_lets_a_user_swap_boxes_and_is_refused(tree: Path) -> None:
    # Anyone may rename vm2 to vm1 in a 0777 parent: vm1's key would write into vm2.
    tree.chmod(0o777)
    with pytest.raises(StoreError, match=r"ancestor .*srv is writable by everyone"):
        BoxStore(tree / "vm1")
    errors, _ = box_path_findings(str(tree / "vm1"), os.geteuid())
    assert errors and "srv is writable by everyone" in errors[0]


def test_a_group_writable_ancestor_is_refused(tree: Path) -> None:
    tree.chmod(0o775)
    with pytest.raises(StoreError, match="writable by its group"):
        BoxStore(tree / "vm1")


def test_a_sticky_world_writable_ancestor_owned_by_root_is_fine(tree: Path) -> None:
    need_root()
    tree.chmod(0o1777)  # like /tmp: others may create entries, not rename ours
    with BoxStore(tree / "vm1"):
        pass


def test_an_ancestor_owned_by_another_user_is_refused(tree: Path) -> None:
    need_root()
    os.chown(tree, NOBODY, NOBODY)
    with pytest.raises(StoreError, match=f"owned by uid {NOBODY}"):
        BoxStore(tree / "vm1")


def test_a_box_owned_by_another_user_is_refused(tree: Path) -> None:
    # A directory planted by someone else: its owner could read everything delivered.
    need_root()
    os.chown(tree / "vm1", NOBODY, NOBODY)
    with pytest.raises(StoreError, match=f"it is owned by uid {NOBODY}"):
        BoxStore(tree / "vm1")
    # ... unless that user is the service user.
    os.close(open_box_dir(str(tree / "vm1"), service_uid=NOBODY))


def test_a_symlink_anywhere_on_the_path_is_refused(tree: Path) -> None:
    # O_NOFOLLOW alone protects the last component; the walk refuses every one.
    (tree.parent / "link").symlink_to(tree)
    with pytest.raises(StoreError, match="symbolic link"):
        BoxStore(tree.parent / "link" / "vm1")


def test_the_descriptor_checked_is_the_descriptor_used(tree: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Structural: every component is opened relative to the previous descriptor, never by path.
    opened: list[tuple[str, int | None]] = []
    real_open = os.open

    def spy(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        opened.append((path, dir_fd))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", spy)
    os.close(open_box_dir(str(tree / "vm1")))
    assert opened[0] == ("/", None)
    assert all("/" not in p and fd is not None for p, fd in opened[1:])
    assert [p for p, _ in opened[1:]] == [p for p in str(tree / "vm1").split("/") if p]


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ANY = 0xFFFFFFFF


def test_acl_entries_parse_the_xattr_format() -> None:
    raw = _acl((USER_OBJ, 7, ANY), (USER, 6, 1000), (GROUP_OBJ, 5, ANY), (MASK, 7, ANY),
               (OTHER, 0, ANY))
    assert acl_entries(raw)[1] == (USER, 6, 1000)
    assert acl_entries(b"\x01\x00\x00\x00") == []


def test_an_acl_granting_another_user_is_a_check_config_warning(tree: Path) -> None:
    box = tree / "vm1"
    try:
        os.setxattr(box, "system.posix_acl_access",
                    _acl((USER_OBJ, 7, ANY), (USER, 5, NOBODY), (GROUP_OBJ, 5, ANY),
                         (MASK, 5, ANY), (OTHER, 0, ANY)))
    except OSError as e:
        need(False, f"no POSIX ACLs here: {e.strerror}")
    fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert extended_acl(fd) == ["access"]
    finally:
        os.close(fd)
    errors, warnings = box_path_findings(str(box), os.geteuid())
    assert errors == []
    assert any("ACL" in w for w in warnings), warnings


def test_an_ancestor_acl_granting_write_is_refused(tree: Path) -> None:
    try:
        os.setxattr(tree, "system.posix_acl_access",
                    _acl((USER_OBJ, 7, ANY), (USER, 7, NOBODY), (GROUP_OBJ, 5, ANY),
                         (MASK, 7, ANY), (OTHER, 5, ANY)))
    except OSError as e:
        need(False, f"no POSIX ACLs here: {e.strerror}")
    # The ACL's mask is the mode's group bits: write granted to anyone shows there.
    with pytest.raises(StoreError, match=r"writable by its group \(or its ACL\)"):
        BoxStore(tree / "vm1")


def test_a_group_writable_box_is_a_check_config_warning(tree: Path) -> None:
    (tree / "vm1").chmod(0o770)
    errors, warnings = box_path_findings(str(tree / "vm1"), os.geteuid())
    assert errors == [] and any("group-writable" in w for w in warnings)
