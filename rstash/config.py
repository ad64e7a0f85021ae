"""rstash-recv's configuration: TOML loading, validation and the effective settings.

This module owns the schema of rstash-recv.toml (brief section 3), the one size
parser and the one duration parser of the project, the ``include`` mechanism,
the ``[defaults]`` inheritance and the cross-checks between boxes. With
rstash.client.profiles (rstash-send's profiles, which words its problems with
the helpers here) it is the only module that imports pydantic; everything else
codes against the frozen :class:`Config` and :class:`BoxConfig` it returns.

It must never touch a box directory or read a key file (``--check-config`` does
that), never create anything, and never let a traceback or pydantic's
multi-line report reach a user: every problem becomes one line
``FILE: field.path: message`` inside one :class:`~rstash.errors.ConfigError`.

rstash-recv imports this module once per connection under inetd, so imports
are kept to the standard library's light modules and one small pydantic model
per TOML table.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError

from rstash.errors import ConfigError
from rstash.names import BOX_NAME_RE, is_box_name
from rstash.units import MAX_SIZE, parse_duration, parse_size

__all__ = [
    "DEFAULT_CONFIG",
    "MAX_SIZE",
    "BoxConfig",
    "Config",
    "dump_config",
    "load_config",
    "parse_duration",
    "parse_size",
]

#: The config a serving rstash-recv reads unless ``-c`` says otherwise.
DEFAULT_CONFIG = "/etc/rstash/rstash-recv.toml"

Overwrite = Literal["refuse", "replace", "rename"]
Network = IPv4Network | IPv6Network

# Sizes and durations: the one parser of each lives in rstash.units (no pydantic there,
# so rstash-send can use it cheaply); re-exported here.


# ---------------------------------------------------------------------------
# Field validators. Each takes the raw TOML value and returns the checked,
# converted value or raises ValueError with a one-line message. They are
# PlainValidators: pydantic's own coercion never runs on these fields.

_TOML_KINDS: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    list: "an array",
    dict: "a table",
}


def _kind(value: object) -> str:
    """What TOML calls the type of ``value`` (for messages)."""
    for typ, name in _TOML_KINDS.items():
        if isinstance(value, typ):
            return name
    return "a date/time" if type(value).__module__ == "datetime" else type(value).__name__


def _string(value: object, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be {what}, not {_kind(value)}")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _abs_path(value: object) -> Path:
    """An absolute path without ``..`` (whose meaning would depend on symlinks)."""
    text = _string(value, "an absolute path")
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path, not {text!r}")
    if ".." in text.split("/"):
        raise ValueError(f"must not contain '..' ({text!r})")
    return Path(text)


def _size(value: object) -> int:
    return parse_size(value)  # type: ignore[arg-type]  # parse_size checks the type itself


def _duration(value: object) -> float:
    seconds = parse_duration(value)  # type: ignore[arg-type]  # checks the type itself
    if seconds <= 0:
        raise ValueError("must be longer than 0 seconds")
    return seconds


def _replay_window(value: object) -> int:
    seconds = parse_duration(value)  # type: ignore[arg-type]  # checks the type itself
    if seconds != int(seconds):
        raise ValueError(f"must be whole seconds ({value!r})")
    if not 30 <= seconds <= 3600:
        raise ValueError(f"must be between 30 and 3600 seconds, not {value!r}")
    return int(seconds)


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {_kind(value)}")
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


_FILE_MODE_RE = re.compile(r"[0-7]{3,4}\Z")
#: Execute, setuid, setgid and sticky bits: a delivered file is data, never a program.
FORBIDDEN_MODE_BITS = 0o7111


def _file_mode(value: object) -> int:
    if not isinstance(value, str):
        # An integer is refused: TOML's 640 would be decimal, silently 0o1200.
        raise ValueError(f"must be an octal string like \"0640\", not {_kind(value)}")
    if not _FILE_MODE_RE.match(value):
        raise ValueError(f"must be an octal string like \"0640\", not {value!r}")
    mode = int(value, 8)
    if mode & FORBIDDEN_MODE_BITS:
        raise ValueError(
            f"{value!r} sets {mode & FORBIDDEN_MODE_BITS:04o}: execute, setuid, setgid and "
            "sticky bits (07111) are not allowed"
        )
    return mode


def _network(value: object) -> Network:
    text = _string(value, "a network like \"192.0.2.0/24\"")
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as e:
        raise ValueError(f"{text!r} is not an IP network: {e}") from None


def _list_of(item: Callable[[object], Any]) -> Callable[[object], list[Any]]:
    """A validator of a TOML array whose items ``item`` checks (messages say which item)."""

    def check(value: object) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError(f"must be an array, not {_kind(value)}")
        out: list[Any] = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except ValueError as e:
                raise ValueError(f"item {i + 1}: {e}") from None
        return out

    return check


def _on_receive(value: object) -> list[str] | None:
    argv: list[str] = _list_of(_string)(value)
    # An empty list turns off a hook inherited from [defaults].
    return argv or None


_LOG_TARGETS = ("auto", "syslog", "stderr")


def _log(value: object) -> str:
    text = _string(value)
    if text not in _LOG_TARGETS and not text.startswith("/"):
        raise ValueError(f"must be auto, syslog, stderr or an absolute path, not {text!r}")
    return text


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: object) -> str:
    text = _string(value)
    if text not in _LOG_LEVELS:
        raise ValueError(f"must be debug, info, warning or error, not {text!r}")
    return text


#: syslog(3) facility names (Linux); the syslog module is not imported for this.
SYSLOG_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "local0", "local1", "local2", "local3", "local4", "local5",
    "local6", "local7",
)


def _syslog_facility(value: object) -> str:
    text = _string(value)
    if text not in SYSLOG_FACILITIES:
        raise ValueError(f"must be a syslog facility (daemon, local0 … local7, …), not {text!r}")
    return text


def _server_id(value: object) -> str:
    text = _string(value)
    if len(text.encode()) > 255:
        raise ValueError("must be at most 255 bytes")
    if any(not c.isprintable() for c in text):
        raise ValueError("must not contain control characters")
    return text


_T = TypeVar("_T")
_M = TypeVar("_M", bound="BaseModel")
AbsPath = Annotated[Path, PlainValidator(_abs_path)]
Size = Annotated[int, PlainValidator(_size)]
Duration = Annotated[float, PlainValidator(_duration)]
Count = Annotated[int, PlainValidator(_count)]
FileMode = Annotated[int, PlainValidator(_file_mode)]
Strings = Annotated[list[str], PlainValidator(_list_of(_string))]
Paths = Annotated[list[str], PlainValidator(_list_of(lambda v: _string(v, "a path")))]
Networks = Annotated[list[Network], PlainValidator(_list_of(_network))]
Argv = Annotated[list[str] | None, PlainValidator(_on_receive)]


# ---------------------------------------------------------------------------
# The TOML tables, one small model each. A field left at None was not set in
# the file, so [defaults] (or the built-in default) applies.

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class _TopTable(BaseModel):
    """The top level of the main file, without [defaults] and [box.*]."""

    model_config = _STRICT

    state_dir: AbsPath = Path("/var/lib/rstash")
    log: Annotated[str, PlainValidator(_log)] = "auto"
    log_level: Annotated[str, PlainValidator(_log_level)] = "info"
    syslog_facility: Annotated[str, PlainValidator(_syslog_facility)] = "daemon"
    include: Strings = []
    preauth_timeout: Duration = 10.0
    idle_timeout: Duration = 60.0
    replay_window: Annotated[int, PlainValidator(_replay_window)] = 300
    max_sessions: Count = 64
    max_preauth_per_peer: Count = 4
    hook_timeout: Duration = 60.0
    server_id: Annotated[str, PlainValidator(_server_id)] = ""


class _BoxSettings(BaseModel):
    """The box keys that [defaults] and [box.NAME] share."""

    model_config = _STRICT

    allow_names: Strings | None = None
    deny_names: Strings | None = None
    overwrite: Overwrite | None = None
    max_file_size: Size | None = None
    quota: Size | None = None
    min_free: Size | None = None
    file_mode: FileMode | None = None
    allow_from: Networks | None = None
    pipe_mode: bool | None = None
    on_receive: Argv = None


class _DefaultsTable(_BoxSettings):
    """[defaults]: every box key but path and keys, plus root."""

    root: AbsPath | None = None


class _BoxTable(_BoxSettings):
    """[box.NAME] as written; inheritance happens in :func:`_effective_box`."""

    path: AbsPath | None = None
    keys: Paths | None = None


_BOX_FIELDS = frozenset(_BoxTable.model_fields)


# ---------------------------------------------------------------------------
# The effective settings: plain frozen dataclasses, no pydantic beyond this module.


@dataclass(frozen=True, slots=True)
class BoxConfig:
    """One box's effective settings, after [defaults]."""

    name: str
    path: Path
    keys: tuple[Path, ...]
    allow_names: tuple[str, ...] = ()
    deny_names: tuple[str, ...] = ()
    overwrite: Overwrite = "refuse"
    max_file_size: int | None = None
    quota: int | None = None
    min_free: int | None = None
    file_mode: int = 0o640
    allow_from: tuple[Network, ...] = ()
    pipe_mode: bool = False
    on_receive: tuple[str, ...] | None = None
    #: the file whose [box.NAME] table defined this box
    source: Path = Path(DEFAULT_CONFIG)


