"""rstash-recv's settings: every setting once, with its default and its check.

The settings of rstash-recv.toml(5) are the fields of two frozen dataclasses:
:class:`ServerSettings` (the top level) and :class:`BoxPolicy` (what
``[defaults]`` and ``[box.NAME]`` share, and what the store enforces). Each
field's metadata carries the check that turns a raw TOML value into the
field's value (or raises ``ValueError`` with a one-line message) and, where
JSON needs another spelling, how ``--dump-config`` shows it. config.py builds
its pydantic models from these fields; the store takes a :class:`BoxPolicy`.
The effective configuration, :class:`Config` and its :class:`BoxConfig` per
box, lives here too, so that a serving process can hold one without pydantic.

This module must never import pydantic (rstash-recv serves a connection
without it where it can), read a file, or know about TOML tables.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Literal

from rstash.units import parse_duration, parse_size

Overwrite = Literal["refuse", "replace", "rename"]
Network = IPv4Network | IPv6Network
Check = Callable[[object], Any]

#: The config a serving rstash-recv reads unless ``-c`` says otherwise.
DEFAULT_CONFIG = "/etc/rstash/rstash-recv.toml"
#: The values of ``overwrite``, in the order messages list them.
OVERWRITE_POLICIES: tuple[Overwrite, ...] = ("refuse", "replace", "rename")
#: Execute, setuid, setgid and sticky bits: a delivered file is data, never a program.
FORBIDDEN_MODE_BITS = 0o7111
#: syslog(3) facility names (Linux); the syslog module is not imported for this.
SYSLOG_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "local0", "local1", "local2", "local3", "local4", "local5",
    "local6", "local7",
)
LOG_TARGETS = ("auto", "syslog", "stderr")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: How a box's sessions authenticate: its key, the SSH login alone, or both
#: (rstash-recv.toml(5) auth; rstash(7) CONSTRUCTION 11).
AUTH_MODES = ("key", "ssh", "key+ssh")

# ---------------------------------------------------------------------------
# Checks. Each takes the raw TOML value and returns the field's value or raises
# ValueError with a one-line message.

_TOML_KINDS: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    list: "an array",
    dict: "a table",
}


def toml_kind(value: object) -> str:
    """What TOML calls the type of ``value`` (for messages)."""
    for typ, name in _TOML_KINDS.items():
        if isinstance(value, typ):
            return name
    return "a date/time" if type(value).__module__ == "datetime" else type(value).__name__


def check_string(value: object, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be {what}, not {toml_kind(value)}")
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


def check_abs_path(value: object) -> Path:
    """An absolute path without ``..`` (whose meaning would depend on symlinks)."""
    text = check_string(value, "an absolute path")
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


def _keep_days(value: object) -> float:
    """Days as a number, or a duration with its unit (``"36h"``); stored as seconds."""
    if isinstance(value, str):
        if value.strip()[-1:].isdigit():
            raise ValueError(f"write a number of days (keep_days = 30) or a duration with its "
                             f"unit (\"36h\"), not {value!r}")
        return _duration(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number of days or a duration string, not {toml_kind(value)}")
    return _duration(value * 86400)


def _min_age(value: object) -> float:
    return parse_duration(value)  # type: ignore[arg-type]  # checks the type itself; 0 is off


def _days(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 86400


def _ttl(value: object) -> float:
    seconds = parse_duration(value)  # type: ignore[arg-type]  # checks the type itself
    if seconds < 0:
        raise ValueError("must be 0 (off) or longer")
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
        raise ValueError(f"must be an integer, not {toml_kind(value)}")
    if value < 1:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {toml_kind(value)}")
    return value


def _overwrite(value: object) -> Overwrite:
    for policy in OVERWRITE_POLICIES:
        if value == policy:
            return policy
    listed = ", ".join(repr(p) for p in OVERWRITE_POLICIES[:-1])
    raise ValueError(f"must be {listed} or {OVERWRITE_POLICIES[-1]!r}, not {value!r}")


_FILE_MODE_RE = re.compile(r"[0-7]{3,4}\Z")


def mode_problem(mode: int) -> str | None:
    """Why ``mode`` may not be a stored file's mode, or None."""
    if mode & ~0o7777:
        return f"{mode:#o} is not a file mode"
    if mode & FORBIDDEN_MODE_BITS:
        return (f"sets {mode & FORBIDDEN_MODE_BITS:04o}: execute, setuid, setgid and "
                "sticky bits (07111) are not allowed")
    return None


