"""Destinations: ``rstash://HOST[:PORT]/BOX`` and ``ssh://[USER@]HOST[:PORT]/BOX``,
and the ssh command line for the second (rstash-send(1), DESTINATIONS).

Pure functions. A destination that could smuggle an option into ssh or a
command into a shell is refused here, before anything is started.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from ..errors import UsageError
from ..names import is_box_name

_URL = re.compile(r"(?P<scheme>rstash|ssh)://(?:(?P<user>[^@/]+)@)?"
                  r"(?P<host>\[[^\]]+\]|[^:/\[\]]+)(?::(?P<port>[0-9]{1,5}))?/(?P<box>[^/]+)\Z")
_SAFE_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?")
_SAFE_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Dest:
    scheme: str  #: "rstash" or "ssh"
    host: str  #: without the brackets of an IPv6 literal
    port: int | None
    box: str
    user: str | None = None


def parse_dest(text: str) -> Dest:
    m = _URL.match(text)
    if m is None:
        raise UsageError(f"{text}: not a destination (rstash://HOST[:PORT]/BOX or ssh://[USER@]HOST[:PORT]/BOX)")
    scheme, user, host, port, box = m.group("scheme", "user", "host", "port", "box")
    host = host[1:-1] if host.startswith("[") else host
    if scheme == "rstash" and user:
        raise UsageError(f"{text}: rstash:// takes no user")
    # An argument that begins with '-' would be an option to ssh: never pass one.
    if host.startswith("-") or (user or "").startswith("-"):
        raise UsageError(f"{text}: host or user begins with '-': refused")
    # The host reaches a shell through --proxy-command's %h (and ssh's ProxyCommand %h,
    # %r: CVE-2023-51385): only a DNS name, an IPv4 or a bracketed IPv6 literal passes.
    if not (_SAFE_HOST.fullmatch(host) or (m.group("host").startswith("[") and _IPV6.fullmatch(host))) \
            or (user is not None and not _SAFE_USER.fullmatch(user)):
        raise UsageError(f"{text}: host or user has characters outside [A-Za-z0-9._-]: refused"
                         " (an unusual ssh user name can be set in ssh_config)")
    if not is_box_name(box):
        raise UsageError(f"{text}: {box!r} is not a box name")
    if port is not None and not 0 < int(port) < 65536:
        raise UsageError(f"{text}: bad port")
    return Dest(scheme, host, int(port) if port else None, box, user)


def ssh_argv(rsh: str, dest: Dest, remote_path: str, subsystem: bool) -> list[str]:
    """ssh's argv: ``rsh`` split like a shell would (never run by one), then our options.

    The box is never on the remote command line: it travels in HELLO, under the key's proof.
    """
    argv = shlex.split(rsh)
    if not argv:
        raise UsageError("empty --rsh")
    if dest.port is not None:
        argv += ["-p", str(dest.port)]
    if dest.user is not None:
        argv += ["-l", dest.user]
    argv += ["-T", "-o", "BatchMode=yes"]
    if subsystem:
        return [*argv, "-s", "--", dest.host, "rstash"]
    return [*argv, "--", dest.host, remote_path]