@dataclass(frozen=True, slots=True)
class Config:
    """rstash-recv's whole effective configuration."""

    source: Path
    state_dir: Path = Path("/var/lib/rstash")
    log: str = "auto"
    log_level: str = "info"
    syslog_facility: str = "daemon"
    preauth_timeout: float = 10.0
    idle_timeout: float = 60.0
    replay_window: int = 300
    max_sessions: int = 64
    max_preauth_per_peer: int = 4
    hook_timeout: float = 60.0
    server_id: str = ""
    boxes: dict[str, BoxConfig] = field(default_factory=dict)
    #: problems that do not stop the server, one line each, formatted like errors
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# Error lines.

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+\Z")


def _key(part: str | int) -> str:
    """One component of a field path, quoted the way TOML would need it."""
    if isinstance(part, int):
        return f"[{part}]"
    if _BARE_KEY_RE.match(part):
        return part
    escaped = "".join(
        "\\" + c if c in '"\\' else c if c.isprintable() else f"\\u{ord(c):04X}" for c in part
    )
    return f'"{escaped}"'


def _field(*parts: str | int) -> str:
    out = ""
    for p in parts:
        k = _key(p)
        out += k if k.startswith("[") or not out else "." + k
    return out


def _line(file: str, where: str, message: str) -> str:
    """One problem: ``FILE: field.path: message``, folded onto one line."""
    message = " ".join(message.split())
    return f"{file}: {where}: {message}" if where else f"{file}: {message}"


