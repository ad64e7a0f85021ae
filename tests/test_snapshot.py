"""The configuration snapshot in state_dir (rstash-recv(8) FILES): the same result as
validating, rebuilt whenever anything it depends on changes, trusted only when the
service user alone could have written it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rstash import config, snapshot
from rstash.errors import ConfigError
from test_config import MANUAL_EXAMPLE, config_file, write

OTHER_UID = 4242


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of the real validator (rstash.config.load_config), by path."""
    calls: list[str] = []
    real = config.load_config

    def counting(path: Any) -> config.Config:
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(config, "load_config", counting)
    return calls


def example(tmp_path: Path) -> Path:
    """The manual's example with an include, a box behind a symlink and a 0700 state_dir."""
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "srv").mkdir()
    path = config_file(tmp_path, MANUAL_EXAMPLE)
    write(tmp_path / "boxes.d" / "vm2.toml", '[box.vm2]\nkeys = ["k/vm2.key"]\n')
    return path


def snap_file(cfg_path: Path) -> Path:
    return snapshot.snapshot_path(cfg_path, cfg_path.parent / "state")


def test_a_snapshot_gives_exactly_what_validation_gives(tmp_path: Path, validations: list[str]) -> None:
    path = example(tmp_path)
    first = snapshot.load_config(path)
    assert validations == [str(path)]
    assert snap_file(path).stat().st_mode & 0o7777 == 0o600
    second = snapshot.load_config(path)
    assert validations == [str(path)]  # not validated again
    assert first == second == config.load_config(path)
    assert second.boxes["vm1"].file_mode == 0o640
    assert str(second.boxes["vm1"].allow_from[1]) == "2001:db8::/32"


def test_every_default_and_none_survives_the_snapshot(tmp_path: Path, validations: list[str]) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    path = config_file(tmp_path, """\
state_dir = "{tmp}/state"
idle_timeout = "90s"
service_user = "rstash"
[defaults]
on_receive = ["/bin/true"]
quota = "1GiB"
[box.a]
path = "/srv/a"
keys = ["/k/a"]
on_receive = []
[box.b]
path = "/srv/b"
keys = ["/k/b", "/k/a"]
""")
    first = snapshot.load_config(path)
    second = snapshot.load_config(path)
    assert len(validations) == 1
    assert first == second
    assert second.boxes["a"].on_receive is None and second.boxes["b"].on_receive == ("/bin/true",)
    assert second.boxes["a"].max_file_size is None and second.idle_timeout == 90.0
    assert second.warnings and "also used by box" in second.warnings[0]
    assert second.service_user == "rstash"


def _touch_keeping_identity(path: Path, text: str) -> None:
    """New content of the same size and mtime: only the hash tells."""
    st = path.stat()
    new = text.encode()
    assert len(new) == st.st_size
    with open(path, "r+b") as f:
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


CHANGES: dict[str, Callable[[Path], object]] = {
    "main file, same size and mtime": lambda d: _touch_keeping_identity(
        d / "rstash-recv.toml",
        (d / "rstash-recv.toml").read_text().replace("idle_timeout = 60", "idle_timeout = 61")),
    "included file": lambda d: write(d / "boxes.d" / "vm2.toml",
                                     '[box.vm2]\nkeys = ["k/vm2.key", "k/vm2-next.key"]\n'),
    "a new file matching include": lambda d: write(d / "boxes.d" / "vm3.toml",
                                                   '[box.vm3]\nkeys = ["k/vm3.key"]\n'),
    "an included file removed": lambda d: (d / "boxes.d" / "vm2.toml").unlink(),
    "a box path now a symlink": lambda d: (d / "srv" / "vm1").symlink_to(d / "elsewhere"),
}


@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_any_change_it_depends_on_validates_again(tmp_path: Path, validations: list[str],
                                                   change: str) -> None:
    path = example(tmp_path)
    snapshot.load_config(path)
    CHANGES[change](tmp_path)
    again = snapshot.load_config(path)
    assert len(validations) == 2
    assert again == config.load_config(path)
    snapshot.load_config(path)
    assert len(validations) == 3  # the one above, in this test; the snapshot holds again