def _file_mode(value: object) -> int:
    if not isinstance(value, str):
        # An integer is refused: TOML's 640 would be decimal, silently 0o1200.
        raise ValueError(f"must be a quoted octal string, e.g. file_mode = \"0640\", "
                         f"not {toml_kind(value)}")
    if not _FILE_MODE_RE.match(value):
        raise ValueError(f"must be an octal string like \"0640\", not {value!r}")
    mode = int(value, 8)
    problem = mode_problem(mode)
    if problem is not None:
        raise ValueError(f"{value!r} {problem}")
    return mode


def _network(value: object) -> Network:
    text = check_string(value, "a network like \"192.0.2.0/24\"")
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as e:
        raise ValueError(f"{text!r} is not an IP network: {e}") from None


def array_of(item: Check) -> Callable[[object], tuple[Any, ...]]:
    """A check of a TOML array whose items ``item`` checks (messages say which item)."""

    def check(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"must be an array, not {toml_kind(value)}")
        out: list[Any] = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except ValueError as e:
                raise ValueError(f"item {i + 1}: {e}") from None
        return tuple(out)

    return check


check_strings = array_of(check_string)


def _pattern(value: object) -> str:
    text = check_string(value, "a pattern like \"db-*.sql.gz\"")
    if not text or "/" in text:
        raise ValueError(f"must be a file name pattern without '/', not {text!r}")
    return text


def _on_receive(value: object) -> tuple[str, ...] | None:
    argv: tuple[str, ...] = check_strings(value)
    # An empty list turns off a hook inherited from [defaults].
    return argv or None


def _one_of(choices: tuple[str, ...], message: str) -> Check:
    def check(value: object) -> str:
        text = check_string(value)
        if text not in choices:
            raise ValueError(f"must be {message}, not {text!r}")
        return text

    return check


def _log(value: object) -> str:
    text = check_string(value)
    if text not in LOG_TARGETS and not text.startswith("/"):
        raise ValueError(f"must be auto, syslog, stderr or an absolute path, not {text!r}")
    return text


def _service_user(value: object) -> str:
    text = check_string(value, "a user name")
    if not text or any(c.isspace() or not c.isprintable() or c == ":" for c in text):
        raise ValueError(f"must be a user name like \"rstash\", not {text!r}")
    return text


def _server_id(value: object) -> str:
    text = check_string(value)
    if len(text.encode()) > 255:
        raise ValueError("must be at most 255 bytes")
    if any(not c.isprintable() for c in text):
        raise ValueError("must not contain control characters")
    return text


# ---------------------------------------------------------------------------
# The settings.


def _octal(mode: object) -> str:
    return f"{mode:04o}"