def _pydantic_message(err: Mapping[str, Any]) -> str:
    """A human message for one pydantic error (never pydantic's own wording if avoidable)."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the listed values')}, not {value!r}"
    if kind == "bool_type":
        return f"must be true or false, not {_kind(value)}"
    if kind == "missing":
        return "required"
    msg: str = err.get("msg", kind)
    return msg


def _validate(
    model: type[_M], data: dict[str, Any], file: str, prefix: tuple[str, ...], problems: list[str]
) -> tuple[_M, set[str]]:
    """Validate one TOML table; report every bad field and return the valid rest.

    The returned model holds every field that validated (bad ones fall back to
    their defaults) and the set of bad field names, so that cross-checks can
    go on without repeating a problem already reported.
    """
    bad: set[str] = set()
    while True:
        try:
            return model.model_validate({k: v for k, v in data.items() if k not in bad}), bad
        except ValidationError as e:
            errors = e.errors(include_url=False)
        for err in errors:
            loc = tuple(err["loc"])
            problems.append(_line(file, _field(*prefix, *loc), _pydantic_message(err)))
            # Every table model has defaults for all fields, so dropping bad keys ends this.
            bad.add(str(loc[0]) if loc else "")
        if "" in bad:
            return model.model_validate({}), bad


# ---------------------------------------------------------------------------
# Loading.


def _read_toml(file: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        with open(file, "rb") as fp:
            raw = fp.read()
    except OSError as e:
        problems.append(_line(file, "", f"cannot read: {e.strerror or e}"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        problems.append(_line(file, f"line {line}", "not valid UTF-8"))
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problems.append(_toml_error(file, str(e), text))
        return None


_TOML_POS_RE = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)\Z", re.S)


def _toml_error(file: str, message: str, text: str) -> str:
    """tomllib's "Msg (at line N, column C)" as ``FILE: line N: msg (column C)``."""
    m = _TOML_POS_RE.match(message)
    if m is None:
        return _line(file, "", f"invalid TOML: {message}")
    msg, line, col = m.groups()
    msg = msg[:1].lower() + msg[1:]
    if line is None:
        return _line(file, f"line {max(1, len(text.splitlines()))}", f"{msg} (at end of file)")
    return _line(file, f"line {line}", f"{msg} (column {col})")


