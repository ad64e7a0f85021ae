"""rstash-send's profiles (rstash/client/profiles.py, rstash-send(1) PROFILES): where the
files are, the refusal of a file others could write, one line per bad field, the
precedence command line > profile > default for every setting, an unknown name, and a
plain send that never loads pydantic nor opens a profile file. Real files, real modes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_support import is_root, need
from rstash import send
from rstash.client import profiles
from rstash.client.options import PROFILE_SETTINGS, Options
from rstash.errors import ConfigError, Exit, UsageError

CHECKOUT = Path(__file__).resolve().parents[2]
KEY_HEX = "00" * 31 + "01"
OTHER_KEY_HEX = "00" * 31 + "02"


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def write_key(path: Path, hex_: str = KEY_HEX) -> Path:
    return write(path, f"rstash-key-v1 {hex_} # {path.name}\n", 0o600)


def run(*args: str | os.PathLike[str]) -> int:
    """rstash-send's main() in this process; argparse's own exits count too."""
    try:
        return send.main([os.fspath(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)


def options(*argv: str | os.PathLike[str]) -> Options:
    """The options rstash-send would run with: the command line merged with its profile."""
    ns = send._parser().parse_args([os.fspath(a) for a in argv])
    return Options.from_namespace(ns, [], send.profile_of(ns))


@pytest.fixture
def no_system_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Root's /etc/rstash/send.toml, moved to where the test decides (absent at first)."""
    path = tmp_path / "etc" / "send.toml"
    monkeypatch.setattr(profiles, "SYSTEM_FILE", path)
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_system_file: Path) -> Path:
    """A home of its own and no XDG_CONFIG_HOME: the user's file is ~/.config/rstash/send.toml."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("RSTASH_KEY_FILE", raising=False)
    monkeypatch.delenv("RSTASH_RSH", raising=False)
    return h


ISSUE_EXAMPLE = """\
[dest.nightly]
url = "ssh://backup@host.example/vm1"
key = "~/.config/rstash/vm1.key"
rsh = "ssh -i ~/.ssh/backup_ed25519"
timeout = 60
"""


# --------------------------------------------------------------------------- where the files are


def test_the_user_file_is_under_xdg_config_home_else_dot_config(tmp_path: Path) -> None:
    sys_file = tmp_path / "etc.toml"
    home = os.path.expanduser("~")
    assert profiles.default_files(euid=1000, environ={"XDG_CONFIG_HOME": "/x/cfg"}, system=sys_file) \
        == [Path("/x/cfg/rstash/send.toml")]
    # Unset, empty and relative values are ignored, as the XDG base directory spec says.
    for environ in ({}, {"XDG_CONFIG_HOME": ""}, {"XDG_CONFIG_HOME": "cfg"}):
        assert profiles.default_files(euid=1000, environ=environ, system=sys_file) \
            == [Path(home, ".config/rstash/send.toml")]


def test_root_reads_the_system_file_first_and_others_never(tmp_path: Path) -> None:
    sys_file = tmp_path / "etc.toml"
    env = {"XDG_CONFIG_HOME": "/x/cfg"}
    assert profiles.default_files(euid=0, environ=env, system=sys_file) \
        == [sys_file, Path("/x/cfg/rstash/send.toml")]
    assert sys_file not in profiles.default_files(euid=1000, environ=env, system=sys_file)


def test_for_root_its_own_profile_replaces_the_system_one_whole(tmp_path: Path) -> None:
    sys_file = write(tmp_path / "etc/send.toml", """
