"""rstash-recv.toml: loading, [defaults], include, cross-checks and one-line errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest

from rstash.config import (
    BoxConfig,
    Config,
    dump_config,
    load_config,
    parse_duration,
    parse_size,
)
from rstash.errors import ConfigError

# The example of rstash-recv.toml(5) EXAMPLE, with {tmp} standing for the test's directory.
MANUAL_EXAMPLE = """\
state_dir = "{tmp}/state"          # SQLite: replay cache and delivery log
log = "auto"
log_level = "info"
syslog_facility = "daemon"
include = ["boxes.d/*.toml"]
preauth_timeout = 10
idle_timeout = 60
replay_window = 300
max_sessions = 64
max_preauth_per_peer = 4
hook_timeout = 60
server_id = ""

[defaults]
root = "{tmp}/srv"
overwrite = "refuse"
file_mode = "0640"

[box.vm1]
path = "{tmp}/srv/vm1"
keys = ["/etc/rstash/keys/vm1.key", "/etc/rstash/keys/vm1-next.key"]
allow_names = ["*.tar.zst", "db-*.sql.gz"]
deny_names = ["*.tmp"]
overwrite = "refuse"
max_file_size = "50GiB"
quota = "500GiB"
min_free = "5GiB"
file_mode = "0640"
allow_from = ["192.0.2.0/24", "2001:db8::/32"]
pipe_mode = false
on_receive = ["/usr/local/sbin/backup-arrived", "{box}", "{name}", "{path}"]
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_file(tmp_path: Path, text: str, name: str = "rstash-recv.toml") -> Path:
    return write(tmp_path / name, text.replace("{tmp}", str(tmp_path)))


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def minimal_box(name: str = "vm1", path: str = "/srv/rstash/vm1", key: str = "/k/vm1.key") -> str:
    return f'[box.{name}]\npath = "{path}"\nkeys = ["{key}"]\n'


# --- the manual's example --------------------------------------------------


def test_manual_example_loads_with_every_setting(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, MANUAL_EXAMPLE)
    write(tmp_path / "boxes.d" / "vm2.toml", '[box.vm2]\nkeys = ["/etc/rstash/keys/vm2.key"]\n')

    cfg = load_config(cfg_path)

    assert isinstance(cfg, Config)
    assert cfg.source == cfg_path
    assert cfg.state_dir == tmp_path / "state"
    assert (cfg.log, cfg.log_level, cfg.syslog_facility) == ("auto", "info", "daemon")
    assert (cfg.preauth_timeout, cfg.idle_timeout, cfg.hook_timeout) == (10.0, 60.0, 60.0)
    assert (cfg.replay_window, cfg.max_sessions, cfg.max_preauth_per_peer) == (300, 64, 4)
    assert cfg.server_id == ""
    assert cfg.warnings == ()
    assert list(cfg.boxes) == ["vm1", "vm2"]
    vm1 = cfg.boxes["vm1"]
    assert vm1 == BoxConfig(
        name="vm1",
        path=tmp_path / "srv" / "vm1",
        keys=(Path("/etc/rstash/keys/vm1.key"), Path("/etc/rstash/keys/vm1-next.key")),
        allow_names=("*.tar.zst", "db-*.sql.gz"),
        deny_names=("*.tmp",),
        overwrite="refuse",
        max_file_size=50 * 2**30,
        quota=500 * 2**30,
        min_free=5 * 2**30,
        file_mode=0o640,
        allow_from=(
            ipaddress.ip_network("192.0.2.0/24"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
        pipe_mode=False,
        on_receive=("/usr/local/sbin/backup-arrived", "{box}", "{name}", "{path}"),
        source=cfg_path,
    )
    vm2 = cfg.boxes["vm2"]
    assert vm2.path == tmp_path / "srv" / "vm2"
    assert vm2.source == tmp_path / "boxes.d" / "vm2.toml"


def test_defaults_of_an_almost_empty_config(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, minimal_box()))
    assert cfg.state_dir == Path("/var/lib/rstash")
    assert (cfg.log, cfg.log_level, cfg.syslog_facility, cfg.server_id) == (
        "auto", "info", "daemon", "")
    assert (cfg.preauth_timeout, cfg.idle_timeout, cfg.hook_timeout) == (10.0, 60.0, 60.0)
    assert (cfg.replay_window, cfg.max_sessions, cfg.max_preauth_per_peer) == (300, 64, 4)
    box = cfg.boxes["vm1"]
    assert box.overwrite == "refuse"
    assert box.file_mode == 0o640
    assert box.pipe_mode is False
    assert box.on_receive is None
    assert (box.max_file_size, box.quota, box.min_free) == (None, None, None)
    assert (box.allow_names, box.deny_names, box.allow_from) == ((), (), ())


def test_config_and_box_are_frozen(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, minimal_box()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.idle_timeout = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.boxes["vm1"].overwrite = "replace"  # type: ignore[misc]


def test_load_config_never_looks_at_box_dirs_or_key_files(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, minimal_box(path="/nonexistent/box", key="/no/key")))
    assert cfg.boxes["vm1"].path == Path("/nonexistent/box")


def test_a_relative_key_path_is_beside_its_config_file(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, '[box.a]\npath = "/srv/a"\nkeys = ["keys/a.key"]\n'))
    assert cfg.boxes["a"].keys == (tmp_path / "keys" / "a.key",)