def _dotted_hints(name: str, table: dict[str, Any]) -> Iterable[tuple[str, str]]:
    """(field, hint) for sub-tables inside [box.NAME]: [box.a.b] meant box "a.b"."""
    for k, v in table.items():
        if k in _BOX_FIELDS or not isinstance(v, dict):
            continue
        dotted = f"{name}.{k}"
        if any(not isinstance(x, dict) for x in v.values()) or not v:
            yield (
                _field("box", name, k),
                f"a table inside box {name!r}: write [box.\"{dotted}\"] "
                "for a box name with dots",
            )
        yield from _dotted_hints(dotted, v)


@dataclass
class _RawBox:
    name: str
    table: _BoxTable
    bad: set[str]
    file: str


def _box_tables(
    data: dict[str, Any], file: str, problems: list[str], into: dict[str, _RawBox]
) -> None:
    boxes = data.get("box", {})
    if not isinstance(boxes, dict):
        problems.append(_line(file, "box", f"must be a table ([box.NAME]), not {_kind(boxes)}"))
        return
    for name, table in boxes.items():
        where = _field("box", name)
        if not isinstance(table, dict):
            problems.append(_line(file, where, f"must be a table, not {_kind(table)}"))
            continue
        hints = list(_dotted_hints(name, table))
        problems.extend(_line(file, f, h) for f, h in hints)
        nested = {k for k, v in table.items() if k not in _BOX_FIELDS and isinstance(v, dict)}
        if hints and nested == set(table):
            continue  # only the artefact of a dotted name: the hint says it all
        if not is_box_name(name):
            problems.append(
                _line(file, where, f"invalid box name: must match {BOX_NAME_RE.pattern[:-2]}")
            )
        if name in into:
            first = into[name].file
            problems.append(
                _line(file, where, f"box {name!r} is already defined in {first}")
                if first != file
                else _line(file, where, "defined twice")
            )
            continue
        plain = {k: v for k, v in table.items() if k not in nested}
        box, bad = _validate(_BoxTable, plain, file, ("box", name), problems)
        into[name] = _RawBox(name, box, bad, file)


def _merge(box: _T | None, default: _T | None, builtin: _T) -> _T:
    if box is not None:
        return box
    return default if default is not None else builtin


