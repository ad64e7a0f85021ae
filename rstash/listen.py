"""Listening sockets and systemd's side of them: --listen addresses, inherited fds, sd_notify.

This module owns turning ``--listen [HOST:]PORT`` into bound, non-blocking,
close-on-exec sockets (every IPv6 one ``IPV6_V6ONLY``), adopting a listening
socket inherited from inetd ``wait`` or systemd ``Accept=no``, and sending
sd_notify(3) messages.

``PORT`` alone binds every address, ``0.0.0.0`` and
``[::]`` (each family its own socket); ``HOST:PORT`` and ``[V6]:PORT`` bind
what HOST resolves to. Every IPv6 socket is ``IPV6_V6ONLY``, whatever the
sysctl says, so ``--listen 0.0.0.0:P --listen [::]:P`` works and ``[::]:P``
means IPv6 only.

It must never accept a connection or read from one:
that is the accept loop's (rstash.serve).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

from .errors import Exit, RstashError
from .transport import is_listening_socket

__all__ = ["ListenError", "adopt_fd", "bind_listen", "parse_listen", "sd_notify", "sock_name"]


class ListenError(RstashError):
    """A ``--listen`` address is malformed or cannot be bound, or an inherited fd is unusable."""

    exit_status = Exit.LOCAL


# --------------------------------------------------------------------------- sd_notify


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's ``NOTIFY_SOCKET`` (sd_notify(3)); False when not possible.

    A path or an abstract name (leading ``@``); anything else is ignored. Never raises.
    """
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# --------------------------------------------------------------------------- listening sockets


def parse_listen(spec: str) -> tuple[str | None, str]:
    """``[HOST:]PORT`` -> (host or None for every address, port); raises ListenError.

    IPv6 addresses must be bracketed: ``[::1]:7370``.
    """
    text = spec.strip()
    host: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ListenError(f"--listen {spec}: write an IPv6 address as [ADDRESS]:PORT")
        host, port = text[1:end], text[end + 2:]
        if not host:
            raise ListenError(f"--listen {spec}: empty address")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ListenError(f"--listen {spec}: write an IPv6 address as [ADDRESS]:PORT")
        if not host:
            raise ListenError(f"--listen {spec}: empty address")
    else:
        host, port = None, text
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"--listen {spec}: {port!r} is not a port number (0-65535)")
    return host, port


def _format_address(sockaddr: Any, family: int) -> str:
    if family == socket.AF_INET6:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    if family == socket.AF_INET:
        return f"{sockaddr[0]}:{sockaddr[1]}"
    return str(sockaddr) or "unix"


def bind_listen(spec: str) -> list[socket.socket]:
    """Listening sockets for one ``--listen`` value (non-blocking, close-on-exec)."""
    host, port = parse_listen(spec)
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP, socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"--listen {spec}: {e.strerror}") from None
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, stype, proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6) or (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            try:
                s = socket.socket(family, stype, proto)
            except OSError as e:
                # PORT alone: a host without IPv6 still serves IPv4.
                if host is None and family == socket.AF_INET6:
                    continue
                raise ListenError(f"--listen {spec}: {e.strerror}") from None
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(sockaddr)
                s.listen(socket.SOMAXCONN)
                s.setblocking(False)
            except OSError as e:
                s.close()
                if host is None and family == socket.AF_INET6 and e.errno in (
                        errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue
                raise ListenError(f"--listen {spec}: {_format_address(sockaddr, family)}: "
                                  f"{e.strerror}") from None
            socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    if not socks:
        raise ListenError(f"--listen {spec}: no address to listen on")
    return socks


def adopt_fd(fd: int) -> socket.socket:
    """An inherited listening socket (inetd ``wait``, systemd ``Accept=no``) as a socket object.

    fds 0-2 are moved to a fresh close-on-exec fd and replaced by /dev/null: a
    child (or a hook) must never hold the listening socket, or the port would
    keep queueing connections after we stopped accepting.
    """
    if not is_listening_socket(fd):
        raise ListenError(f"fd {fd} is not a listening socket")
    if fd <= 2:
        new = os.dup(fd)  # non-inheritable
        null = os.open(os.devnull, os.O_RDWR)
        for low in (0, 1, 2):
            if _same_file(low, new):
                os.dup2(null, low)
        os.close(null)
        fd = new
    else:
        os.set_inheritable(fd, False)
    s = socket.socket(fileno=fd)
    s.setblocking(False)
    return s


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def sock_name(s: socket.socket) -> str:
    try:
        return _format_address(s.getsockname(), s.family)
    except OSError:
        return f"fd {s.fileno()}"