def test_quoted_box_name_with_dots_is_a_box(tmp_path: Path) -> None:
    text = '[box."db.example"]\npath = "/srv/db"\nkeys = ["/k"]\n'
    cfg = load_config(config_file(tmp_path, text))
    assert list(cfg.boxes) == ["db.example"]


def test_dump_config_is_json_with_octal_mode_and_int_sizes(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, MANUAL_EXAMPLE)
    dumped = dump_config(load_config(cfg_path))
    assert json.loads(json.dumps(dumped)) == dumped
    vm1 = dumped["boxes"]["vm1"]
    assert vm1["file_mode"] == "0640"
    assert vm1["max_file_size"] == 50 * 2**30
    assert vm1["path"] == str(tmp_path / "srv" / "vm1")
    assert vm1["allow_from"] == ["192.0.2.0/24", "2001:db8::/32"]
    assert vm1["source"] == str(cfg_path)
    assert dumped["state_dir"] == str(tmp_path / "state")
    assert dumped["replay_window"] == 300


# --- [defaults] ----------------------------------------------------------------


def test_defaults_apply_to_every_box_and_a_box_overrides_them(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, """\
[defaults]
root = "/srv/rstash"
overwrite = "rename"
max_file_size = "1GiB"
quota = "10GB"
min_free = 1000
file_mode = "0600"
allow_names = ["*.gz"]
deny_names = ["*.tmp"]
allow_from = ["10.0.0.0/8"]
pipe_mode = true
on_receive = ["/usr/bin/logger", "{box}"]

[box.plain]
keys = ["/k/plain"]

[box.own]
path = "/data/own"
keys = ["/k/own"]
overwrite = "replace"
max_file_size = "2GiB"
file_mode = "0644"
allow_names = []
pipe_mode = false
on_receive = []
""")
    cfg = load_config(cfg_path)
    plain, own = cfg.boxes["plain"], cfg.boxes["own"]

    assert plain.path == Path("/srv/rstash/plain")
    assert plain.overwrite == "rename"
    assert plain.max_file_size == 2**30
    assert plain.quota == 10 * 10**9
    assert plain.min_free == 1000
    assert plain.file_mode == 0o600
    assert plain.allow_names == ("*.gz",)
    assert plain.deny_names == ("*.tmp",)
    assert plain.allow_from == (ipaddress.ip_network("10.0.0.0/8"),)
    assert plain.pipe_mode is True
    assert plain.on_receive == ("/usr/bin/logger", "{box}")

    assert own.path == Path("/data/own")
    assert own.overwrite == "replace"
    assert own.max_file_size == 2 * 2**30
    assert own.quota == 10 * 10**9
    assert own.file_mode == 0o644
    assert own.allow_names == ()
    assert own.deny_names == ("*.tmp",)
    assert own.pipe_mode is False
    assert own.on_receive is None  # an empty list turns the default hook off