def _effective_box(
    raw: _RawBox, defaults: _DefaultsTable, defaults_bad: set[str], problems: list[str]
) -> BoxConfig | None:
    """The box after [defaults], or None (and problems) when it cannot exist."""
    b, file, name = raw.table, raw.file, raw.name
    path = b.path
    if path is None and "path" not in raw.bad:
        if defaults.root is not None:
            path = defaults.root / name
        elif "root" not in defaults_bad:
            problems.append(
                _line(file, _field("box", name, "path"),
                      "missing, and [defaults] has no root to put the box in")
            )
    keys: tuple[Path, ...] = ()
    if b.keys is not None:
        base = Path(file).parent
        keys = tuple(base / k for k in b.keys)  # a relative key is beside its config file
    if not keys and "keys" not in raw.bad:
        problems.append(
            _line(file, _field("box", name, "keys"),
                  "a box needs at least one key (there is no open box)")
        )
    if path is None:
        return None
    return BoxConfig(
        name=name,
        path=path,
        keys=keys,
        allow_names=tuple(_merge(b.allow_names, defaults.allow_names, [])),
        deny_names=tuple(_merge(b.deny_names, defaults.deny_names, [])),
        overwrite=_merge(b.overwrite, defaults.overwrite, "refuse"),
        max_file_size=_merge(b.max_file_size, defaults.max_file_size, None),
        quota=_merge(b.quota, defaults.quota, None),
        min_free=_merge(b.min_free, defaults.min_free, None),
        file_mode=_merge(b.file_mode, defaults.file_mode, 0o640),
        allow_from=tuple(_merge(b.allow_from, defaults.allow_from, [])),
        pipe_mode=_merge(b.pipe_mode, defaults.pipe_mode, False),
        on_receive=_on_receive_of(b, defaults),
        source=Path(file),
    )


def _on_receive_of(b: _BoxTable, d: _DefaultsTable) -> tuple[str, ...] | None:
    if "on_receive" in b.model_fields_set:
        argv = b.on_receive  # may be None: `on_receive = []` turns the default off
    else:
        argv = d.on_receive
    return tuple(argv) if argv else None


def _real(p: Path) -> Path:
    # Symlinks that exist are followed, missing components are not required:
    # two spellings of one directory must not pass for two boxes.
    return Path(os.path.realpath(p))


