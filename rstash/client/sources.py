"""What rstash-send sends: regular files, standard input, or the output of
``--from-command`` (rstash-send(1), OPTIONS).

Every remote name is checked here with the server's own checker before anything
is sent or any command is started. A source says why its content must not be
stored (a producer that failed); it never talks to the server.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from ..errors import RstashError, UsageError
from ..names import name_problem
from .options import Options

if TYPE_CHECKING:
    import subprocess


@dataclass
class Source:
    label: str  #: what the user named: a path, "-", or the command
    name: str  #: the remote name
    size: int | None  #: None: unknown until the end (stdin, a command)
    mtime: int
    fobj: BinaryIO | None = None
    proc: subprocess.Popen[bytes] | None = None

    def open(self) -> None:
        if self.label == "-" or self.proc is not None:
            return
        try:
            self.fobj = open(self.label, "rb")
        except OSError as e:
            raise RstashError(f"{self.label}: {e.strerror}") from None

    def read_fd(self) -> int:
        if self.proc is not None:
            assert self.proc.stdout is not None
            return self.proc.stdout.fileno()
        if self.label == "-":
            return sys.stdin.fileno()
        assert self.fobj is not None
        return self.fobj.fileno()

    def close(self) -> None:
        if self.fobj is not None:
            self.fobj.close()
            self.fobj = None

    def discard(self) -> None:
        """The server refused this source: a producer gets EPIPE at its next write
        instead of blocking on a full pipe; its exit status no longer matters."""
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def failed(self) -> str | None:
        """Why the source's content must not be stored (a producer that failed)."""
        if self.proc is None:
            return None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        rc = self.proc.wait()
        if rc != 0:
            return f"command exited with status {rc}" if rc > 0 else f"command killed by signal {-rc}"
        return None


def make_sources(opts: Options) -> list[Source]:
    now = int(time.time())
    if opts.from_command:
        return [_command(opts, now)]
    if not opts.files:
        raise UsageError("no FILE given")
    if opts.name is not None and len(opts.files) != 1:
        raise UsageError("--name takes exactly one FILE")
    sources = []
    for path in opts.files:
        if path == "-":
            if not opts.name:
                raise UsageError("'-' (stdin) needs --name")
            sources.append(Source("-", opts.name, None, now))
            continue
        try:
            st = os.stat(path)
        except OSError as e:
            raise RstashError(f"{path}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise RstashError(f"{path}: not a regular file")
        name = opts.name if opts.name is not None else os.path.basename(path)  # --name '' is refused
        sources.append(Source(path, name, st.st_size, int(st.st_mtime)))
    for src in sources:
        problem = name_problem(src.name)
        if problem is not None:
            raise UsageError(f"{src.name!r}: name not allowed: {problem}")
    return sources


def _command(opts: Options, now: int) -> Source:
    if not opts.name:
        raise UsageError("--from-command needs --name")
    if not opts.files:
        raise UsageError("--from-command needs a command after --")
    problem = name_problem(opts.name)
    if problem is not None:  # checked before the command runs, not only by the server
        raise UsageError(f"{opts.name!r}: name not allowed: {problem}")
    import subprocess  # only for --from-command

    try:
        proc = subprocess.Popen(opts.files, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    except OSError as e:
        raise RstashError(f"{opts.files[0]}: {e.strerror}") from None
    return Source(" ".join(opts.files), opts.name, None, now, proc=proc)
