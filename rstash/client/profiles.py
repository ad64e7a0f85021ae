"""rstash-send's profiles: finding, checking and validating send.toml (rstash-send(1), PROFILES).

Owns where the files are (``-F``, else ``$XDG_CONFIG_HOME/rstash/send.toml``, and for
root first ``/etc/rstash/send.toml``), the refusal of a file that someone other than its
owner could have written, and the schema of the ``[dest.NAME]`` tables. It returns
plain :class:`~rstash.client.options.Profile` records; merging them with the command
line is ``Options.from_namespace``'s job.

This is the client's only pydantic import: ``rstash.send`` imports this module only when
DEST names a profile, or with ``-F`` or ``--profiles``, so that a client that only sends
never pays for it. Problems are worded by rstash.config's helpers, one line each,
``FILE: dest.NAME.FIELD: message``, as rstash-recv words its own. Nothing here opens
a key file, runs a command or touches the network.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainValidator

from ..config import _validate
from ..errors import ConfigError, UsageError
from ..names import BOX_NAME_RE, is_box_name
from ..settings import _boolean, _duration, _server_id, _size
from ..settings import check_string as _string
from ..settings import toml_kind as _kind
from ..tomlfile import _toml_error
from ..tomlfile import field_path as _field
from ..tomlfile import problem_line as _line
from ..units import parse_duration
from .destinations import parse_dest
from .options import PROFILE_SETTINGS, Profile

#: Read by root only, before (so below) root's own file.
SYSTEM_FILE = Path("/etc/rstash/send.toml")


# ---------------------------------------------------------------------------
# Field validators: each takes the raw TOML value, returns it checked or raises
# ValueError with a one-line message (pydantic's own coercion never runs).


def _url(value: object) -> str:
    text = _string(value, "a destination URL")
    try:
        parse_dest(text)
    except UsageError as e:
        raise ValueError(e.message) from None
    return text


def _command(value: object) -> str:
    text = _string(value, "a command line")
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot be split into words: {e}") from None
    if not words:
        raise ValueError("must not be empty")
    return text


def _nonempty(value: object) -> str:
    text = _string(value)
    if not text:
        raise ValueError("must not be empty")
    return text


def _busy_wait(value: object) -> float:
    return parse_duration(value)  # type: ignore[arg-type]  # checks the type itself; 0 is allowed


class _DestTable(BaseModel):
    """``[dest.NAME]`` as written. ``url`` is required, but checked by :func:`_profile`:
    a default here lets the validator drop a bad field and go on."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    url: Annotated[str, PlainValidator(_url)] | None = None
    key: Annotated[str, PlainValidator(_nonempty)] | None = None
    rsh: Annotated[str, PlainValidator(_command)] | None = None
    remote_path: Annotated[str, PlainValidator(_nonempty)] | None = None
    subsystem: Annotated[bool, PlainValidator(_boolean)] | None = None
    proxy_command: Annotated[str, PlainValidator(_nonempty)] | None = None
    connect_timeout: Annotated[float, PlainValidator(_duration)] | None = None
    timeout: Annotated[float, PlainValidator(_duration)] | None = None
    busy_wait: Annotated[float, PlainValidator(_busy_wait)] | None = None
    bwlimit: Annotated[int, PlainValidator(_size)] | None = None
    server_id: Annotated[str, PlainValidator(_server_id)] | None = None


assert set(_DestTable.model_fields) == {"url", *PROFILE_SETTINGS}


# ---------------------------------------------------------------------------
# Where the files are.


def default_files(*, euid: int | None = None, environ: Mapping[str, str] | None = None,
                  system: Path | None = None) -> list[Path]:
    """The files read without ``-F``, lowest precedence first."""
    euid = os.geteuid() if euid is None else euid
    system = SYSTEM_FILE if system is None else system
    environ = os.environ if environ is None else environ
    xdg = environ.get("XDG_CONFIG_HOME", "")
    # The XDG base directory spec: an unset, empty or relative value is ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path(os.path.expanduser("~")) / ".config"
    user = base / "rstash" / "send.toml"
    return [system, user] if euid == 0 and user != system else [user]


@dataclass(frozen=True)
class Profiles:
    """The profiles found, the files looked for and those read (for messages)."""

    by_name: dict[str, Profile]
    files: tuple[Path, ...]
    read: tuple[Path, ...]

    def where(self) -> str:
        if self.read:
            return " and ".join(str(f) for f in self.read)
        return " or ".join(str(f) for f in self.files) + " (no such file)"

    def get(self, name: str) -> Profile:
        """The profile ``name``, or a usage error listing the known ones."""
        found = self.by_name.get(name)
        if found is not None:
            return found
        if not self.by_name:
            raise UsageError(f"unknown profile {name!r}: no profiles in {self.where()}; "
                             "a destination URL has '://' (see rstash-send(1) PROFILES)")
        raise UsageError(f"unknown profile {name!r}: known profiles are "
                         f"{', '.join(sorted(self.by_name))} (in {self.where()})")