def test_box_without_path_needs_a_root(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, '[box.vm1]\nkeys = ["/k"]\n')
    assert problems_of(cfg_path) == [
        f"{cfg_path}: box.vm1.path: missing, and [defaults] has no root to put the box in"
    ]


# --- sizes and durations ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1234, 1234),
        ("1234", 1234),
        ("7B", 7),
        ("1KiB", 1024),
        ("1MiB", 1024**2),
        ("50GiB", 50 * 1024**3),
        ("2TiB", 2 * 1024**4),
        ("1KB", 1000),
        ("3MB", 3 * 1000**2),
        ("5GB", 5 * 1000**3),
        ("1TB", 1000**4),
        ("20 MiB", 20 * 1024**2),
        ("1.5GiB", 3 * 2**29),
        ("0.5KB", 500),
    ],
)
def test_parse_size_understands_every_unit(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GiB", "-1", "1.5", "5 gib", "5gb", "5Kib", "5 PiB", "1e9", "ten", "5GiB!"]
)
def test_parse_size_refuses_garbage_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a size|whole|negative"):
        parse_size(text)


@pytest.mark.parametrize("value", [-1, True, 1.5, None, [1]])
def test_parse_size_refuses_non_sizes(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)  # type: ignore[arg-type]


def test_parse_size_refuses_more_than_off_t_holds() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_size("9000000TiB")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (10, 10.0),
        (2.5, 2.5),
        ("10", 10.0),
        ("45s", 45.0),
        ("5m", 300.0),
        ("1.5m", 90.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        (" 30 s ", 30.0),
    ],
)
def test_parse_duration_understands_seconds_and_units(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5x", "5 min", "-1", "", True, -3, float("nan")])
def test_parse_duration_refuses_garbage(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)  # type: ignore[arg-type]


def test_durations_in_the_config_accept_units(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, 'idle_timeout = "2m"\npreauth_timeout = 5.5\n'
                                  'hook_timeout = "1h"\nreplay_window = "10m"\n'
                                  + minimal_box()))
    assert (cfg.idle_timeout, cfg.preauth_timeout, cfg.hook_timeout) == (120.0, 5.5, 3600.0)
    assert cfg.replay_window == 600


@pytest.mark.parametrize("value", ["29", "3601", '"1h1s"', '"30.5"', "0"])
def test_replay_window_outside_30_to_3600_is_refused(tmp_path: Path, value: str) -> None:
    cfg_path = config_file(tmp_path, f"replay_window = {value}\n" + minimal_box())
    [problem] = problems_of(cfg_path)
    assert problem.startswith(f"{cfg_path}: replay_window: ")


def test_a_zero_timeout_is_refused(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, "idle_timeout = 0\n" + minimal_box())
    assert problems_of(cfg_path) == [
        f"{cfg_path}: idle_timeout: must be longer than 0 seconds"
    ]


# --- file_mode -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"), [("0640", 0o640), ("0644", 0o644), ("0600", 0o600), ("440", 0o440)]
)
def test_file_mode_without_execute_or_special_bits_is_accepted(
    tmp_path: Path, text: str, mode: int
) -> None:
    cfg = load_config(config_file(tmp_path, minimal_box() + f'file_mode = "{text}"\n'))
    assert cfg.boxes["vm1"].file_mode == mode


@pytest.mark.parametrize("text", ['"0755"', '"4640"', '"0641"', '"2640"', '"1640"', '"0650"',
                                  '"rw-r-----"', '"0648"', '"06400"', "640", "0o640"])
def test_file_mode_with_execute_or_special_bits_is_refused(tmp_path: Path, text: str) -> None:
    cfg_path = config_file(tmp_path, minimal_box() + f"file_mode = {text}\n")
    [problem] = problems_of(cfg_path)
    assert problem.startswith(f"{cfg_path}: box.vm1.file_mode: ")