def meta(check: Check, dump: Callable[[Any], Any] | None = None, *,
         empty: str = "none") -> dict[str, Any]:
    """A settings field's metadata: the check of its TOML value, its --dump-config form
    and what an empty list of it means in the human --dump-config."""
    return {"check": check, "dump": dump, "empty": empty}


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The top level of rstash-recv.toml (rstash-recv.toml(5))."""

    state_dir: Path = field(default=Path("/var/lib/rstash"), metadata=meta(check_abs_path))
    log: str = field(default="auto", metadata=meta(_log))
    log_level: str = field(default="info", metadata=meta(
        _one_of(LOG_LEVELS, "debug, info, warning or error")))
    syslog_facility: str = field(default="daemon", metadata=meta(
        _one_of(SYSLOG_FACILITIES, "a syslog facility (daemon, local0 … local7, …)")))
    preauth_timeout: float = field(default=10.0, metadata=meta(_duration))
    idle_timeout: float = field(default=60.0, metadata=meta(_duration))
    replay_window: int = field(default=300, metadata=meta(_replay_window))
    max_sessions: int = field(default=64, metadata=meta(_count))
    max_preauth_per_peer: int = field(default=4, metadata=meta(_count))
    hook_timeout: float = field(default=60.0, metadata=meta(_duration))
    server_id: str = field(default="", metadata=meta(_server_id))
    #: the account rstash-recv serves as; -t and --check-config judge every path for it
    service_user: str = field(default="", metadata=meta(_service_user))


@dataclass(frozen=True, slots=True)
class BoxPolicy:
    """What [defaults] and [box.NAME] share: the rules the store enforces for one box."""

    allow_names: tuple[str, ...] = field(default=(), metadata=meta(check_strings, empty="any"))
    deny_names: tuple[str, ...] = field(default=(), metadata=meta(check_strings))
    overwrite: Overwrite = field(default="refuse", metadata=meta(_overwrite))
    max_file_size: int | None = field(default=None, metadata=meta(_size))
    quota: int | None = field(default=None, metadata=meta(_size))
    min_free: int | None = field(default=None, metadata=meta(_size))
    file_mode: int = field(default=0o640, metadata=meta(_file_mode, _octal))
    allow_from: tuple[Network, ...] = field(default=(), metadata=meta(array_of(_network),
                                                                      empty="any"))
    pipe_mode: bool = field(default=False, metadata=meta(_boolean))
    resume_ttl: float = field(default=86400.0, metadata=meta(_ttl))
    auth: str = field(default="key", metadata=meta(_one_of(AUTH_MODES, '"key", "ssh" or "key+ssh"')))
    on_receive: tuple[str, ...] | None = field(default=None, metadata=meta(_on_receive))
    #: retention (rstash.retention): keep the N newest files of each group ...
    keep_last: int | None = field(default=None, metadata=meta(_count))
    #: ... and every file younger than this many seconds (written in days) ...
    keep_days: float | None = field(default=None, metadata=meta(_keep_days, _days))
    #: ... and never remove a file younger than this, whatever a key holder stores
    keep_min_age: float = field(default=7 * 86400.0, metadata=meta(_min_age))
    groups: tuple[str, ...] = field(default=(), metadata=meta(array_of(_pattern),
                                                              empty="by name"))

    def __post_init__(self) -> None:
        # The store's own guard: a policy built without config.py obeys the same rules.
        if self.overwrite not in OVERWRITE_POLICIES:
            raise ValueError(f"overwrite must be one of {', '.join(OVERWRITE_POLICIES)}: "
                             f"{self.overwrite!r}")
        problem = mode_problem(self.file_mode)
        if problem is not None:
            raise ValueError(f"file_mode {problem}")


# ---------------------------------------------------------------------------
# The effective settings: the settings dataclasses plus what only a loaded file has
# (rstash.config builds them with pydantic, rstash.snapshot rebuilds them from its JSON).


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxConfig(BoxPolicy):
    """One box's effective settings, after [defaults]."""

    name: str
    path: Path
    keys: tuple[Path, ...]
    #: the file whose [box.NAME] table defined this box
    source: Path = Path(DEFAULT_CONFIG)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config(ServerSettings):
    """rstash-recv's whole effective configuration."""

    source: Path
    boxes: dict[str, BoxConfig] = field(default_factory=dict)
    #: problems that do not stop the server, one line each, formatted like errors
    warnings: tuple[str, ...] = ()



def settings_fields(cls: type[ServerSettings] | type[BoxPolicy]) -> tuple[Field[Any], ...]:
    """The fields of ``cls`` that are settings (those with a check)."""
    return tuple(f for f in fields(cls) if "check" in f.metadata)


def empty_means(name: str) -> str:
    """What an empty list means for the box setting ``name`` ("any", "none", "by name")."""
    for f in settings_fields(BoxPolicy):
        if f.name == name:
            return str(f.metadata["empty"])
    return "none"


def dump_value(value: object) -> object:
    """A setting's value as JSON-ready data: paths and networks as strings, tuples as lists."""
    if isinstance(value, tuple | list):
        return [dump_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def dump_settings(obj: ServerSettings | BoxPolicy) -> dict[str, object]:
    """Every setting of ``obj`` as JSON-ready data, in declaration order."""
    out: dict[str, object] = {}
    for f in settings_fields(type(obj)):
        value = getattr(obj, f.name)
        dump = f.metadata["dump"]
        out[f.name] = dump(value) if dump is not None else dump_value(value)
    return out
