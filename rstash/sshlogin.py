"""Whether this rstash-recv runs for an SSH login, and which SSH key that login used.

A box with ``auth = "ssh"`` or ``"key+ssh"`` (rstash-recv.toml(5)) is served
only by a process that sshd started as the forced command of one key
(rstash-recv(8) SSH; rstash(7) CONSTRUCTION 11): this module owns those
conditions — exactly one ``--box``, one session on stdin/stdout (the caller
asks only on that path, never in an accept loop), ``SSH_CONNECTION`` set, fd 0
not a network socket — and reading the key that sshd exposes with
``ExposeAuthInfo yes`` (the file ``SSH_USER_AUTH`` names), for the log.

It must never judge a HELLO (rstash.hello does), and never believe the
environment alone: an inetd or socket-activated process started from an ssh
shell inherits ``SSH_CONNECTION``, which is why fd 0 is asked too. The
exposed key only names the login in logs; nothing is decided by it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rstash.transport import ask_socket

if TYPE_CHECKING:
    from rstash.config import BoxConfig

#: sshd writes a few lines; anything bigger is not its file.
MAX_AUTH_INFO = 65536
#: The name logged when sshd does not expose the key (ExposeAuthInfo off).
UNKNOWN_KEY = "ssh:unexposed (sshd ExposeAuthInfo off)"


@dataclass(frozen=True)
class SshLogin:
    """This process serves one SSH login, limited to ``box``; ``key_name`` names its key."""

    box: str
    key_name: str


def stdin_is_network_socket(fd: int = 0) -> bool:
    """True when ``fd`` is a socket other than a Unix one (fails closed: unknown is network)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
    except OSError:
        return True
    return ask_socket(fd, lambda s: s.family != socket.AF_UNIX, failed=True)


def ssh_login(boxes: frozenset[str] | None, environ: Mapping[str, str] | None = None,
              fd: int = 0) -> SshLogin | None:
    """The login this single stdin/stdout session serves, or None when the conditions fail.

    Call it only for one session on stdin/stdout: an accept loop or a socket from
    LISTEN_FDS never serves a login, whatever the environment says.
    """
    env = os.environ if environ is None else environ
    if boxes is None or len(boxes) != 1:
        return None
    if not env.get("SSH_CONNECTION", "").strip():
        return None
    if stdin_is_network_socket(fd):
        return None
    (box,) = boxes
    path = env.get("SSH_USER_AUTH")
    return SshLogin(box, exposed_key(path) if path else UNKNOWN_KEY)


def exposed_key(path: str) -> str:
    """``SHA256:… (ssh TYPE)`` of the publickey sshd exposed in ``path``, or UNKNOWN_KEY.

    The file is sshd's (mode 0600, owned by the login's user): a symlink, anything
    but a regular file, a file of another user or one others may write is ignored,
    since another user could have put it there to name a key that was never used.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return UNKNOWN_KEY
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_size > MAX_AUTH_INFO):
            return UNKNOWN_KEY
        data = os.read(fd, MAX_AUTH_INFO + 1)
    except OSError:
        return UNKNOWN_KEY
    finally:
        os.close(fd)
    names = [name for line in data.decode("ascii", "replace").splitlines()
             if (name := _publickey_name(line)) is not None]
    # With AuthenticationMethods publickey,publickey sshd lists each key used.
    return ", ".join(names) if names else UNKNOWN_KEY


def _publickey_name(line: str) -> str | None:
    """``SHA256:<base64> (ssh TYPE)`` for a ``publickey TYPE BASE64 …`` line, as ssh-keygen -l."""
    words = line.split()
    if len(words) < 3 or words[0] != "publickey":
        return None
    try:
        blob = base64.b64decode(words[2], validate=True)
    except (binascii.Error, ValueError):
        return None
    ktype = "".join(c for c in words[1] if c.isalnum() or c in "-@.")[:64]
    digest = base64.b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode("ascii")
    return f"SHA256:{digest} (ssh {ktype})"


def reached_by(box: BoxConfig) -> str:
    """How a client can reach ``box`` (rstash-recv(8) SSH), in one line."""
    forced = f'only as the forced command "rstash-recv --box {box.name}" of an SSH login'
    if box.auth == "key":
        return "auth key: reached with one of its keys, over any transport"
    if box.auth == "key+ssh":
        return f"auth key+ssh: reached with one of its keys, {forced}; never over rstash://, inetd or --listen"
    also = " (or with one of its keys)" if box.keys else ""
    return f"auth ssh: reached with the SSH key alone{also}, {forced}; never over rstash://, inetd or --listen"