@pytest.mark.parametrize(("text", "digits"), [("0640", "0640"), ("0600  # owner only", "0600")])
def test_an_unquoted_file_mode_says_how_to_write_it(tmp_path: Path, text: str, digits: str) -> None:
    # TOML has no leading-zero integers: the parser's own words would not help.
    cfg_path = config_file(tmp_path, minimal_box() + f"file_mode = {text}\n")
    [problem] = problems_of(cfg_path)
    assert problem.startswith(f"{cfg_path}: line ")
    assert problem.endswith(f': file_mode must be a quoted octal string, e.g. file_mode = "{digits}"')


def test_an_integer_file_mode_says_how_to_write_it(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, minimal_box() + "file_mode = 640\n")
    assert problems_of(cfg_path) == [f'{cfg_path}: box.vm1.file_mode: must be a quoted octal '
                                     f'string, e.g. file_mode = "0640", not an integer']


# --- errors: file, field, one line each ---------------------------------------------

# (config text, extra files, expected problem: (file relative to tmp_path, field, words))
BAD_CONFIGS: dict[str, tuple[str, dict[str, str], tuple[str, str, str]]] = {
    "unknown top-level key": (
        "idle_timout = 60\n" + minimal_box(), {},
        ("rstash-recv.toml", "idle_timout", "unknown key"),
    ),
    "unknown box key": (
        minimal_box() + 'authz = "ssh"\n', {},
        ("rstash-recv.toml", "box.vm1.authz", "unknown key"),
    ),
    "bad overwrite": (
        minimal_box() + 'overwrite = "clobber"\n', {},
        ("rstash-recv.toml", "box.vm1.overwrite", "'refuse', 'replace' or 'rename'"),
    ),
    "bad size": (
        minimal_box() + 'quota = "lots"\n', {},
        ("rstash-recv.toml", "box.vm1.quota", "not a size"),
    ),
    "bad CIDR": (
        minimal_box() + 'allow_from = ["192.0.2.1/24"]\n', {},
        ("rstash-recv.toml", "box.vm1.allow_from", "host bits set"),
    ),
    "not an address": (
        minimal_box() + 'allow_from = ["example.org"]\n', {},
        ("rstash-recv.toml", "box.vm1.allow_from", "not an IP network"),
    ),
    "replay_window 10": (
        "replay_window = 10\n" + minimal_box(), {},
        ("rstash-recv.toml", "replay_window", "between 30 and 3600"),
    ),
    "keyless box": (
        '[box.vm1]\npath = "/srv/vm1"\n', {},
        ("rstash-recv.toml", "box.vm1.keys", "at least one key"),
    ),
    "empty key list": (
        '[box.vm1]\npath = "/srv/vm1"\nkeys = []\n', {},
        ("rstash-recv.toml", "box.vm1.keys", "at least one key"),
    ),
    "relative path": (
        minimal_box(path="srv/vm1"), {},
        ("rstash-recv.toml", "box.vm1.path", "absolute"),
    ),
    "dot-dot in path": (
        minimal_box(path="/srv/../etc"), {},
        ("rstash-recv.toml", "box.vm1.path", "'..'"),
    ),
    "overlapping paths": (
        minimal_box("a", "/srv/x") + minimal_box("b", "/srv/x/", "/k/b"), {},
        ("rstash-recv.toml", "box.b.path", "same directory as box a"),
    ),
    "nested paths": (
        minimal_box("outer", "/srv/x") + minimal_box("inner", "/srv/x/y/z", "/k/b"), {},
        ("rstash-recv.toml", "box.inner.path", "inside box outer"),
    ),
    "state_dir inside a box": (
        'state_dir = "/srv/rstash/vm1/.state"\n' + minimal_box(), {},
        ("rstash-recv.toml", "state_dir", "inside box vm1"),
    ),
    "box inside state_dir": (
        'state_dir = "/var/lib/rstash"\n' + minimal_box(path="/var/lib/rstash/box"), {},
        ("rstash-recv.toml", "box.vm1.path", "inside state_dir"),
    ),
    "bad box name": (
        minimal_box('"vm 1"'), {},
        ("rstash-recv.toml", 'box."vm 1"', "invalid box name"),
    ),
    "box name with a leading dash": (
        minimal_box("-vm1"), {},
        ("rstash-recv.toml", "box.-vm1", "invalid box name"),
    ),
    "dotted box name": (
        minimal_box("a.b"), {},
        ("rstash-recv.toml", "box.a.b", 'write [box."a.b"] for a box name with dots'),
    ),
    "TOML syntax error": (
        minimal_box() + "overwrite = refuse\n", {},
        ("rstash-recv.toml", "line 4", "invalid value"),
    ),
    "include duplicate": (
        'include = ["boxes.d/*.toml"]\n' + minimal_box(),
        {"boxes.d/again.toml": minimal_box(path="/srv/other")},
        ("boxes.d/again.toml", "box.vm1", "already defined in {tmp}/rstash-recv.toml"),
    ),
    "include file with a top-level key": (
        'include = ["boxes.d/*.toml"]\n' + minimal_box(),
        {"boxes.d/x.toml": "idle_timeout = 5\n" + minimal_box("x", "/srv/x", "/k/x")},
        ("boxes.d/x.toml", "idle_timeout", "only [box.NAME] tables"),
    ),
    "include file with defaults": (
        'include = ["boxes.d/*.toml"]\n' + minimal_box(),
        {"boxes.d/x.toml": '[defaults]\noverwrite = "replace"\n'},
        ("boxes.d/x.toml", "defaults", "only [box.NAME] tables"),
    ),
    "include of a missing file": (
        'include = ["boxes.d/vm9.toml"]\n' + minimal_box(), {},
        ("rstash-recv.toml", "include", "No such file or directory"),
    ),
    "bad log level": (
        'log_level = "verbose"\n' + minimal_box(), {},
        ("rstash-recv.toml", "log_level", "debug, info, warning or error"),
    ),
    "bad syslog facility": (
        'syslog_facility = "local9"\n' + minimal_box(), {},
        ("rstash-recv.toml", "syslog_facility", "syslog facility"),
    ),
    "bad log target": (
        'log = "journal"\n' + minimal_box(), {},
        ("rstash-recv.toml", "log", "auto, syslog, stderr or an absolute path"),
    ),
    "max_sessions 0": (
        "max_sessions = 0\n" + minimal_box(), {},
        ("rstash-recv.toml", "max_sessions", "at least 1"),
    ),
    "pipe_mode as a string": (
        minimal_box() + 'pipe_mode = "yes"\n', {},
        ("rstash-recv.toml", "box.vm1.pipe_mode", "true or false"),
    ),
    "keys as a string": (
        '[box.vm1]\npath = "/srv/vm1"\nkeys = "/k/vm1"\n', {},
        ("rstash-recv.toml", "box.vm1.keys", "must be an array"),
    ),
    "bad defaults key": (
        '[defaults]\npath = "/srv"\n' + minimal_box(), {},
        ("rstash-recv.toml", "defaults.path", "unknown key"),
    ),
    "root in a box": (
        minimal_box() + 'root = "/srv"\n', {},
        ("rstash-recv.toml", "box.vm1.root", "unknown key"),
    ),
    "box not a table": (
        "[box]\nvm1 = 3\n", {},
        ("rstash-recv.toml", "box.vm1", "must be a table"),
    ),
    "empty on_receive item list type": (
        minimal_box() + "on_receive = [1]\n", {},
        ("rstash-recv.toml", "box.vm1.on_receive", "item 1: must be a string"),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_every_config_error_names_file_and_field(tmp_path: Path, case: str) -> None:
    text, extra, (file, field, words) = BAD_CONFIGS[case]
    cfg_path = config_file(tmp_path, text)
    for rel, content in extra.items():
        write(tmp_path / rel, content)

    problems = problems_of(cfg_path)

    prefix = f"{tmp_path / file}: {field}: "
    words = words.replace("{tmp}", str(tmp_path))
    matching = [p for p in problems if p.startswith(prefix) and words in p]
    assert matching, f"no problem starting {prefix!r} with {words!r} in {problems!r}"


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert problems_of(missing) == [f"{missing}: cannot read: No such file or directory"]


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, 'log = "auto"\n\n[box.vm1\n')
    [problem] = problems_of(cfg_path)
    assert problem.startswith(f"{cfg_path}: line 3: ")


def test_invalid_utf8_is_one_line(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_bytes(b'log = "auto"\nserver_id = "\xff"\n')
    assert problems_of(cfg_path) == [f"{cfg_path}: line 2: not valid UTF-8"]


def test_include_duplicate_names_both_files(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, 'include = ["boxes.d/*.toml"]\n' + minimal_box())
    dup = write(tmp_path / "boxes.d" / "dup.toml", minimal_box(path="/srv/elsewhere"))
    [problem] = problems_of(cfg_path)
    assert problem.startswith(f"{dup}: box.vm1: ")
    assert str(cfg_path) in problem


def test_include_is_relative_to_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    cfg_path = config_file(etc, 'include = ["boxes.d/*.toml"]\n')
    write(etc / "boxes.d" / "a.toml", minimal_box("a", "/srv/a", "/k/a"))
    write(etc / "boxes.d" / "b.toml", minimal_box("b", "/srv/b", "/k/b"))
    write(etc / "boxes.d" / "ignored.conf", "this is not toml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_path)
    assert list(cfg.boxes) == ["a", "b"]
    assert cfg.boxes["b"].source == etc / "boxes.d" / "b.toml"


def test_include_matching_nothing_is_fine(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, 'include = ["boxes.d/*.toml"]\n' + minimal_box()))
    assert list(cfg.boxes) == ["vm1"]


def test_dotted_box_name_gets_only_the_hint(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, minimal_box("db.example"))
    assert problems_of(cfg_path) == [
        f'{cfg_path}: box.db.example: a table inside box \'db\': '
        'write [box."db.example"] for a box name with dots'
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, """\
replay_window = 10
bogus = 1
[defaults]
overwrite = "clobber"
[box.vm1]
path = "relative"
keys = ["/k"]
max_file_size = "huge"
[box.vm2]
path = "/srv/vm2"
""")
    problems = problems_of(cfg_path)
    fields = [p.split(": ")[1] for p in problems]
    assert sorted(fields) == sorted([
        "replay_window", "bogus", "defaults.overwrite", "box.vm1.path",
        "box.vm1.max_file_size", "box.vm2.keys",
    ])


def test_error_output_is_one_line_per_problem_without_noise(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, """\
idle_timeout = [1, 2]
max_sessions = "many"
server_id = 7
include = "boxes.d"
[defaults]
allow_from = "10.0.0.0/8"
file_mode = 416
[box.vm1]
path = 5
keys = [1, {a = 1}]
overwrite = 2
pipe_mode = 1
on_receive = "hook"
allow_names = [true]
""")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_path)
    err = info.value
    text = str(err)
    assert text == "\n".join(err.problems)
    assert len(err.problems) == 12
    for line in err.problems:
        assert "\n" not in line
        assert line.startswith(f"{cfg_path}: ")
    for noise in ("Traceback", "pydantic", "validation error", "Input should", "errors.pydantic"):
        assert noise not in text


# --- warnings ---------------------------------------------------------------------


def test_one_key_on_two_boxes_is_a_warning_not_an_error(tmp_path: Path) -> None:
    cfg_path = config_file(tmp_path, minimal_box("a", "/srv/a", "/k/shared")
                           + minimal_box("b", "/srv/b", "/k/shared"))
    cfg = load_config(cfg_path)
    assert set(cfg.boxes) == {"a", "b"}
    assert cfg.warnings == (
        f"{cfg_path}: box.b.keys: key /k/shared also used by box a: "
        "a leaked client key opens both",
    )


def test_no_box_at_all_is_a_warning(tmp_path: Path) -> None:
    cfg = load_config(config_file(tmp_path, 'log = "stderr"\n'))
    assert cfg.boxes == {}
    assert len(cfg.warnings) == 1
    assert "no box" in cfg.warnings[0]
