"""--check-config's check of the log target: whether the service user's lines reach somewhere.

This module owns judging ``log`` (rstash-recv.toml(5)) for the service user:
a file (or, before it exists, its directory) writable by that user, the
syslog socket, and for ``auto`` where lines go when there is no syslog (the
fallback file in state_dir, rstash-recv(8) LOGGING). Like rstash.checks, it
must never change anything and never switch users.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rstash.checks import Report, ServiceUser, _unreachable, _user_name
from rstash.config import Config


def check_log_target(cfg: Config, user: ServiceUser, report: Report) -> None:
    """Whether the service user's log lines reach somewhere (rstash-recv(8) LOGGING)."""
    from rstash.log import DEV_LOG, JOURNAL_SOCKET, fallback_path, is_socket_path

    target = cfg.log
    if target == "stderr":
        report.add(None, "info", "log stderr")
        report.add(None, "warning", "log = \"stderr\": under inetd and ssh standard error "
                                    "is not kept, so every line would be lost there; "
                                    "use \"auto\" or a file")
        return
    if target == "syslog":
        problem = _socket_problem(DEV_LOG, user)
        if problem is None:
            report.add(None, "info", f"log syslog via {DEV_LOG} ({cfg.syslog_facility})")
        else:
            report.add(None, "error", f"log = \"syslog\": {problem}: every line would be lost "
                                      "(start a syslog daemon, or set log to \"auto\" or a file)")
        return
    if target != "auto":
        problem = _file_problem(Path(target), user)
        if problem is None:
            report.add(None, "info", f"log {target}: writable by {user.name}")
        else:
            report.add(None, "error", f"log {problem}")
        return
    # auto: journald when started by systemd with stderr to the journal, else syslog,
    # else stderr when it is usable, else the fallback file in state_dir.
    journal = "journald when started by systemd; " if is_socket_path(JOURNAL_SOCKET) else ""
    if _socket_problem(DEV_LOG, user) is None:
        report.add(None, "info", f"log auto: {journal}else syslog via {DEV_LOG}")
        return
    fallback = fallback_path(cfg.state_dir)
    problem = _file_problem(Path(fallback), user)
    if problem is None:
        report.add(None, "info", f"log auto: {journal}no {DEV_LOG}: to standard error when "
                                 "it is open (a terminal, a file, ssh's), else (under inetd, "
                                 f"where it is the connection) to {fallback}")
    else:
        report.add(None, "error", f"log auto: no syslog socket {DEV_LOG} and the fallback "
                                  f"{problem}: under inetd every line would be lost "
                                  f"(start a syslog daemon, or set log to a writable file)")


def _socket_problem(path: str, user: ServiceUser) -> str | None:
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    if not user.may(st, 2):
        return f"{path} is not writable by {user.name}"
    return None


def _file_problem(path: Path, user: ServiceUser) -> str | None:
    """Why ``user`` cannot append to the file ``path`` (or create it), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        where = path.parent
        try:
            st = os.stat(where)
        except OSError as e:
            return f"{path}: its directory {where}: {e.strerror}"
        blocked = _unreachable(where / "x", user)
        if blocked is not None:
            return f"{path}: {blocked} is not searchable by {user.name}"
        if not user.may(st, 2 | 1):
            return (f"{path} does not exist and its directory {where} is not writable by "
                    f"{user.name} (owner {_user_name(st.st_uid)}, mode "
                    f"{stat.S_IMODE(st.st_mode):04o})")
        return None
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    blocked = _unreachable(path, user)
    if blocked is not None:
        return f"{path}: {blocked} is not searchable by {user.name}"
    if not user.may(st, 2):
        return (f"{path} is not writable by {user.name} (owner {_user_name(st.st_uid)}, "
                f"mode {stat.S_IMODE(st.st_mode):04o})")
    return None