def test_another_rstash_version_validates_again(tmp_path: Path, validations: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = example(tmp_path)
    snapshot.load_config(path)
    monkeypatch.setattr(snapshot, "__version__", "99.0")
    snapshot.load_config(path)
    assert len(validations) == 2


def test_two_config_files_in_one_state_dir_keep_two_snapshots(tmp_path: Path,
                                                              validations: list[str]) -> None:
    path = example(tmp_path)
    other = config_file(tmp_path, MANUAL_EXAMPLE.replace("idle_timeout = 60", "idle_timeout = 5"),
                        name="other.toml")
    for _ in range(2):
        assert snapshot.load_config(path).idle_timeout == 60.0
        assert snapshot.load_config(other).idle_timeout == 5.0
    assert len(validations) == 2
    assert snap_file(path) != snap_file(other)


def _forged(path: Path) -> None:
    """A snapshot that matches everything but says idle_timeout is 1 second."""
    snap = snap_file(path)
    data = json.loads(snap.read_bytes())
    data["config"]["settings"]["idle_timeout"] = 1.0
    snap.write_text(json.dumps(data))


def _replace_by_symlink(s: Path) -> None:
    s.rename(s.with_name("real"))
    s.symlink_to(s.with_name("real"))


UNTRUSTED: dict[str, Callable[[Path], object]] = {
    "mode 0644": lambda s: s.chmod(0o644),
    "another owner": lambda s: os.chown(s, OTHER_UID, -1),
    "a second link": lambda s: os.link(s, s.with_name("hardlink")),
    "a symlink to a snapshot": _replace_by_symlink,
}


@pytest.mark.parametrize("how", UNTRUSTED, ids=list(UNTRUSTED))
def test_a_snapshot_others_could_have_written_is_not_trusted(tmp_path: Path, validations: list[str],
                                                              how: str) -> None:
    path = example(tmp_path)
    snapshot.load_config(path)
    _forged(path)
    assert snapshot.load_config(path).idle_timeout == 1.0  # the forgery works when trusted…
    UNTRUSTED[how](snap_file(path))
    assert snapshot.load_config(path).idle_timeout == 60.0  # …and is ignored when not
    assert len(validations) == 2
    st = os.lstat(snap_file(path))
    assert (st.st_uid, st.st_mode & 0o7777, st.st_nlink) == (os.geteuid(), 0o600, 1)


@pytest.mark.parametrize("how", ["group-writable", "another owner"])
def test_a_state_dir_others_control_is_never_used(tmp_path: Path, validations: list[str],
                                                  how: str) -> None:
    path = example(tmp_path)
    state = tmp_path / "state"
    if how == "group-writable":
        state.chmod(0o770)
    else:
        os.chown(state, OTHER_UID, -1)
    snapshot.load_config(path)
    snapshot.load_config(path)
    assert len(validations) == 2
    assert os.listdir(state) == []


def test_garbage_in_the_snapshot_validates_again_and_replaces_it(tmp_path: Path,
                                                                 validations: list[str]) -> None:
    path = example(tmp_path)
    snapshot.load_config(path)
    snap_file(path).write_text('{"key": 1}')
    assert snapshot.load_config(path) == config.load_config(path)
    assert len(validations) == 3
    assert '"realpaths"' in snap_file(path).read_text()
    assert [n for n in os.listdir(tmp_path / "state") if n.startswith(".")] == []


def test_a_missing_state_dir_costs_only_time(tmp_path: Path, validations: list[str]) -> None:
    path = example(tmp_path)
    (tmp_path / "state").rmdir()
    assert snapshot.load_config(path) == snapshot.load_config(path)
    assert len(validations) == 2


def test_a_bad_config_raises_the_validators_problems_and_leaves_no_snapshot(tmp_path: Path) -> None:
    path = example(tmp_path)
    snapshot.load_config(path)
    path.write_text(path.read_text().replace('overwrite = "refuse"\nmax', 'overwrite = "never"\nmax'))
    with pytest.raises(ConfigError) as info:
        snapshot.load_config(path)
    assert any("box.vm1.overwrite" in p for p in info.value.problems), info.value.problems
    with pytest.raises(ConfigError):
        snapshot.load_config(path)  # the old snapshot is never used for the new file


def test_a_config_tomllib_refuses_is_reported_by_the_validator(tmp_path: Path) -> None:
    path = config_file(tmp_path, "state_dir = \n")
    with pytest.raises(ConfigError) as info:
        snapshot.load_config(path)
    assert info.value.problems[0].startswith(f"{path}: line 1:")


def test_a_snapshot_hit_imports_no_pydantic(tmp_path: Path) -> None:
    path = example(tmp_path)
    code = ("import sys; from rstash import snapshot; snapshot.load_config(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pydantic', 'pydantic_core', 'rstash') and m != 'rstash.snapshot'))")
    runs = [subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                           check=True, timeout=60).stdout for _ in range(2)]
    assert "'pydantic'" in runs[0] and "'rstash.config'" in runs[0]  # the first one validates
    assert "pydantic" not in runs[1] and "'rstash.config'" not in runs[1], runs[1]
