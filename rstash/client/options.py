"""rstash-send's options: one frozen, typed record, built once from the command line.

Every option is resolved here (sizes parsed, the command after ``--`` joined to
the operands), so the rest of the client reads plain typed fields. This module
never reads the environment, a file or the network.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..errors import UsageError
from ..units import parse_size


@dataclass(frozen=True)
class Options:
    dest: str | None = None  #: DEST, or BOX with --stdout
    files: tuple[str, ...] = ()  #: FILE operands, or the command of --from-command
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
    bwlimit: int | None = None  #: bytes per second
    progress: bool | None = None  #: None: a bar when stderr is a terminal and not --quiet
    quiet: bool = False
    verbose: bool = False
    server_id: str | None = None
    version: bool = False

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, command: list[str] | None = None) -> Options:
        """The options of a parsed command line; ``command`` is what followed ``--``."""
        bwlimit = None
        if ns.bwlimit:
            try:
                bwlimit = parse_size(ns.bwlimit)
            except ValueError as e:
                raise UsageError(f"--bwlimit: {e}") from None
        return cls(
            dest=ns.dest, files=(*ns.files, *(command or ())), key=ns.key, name=ns.name,
            json=ns.json, ignore_existing=ns.ignore_existing, dry_run=ns.dry_run, test=ns.test,
            fingerprint=ns.fingerprint, from_command=ns.from_command, stdout=ns.stdout,
            rsh=ns.rsh, remote_path=ns.remote_path, subsystem=ns.subsystem,
            proxy_command=ns.proxy_command, connect_timeout=ns.connect_timeout,
            timeout=ns.timeout, busy_wait=ns.busy_wait, bwlimit=bwlimit, progress=ns.progress,
            quiet=ns.quiet, verbose=ns.verbose, server_id=ns.server_id, version=ns.version)