def _cross_check(
    boxes: list[BoxConfig], state_dir: Path | None, top_file: str,
    problems: list[str], warnings: list[str],
) -> None:
    by_path: dict[Path, BoxConfig] = {}
    for box in boxes:
        real = _real(box.path)
        where = _field("box", box.name, "path")
        other = by_path.get(real)
        if other is not None:
            problems.append(_line(str(box.source), where,
                                  f"{box.path} is the same directory as box {other.name}'s"))
            continue
        by_path[real] = box
    for real, box in by_path.items():
        for parent in real.parents:
            outer = by_path.get(parent)
            if outer is not None:
                problems.append(_line(
                    str(box.source), _field("box", box.name, "path"),
                    f"{box.path} is inside box {outer.name} ({outer.path}): box paths must "
                    "not nest",
                ))
                break
    if state_dir is not None:
        real_state = _real(state_dir)
        for real, box in by_path.items():
            if real_state == real or real in real_state.parents:
                problems.append(_line(top_file, "state_dir",
                                      f"{state_dir} is inside box {box.name} ({box.path})"))
            elif real_state in real.parents:
                problems.append(_line(str(box.source), _field("box", box.name, "path"),
                                      f"{box.path} is inside state_dir ({state_dir})"))
    key_owner: dict[Path, BoxConfig] = {}
    for box in boxes:
        seen: set[Path] = set()
        for key in box.keys:
            real = _real(key)
            where = _field("box", box.name, "keys")
            if real in seen:
                warnings.append(_line(str(box.source), where, f"key {key} is listed twice"))
                continue
            seen.add(real)
            owner = key_owner.setdefault(real, box)
            if owner is not box:
                warnings.append(_line(
                    str(box.source), where,
                    f"key {key} also used by box {owner.name}: a leaked client key opens both",
                ))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and cross-check rstash-recv's configuration.

    Raises :class:`ConfigError` carrying every problem found, one line each.
    Never looks at box directories or key files.
    """
    file = os.path.abspath(os.fspath(path))
    problems: list[str] = []
    warnings: list[str] = []
    data = _read_toml(file, problems)
    if data is None:
        raise ConfigError(problems)

    defaults_data = data.pop("defaults", {})
    box_data = {"box": data.pop("box")} if "box" in data else {}
    top, top_bad = _validate(_TopTable, data, file, (), problems)

    if not isinstance(defaults_data, dict):
        problems.append(_line(file, "defaults", f"must be a table, not {_kind(defaults_data)}"))
        defaults_data = {}
    defaults, defaults_bad = _validate(
        _DefaultsTable, defaults_data, file, ("defaults",), problems
    )

    raw_boxes: dict[str, _RawBox] = {}
    _box_tables(box_data, file, problems, raw_boxes)
    base = os.path.dirname(file)
    # A file matched by two patterns is read once; the main file never again.
    read_already = {os.path.realpath(file)}
    for pattern in top.include:
        full = os.path.join(base, pattern)
        matches = sorted(glob.glob(full))
        if not matches and not glob.has_magic(full):
            problems.append(
                _line(file, "include", f"cannot read {full}: No such file or directory")
            )
        for inc in matches:
            real = os.path.realpath(inc)
            if real == os.path.realpath(file):
                problems.append(_line(file, "include", f"{pattern!r} includes this file itself"))
            if real in read_already:
                continue
            read_already.add(real)
            inc_data = _read_toml(inc, problems)
            if inc_data is None:
                continue
            for key in inc_data:
                if key != "box":
                    problems.append(_line(
                        inc, _field(key),
                        "not allowed in an included file (only [box.NAME] tables)",
                    ))
            _box_tables(inc_data, inc, problems, raw_boxes)

    boxes: dict[str, BoxConfig] = {}
    for raw in raw_boxes.values():
        box = _effective_box(raw, defaults, defaults_bad, problems)
        if box is not None:
            boxes[box.name] = box
    state_dir = None if "state_dir" in top_bad else top.state_dir
    _cross_check(list(boxes.values()), state_dir, file, problems, warnings)
    if not raw_boxes and not problems:
        warnings.append(_line(file, "box", "no box is defined: every session will be refused"))
    if problems:
        raise ConfigError(problems)
    return Config(
        source=Path(file),
        state_dir=top.state_dir,
        log=top.log,
        log_level=top.log_level,
        syslog_facility=top.syslog_facility,
        preauth_timeout=top.preauth_timeout,
        idle_timeout=top.idle_timeout,
        replay_window=top.replay_window,
        max_sessions=top.max_sessions,
        max_preauth_per_peer=top.max_preauth_per_peer,
        hook_timeout=top.hook_timeout,
        server_id=top.server_id,
        boxes=boxes,
        warnings=tuple(warnings),
    )


def dump_config(cfg: Config) -> dict[str, Any]:
    """The effective settings as JSON-ready data (``--dump-config``)."""
    return {
        "source": str(cfg.source),
        "state_dir": str(cfg.state_dir),
        "log": cfg.log,
        "log_level": cfg.log_level,
        "syslog_facility": cfg.syslog_facility,
        "preauth_timeout": cfg.preauth_timeout,
        "idle_timeout": cfg.idle_timeout,
        "replay_window": cfg.replay_window,
        "max_sessions": cfg.max_sessions,
        "max_preauth_per_peer": cfg.max_preauth_per_peer,
        "hook_timeout": cfg.hook_timeout,
        "server_id": cfg.server_id,
        "boxes": {name: _dump_box(box) for name, box in cfg.boxes.items()},
        "warnings": list(cfg.warnings),
    }


def _dump_box(box: BoxConfig) -> dict[str, Any]:
    return {
        "name": box.name,
        "source": str(box.source),
        "path": str(box.path),
        "keys": [str(k) for k in box.keys],
        "allow_names": list(box.allow_names),
        "deny_names": list(box.deny_names),
        "overwrite": box.overwrite,
        "max_file_size": box.max_file_size,
        "quota": box.quota,
        "min_free": box.min_free,
        "file_mode": f"{box.file_mode:04o}",
        "allow_from": [str(n) for n in box.allow_from],
        "pipe_mode": box.pipe_mode,
        "on_receive": list(box.on_receive) if box.on_receive is not None else None,
    }