def load(explicit: str | None = None, *, euid: int | None = None,
         environ: Mapping[str, str] | None = None, system: Path | None = None) -> Profiles:
    """The profiles of ``-F explicit``, else of the default files that exist.

    Of two files (root's), a profile of the user's file replaces the one of the same
    name in the system file as a whole. Raises ConfigError with one line per problem.
    """
    euid = os.geteuid() if euid is None else euid
    if explicit is not None:
        files, required = [Path(os.path.abspath(explicit))], True
    else:
        files, required = default_files(euid=euid, environ=environ, system=system), False
    by_name: dict[str, Profile] = {}
    read: list[Path] = []
    problems: list[str] = []
    for file in files:
        data = _read(file, euid, required)
        if data is not None:
            read.append(file)
            by_name.update(_profiles(data, file, problems))
    if problems:
        raise ConfigError(problems)
    return Profiles(by_name, tuple(files), tuple(read))


# ---------------------------------------------------------------------------
# Reading one file.


def _read(file: Path, euid: int, required: bool) -> dict[str, Any] | None:
    """The file's TOML, after the ownership and permission checks on what was opened."""
    try:
        # Non-blocking, so that a FIFO put in its place cannot hang a cron job.
        fd = os.open(file, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if required:
            raise ConfigError(_line(str(file), "", "cannot read: No such file or directory")) from None
        return None
    except OSError as e:
        raise ConfigError(_line(str(file), "", f"cannot read: {e.strerror or e}")) from None
    try:
        _check_owner_and_mode(file, os.fstat(fd), euid)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fp:
        raw = fp.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(_line(str(file), f"line {line}", "not valid UTF-8")) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_toml_error(str(file), str(e), text)) from None


def _check_owner_and_mode(file: Path, st: os.stat_result, euid: int) -> None:
    """Refuse what someone other than the user or root could have written.

    A profile names commands rstash-send runs (``rsh``, ``proxy_command``) and the key it
    proves: whoever can write the file runs code as the user, like ssh_config(5).
    """
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(_line(str(file), "", "not a regular file"))
    if st.st_uid not in (euid, 0):
        owners = "root" if euid == 0 else f"you ({_user(euid)}) or root"
        raise ConfigError(_line(
            str(file), "", f"owned by {_user(st.st_uid)}, not by {owners}, and it names commands "
            f"rstash-send runs: refused; run: chown {_user(euid)} {file}"))
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        raise ConfigError(_line(
            str(file), "", f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), and it names "
            f"commands rstash-send runs: refused; run: chmod go-w {file}"))


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _profiles(data: dict[str, Any], file: Path, problems: list[str]) -> dict[str, Profile]:
    where = str(file)
    for key in data:
        if key != "dest":
            problems.append(_line(where, _field(key), "unknown key (a profile is a [dest.NAME] table)"))
    tables = data.get("dest", {})
    if not isinstance(tables, dict):
        problems.append(_line(where, "dest", f"must be a table ([dest.NAME]), not {_kind(tables)}"))
        return {}
    out: dict[str, Profile] = {}
    for name, table in tables.items():
        profile = _profile(name, table, file, problems)
        if profile is not None:
            out[name] = profile
    return out


def _profile(name: str, table: object, file: Path, problems: list[str]) -> Profile | None:
    where = str(file)
    if not isinstance(table, dict):
        problems.append(_line(where, _field("dest", name), f"must be a table, not {_kind(table)}"))
        return None
    n = len(problems)
    if not is_box_name(name):
        problems.append(_line(where, _field("dest", name),
                              f"invalid profile name: must match {BOX_NAME_RE.pattern[:-2]}"))
    nested = {k for k, v in table.items() if isinstance(v, dict)}
    for k in nested:
        problems.append(_line(where, _field("dest", name, k),
                              f"a table inside profile {name!r}: write [dest.\"{name}.{k}\"] "
                              "for a name with dots"))
    if nested and nested == set(table):
        return None  # only the artefact of a dotted name: the hint says it all
    plain = {k: v for k, v in table.items() if k not in nested}
    t, bad = _validate(_DestTable, plain, where, ("dest", name), problems)
    if t.url is None and "url" not in bad:
        problems.append(_line(where, _field("dest", name, "url"),
                              "required: rstash://HOST[:PORT]/BOX or ssh://[USER@]HOST[:PORT]/BOX"))
    if len(problems) > n or t.url is None:
        return None
    key = None
    if t.key is not None:
        # Like rstash-recv's keys: a relative path is beside the file that names it.
        key = str(file.parent / os.path.expanduser(t.key))
    return Profile(name=name, url=t.url, file=file, key=key, rsh=t.rsh, remote_path=t.remote_path,
                   subsystem=t.subsystem, proxy_command=t.proxy_command,
                   connect_timeout=t.connect_timeout, timeout=t.timeout, busy_wait=t.busy_wait,
                   bwlimit=t.bwlimit, server_id=t.server_id)


# ---------------------------------------------------------------------------
# --profiles


def show(profiles: Profiles, *, as_json: bool = False) -> None:
    """``--profiles``: one line per profile, by name: name, url, key (``-`` when none);
    with ``as_json``, one JSON object per line with every setting (null when not set)."""
    rows = [profiles.by_name[n] for n in sorted(profiles.by_name)]
    if as_json:
        for p in rows:
            print(json.dumps({"name": p.name, "url": p.url, "file": str(p.file),
                              **{s: getattr(p, s) for s in PROFILE_SETTINGS}}))
        return
    width = [max((len(x) for x in col), default=0)
             for col in ([p.name for p in rows], [p.url for p in rows])]
    for p in rows:
        print(f"{p.name:<{width[0]}}  {p.url:<{width[1]}}  {p.key or '-'}".rstrip())