[dest.nightly]
url = "rstash://system.example/vm1"
key = "/etc/rstash/send/vm1.key"
timeout = 5
[dest.weekly]
url = "rstash://system.example/vm2"
""")
    cfg = tmp_path / "cfg"
    write(cfg / "rstash/send.toml", '[dest.nightly]\nurl = "rstash://own.example/vm1"\n')
    found = profiles.load(euid=0, environ={"XDG_CONFIG_HOME": str(cfg)}, system=sys_file)
    nightly = found.get("nightly")
    # No field merging: the system file's key and timeout are gone with its table.
    assert (nightly.url, nightly.key, nightly.timeout) == ("rstash://own.example/vm1", None, None)
    assert nightly.file == cfg / "rstash/send.toml"
    assert found.get("weekly").file == sys_file
    # Not root: the system file is not read at all.
    found = profiles.load(euid=4321 if os.geteuid() != 4321 else 4322,
                          environ={"XDG_CONFIG_HOME": str(cfg)}, system=sys_file)
    assert sorted(found.by_name) == ["nightly"]


def test_the_issue_example_loads_from_the_default_place(home: Path) -> None:
    write(home / ".config/rstash/send.toml", ISSUE_EXAMPLE)
    p = profiles.load().get("nightly")
    assert p.url == "ssh://backup@host.example/vm1"
    assert p.key == str(home / ".config/rstash/vm1.key")  # ~ is the home directory
    assert (p.rsh, p.timeout) == ("ssh -i ~/.ssh/backup_ed25519", 60.0)


def test_a_relative_key_is_beside_the_file(tmp_path: Path) -> None:
    f = write(tmp_path / "conf/p.toml", '[dest.a]\nurl = "rstash://h/vm1"\nkey = "keys/vm1.key"\n')
    assert profiles.load(str(f)).get("a").key == str(tmp_path / "conf/keys/vm1.key")


def test_an_explicit_file_must_exist_a_default_one_need_not(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        profiles.load(str(home / "nope.toml"))
    assert profiles.load().by_name == {}


# --------------------------------------------------------------------------- owner and mode


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640, 0o400, 0o604])
def test_a_file_only_its_owner_can_write_is_accepted(tmp_path: Path, mode: int) -> None:
    f = write(tmp_path / "send.toml", '[dest.a]\nurl = "rstash://h/vm1"\n', mode)
    assert profiles.load(str(f)).get("a").url == "rstash://h/vm1"


@pytest.mark.parametrize(("mode", "who"), [(0o664, "group"), (0o646, "others"),
                                           (0o666, "group and others"), (0o620, "group")])
def test_a_file_others_can_write_is_refused_with_the_fix(tmp_path: Path, mode: int, who: str,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path / "send.toml", '[dest.a]\nurl = "rstash://h/vm1"\n', mode)
    with pytest.raises(ConfigError) as e:
        profiles.load(str(f))
    (line,) = e.value.problems
    assert line == (f"{f}: writable by {who} (mode {mode:04o}), and it names commands rstash-send "
                    f"runs: refused; run: chmod go-w {f}")
    # Through the command line: exit 2, that one line.
    assert run("-F", f, "a", "x") == Exit.LOCAL
    assert capfd.readouterr().err == f"rstash-send: {line}\n"


def test_a_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    f = write(tmp_path / "send.toml", '[dest.a]\nurl = "rstash://h/vm1"\n')
    owner = f.stat().st_uid
    other = 4321 if owner != 4321 else 4322
    if owner == 0:
        # Root's file is everyone's to trust: root can write any file anyway.
        assert profiles.load(str(f), euid=other).get("a")
    else:
        with pytest.raises(ConfigError, match=rf"owned by .*, not by you .* or root, .*refused; "
                                              rf"run: chown .* {f}\Z"):
            profiles.load(str(f), euid=other)


def test_a_file_chowned_to_another_user_is_refused(tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    need(is_root(), "chown to another user needs root")
    f = write(tmp_path / "send.toml", '[dest.a]\nurl = "rstash://h/vm1"\n')
    os.chown(f, 4321, -1)
    assert run("-F", f, "a", "x") == Exit.LOCAL
    err = capfd.readouterr().err
    assert err == (f"rstash-send: {f}: owned by uid 4321, not by root, and it names commands "
                   f"rstash-send runs: refused; run: chown root {f}\n")
    # The same file is that user's own: accepted for them, and root's is accepted for anyone.
    assert profiles.load(str(f), euid=4321).get("a")
    os.chown(f, 0, -1)
    assert profiles.load(str(f), euid=4321).get("a")


def test_a_symlink_is_judged_by_the_file_it_reaches(tmp_path: Path) -> None:
    target = write(tmp_path / "real.toml", '[dest.a]\nurl = "rstash://h/vm1"\n')
    link = tmp_path / "send.toml"
    link.symlink_to(target)
    assert profiles.load(str(link)).get("a")
    target.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group and others"):
        profiles.load(str(link))


def test_a_directory_or_a_fifo_is_not_a_profile_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo, 0o600)
    # A FIFO nobody writes to would block a plain open(): refused at once instead.
    for path in (tmp_path, fifo):
        with pytest.raises(ConfigError, match="not a regular file"):
            profiles.load(str(path))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("body", "field", "message"), [
    ('url = "rstash://h/vm1"\ntimeout = "fast"', "dest.a.timeout", "'fast' is not a duration"),
    ('url = "rstash://h/vm1"\ntimeout = 0', "dest.a.timeout", "must be longer than 0 seconds"),
    ('url = "rstash://h/vm1"\nconnect_timeout = true', "dest.a.connect_timeout",
     "a duration must be a number"),
    ('url = "rstash://h/vm1"\nbusy_wait = -1', "dest.a.busy_wait", "cannot be negative"),
    ('url = "rstash://h/vm1"\nbwlimit = "fast"', "dest.a.bwlimit", "'fast' is not a size"),
    ('url = "rstash://h/vm1"\nsubsystem = "yes"', "dest.a.subsystem", "must be true or false"),
    ('url = "rstash://h/vm1"\nrsh = ""', "dest.a.rsh", "must not be empty"),
    ('url = "rstash://h/vm1"\nrsh = "ssh \'open"', "dest.a.rsh", "cannot be split into words"),
    ('url = "rstash://h/vm1"\nkey = 7', "dest.a.key", "must be a string, not an integer"),
    ('url = "rstash://h/vm1"\nproxy_command = ""', "dest.a.proxy_command", "must not be empty"),
    ('url = "rstash://h/vm1"\nremote_path = ["r"]', "dest.a.remote_path",
     "must be a string, not an array"),
    ('url = "rstash://h/vm1"\nserver_id = "a\\u0007b"', "dest.a.server_id",
     "must not contain control characters"),
    ('url = "rstash://h/vm1"\nport = 22', "dest.a.port", "unknown key"),
    ('key = "k"', "dest.a.url", "required: rstash://HOST[:PORT]/BOX or ssh://[USER@]HOST[:PORT]/BOX"),
    ('url = "http://h/vm1"', "dest.a.url", "http://h/vm1: not a destination"),
    ('url = "ssh://-oProxyCommand=x/vm1"', "dest.a.url", "begins with '-': refused"),
    ('url = "rstash://h/../etc"', "dest.a.url", "not a destination"),
])
def test_a_bad_field_is_one_line_naming_file_and_field(tmp_path: Path, body: str, field: str,
                                                       message: str) -> None:
    f = write(tmp_path / "send.toml", f"[dest.a]\n{body}\n")
    with pytest.raises(ConfigError) as e:
        profiles.load(str(f))
    (line,) = e.value.problems
    assert line.startswith(f"{f}: {field}: ") and message in line, line
    assert "\n" not in line


def test_every_problem_of_the_file_is_reported_and_nothing_is_sent(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path / "send.toml", """\
top = 1
[dest.good]
url = "rstash://h/vm1"
[dest.a]
url = "rstash://h/vm1"
timeout = "soon"
[dest.b]
key = "k"
[dest."bad name"]
url = "rstash://h/vm1"
[dest.c.d]
url = "rstash://h/vm1"
[dest.e]
url = "rstash://h/vm1"
bwlimit = "1 furlong"
""")
    # Even the good profile is not used while the file has problems.
    assert run("-F", f, "good", f) == Exit.LOCAL
    lines = capfd.readouterr().err.splitlines()
    assert [ln.split(": ", 3)[:3] for ln in lines] == [
        ["rstash-send", str(f), field] for field in
        ("top", "dest.a.timeout", "dest.b.url", 'dest."bad name"', "dest.c.d", "dest.e.bwlimit")]
    assert 'write [dest."c.d"] for a name with dots' in lines[4]


@pytest.mark.parametrize(("text", "where"), [
    ('[dest.a]\nurl = "rstash://h/vm1"\nurl = "x"\n', "line 3"),
    ('[dest.a\n', "line 1"),
    ('dest = 3\n', "dest"),
    ('[dest]\na = 3\n', "dest.a"),
])
def test_a_file_that_is_not_profiles_is_one_line(tmp_path: Path, text: str, where: str) -> None:
    f = write(tmp_path / "send.toml", text)
    with pytest.raises(ConfigError) as e:
        profiles.load(str(f))
    (line,) = e.value.problems
    assert line.startswith(f"{f}: {where}: "), line


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "send.toml"
    f.write_bytes(b'[dest.a]\nurl = "rstash://h/\xff"\n')
    f.chmod(0o600)
    with pytest.raises(ConfigError, match=rf"\A{f}: line 2: not valid UTF-8\Z"):
        profiles.load(str(f))


def test_the_shipped_example_validates_with_its_paths_moved(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    text = (CHECKOUT / "config/send.toml").read_text(encoding="utf-8")
    assert "/etc/rstash/send/" in text
    moved = write(tmp_path / "send.toml", text.replace("/etc/rstash/send/", f"{tmp_path}/keys/"))
    found = profiles.load(str(moved))
    assert sorted(found.by_name) == ["db", "nightly", "vm2"]
    assert found.get("vm2").key is None  # an ssh-only box: the SSH login is the secret
    # Every setting a profile can hold appears in the example, set or commented out.
    for setting in PROFILE_SETTINGS:
        assert f"\n{setting} = " in text or f"\n# {setting} = " in text, setting
    # Each profile's key is where the example says; with the keys there, --fingerprint
    # through the profile reads them.
    for name, hex_ in (("nightly", KEY_HEX), ("db", OTHER_KEY_HEX)):
        key = found.get(name).key
        assert key is not None and key.startswith(str(tmp_path))
        write_key(Path(key), hex_)
        assert run("-F", moved, "--fingerprint", name) == Exit.OK
    nightly_fp, db_fp = capfd.readouterr().out.splitlines()
    assert nightly_fp != db_fp and "SHA256:" in nightly_fp


# --------------------------------------------------------------------------- precedence

#: setting: (TOML value, what the profile gives, command line, what it gives, the default)
PRECEDENCE: dict[str, tuple[str, object, list[str], object, object]] = {
    "key": ('"/p/vm1.key"', "/p/vm1.key", ["-k", "/c/vm1.key"], "/c/vm1.key", None),
    "rsh": ('"ssh -p 2"', "ssh -p 2", ["-e", "ssh -p 3"], "ssh -p 3", None),
    "remote_path": ('"/opt/rstash-recv"', "/opt/rstash-recv", ["--remote-path", "/usr/r"], "/usr/r",
                    "rstash-recv"),
    "subsystem": ("true", True, ["--no-subsystem"], False, False),
    "proxy_command": ('"nc %h %p"', "nc %h %p", ["--proxy-command", ""], "", None),
    "connect_timeout": ('"1m"', 60.0, ["--connect-timeout", "5"], 5.0, 30.0),
    "timeout": ("60", 60.0, ["--timeout", "7.5"], 7.5, 120.0),
    "busy_wait": ("0", 0.0, ["--busy-wait", "9"], 9.0, 120.0),
    "bwlimit": ('"1KiB"', 1024, ["--bwlimit", "0"], 0, None),
    "server_id": ('"profile.example"', "profile.example", ["--server-id", "cli.example"],
                  "cli.example", None),
}


def test_the_precedence_table_covers_every_setting() -> None:
    assert set(PRECEDENCE) == set(PROFILE_SETTINGS)


@pytest.mark.parametrize("setting", sorted(PRECEDENCE))
def test_option_beats_profile_beats_default(setting: str, tmp_path: Path, home: Path) -> None:
    toml, from_profile, cli, from_cli, default = PRECEDENCE[setting]
    f = write(tmp_path / "send.toml", f'[dest.p]\nurl = "rstash://h/vm1"\n{setting} = {toml}\n'
                                      '[dest.bare]\nurl = "rstash://h/vm2"\n')
    assert getattr(options("-F", f, "p", "x"), setting) == from_profile
    assert getattr(options("-F", f, *cli, "p", "x"), setting) == from_cli
    assert getattr(options("-F", f, "bare", "x"), setting) == default
    assert getattr(options("rstash://h/vm1", "x"), setting) == default
    assert getattr(options(*cli, "rstash://h/vm1", "x"), setting) == from_cli


def test_the_profile_url_is_the_destination(tmp_path: Path) -> None:
    f = write(tmp_path / "send.toml", '[dest.p]\nurl = "ssh://u@h:2222/vm1"\n')
    opts = options("-F", f, "p", "a", "b")
    assert (opts.dest, opts.profile, opts.files) == ("ssh://u@h:2222/vm1", "p", ("a", "b"))
    # A URL with -F: the file is read (and must be valid), the URL is the destination.
    opts = options("-F", f, "rstash://other/vm2", "a")
    assert (opts.dest, opts.profile) == ("rstash://other/vm2", None)


def test_the_profile_key_beats_rstash_key_file(tmp_path: Path, home: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    prof_key = write_key(tmp_path / "profile.key", KEY_HEX)
    env_key = write_key(tmp_path / "env.key", OTHER_KEY_HEX)
    cli_key = write_key(tmp_path / "cli.key", "00" * 31 + "03")
    write(home / ".config/rstash/send.toml", f'[dest.p]\nurl = "rstash://h/vm1"\nkey = "{prof_key}"\n'
                                             '[dest.q]\nurl = "rstash://h/vm1"\n')
    monkeypatch.setenv("RSTASH_KEY_FILE", str(env_key))
    fingerprints = {}
    for path in (prof_key, env_key, cli_key):
        assert run("--fingerprint", "-k", path) == Exit.OK
        fingerprints[capfd.readouterr().out] = path
    assert run("--fingerprint", "p") == Exit.OK
    assert fingerprints[capfd.readouterr().out] == prof_key
    assert run("--fingerprint", "-k", cli_key, "p") == Exit.OK
    assert fingerprints[capfd.readouterr().out] == cli_key
    # A profile without a key: the environment's.
    assert run("--fingerprint", "q") == Exit.OK
    assert fingerprints[capfd.readouterr().out] == env_key


def test_the_profile_rsh_beats_rstash_rsh(tmp_path: Path, home: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The ssh command actually run: -e, else the profile's, else RSTASH_RSH."""
    records = {}
    for who in ("env", "profile", "cli"):
        record = tmp_path / f"{who}.argv"
        script = write(tmp_path / f"{who}-ssh", f"#!{sys.executable}\nimport json, sys\n"
                       f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\nsys.exit(255)\n",
                       0o755)
        records[who] = (script, record)
    key = write_key(tmp_path / "vm1.key")
    afile = write(tmp_path / "a.txt", "hello\n")
    write(home / ".config/rstash/send.toml",
          f'[dest.p]\nurl = "ssh://h/vm1"\nkey = "{key}"\nrsh = "{records["profile"][0]} -v"\n'
          f'[dest.q]\nurl = "ssh://h/vm1"\nkey = "{key}"\n')
    monkeypatch.setenv("RSTASH_RSH", str(records["env"][0]))
    assert run("p", afile) == Exit.TRANSPORT
    assert json.loads(records["profile"][1].read_text())[0] == "-v"
    assert run("-e", f"{records['cli'][0]} -q", "p", afile) == Exit.TRANSPORT
    assert json.loads(records["cli"][1].read_text())[0] == "-q"
    assert not records["env"][1].exists()
    assert run("q", afile) == Exit.TRANSPORT
    assert records["env"][1].exists()


