"""rstash-recv's admin commands: -t, --check-config, --dump-config, --status (rstash/admin.py).

Most cases run the real command line in-process (``rstash.recv.main``); a few run it as a
subprocess (``python -m rstash.recv``), the way Ansible and Nagios call it. Root-only cases
(chown to nobody) skip when not root, and fail under CI=true (CI runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e_support import need
from rstash import recv
from rstash.auth import fingerprint, format_key, generate_key
from rstash.state import StateDB

NOBODY = 65534


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (chown to nobody)")


# --- a server directory to configure ---------------------------------------------------------


@dataclass
class Site:
    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def config(self) -> Path:
        return self.root / "rstash-recv.toml"

    def box(self, name: str, mode: int = 0o755) -> Path:
        path = self.root / "boxes" / name
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        return path

    def key(self, name: str, comment: str = "", mode: int = 0o600) -> tuple[Path, str]:
        """A key file under keys/ and its fingerprint."""
        secret = generate_key()
        path = self.root / "keys" / f"{name}.key"
        path.parent.mkdir(exist_ok=True)
        path.write_text(format_key(secret, comment))
        path.chmod(mode)
        return path, fingerprint(secret)

    def write(self, text: str, name: str = "rstash-recv.toml") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


@pytest.fixture
def site() -> Iterator[Site]:
    # Not under tmp_path: pytest's base directory is 0700, which no other user can search.
    root = Path(tempfile.mkdtemp(prefix="rstash-admin-"))
    root.chmod(0o755)
    s = Site(root)
    s.state.mkdir(mode=0o700)
    s.state.chmod(0o700)
    yield s
    shutil.rmtree(root, ignore_errors=True)


def good_config(site: Site, **box_extra: str) -> dict[str, str]:
    """Two boxes vm1 (explicit settings) and vm2 (from [defaults]); returns fingerprints."""
    site.box("vm1")
    site.box("vm2")
    _, fp1 = site.key("vm1", "vm1 backups")
    _, fp2 = site.key("vm2")
    extra = "".join(f"{k} = {v}\n" for k, v in box_extra.items())
    site.write(f"""\
state_dir = "{site.state}"
log = "{site.root}/rstash-recv.log"
idle_timeout = 60

[defaults]
root = "{site.root}/boxes"
quota = "500GiB"
overwrite = "rename"

[box.vm1]
path = "{site.root}/boxes/vm1"
keys = ["keys/vm1.key"]
allow_names = ["*.tar.zst", "db-*.sql.gz"]
deny_names = ["*.tmp"]
overwrite = "refuse"
max_file_size = "50GiB"
{extra}
[box.vm2]
keys = ["keys/vm2.key"]
""")
    return {"vm1": fp1, "vm2": fp2}


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], site: Site) -> Run:
    """``run(*args)`` -> (exit status, stdout, stderr) of rstash-recv -c <site config> ARGS."""

    def call(*args: str, config: Path | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = recv.main(["-c", str(config or site.config), *args])
        out, err = capsys.readouterr()
        return rc, out, err

    return call


def records(out: str) -> list[dict[str, Any]]:
    data = json.loads(out)
    assert isinstance(data, list)
    for r in data:
        assert set(r) == {"box", "level", "message"}
        assert r["level"] in ("error", "warning", "info")
    return data


#: Run as root with neither service_user nor --user, every check also warns that
#: root can use anything (test_root_without_a_service_user_is_warned_about_it).
ROOT_WARNING = "checked as root, who can read and write anything"
ROOT_WARNINGS = int(os.geteuid() == 0)


def problems(recs: list[dict[str, Any]], level: str) -> list[dict[str, Any]]:
    """The records of ``level``, without the root warning."""
    return [r for r in recs if r["level"] == level and not r["message"].startswith(ROOT_WARNING)]


def quiet(err: str) -> str:
    """-t's stderr without the root warning."""
    return "".join(line for line in err.splitlines(keepends=True) if ROOT_WARNING not in line)


