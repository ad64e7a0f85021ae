"""Log lines: one per session and per file, ``key=value`` with a fixed vocabulary.

Targets: ``stderr``, ``syslog``, a file path (reopened when logrotate moved it),
or ``auto`` (journald when JOURNAL_STREAM names fd 2, else syslog when
/dev/log is a socket, else stderr when it is open and not /dev/null, else the
fallback file ``<state_dir>/rstash-recv.log``: under inetd with no syslog
daemon, lines are never lost silently). Peer-supplied strings are JSON-escaped and cut
at 300 bytes so that a hostile name can neither forge a log line nor flood it.
This module never writes to the connection and never logs a secret.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rstash.settings import ServerSettings

PEER_CUT = 300
#: A hook's output (field ``output``) is kept up to 4 KiB.
OUTPUT_CUT = 4096
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_SYSLOG_PRIO = {"debug": 7, "info": 6, "warning": 4, "error": 3}
#: The file ``log = "auto"`` writes to, in state_dir, when there is no journal,
#: no syslog socket and no usable stderr (rstash-recv(8) LOGGING).
FALLBACK_NAME = "rstash-recv.log"
DEV_LOG = "/dev/log"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_SAFE = re.compile(r"[A-Za-z0-9._\-:/+@,=~]+")


def quote(value: object, limit: int = PEER_CUT) -> str:
    """One field value: bare when it is safe, else JSON-escaped (ASCII only) and cut."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = str(value)
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) > limit:
        text = raw[:limit].decode("utf-8", "ignore") + "…"
    if _SAFE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def format_fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={quote(v, OUTPUT_CUT if k == 'output' else PEER_CUT)}"
                    for k, v in fields.items() if v is not None)


class Logger:
    """Writes log lines to one target; ``emit`` never raises."""

    def __init__(self, target: str = "stderr", level: str = "info", facility: str = "daemon",
                 ident: str = "rstash-recv", fallback: str | None = None) -> None:
        self.level = LEVELS.get(level, 20)
        self.ident = ident
        self.target = resolve_target(target, fallback)
        self.facility = facility
        self._file: TextIO | None = None
        self._ino: tuple[int, int] | None = None
        self._syslog_open = False

    def set_level(self, level: str) -> None:
        self.level = LEVELS.get(level, 20)

    def emit(self, level: str, fields: dict[str, Any]) -> None:
        if LEVELS.get(level, 20) < self.level:
            return
        text = format_fields(fields)
        try:
            if self.target == "syslog":
                self._syslog(level, text)
            elif self.target == "stderr":
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
                sys.stderr.write(f"{stamp} {self.ident}[{os.getpid()}]: {level} {text}\n")
                sys.stderr.flush()
            elif self.target == "journal":
                sys.stderr.write(f"<{_SYSLOG_PRIO[level]}>{text}\n")
                sys.stderr.flush()
            else:
                self._to_file(level, text)
        except Exception:  # noqa: S110 - a log target failing must never end a session
            pass

    def info(self, **fields: Any) -> None:
        self.emit("info", fields)

    def warning(self, **fields: Any) -> None:
        self.emit("warning", fields)

    def error(self, **fields: Any) -> None:
        self.emit("error", fields)

    def debug(self, **fields: Any) -> None:
        self.emit("debug", fields)

    def _syslog(self, level: str, text: str) -> None:
        import syslog

        if not self._syslog_open:
            fac = getattr(syslog, "LOG_" + self.facility.upper(), syslog.LOG_DAEMON)
            syslog.openlog(self.ident, syslog.LOG_PID, fac)
            self._syslog_open = True
        syslog.syslog(_SYSLOG_PRIO[level], text)

    def _to_file(self, level: str, text: str) -> None:
        # logrotate moves the file away: reopen when the path no longer names our file.
        try:
            st = os.stat(self.target)
            ino: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            ino = None
        if self._file is None or ino != self._ino:
            if self._file is not None:
                self._file.close()
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._file = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
            st = os.fstat(fd)
            self._ino = (st.st_dev, st.st_ino)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # one write per line, O_APPEND: lines of concurrent sessions never interleave
        self._file.write(f"{stamp} {self.ident}[{os.getpid()}]: {level} {text}\n")
        self._file.flush()


def fallback_path(state_dir: Path | str) -> str:
    """Where ``log = "auto"`` writes when nothing else would take the lines."""
    return str(Path(state_dir) / FALLBACK_NAME)


def server_logger(settings: ServerSettings) -> Logger:
    """The serving process's logger as rstash-recv.toml(5) configures it."""
    return Logger(settings.log, settings.log_level, settings.syslog_facility,
                  fallback=fallback_path(settings.state_dir))


def is_socket_path(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def stderr_usable() -> bool:
    """Whether fd 2 is open and not /dev/null (where recv's start-up points a connection)."""
    try:
        st = os.fstat(2)
        null = os.stat(os.devnull)
    except OSError:
        return False
    return not (stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev)


def resolve_target(target: str, fallback: str | None = None) -> str:
    """What ``target`` means here: ``journal``, ``syslog``, ``stderr`` or a file path.

    ``auto`` with neither journal, syslog socket nor usable stderr is ``fallback``
    (when given), so that a serving process's lines always reach a documented place.
    """
    if target != "auto":
        return target
    stream = os.environ.get("JOURNAL_STREAM", "")
    if stream:
        try:
            dev, ino = (int(x) for x in stream.split(":"))
            st = os.fstat(2)
            if (st.st_dev, st.st_ino) == (dev, ino):
                return "journal"
        except (ValueError, OSError):
            pass
    if is_socket_path(DEV_LOG):
        return "syslog"
    if fallback is not None and not stderr_usable():
        return fallback
    return "stderr"
