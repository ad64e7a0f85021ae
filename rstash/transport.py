"""Moving bytes with deadlines over file descriptors: a socket, or a pipe pair.

This module owns :class:`FdStream` (a socket, stdin/stdout under inetd or ssh,
an ssh subprocess's pipes on the client) and the questions asked of an fd:
is it a socket, is it listening, who is the peer (one function,
:func:`peer_address`, for every deployment shape). Every read and write waits
in ``poll()`` against a ``time.monotonic()`` deadline: no SIGALRM, no
blocking call without a bound. It must never know of frames or lines, and
never spawn or end a process.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import time
from collections.abc import Callable

from .errors import PeerTimeout, TransportError


class PeerClosed(TransportError):
    """The peer closed the connection while we were writing."""


READ_SIZE = 256 * 1024
#: How long, and how much, a server reads after its last line (rstash(7) "Closing the
#: connection"): enough for what a pipelining client has in flight on a LAN, and little
#: enough that a peer cannot keep a session alive by sending.
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 << 20


class FdStream:
    """A byte stream over one fd (a socket) or two (a pipe pair, ssh's stdio)."""

    def __init__(self, rfd: int, wfd: int | None = None) -> None:
        self.rfd = rfd
        self.wfd = rfd if wfd is None else wfd
        os.set_blocking(self.rfd, False)
        if self.wfd != self.rfd:
            os.set_blocking(self.wfd, False)
        self.bytes_in = 0
        self.bytes_out = 0

    def _wait(self, fd: int, events: int, deadline: float, what: str) -> None:
        p = select.poll()
        p.register(fd, events)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"timed out waiting to {what}")
            if p.poll(left * 1000):
                return

    def read(self, deadline: float, size: int = READ_SIZE) -> bytes:
        """Up to ``size`` bytes; ``b""`` at end of stream."""
        while True:
            try:
                data = os.read(self.rfd, size)
            except BlockingIOError:
                self._wait(self.rfd, select.POLLIN, deadline, "read")
                continue
            except ConnectionResetError:
                return b""
            except OSError as e:
                raise TransportError(f"read failed: {e.strerror}") from None
            self.bytes_in += len(data)
            return data

    def readable(self, timeout: float) -> bool:
        p = select.poll()
        p.register(self.rfd, select.POLLIN)
        return bool(p.poll(max(0.0, timeout) * 1000))

    def write(self, data: bytes | memoryview, deadline: float, *, idle: float | None = None,
              on_readable: Callable[[], None] | None = None) -> None:
        """Write all of ``data`` by ``deadline`` (pushed ``idle`` seconds past each bit of
        progress when given). While the peer cannot take more, ``on_readable`` is called
        whenever it has something to say: a peer blocked on its own writes to us would
        otherwise never read again."""
        view = memoryview(data)
        p = select.poll()
        if on_readable is not None and self.rfd == self.wfd:
            # A socket: registering one fd twice would replace its mask, not add to it.
            p.register(self.wfd, select.POLLOUT | select.POLLIN)
        else:
            p.register(self.wfd, select.POLLOUT)
            if on_readable is not None:
                p.register(self.rfd, select.POLLIN)
        while view:
            try:
                n = os.write(self.wfd, view)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout("timed out waiting to write") from None
                for fd, ev in p.poll(left * 1000):
                    if on_readable is not None and fd == self.rfd and ev & (select.POLLIN | select.POLLHUP):
                        on_readable()
                        if idle is not None:
                            deadline = time.monotonic() + idle
                continue
            except (BrokenPipeError, ConnectionResetError):
                raise PeerClosed("connection closed by peer") from None
            except OSError as e:
                raise TransportError(f"write failed: {e.strerror}") from None
            self.bytes_out += n
            view = view[n:]
            if idle is not None:
                deadline = time.monotonic() + idle


    def finish(self, linger: float = LINGER_SECONDS, limit: int = LINGER_BYTES) -> None:
        """Close our sending direction, then read and discard what the peer still sends until
        it closes, for at most ``linger`` seconds and ``limit`` bytes.

        A socket is shut down for writing; a pipe's write end is replaced by /dev/null (the fd
        number stays taken); anything else (a file) is left as it is. Unread bytes at close()
        make TCP send a reset instead of a FIN, and a reset can destroy our last line before the
        peer reads it. Never raises.
        """
        try:
            if self.wfd == self.rfd:
                if is_socket(self.wfd):
                    sock = socket.socket(fileno=os.dup(self.wfd))
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    finally:
                        sock.close()
            elif stat.S_ISFIFO(os.fstat(self.wfd).st_mode):  # ssh: sshd then ends the channel
                null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.dup2(null, self.wfd, inheritable=False)
                finally:
                    os.close(null)
        except OSError:
            pass
        deadline = time.monotonic() + linger
        taken = 0
        while taken < limit:
            try:
                data = self.read(deadline, min(READ_SIZE, limit - taken))
            except (PeerTimeout, TransportError):
                return
            if not data:
                return
            taken += len(data)


PIPE_SIZE = 1 << 20


def widen_pipe(fd: int) -> None:
    """Grow a pipe's buffer to 1 MiB (Linux F_SETPIPE_SZ; the default limit for any user).

    With the default 64 KiB, a stream through ssh moves in small slices and both ends
    wake up for each; a failure here only costs speed.
    """
    import fcntl

    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass


def peer_address(fd: int = 0) -> str | None:
    """The client's address: getpeername() on a socket, else SSH_CONNECTION / SSH_CLIENT.

    The environment is believed only when fd 0 is not a socket: a TCP peer can't
    set it, and under ssh sshd sets it for us.
    """
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        sock = None
    if sock is not None:
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    return normalise_address(sock.getpeername()[0])
                except OSError:
                    return None
            if sock.family == socket.AF_UNIX:
                return None
        finally:
            sock.close()
    for var in ("SSH_CONNECTION", "SSH_CLIENT"):
        value = os.environ.get(var, "").split()
        if value:
            return normalise_address(value[0])
    return None


def normalise_address(addr: str) -> str:
    """Drop a scope id and match IPv4-mapped IPv6 as IPv4."""
    import ipaddress

    addr = addr.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def is_socket(fd: int) -> bool:

    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def ask_socket(fd: int, question: Callable[[socket.socket], object], *, failed: bool) -> bool:
    """``question`` asked of a duplicate of the socket ``fd``; ``failed`` when it cannot be asked."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return failed
    try:
        return bool(question(sock))
    except OSError:
        return failed
    finally:
        sock.close()


def is_listening_socket(fd: int) -> bool:
    return is_socket(fd) and ask_socket(
        fd, lambda s: s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), failed=False)