# --------------------------------------------------------------------------- names


def test_an_unknown_profile_exits_2_listing_the_known(tmp_path: Path, home: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    f = write(home / ".config/rstash/send.toml",
              '[dest.weekly]\nurl = "rstash://h/vm1"\n[dest.nightly]\nurl = "rstash://h/vm1"\n')
    assert run("nighlty", "x") == Exit.LOCAL
    assert capfd.readouterr().err == (f"rstash-send: unknown profile 'nighlty': known profiles are "
                                      f"nightly, weekly (in {f})\n")


def test_an_unknown_profile_without_any_file_says_where_it_looked(
        home: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert run("nightly", "x") == Exit.LOCAL
    err = capfd.readouterr().err
    assert err.startswith("rstash-send: unknown profile 'nightly': no profiles in ") and err.count("\n") == 1
    assert str(home / ".config/rstash/send.toml") in err and "'://'" in err


@pytest.mark.parametrize("dest", ["/var/backups/db.sql.gz", "rstash:/h/vm1", "-x", "a b", "host:vm1"])
def test_a_dest_neither_url_nor_profile_name_is_refused_without_reading(
        dest: str, home: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # A profile file that would be refused, were it read.
    write(home / ".config/rstash/send.toml", "not toml", 0o666)
    with pytest.raises(UsageError, match="not a destination"):
        send.profile_of(send._parser().parse_args(["--", dest] if dest.startswith("-") else [dest]))


def test_stdout_box_is_never_a_profile(tmp_path: Path, home: Path) -> None:
    write(home / ".config/rstash/send.toml", '[dest.vm1]\nurl = "rstash://h/other"\n')
    opts = options("--stdout", "vm1", "x")
    assert (opts.dest, opts.profile) == ("vm1", None)
    with pytest.raises(UsageError, match="-F: profiles do not apply to --stdout"):
        options("-F", home / ".config/rstash/send.toml", "--stdout", "vm1", "x")


# --------------------------------------------------------------------------- --profiles


def test_profiles_lists_name_url_and_key(tmp_path: Path, home: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    f = write(home / ".config/rstash/send.toml", ISSUE_EXAMPLE + """
[dest.db]
url = "rstash://backup.example/db1"
bwlimit = "1MiB"
""")
    assert run("--profiles") == Exit.OK
    assert capfd.readouterr().out == (
        "db       rstash://backup.example/db1    -\n"
        f"nightly  ssh://backup@host.example/vm1  {home}/.config/rstash/vm1.key\n")
    assert run("--profiles", "--json") == Exit.OK
    db, nightly = (json.loads(x) for x in capfd.readouterr().out.splitlines())
    assert db == {"name": "db", "url": "rstash://backup.example/db1", "file": str(f), "key": None,
                  "rsh": None, "remote_path": None, "subsystem": None, "proxy_command": None,
                  "connect_timeout": None, "timeout": None, "busy_wait": None, "bwlimit": 1048576,
                  "server_id": None}
    assert (nightly["name"], nightly["timeout"], nightly["rsh"]) == ("nightly", 60.0,
                                                                     "ssh -i ~/.ssh/backup_ed25519")


def test_profiles_with_no_file_says_so_and_succeeds(home: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert run("--profiles") == Exit.OK
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("rstash-send: no profiles in ")
    assert run("--profiles", "nightly") == Exit.LOCAL


def test_profiles_reports_a_bad_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path / "send.toml", '[dest.a]\nurl = "rstash://h/vm1"\ntimeout = -3\n')
    assert run("-F", f, "--profiles") == Exit.LOCAL
    assert capfd.readouterr().err.startswith(f"rstash-send: {f}: dest.a.timeout: ")


# --------------------------------------------------------------------------- the hot path

PROBE = r"""
import json, sys
opened = []
def audit(event, args):
    if event == "open" and "send.toml" in str(args[0]):
        opened.append(str(args[0]))
sys.addaudithook(audit)
from rstash import send
rc = send.main(sys.argv[1:])
loaded = sorted(m for m in ("pydantic", "rstash.config", "rstash.client.profiles") if m in sys.modules)
print(json.dumps({"rc": rc, "opened": opened, "loaded": loaded}))
"""


def probe(args: list[str], env: dict[str, str]) -> dict[str, object]:
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                       env=env, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    result: dict[str, object] = json.loads(p.stdout.splitlines()[-1])
    return result


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_a_plain_send_loads_no_pydantic_and_opens_no_profile_file(tmp_path: Path) -> None:
    key = write_key(tmp_path / "vm1.key")
    afile = write(tmp_path / "a.txt", "hello\n")
    cfg = tmp_path / "cfg"
    url = f"rstash://127.0.0.1:{closed_port()}/vm1"
    write(cfg / "rstash/send.toml", f'[dest.local]\nurl = "{url}"\nkey = "{key}"\n')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "XDG_CONFIG_HOME": str(cfg), "PYTHONPATH": str(CHECKOUT)}
    for args in (["-k", str(key), "--busy-wait", "0", url, str(afile)],
                 ["--test", "-k", str(key), url],
                 ["--fingerprint", "-k", str(key)]):
        got = probe(args, env)
        assert got["opened"] == [] and got["loaded"] == [], (args, got)
        assert got["rc"] in (Exit.OK, Exit.TRANSPORT), (args, got)
    # The probe sees them when a profile is used: the same send through the profile.
    got = probe(["local", str(afile)], env)
    assert got["rc"] == Exit.TRANSPORT
    assert got["loaded"] == ["pydantic", "rstash.client.profiles", "rstash.config"]
    assert str(cfg / "rstash/send.toml") in got["opened"]  # type: ignore[operator]