def check_json(run: Run, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    rc, out, _ = run("--check-config", "--json", *extra)
    return rc, records(out)


# --- --check-config and -t on a good config --------------------------------------------------


def test_good_config_checks_clean_and_lists_every_box(site: Site, run: Run) -> None:
    fps = good_config(site)
    rc, out, err = run("--check-config")
    assert rc == 0, out
    assert err == ""
    assert "\nbox vm1\n" in out and "\nbox vm2\n" in out
    assert f"path {site.root}/boxes/vm1 exists, writable by" in out
    assert "names allow *.tar.zst db-*.sql.gz; deny *.tmp" in out
    assert "overwrite refuse, file_mode 0640" in out
    assert "overwrite rename" in out  # vm2 inherits [defaults]
    assert "limits max_file_size 50GiB, quota 500GiB, min_free none" in out
    assert f"256 {fps['vm1']} vm1 backups (rstash-hmac)" in out
    assert f"256 {fps['vm2']} no comment (rstash-hmac)" in out
    warnings = "1 warning" if ROOT_WARNINGS else "0 warnings"
    assert f"0 errors, {warnings}; ok: 2 boxes can receive" in out


def test_good_config_json_is_one_array_of_records(site: Site, run: Run) -> None:
    fps = good_config(site)
    rc, recs = check_json(run)
    assert rc == 0
    assert problems(recs, "error") == [] and problems(recs, "warning") == []
    vm1 = [r["message"] for r in recs if r["box"] == "vm1"]
    assert any(m.startswith(f"path {site.root}/boxes/vm1 exists, writable by") for m in vm1)
    assert f"key {site.root}/keys/vm1.key 256 {fps['vm1']} vm1 backups (rstash-hmac)" in vm1
    assert any(r["box"] is None and r["message"].startswith(f"state_dir {site.state}: ok")
               for r in recs)


def test_t_is_silent_and_exits_0_on_a_good_config(site: Site, run: Run) -> None:
    good_config(site)
    rc, out, err = run("-t")
    assert (rc, out, quiet(err)) == (0, "", "")


# --- every problem of rstash-recv.toml(5) ---------------------------------------------------


def test_missing_box_dir_is_an_error(site: Site, run: Run) -> None:
    good_config(site)
    (site.root / "boxes" / "vm2").rmdir()
    rc, recs = check_json(run)
    assert rc == 1
    [e] = problems(recs, "error")
    assert e["box"] == "vm2" and "does not exist" in e["message"]
    rc, out, err = run("-t")
    assert (rc, out) == (1, "")
    assert quiet(err) == f"rstash-recv: error: box vm2: path {site.root}/boxes/vm2 does not exist " \
                  "(rstash-recv never creates it)\n"
    rc, out, _ = run("--check-config")
    assert rc == 1
    assert "cannot receive: box vm2" in out
    assert "error: box vm2: path" in out


def test_world_writable_box_dir_is_an_error(site: Site, run: Run) -> None:
    good_config(site)
    site.box("vm1", 0o777)
    rc, recs = check_json(run)
    assert rc == 1
    [e] = problems(recs, "error")
    assert e["box"] == "vm1" and "world-writable" in e["message"]
    assert run("-t")[0] == 1


def test_box_path_that_is_a_symlink_is_an_error(site: Site, run: Run) -> None:
    good_config(site)
    real = site.box("elsewhere")
    (site.root / "boxes" / "vm2").rmdir()
    (site.root / "boxes" / "vm2").symlink_to(real)
    rc, recs = check_json(run)
    assert rc == 1
    assert any(e["box"] == "vm2" and "symbolic link" in e["message"]
               for e in problems(recs, "error"))


def test_box_dir_unwritable_for_another_user_is_an_error(site: Site, run: Run) -> None:
    good_config(site)  # owned by us, 0755, keys 0600: nobody can neither write nor read
    rc, recs = check_json(run, "--user", "nobody")
    assert rc == 1
    errors = {(e["box"], e["message"].split(" is ")[-1].split(" (")[0]) for e in
              problems(recs, "error") if e["box"]}
    assert ("vm1", "not writable by nobody") in errors
    assert ("vm1", "not readable by nobody") in errors
    assert any(r["message"] == "service user nobody (uid 65534)" for r in recs)


def test_box_dir_behind_an_unsearchable_directory_is_an_error(site: Site, run: Run) -> None:
    good_config(site)
    (site.root / "boxes").chmod(0o700)
    rc, recs = check_json(run, "--user", "nobody")
    assert rc == 1
    assert any(e["box"] == "vm1" and e["message"] == f"path {site.root}/boxes/vm1 cannot be "
               f"reached by nobody: {site.root}/boxes is not searchable"
               for e in problems(recs, "error"))


def test_unknown_user_is_a_usage_error(site: Site, run: Run) -> None:
    good_config(site)
    rc, out, err = run("--check-config", "--user", "no-such-user-rstash")
    assert (rc, out) == (2, "")
    assert "no such user" in err


def test_box_and_keys_owned_by_the_service_user_check_clean(site: Site, run: Run) -> None:
    need_root()
    good_config(site)
    (site.root / "rstash-recv.log").touch()
    for p in [site.root / "boxes" / "vm1", site.root / "boxes" / "vm2", site.state,
              site.root / "rstash-recv.log"]:
        os.chown(p, NOBODY, NOBODY)
    for k in (site.root / "keys").iterdir():  # the documented layout: root:rstash 0640
        os.chown(k, 0, NOBODY)
        k.chmod(0o640)
    rc, recs = check_json(run, "--user", "nobody")
    assert rc == 0, recs
    assert problems(recs, "warning") == []
    assert any(r["message"].startswith(f"path {site.root}/boxes/vm1 exists, writable by nobody")
               for r in recs)


def _st(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def test_permission_bits_are_judged_like_the_kernel_does() -> None:
    import stat

    from rstash.admin import ServiceUser

    user = ServiceUser("svc", 1000, frozenset({1000, 4242}))  # 4242: a supplementary group
    d = stat.S_IFDIR
    assert user.may(_st(d | 0o2770, 0, 4242), 3)  # via the supplementary group
    assert not user.may(_st(d | 0o2750, 0, 4242), 3)
    assert not user.may(_st(d | 0o0077, 1000, 1000), 3)  # the owner class wins, even when worse
    assert user.may(_st(d | 0o0703, 0, 0), 3)  # other
    assert not user.may(_st(d | 0o0770, 0, 99), 1)
    root = ServiceUser("root", 0, frozenset({0}))
    assert root.may(_st(d | 0o0000, 1000, 1000), 3)
    assert root.may(_st(stat.S_IFREG | 0o0000, 1000, 1000), 4)


def test_resolve_user_includes_supplementary_groups() -> None:
    import grp
    import pwd

    from rstash.admin import resolve_user

    me = pwd.getpwuid(os.geteuid())
    user = resolve_user(me.pw_name)
    expected = {me.pw_gid} | {g.gr_gid for g in grp.getgrall() if me.pw_name in g.gr_mem}
    assert user.uid == me.pw_uid and user.groups == expected
    assert resolve_user(str(me.pw_uid)).name == me.pw_name


def test_state_dir_owned_by_another_user_is_an_error_for_pipe_mode(site: Site, run: Run) -> None:
    good_config(site, pipe_mode="true")
    site.state.chmod(0o755)
    rc, recs = check_json(run)
    assert rc == 1
    [e] = problems(recs, "error")
    assert e["box"] is None
    assert e["message"] == f"state_dir {site.state}: mode 0755, must be 0700: pipe mode needs " \
                           "it (box vm1)"


def test_state_dir_problem_is_a_warning_without_pipe_mode(site: Site, run: Run) -> None:
    good_config(site)
    site.state.rmdir()
    rc, recs = check_json(run)
    assert rc == 0
    [w] = problems(recs, "warning")
    assert w["message"].startswith(f"state_dir {site.state}: No such file or directory")
    assert "delivery log" in w["message"]


def test_keyless_box_is_a_config_error(site: Site, run: Run) -> None:
    site.box("open")
    site.write(f'state_dir = "{site.state}"\n[box.open]\npath = "{site.root}/boxes/open"\n')
    rc, recs = check_json(run)
    assert rc == 1
    assert recs == [{"box": None, "level": "error",
                     "message": f"{site.config}: box.open.keys: a box needs at least one key "
                                "(there is no open box)"}]
    rc, out, err = run("-t")
    assert (rc, out) == (1, "")
    assert err == f"rstash-recv: error: {site.config}: box.open.keys: a box needs at least " \
                  "one key (there is no open box)\n"
    rc, out, err = run("--check-config")
    assert rc == 1 and "box.open.keys" in out and "does not load" in out
    rc, out, err = run("--dump-config")
    assert (rc, out) == (1, "")
    assert err == f"rstash-recv: {site.config}: box.open.keys: a box needs at least one key " \
                  "(there is no open box)\n"
    assert run("--status")[0] == 1


def test_key_symlink_is_an_error(site: Site, run: Run) -> None:
    good_config(site)
    real, _ = site.key("real")
    link = site.root / "keys" / "vm1.key"
    link.unlink()
    link.symlink_to(real)
    rc, recs = check_json(run)
    assert rc == 1
    [e] = problems(recs, "error")
    assert e == {"box": "vm1", "level": "error",
                 "message": f"{link}: key file is a symlink: refused"}


def test_world_readable_key_is_an_error(site: Site, run: Run) -> None:
    good_config(site)
    (site.root / "keys" / "vm2.key").chmod(0o644)
    rc, recs = check_json(run)
    assert rc == 1
    [e] = problems(recs, "error")
    assert e["box"] == "vm2" and "too open" in e["message"]
    assert run("-t")[0] == 1


def test_key_that_is_not_a_regular_file_is_an_error(site: Site, run: Run) -> None:
    good_config(site)
    k = site.root / "keys" / "vm2.key"
    k.unlink()
    os.mkfifo(k, 0o600)
    rc, recs = check_json(run)
    assert rc == 1
    assert any("not a regular file" in e["message"] for e in problems(recs, "error"))


def test_key_readable_by_a_foreign_group_is_a_warning(site: Site, run: Run) -> None:
    need_root()
    good_config(site)
    k = site.root / "keys" / "vm1.key"
    os.chown(k, 0, NOBODY)  # nogroup: root (the service user here) is not in it
    k.chmod(0o640)
    rc, recs = check_json(run)
    assert rc == 0
    [w] = problems(recs, "warning")
    assert w["box"] == "vm1"
    assert "readable by group nogroup, which root is not in" in w["message"]


def test_key_writable_by_another_non_root_user_is_a_warning(site: Site, run: Run) -> None:
    need_root()
    good_config(site)
    k = site.root / "keys" / "vm2.key"
    os.chown(k, NOBODY, 0)
    rc, recs = check_json(run)
    assert rc == 0
    [w] = problems(recs, "warning")
    assert w["box"] == "vm2" and "writable by its owner nobody" in w["message"]


def test_key_on_two_boxes_is_a_warning(site: Site, run: Run) -> None:
    good_config(site)
    text = site.config.read_text().replace('keys = ["keys/vm2.key"]', 'keys = ["keys/vm1.key"]')
    site.write(text)
    rc, recs = check_json(run)
    assert rc == 0
    [w] = problems(recs, "warning")
    assert "also used by box vm1" in w["message"]
    rc, out, err = run("-t")
    assert (rc, out, quiet(err)) == (0, "", "")  # -t prints errors only


def test_overlapping_box_paths_are_a_config_error(site: Site, run: Run) -> None:
    good_config(site)
    site.box("vm1/inner")
    site.write(site.config.read_text()
               + f'[box.inner]\npath = "{site.root}/boxes/vm1/inner"\nkeys = ["keys/vm2.key"]\n')
    rc, recs = check_json(run)
    assert rc == 1
    [e] = recs
    assert "box.inner.path" in e["message"] and "must not nest" in e["message"]


def test_state_dir_inside_a_box_is_a_config_error(site: Site, run: Run) -> None:
    good_config(site)
    inner = site.root / "boxes" / "vm1" / "state"
    site.write(site.config.read_text().replace(f'state_dir = "{site.state}"',
                                               f'state_dir = "{inner}"'))
    rc, recs = check_json(run)
    assert rc == 1
    [e] = recs
    assert "state_dir" in e["message"] and "inside box vm1" in e["message"]
    assert run("-t")[0] == 1


def test_stale_temp_is_a_warning_and_a_fresh_one_is_not(site: Site, run: Run) -> None:
    good_config(site)
    box = site.root / "boxes" / "vm1"
    stale = box / (".rstash-tmp-" + "a" * 32 + ".100")
    stale.write_bytes(b"x" * 10)
    old = time.time() - 3 * 3600
    os.utime(stale, (old, old))
    (box / (".rstash-tmp-" + "b" * 32 + ".u")).write_bytes(b"fresh")
    rc, recs = check_json(run)
    assert rc == 0
    [w] = problems(recs, "warning")
    assert w["box"] == "vm1"
    assert w["message"].startswith(f"stale temp file {stale} (10 B, 3 h old)")
    rc, out, _ = run("--check-config")
    assert rc == 0 and f"warning: box vm1: stale temp file {stale}" in out
    assert f"0 errors, {1 + ROOT_WARNINGS} warning{'s' * ROOT_WARNINGS};" in out


# --- -t as config management calls it --------------------------------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


def recv_process(*args: str, cwd: Path, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rstash.recv", *args], cwd=cwd,
                          env=_env() if env is None else env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_t_validates_a_temp_file_with_a_relative_include(site: Site, tmp_path: Path) -> None:
    # Ansible: `validate: rstash-recv -t -c %s` on a temp file in another directory.
    site.box("vm1")
    site.box("vm2")
    etc = tmp_path / "etc"
    (etc / "boxes.d").mkdir(parents=True)
    site.key("vm1")
    (etc / "boxes.d" / "vm2.toml").write_text(
        f'[box.vm2]\npath = "{site.root}/boxes/vm2"\nkeys = ["{site.root}/keys/vm1.key"]\n')
    tmp = etc / ".ansible_tmp_x1y2"
    tmp.write_text(f'state_dir = "{site.state}"\ninclude = ["boxes.d/*.toml"]\n'
                   f'[box.vm1]\npath = "{site.root}/boxes/vm1"\n'
                   f'keys = ["{site.root}/keys/vm1.key"]\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    done = recv_process("-t", "-c", str(tmp), cwd=elsewhere)
    assert (done.returncode, done.stdout, quiet(done.stderr)) == (0, "", "")
    # The include really was read: vm2 shows up in the effective settings.
    dump = recv_process("--dump-config", "--json", "-c", str(tmp), cwd=elsewhere)
    assert dump.returncode == 0
    assert set(json.loads(dump.stdout)["boxes"]) == {"vm1", "vm2"}

    tmp.write_text(tmp.read_text().replace("[box.vm1]", "[box.vm1\n"))
    broken = recv_process("-t", "-c", str(tmp), cwd=elsewhere)
    assert broken.returncode == 1
    assert broken.stdout == ""
    assert broken.stderr.startswith(f"rstash-recv: error: {tmp}: line ")


def test_t_survives_the_python_I_reexec(site: Site) -> None:
    good_config(site)
    env = _env() | {"PYTHONDONTWRITEBYTECODE": "1"}
    done = recv_process("-t", "-c", str(site.config), cwd=site.root, env=env)
    assert (done.returncode, done.stdout, quiet(done.stderr)) == (0, "", "")


def test_include_with_a_duplicate_box_names_both_files(site: Site, run: Run) -> None:
    good_config(site)
    inc = site.write(f'[box.vm1]\npath = "{site.root}/boxes/vm2"\nkeys = ["../keys/vm1.key"]\n',
                     "boxes.d/dup.toml")
    site.write('include = ["boxes.d/*.toml"]\n' + site.config.read_text())
    rc, recs = check_json(run)
    assert rc == 1
    [e] = recs
    assert e["message"].startswith(f"{inc}: box.vm1:")
    assert str(site.config) in e["message"]
    rc, _, err = run("-t")
    assert rc == 1 and str(inc) in err and str(site.config) in err


# --- --dump-config ---------------------------------------------------------------------------


def test_dump_config_json_shows_defaults_inheritance(site: Site, run: Run) -> None:
    good_config(site)
    rc, out, err = run("--dump-config", "--json")
    assert (rc, err) == (0, "")
    data = json.loads(out)
    assert data["state_dir"] == str(site.state)
    vm1, vm2 = data["boxes"]["vm1"], data["boxes"]["vm2"]
    assert vm2["path"] == f"{site.root}/boxes/vm2"  # [defaults] root
    assert vm2["overwrite"] == "rename" and vm1["overwrite"] == "refuse"
    assert vm1["quota"] == vm2["quota"] == 500 << 30
    assert vm1["max_file_size"] == 50 << 30 and vm2["max_file_size"] is None
    assert vm2["keys"] == [f"{site.root}/keys/vm2.key"]


def test_dump_config_human_is_key_value_lines(site: Site, run: Run) -> None:
    good_config(site)
    rc, out, _ = run("--dump-config")
    assert rc == 0
    top, _, boxes = out.partition("\nbox ")
    assert f"state_dir {site.state}\n" in top
    assert "idle_timeout 60\n" in top and "server_id \"\"\n" in top
    assert boxes.startswith("vm1\n")
    assert "  allow_names *.tar.zst db-*.sql.gz\n" in boxes
    assert "  allow_from any\n" in boxes
    assert "  overwrite rename\n" in boxes.split("\nbox vm2\n")[1]
    assert f"  quota {500 << 30}\n" in boxes


def test_dump_config_on_a_bad_config_exits_1(site: Site, run: Run) -> None:
    site.write("idle_timeout = -1\n")
    rc, out, err = run("--dump-config", "--json")
    assert (rc, out) == (1, "")
    assert "idle_timeout" in err


# --- --status --------------------------------------------------------------------------------


def _log(site: Site, fps: dict[str, str], *, age: float, box: str = "vm1", **kw: Any) -> None:
    with StateDB(site.state) as db:
        assert db.log_event(box=box, key=f"{fps[box]} {box}", peer="192.0.2.7",
                            when=time.time() - age, **kw)


def test_status_without_a_database_says_no_delivery_log_yet_and_creates_nothing(
        site: Site, run: Run) -> None:
    good_config(site)
    rc, out, err = run("--status")
    assert (rc, err) == (0, "")
    assert out.count("last stored   no delivery log yet") == 2 and "never" not in out
    assert "last used no delivery log yet" in out
    assert list(site.state.iterdir()) == []
    rc, out, _ = run("--status", "--stale-after", "26h")  # a Nagios check: UNKNOWN
    assert rc == 3 and out.startswith("RSTASH UNKNOWN - no delivery log yet: ")
    assert list(site.state.iterdir()) == []


def test_status_reports_deliveries_refusals_and_key_use(site: Site, run: Run) -> None:
    fps = good_config(site)
    _log(site, fps, age=7200, name="db-1.sql.gz", outcome="stored", code=250, bytes=1 << 20,
         sha256="ab" * 32)
    _log(site, fps, age=3600, name="db-1.sql.gz", outcome="exists", code=550)
    _log(site, fps, age=30 * 3600, name="old.tar.zst", outcome="stored", code=250, bytes=5)
    rc, out, err = run("--status")
    assert (rc, err) == (0, "")
    vm1 = out.split("box vm2")[0]
    assert "last stored   db-1.sql.gz " in vm1 and "1.0 MiB from 192.0.2.7" in vm1
    assert "last refused  db-1.sql.gz " in vm1 and "550 exists" in vm1
    assert "last 24 h     1 stored, 1 refused" in vm1
    assert f"  {fps['vm1']} vm1 backups  box vm1  last used 20" in out
    assert f"  {fps['vm2']}  box vm2  last used never" in out

    rc, out, _ = run("--status", "vm1", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["ok"] is True and data["stale_after"] is None
    [b] = data["boxes"]
    assert b["box"] == "vm1" and b["configured"] is True
    assert b["last_stored"]["name"] == "db-1.sql.gz" and b["last_stored"]["bytes"] == 1 << 20
    assert b["last_stored"]["peer"] == "192.0.2.7"
    assert abs(b["last_stored"]["timestamp"] - (time.time() - 7200)) < 60
    assert b["last_stored"]["time"][:19] == time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.localtime(b["last_stored"]["timestamp"]))
    assert b["last_refused"]["code"] == 550 and b["last_refused"]["outcome"] == "exists"
    assert (b["stored_24h"], b["refused_24h"]) == (1, 1)
    [k] = data["keys"]
    assert k["fingerprint"] == fps["vm1"] and k["comment"] == "vm1 backups"
    assert k["last_used_timestamp"] == pytest.approx(time.time() - 3600, abs=60)


def test_status_stale_after_flags_an_old_delivery(site: Site, run: Run) -> None:
    fps = good_config(site)
    _log(site, fps, age=2 * 3600, name="a.tar.zst", outcome="stored", code=250, bytes=1)
    _log(site, fps, age=60, box="vm2", name="b", outcome="stored", code=250, bytes=1)
    rc, out, _ = run("--status", "--stale-after", "1h")
    assert rc == 1
    assert "box vm1 STALE\n" in out and "box vm2\n" in out
    rc, out, _ = run("--status", "vm2", "--stale-after", "1h")
    assert rc == 0 and "ok: every box stored a file in the last 60 min" in out
    rc, out, _ = run("--status", "--stale-after", "3h", "--json")
    assert rc == 0 and json.loads(out)["ok"] is True
    rc, out, _ = run("--status", "--stale-after", "1h", "--json")
    data = json.loads(out)
    assert rc == 1 and data["ok"] is False and data["stale_after"] == 3600
    assert [b["box"] for b in data["boxes"] if b["stale"]] == ["vm1"]


def test_status_refusals_do_not_count_as_deliveries(site: Site, run: Run) -> None:
    fps = good_config(site)
    _log(site, fps, age=60, name="x", outcome="refused", code=553)
    rc, out, _ = run("--status", "vm1", "--stale-after", "1h")
    assert rc == 1 and "box vm1 STALE" in out and "553 refused" in out


def test_status_of_an_unknown_box_exits_1(site: Site, run: Run) -> None:
    good_config(site)
    rc, out, err = run("--status", "nosuchbox")
    assert (rc, out) == (1, "")
    assert "nosuchbox" in err


def test_status_shows_a_box_only_in_the_log_and_a_removed_key(site: Site, run: Run) -> None:
    fps = good_config(site) | {"gone": "SHA256:removedkeyfingerprint"}
    _log(site, fps, box="gone", age=60, name="f", outcome="stored", code=250, bytes=1)
    rc, out, _ = run("--status", "--json")
    data = json.loads(out)
    assert rc == 0
    [gone] = [b for b in data["boxes"] if b["box"] == "gone"]
    assert gone["configured"] is False and gone["stale"] is False
    [k] = [k for k in data["keys"] if not k["configured"]]
    assert k["fingerprint"] == "SHA256:removedkeyfingerprint" and k["comment"] == "gone"
    assert run("--status", "gone")[0] == 0


def test_status_bad_stale_after_is_a_usage_error(site: Site, run: Run) -> None:
    good_config(site)
    rc, out, err = run("--status", "--stale-after", "soon")  # a Nagios check: UNKNOWN
    assert (rc, err) == (3, "") and out.startswith("RSTASH UNKNOWN - --stale-after: 'soon'")


def test_status_as_root_leaves_the_service_users_files_alone(site: Site, run: Run) -> None:
    need_root()
    fps = good_config(site)
    _log(site, fps, age=60, name="a.tar.zst", outcome="stored", code=250, bytes=1)
    for p in [site.state, *site.state.iterdir()]:
        os.chown(p, NOBODY, NOBODY)
    rc, out, _ = run("--status")
    assert rc == 0 and "a.tar.zst" in out
    assert all(p.stat().st_uid == NOBODY for p in site.state.iterdir())
    empty = site.root / "empty-state"
    empty.mkdir(mode=0o700)
    os.chown(empty, NOBODY, NOBODY)
    site.write(site.config.read_text().replace(str(site.state), str(empty)))
    assert run("--status")[0] == 0
    assert list(empty.iterdir()) == []


def test_status_after_real_pipe_mode_sessions(site: Site, run: Run, tmp_path: Path) -> None:
    # Real deliveries: rstash-send --stdout writes a pipe-mode stream, the server session
    # reads it in-process (rstash-recv refuses to serve as root; the session does not care).
    from rstash.config import load_config
    from rstash.log import Logger
    from rstash.session import ServerSession
    from rstash.transport import FdStream

    fps = good_config(site)
    site.write(site.config.read_text().replace('keys = ["keys/vm2.key"]',
                                               'keys = ["keys/vm2.key"]\npipe_mode = true\n'
                                               'overwrite = "refuse"'))
    data = tmp_path / "db.sql"
    data.write_bytes(b"hello\n")
    streams = []
    for i in range(2):
        stream = tmp_path / f"stream{i}"
        with stream.open("wb") as fp:
            subprocess.run([sys.executable, "-m", "rstash.send", "--stdout", "-k",
                            str(site.root / "keys" / "vm2.key"), "vm2", str(data)],
                           stdout=fp, env=_env(), check=True, timeout=60)
        streams.append(stream)
    cfg = load_config(site.config)
    for stream in streams:  # the second one is refused: 550 exists
        rfd = os.open(stream, os.O_RDONLY)
        wfd = os.open(tmp_path / "replies", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            ServerSession(cfg, FdStream(rfd, wfd), Logger("stderr", "error"),
                          peer="198.51.100.9").run()
        finally:
            os.close(rfd)
            os.close(wfd)
    assert (site.root / "boxes" / "vm2" / "db.sql").read_bytes() == b"hello\n"
    rc, out, _ = run("--status", "vm2", "--json", "--stale-after", "1h")
    assert rc == 0
    result = json.loads(out)
    [b] = result["boxes"]
    assert b["last_stored"]["name"] == "db.sql" and b["last_stored"]["bytes"] == 6
    assert b["last_stored"]["peer"] == "198.51.100.9"
    assert b["last_refused"]["code"] == 550
    assert (b["stored_24h"], b["refused_24h"]) == (1, 1)
    [k] = result["keys"]
    assert k["fingerprint"] == fps["vm2"] and k["last_used"] is not None


def test_status_runs_as_a_subprocess_for_nagios(site: Site) -> None:
    fps = good_config(site)
    _log(site, fps, age=30 * 3600, name="a.tar.zst", outcome="stored", code=250, bytes=1)
    done = recv_process("--status", "--stale-after", "26h", "-c", str(site.config), cwd=site.root)
    assert done.returncode == 1 and done.stdout.startswith("RSTASH WARNING - ")
    assert "STALE" in done.stdout and done.stderr == ""


# --- the service user and the log target ------------------------------------------------------


def test_root_without_a_service_user_is_warned_about_it(site: Site, run: Run) -> None:
    need_root()
    good_config(site)
    rc, out, err = run("-t")
    assert (rc, out) == (0, "")
    assert err.startswith("rstash-recv: warning: checked as root") and "set service_user in" in err
    rc, recs = check_json(run)
    assert any(r["level"] == "warning" and "service_user" in r["message"] for r in recs)


def test_service_user_setting_is_who_the_checks_are_for(site: Site, run: Run) -> None:
    need_root()
    good_config(site)  # a root-owned box and root-only keys: unusable by nobody
    site.write(site.config.read_text().replace("idle_timeout = 60",
                                               'idle_timeout = 60\nservice_user = "nobody"'))
    rc, _, err = run("-t")
    assert rc == 1 and "checked as root" not in err
    assert f"box vm1: path {site.root}/boxes/vm1 is not writable by nobody" in err
    assert f"key {site.root}/keys/vm1.key is not readable by nobody" in err
    rc, recs = check_json(run)
    assert rc == 1
    assert any(r["message"] == "service user nobody (uid 65534) from service_user" for r in recs)
    assert any(e["box"] is None and e["message"].startswith(f"log {site.root}/rstash-recv.log "
                                                            "does not exist and its directory")
               for e in problems(recs, "error"))
    # --user overrides the setting.
    rc, recs = check_json(run, "--user", "root")
    assert rc == 0 and any(r["message"] == "service user root (uid 0)" for r in recs)


def test_an_unknown_service_user_is_an_error(site: Site, run: Run) -> None:
    good_config(site)
    site.write(site.config.read_text().replace(
        "idle_timeout = 60", 'idle_timeout = 60\nservice_user = "no-such-user-rstash"'))
    rc, _, err = run("-t")
    assert rc == 1
    assert 'service_user = "no-such-user-rstash": no such user' in err


def test_an_unwritable_log_file_is_an_error(site: Site, run: Run) -> None:
    need_root()
    good_config(site)
    for p in [site.root / "boxes" / "vm1", site.root / "boxes" / "vm2", site.state]:
        os.chown(p, NOBODY, NOBODY)
    for k in (site.root / "keys").iterdir():
        os.chown(k, 0, NOBODY)
        k.chmod(0o640)
    log = site.root / "rstash-recv.log"
    log.touch(mode=0o644)  # root's: nobody cannot append
    rc, recs = check_json(run, "--user", "nobody")
    assert rc == 1
    [e] = problems(recs, "error")
    assert e["message"] == f"log {log} is not writable by nobody (owner root, mode 0644)"
    os.chown(log, NOBODY, NOBODY)
    assert check_json(run, "--user", "nobody")[0] == 0


def test_syslog_without_a_socket_is_an_error(site: Site, run: Run,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from rstash import log

    good_config(site)
    site.write(site.config.read_text().replace(f'log = "{site.root}/rstash-recv.log"',
                                               'log = "syslog"'))
    monkeypatch.setattr(log, "DEV_LOG", str(site.root / "no-dev-log"))
    rc, recs = check_json(run)
    assert rc == 1
    [e] = problems(recs, "error")
    assert e["message"].startswith(f'log = "syslog": {site.root}/no-dev-log: No such file')


def test_auto_without_syslog_names_the_fallback_file(site: Site, run: Run,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rstash import log

    good_config(site)
    site.write(site.config.read_text().replace(f'log = "{site.root}/rstash-recv.log"\n', ""))
    monkeypatch.setattr(log, "DEV_LOG", str(site.root / "no-dev-log"))
    rc, recs = check_json(run)
    assert rc == 0
    assert any(r["message"].startswith("log auto:") and
               r["message"].endswith(f"connection) to {site.state}/rstash-recv.log")
               for r in recs)
    site.state.rmdir()  # the fallback cannot be written either: lines would be lost
    rc, recs = check_json(run)
    assert rc == 1
    assert any(e["message"].startswith("log auto: no syslog socket") for e in problems(recs, "error"))
def test_a_box_under_a_directory_others_can_write_is_a_check_config_error(site: Site,
                                                                        run: Run) -> None:
    # A local user could rename vm2 to vm1 there, or plant a directory of their own.
    good_config(site)
    boxes = site.root / "boxes"
    boxes.chmod(0o777)
    rc, recs = check_json(run)
    assert rc == 1, recs
    errs = [r for r in problems(recs, "error") if r["box"] == "vm1"]
    assert any(f"its ancestor {boxes} is writable by everyone" in r["message"] for r in errs), recs


def test_a_box_owned_by_another_user_is_a_check_config_error(site: Site, run: Run) -> None:
    need_root()
    good_config(site)
    os.chown(site.root / "boxes" / "vm1", NOBODY, NOBODY)
    rc, recs = check_json(run, "--user", "root")
    assert rc == 1, recs
    assert any(f"owned by uid {NOBODY}" in r["message"] for r in problems(recs, "error")), recs
    # Root without --user does not know the service user: the box's owner stands in.
    rc, recs = check_json(run)
    assert not any("owned by uid" in r["message"] for r in problems(recs, "error")), recs


def test_a_group_writable_box_is_a_check_config_warning(site: Site, run: Run) -> None:
    good_config(site)
    (site.root / "boxes" / "vm1").chmod(0o770)
    _rc, recs = check_json(run)
    assert any("group-writable" in r["message"] and r["box"] == "vm1"
               for r in problems(recs, "warning")), recs


def test_an_expired_partial_transfer_is_a_warning_and_a_live_one_is_not(site: Site, run: Run) -> None:
    good_config(site)
    parts = site.root / "boxes" / "vm1" / ".rstash-partials"
    parts.mkdir(mode=0o700)
    expired = parts / ("a" * 40 + ".70000000.part")
    expired.write_bytes(b"x" * 10)
    old = time.time() - 2 * 86400  # resume_ttl defaults to 24 h
    os.utime(expired, (old, old))
    (parts / ("b" * 40 + ".70000000.part")).write_bytes(b"live")
    rc, recs = check_json(run)
    assert rc == 0
    [w] = problems(recs, "warning")
    assert w["box"] == "vm1" and w["message"].startswith(f"expired partial transfer {expired} (10 B")
