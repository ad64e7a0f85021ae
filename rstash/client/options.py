"""rstash-send's options: one frozen, typed record, built once from the command line
and, when DEST names one, a profile (rstash-send(1), PROFILES).

Every option is resolved here (sizes parsed, the command after ``--`` joined to
the operands, each setting taken from the command line, else the profile, else
the default), so the rest of the client reads plain typed fields. This module
never reads the environment, a file or the network, and never imports pydantic:
:class:`Profile` is the plain record that ``rstash.client.profiles`` fills.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import UsageError
from ..units import parse_size

_T = TypeVar("_T")

#: The settings a profile may hold besides ``url``: each is an option of rstash-send,
#: under the option's long name with ``_`` for ``-`` (``key`` is ``-k``/``--key``).
PROFILE_SETTINGS = ("key", "rsh", "remote_path", "subsystem", "proxy_command",
                    "connect_timeout", "timeout", "busy_wait", "bwlimit", "server_id")


@dataclass(frozen=True)
class Profile:
    """One ``[dest.NAME]`` table, validated; None is a setting the table leaves out."""

    name: str
    url: str
    file: Path  #: the file that defined it
    key: str | None = None  #: ``~`` expanded; a relative path already made relative to ``file``
    rsh: str | None = None
    remote_path: str | None = None
    subsystem: bool | None = None
    proxy_command: str | None = None
    connect_timeout: float | None = None
    timeout: float | None = None
    busy_wait: float | None = None
    bwlimit: int | None = None  #: bytes per second; 0 is no limit
    server_id: str | None = None


@dataclass(frozen=True)
class Options:
    dest: str | None = None  #: DEST (a profile's url when a profile is used), or BOX with --stdout
    files: tuple[str, ...] = ()  #: FILE operands, or the command of --from-command
    profile: str | None = None  #: the profile DEST named, if any
    key: str | None = None
    name: str | None = None
    json: bool = False
    ignore_existing: bool = False
    dry_run: bool = False
    test: bool = False
    fingerprint: bool = False
    from_command: bool = False
    stdout: bool = False
    rsh: str | None = None
    remote_path: str = "rstash-recv"
    subsystem: bool = False
    proxy_command: str | None = None
    connect_timeout: float = 30.0
    timeout: float = 120.0
    busy_wait: float = 120.0
    bwlimit: int | None = None  #: bytes per second; None or 0 is no limit
    progress: bool | None = None  #: None: a bar when stderr is a terminal and not --quiet
    quiet: bool = False
    verbose: bool = False
    server_id: str | None = None
    version: bool = False
    no_resume: bool = False  #: send regular files without a transfer id (no resume, no 251)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, command: list[str] | None = None,
                       profile: Profile | None = None) -> Options:
        """The options of a parsed command line; ``command`` is what followed ``--``.

        With ``profile``, DEST was its name: the profile's url is the destination and
        each of its settings applies unless the command line gives that option.
        """
        bwlimit = None
        if ns.bwlimit is not None:
            try:
                bwlimit = parse_size(ns.bwlimit)
            except ValueError as e:
                raise UsageError(f"--bwlimit: {e}") from None
        p = profile or Profile("", "", Path())
        return cls(
            dest=p.url if profile else ns.dest, files=(*ns.files, *(command or ())),
            profile=profile.name if profile else None, key=_first(ns.key, p.key),
            name=ns.name, json=ns.json, ignore_existing=ns.ignore_existing, dry_run=ns.dry_run,
            test=ns.test, fingerprint=ns.fingerprint, from_command=ns.from_command,
            stdout=ns.stdout, rsh=_first(ns.rsh, p.rsh),
            remote_path=_pick(ns.remote_path, p.remote_path, cls.remote_path),
            subsystem=_pick(ns.subsystem, p.subsystem, cls.subsystem),
            proxy_command=_first(ns.proxy_command, p.proxy_command),
            connect_timeout=_pick(ns.connect_timeout, p.connect_timeout, cls.connect_timeout),
            timeout=_pick(ns.timeout, p.timeout, cls.timeout),
            busy_wait=_pick(ns.busy_wait, p.busy_wait, cls.busy_wait),
            bwlimit=_first(bwlimit, p.bwlimit), progress=ns.progress, quiet=ns.quiet,
            verbose=ns.verbose, server_id=_first(ns.server_id, p.server_id), version=ns.version,
            no_resume=getattr(ns, "no_resume", False))


def _first(option: _T | None, profile: _T | None) -> _T | None:
    """The command line's value if it gave one, else the profile's (None: neither)."""
    return option if option is not None else profile


def _pick(option: _T | None, profile: _T | None, default: _T) -> _T:
    """The command line's value if it gave one, else the profile's, else the default."""
    return option if option is not None else profile if profile is not None else default
