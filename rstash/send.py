"""rstash-send: the client's command line (rstash-send(1)).

One driver loop: open the destination, prove the key, stream every file
pipelined while reading replies as they come, verify every receipt, and map
the outcomes to one exit status by the precedence of rstash-send(1).
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from . import DEFAULT_PORT, PROTOCOL, __version__, auth, protocol
from .errors import (
    AuthenticationFailed,
    Exit,
    KeyFileError,
    PeerTimeout,
    RemoteProtocolError,
    Reply,
    RstashError,
    TransportError,
    UsageError,
    outcome_of,
    worst_exit,
)
from .names import is_box_name, name_problem
from .transport import FdStream, PeerClosed, widen_pipe
from .units import human_size

CHUNK = 256 * 1024

USAGE = """\
rstash-send [OPTIONS] DEST FILE...
rstash-send [OPTIONS] --name NAME --from-command DEST -- CMD [ARG...]
rstash-send [OPTIONS] --stdout BOX FILE...
rstash-send --fingerprint -k KEY
  DEST = rstash://HOST[:PORT]/BOX | ssh://[USER@]HOST[:PORT]/BOX"""


def _parser() -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog="rstash-send", usage=USAGE,
        description="Send files into an rstash box (rstash-send(1)).",
        epilog="Exit status: 0 all stored; 1 a file refused; 2 usage or local error; "
               "3 authentication failed; 4 network or ssh failure; 5 protocol error; "
               "75 temporary refusal, try later.")
    p.add_argument("dest", nargs="?", help="rstash://HOST[:PORT]/BOX, ssh://[USER@]HOST[:PORT]/BOX, "
                   "or BOX with --stdout")
    p.add_argument("files", nargs="*", metavar="FILE", help="files to send; - for stdin")
    p.add_argument("-k", "--key", metavar="FILE", help="box key (else RSTASH_KEY_FILE)")
    p.add_argument("--name", help="remote name (one FILE only; default the file's base name)")
    p.add_argument("--json", action="store_true", help="JSON Lines on stdout, one object per file")
    p.add_argument("--ignore-existing", action="store_true",
                   help="a file refused as 'exists' counts as success")
    p.add_argument("--dry-run", action="store_true", help="ask the server's verdict, send no data")
    p.add_argument("--test", action="store_true", help="authenticate and disconnect")
    p.add_argument("--fingerprint", action="store_true", help="print the key's fingerprint and exit")
    p.add_argument("--from-command", action="store_true",
                   help="stream the stdout of the command after --; nothing stored if it fails")
    p.add_argument("--stdout", action="store_true",
                   help="pipe mode: write a one-way stream to stdout (… | nc -N host 7370)")
    p.add_argument("-e", "--rsh", metavar="CMD", help='ssh command for ssh:// (else RSTASH_RSH; default "ssh")')
    p.add_argument("--remote-path", metavar="CMD", default="rstash-recv",
                   help="remote command for ssh:// (default rstash-recv)")
    p.add_argument("--subsystem", action="store_true", help='request the sshd subsystem "rstash"')
    p.add_argument("--proxy-command", metavar="CMD", help="reach rstash:// through CMD (%%h %%p)")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                   help="limit for connecting and the greeting (default 30)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="limit for any one read or write (default 120)")
    p.add_argument("--busy-wait", type=float, default=120.0, metavar="S",
                   help="retry '421 busy' for up to S seconds (default 120)")
    p.add_argument("--bwlimit", metavar="RATE", help="bytes per second, e.g. 20MiB")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="a progress bar on stderr (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="no line for a stored file")
    p.add_argument("-v", "--verbose", action="store_true", help="say more (retries)")
    p.add_argument("--server-id", metavar="ID", help="must match the server's server_id")
    p.add_argument("-V", "--version", action="store_true", help="print program and protocol version")
    return p


# --- destinations ---------------------------------------------------------------

_URL = re.compile(r"(?P<scheme>rstash|ssh)://(?:(?P<user>[^@/]+)@)?"
                  r"(?P<host>\[[^\]]+\]|[^:/\[\]]+)(?::(?P<port>[0-9]{1,5}))?/(?P<box>[^/]+)\Z")
_SAFE_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?")
_SAFE_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Dest:
    scheme: str
    host: str
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
    import shlex

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


# --- connections ---------------------------------------------------------------


class Connection:
    """A bidirectional byte stream to a server and what it takes to close it."""

    def __init__(self, stream: FdStream, closers: list[Any], proc: Any = None,
                 stderr_tail: list[str] | None = None) -> None:
        self.stream = stream
        self.closers = closers
        self.proc = proc
        self.stderr_tail = stderr_tail if stderr_tail is not None else []
        self.stderr_pump: Any = None

    def last_stderr_line(self, timeout: float = 5.0) -> str | None:
        """ssh's last stderr line, read after ssh exited and its stderr reached EOF.

        Without the wait, the stdout EOF often wins the race against the thread that
        copies stderr, and the reason ssh printed would be lost.
        """
        if self.proc is not None and self.stderr_pump is not None:
            deadline = time.monotonic() + timeout
            try:
                self.proc.wait(timeout)
            except Exception:  # still running: it did not fail (yet), so no reason to quote
                return None
            self.stderr_pump.join(max(0.0, deadline - time.monotonic()))
        return self.stderr_tail[-1] if self.stderr_tail else None

    def close(self) -> None:
        for c in self.closers:
            try:
                c()
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


def _spawn(argv: list[str], *, shell: bool = False, tail: list[str] | None = None) -> Connection:
    import subprocess
    import threading

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if tail is not None else None,
                                shell=shell, close_fds=True)
    except OSError as e:
        raise TransportError(f"{argv[0]}: {e.strerror}") from None
    assert proc.stdin is not None and proc.stdout is not None
    pump_thread = None
    if tail is not None:
        assert proc.stderr is not None
        err = proc.stderr

        def pump() -> None:  # ssh's stderr passes through; its last line is kept for errors
            for raw in iter(err.readline, b""):
                sys.stderr.buffer.write(raw)
                sys.stderr.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    tail[:] = [line]

        pump_thread = threading.Thread(target=pump, daemon=True)
        pump_thread.start()
    widen_pipe(proc.stdin.fileno())
    widen_pipe(proc.stdout.fileno())
    stream = FdStream(proc.stdout.fileno(), proc.stdin.fileno())
    conn = Connection(stream, [proc.stdin.close, proc.stdout.close], proc, tail)
    conn.stderr_pump = pump_thread
    return conn


def connect(dest: Dest, opts: Any) -> Connection:
    if dest.scheme == "ssh":
        rsh = opts.rsh or os.environ.get("RSTASH_RSH") or "ssh"
        return _spawn(ssh_argv(rsh, dest, opts.remote_path, opts.subsystem), tail=[])
    port = dest.port or DEFAULT_PORT
    if opts.proxy_command:
        cmd = opts.proxy_command.replace("%h", dest.host).replace("%p", str(port)).replace("%%", "%")
        return _spawn(["/bin/sh", "-c", f"exec {cmd}"])
    import socket

    try:
        sock = socket.create_connection((dest.host, port), timeout=opts.connect_timeout)
    except TimeoutError:
        raise TransportError(f"{dest.host} port {port}: connect timed out") from None
    except OSError as e:
        raise TransportError(f"{dest.host} port {port}: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(FdStream(sock.fileno()), [sock.close])


# --- sources ----------------------------------------------------------------------


@dataclass
class Source:
    label: str  # what the user named: a path, "-", or the command
    name: str  # the remote name
    size: int | None
    mtime: int
    fobj: BinaryIO | None = None
    proc: Any = None

    def open(self) -> None:
        if self.label == "-" or self.proc is not None:
            return
        try:
            self.fobj = open(self.label, "rb")
        except OSError as e:
            raise RstashError(f"{self.label}: {e.strerror}") from None

    def read_fd(self) -> int:
        if self.proc is not None:
            return int(self.proc.stdout.fileno())
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
        self.proc.stdout.close()
        rc = self.proc.wait()
        if rc != 0:
            return f"command exited with status {rc}" if rc > 0 else f"command killed by signal {-rc}"
        return None


def make_sources(opts: Any) -> list[Source]:
    now = int(time.time())
    if opts.from_command:
        import subprocess

        if not opts.name:
            raise UsageError("--from-command needs --name")
        if not opts.files:
            raise UsageError("--from-command needs a command after --")
        problem = name_problem(opts.name)
        if problem is not None:  # checked before the command runs, not only by the server
            raise UsageError(f"{opts.name!r}: name not allowed: {problem}")
        try:
            proc = subprocess.Popen(opts.files, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        except OSError as e:
            raise RstashError(f"{opts.files[0]}: {e.strerror}") from None
        return [Source(" ".join(opts.files), opts.name, None, now, proc=proc)]
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
        import stat as stat_

        if not stat_.S_ISREG(st.st_mode):
            raise RstashError(f"{path}: not a regular file")
        name = opts.name if opts.name is not None else os.path.basename(path)  # --name '' is refused
        sources.append(Source(path, name, st.st_size, int(st.st_mtime)))
    for src in sources:
        problem = name_problem(src.name)
        if problem is not None:
            raise UsageError(f"{src.name!r}: name not allowed: {problem}")
    return sources


# --- results ----------------------------------------------------------------------


@dataclass
class Result:
    name: str
    final_name: str | None = None
    status: str = "error"
    code: int | None = None
    bytes: int = 0
    sha256: str | None = None
    message: str = ""

    def exit_status(self, ignore_existing: bool) -> int:
        if self.status in ("stored", "would_store"):
            return Exit.OK
        if self.status == "exists":
            return Exit.OK if ignore_existing else Exit.REFUSED
        if self.status == "temporary":
            return Exit.TEMPFAIL
        if self.status == "refused":
            return Exit.REFUSED
        return Exit.LOCAL


# --- the session ------------------------------------------------------------------


class Aborted(Exception):
    """The current file was refused while we were still sending it."""


@dataclass
class Session:
    opts: Any
    key: auth.Key
    box: str
    conn: Connection | None = None
    proto: protocol.ClientConnection | None = None
    results: dict[int, Result] = field(default_factory=dict)
    sources: dict[int, Source] = field(default_factory=dict)
    done: protocol.Done | None = None
    session_error: tuple[int, int | None, str] | None = None
    refused_current: bool = False
    got_bytes: bool = False
    bar: Any = None

    # -- I/O helpers --

    def _deadline(self) -> float:
        return time.monotonic() + float(self.opts.timeout)

    def _pump(self, timeout: float) -> None:
        """Read what the server sent within ``timeout`` and handle every event."""
        assert self.conn is not None and self.proto is not None
        if timeout > 0 and not self.conn.stream.readable(timeout):
            return
        if timeout <= 0 and not self.conn.stream.readable(0):
            return
        data = self.conn.stream.read(self._deadline())
        if data:
            self.got_bytes = True
        self.proto.receive_data(data)
        self._events()

    def _events(self) -> None:
        assert self.proto is not None
        while True:
            if self.proto.state is protocol.ClientState.CLOSED:
                return
            ev = self.proto.next_event()
            if ev is protocol.NEED_DATA:
                return
            self._on_event(ev)

    def _on_event(self, ev: protocol.ClientEvent) -> None:
        if isinstance(ev, protocol.Receipt):
            src = self.sources.get(ev.index)
            res = self.results[ev.index]
            res.code = ev.code
            res.status = outcome_of(ev.code, dry_run=ev.dry_run)
            res.final_name = ev.final_name.decode("utf-8", "replace")
            if ev.code == Reply.STORED and not ev.dry_run:
                res.bytes, res.sha256 = ev.size, ev.sha256
            res.message = ev.reason
            if src is not None and self.proto is not None and self.proto.current_index == ev.index:
                self.refused_current = True
            self._report(res)
        elif isinstance(ev, protocol.Done):
            self.done = ev
        elif isinstance(ev, protocol.SessionRefused):
            self._session_refused(ev.code, ev.text)
        elif isinstance(ev, protocol.ConnectionClosed):
            if self.done is None and self.session_error is None:
                raise TransportError(self._closed_message())

    def _closed_message(self) -> str:
        last = self.conn.last_stderr_line() if self.conn and not self.got_bytes else None
        if last:
            return f"ssh failed: {last}"
        return "connection closed by the server before the session completed"

    def _session_refused(self, code: int, text: str) -> None:
        if code == Reply.AUTH_FAILED:
            raise AuthenticationFailed(f"authentication failed ({text})", reply=code)
        if code in (Reply.INTEGRITY, Reply.PROTOCOL_ERROR):
            raise RemoteProtocolError(f"server: {text}", reply=code)
        if code == Reply.BUSY:
            if self.proto is not None and self.proto.state is protocol.ClientState.AWAIT_GREETING:
                raise _Busy(text, reply=code)  # nothing sent yet: the whole session may be retried
            # "421 timeout" mid-session: stdin or a command may be half read, so a retry
            # would store the rest as if it were the whole stream. The session failed.
            raise TransportError(f"server: {text}", reply=code)
        status = Exit.TEMPFAIL if 400 <= code < 500 else Exit.REFUSED
        if code in (Reply.VERSION_NOT_SUPPORTED, Reply.METHOD_NOT_SUPPORTED):
            status = Exit.PROTOCOL
        raise RstashError(f"server: {text}", exit_status=status, reply=code)

    def write(self, data: bytes | memoryview) -> None:
        """Write everything, reading replies whenever the server has some (no deadlock)."""
        assert self.conn is not None
        try:
            self.conn.stream.write(data, self._deadline(), idle=float(self.opts.timeout),
                                   on_readable=lambda: self._pump(0))
        except PeerClosed:
            # The server closed: its last lines say why.
            self._drain()
            raise TransportError(self._closed_message()) from None

    def _drain(self) -> None:
        try:
            for _ in range(100):
                self._pump(0.5)
        except TransportError:
            pass

    # -- the protocol --

    def handshake(self) -> None:
        assert self.proto is not None
        deadline = time.monotonic() + self.opts.connect_timeout
        while self.proto.state is protocol.ClientState.AWAIT_GREETING:
            if time.monotonic() > deadline:
                raise PeerTimeout("timed out waiting for the server's greeting")
            self._pump(max(0.01, deadline - time.monotonic()))
            if self.proto.state is protocol.ClientState.CLOSED:  # type: ignore[comparison-overlap]
                raise TransportError(self._closed_message())
        import secrets

        self.write(self.proto.hello(secrets.token_bytes(32), int(time.time())))

    def send_file(self, index: int, src: Source, bwlimit: int | None) -> None:
        assert self.proto is not None
        self.results[index] = Result(src.name)
        self.sources[index] = src
        self.write(self.proto.file(src.name.encode("utf-8"), src.size, src.mtime,
                                   dry_run=self.opts.dry_run))
        if self.opts.dry_run:
            return
        self.refused_current = False
        src.open()
        fd = src.read_fd()
        sent = 0
        started = time.monotonic()
        bar = self._bar(src)
        try:
            while True:
                self._pump(0)
                if self.refused_current:
                    self.write(self.proto.abort())
                    src.discard()
                    return
                want = CHUNK if src.size is None else min(CHUNK, src.size - sent)
                if want == 0:
                    break
                chunk = self._read_source(fd, want)
                if not chunk:
                    if self.refused_current:
                        # Refused while we waited for the source: not its end of file
                        # (that would be "shrank" or a failed producer); ABORT above.
                        continue
                    break
                hdr = self.proto.data_header(len(chunk))
                self.proto.data_sent(chunk)
                self.write(hdr + chunk if len(chunk) < 65536 else hdr)
                if len(chunk) >= 65536:
                    self.write(chunk)
                sent += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                if bwlimit:
                    ahead = sent / bwlimit - (time.monotonic() - started)
                    if ahead > 0:
                        self._pump(ahead)
            problem = src.failed()
            if problem is None and src.size is not None and sent != src.size:
                problem = f"file shrank while sending ({sent} of {src.size} bytes)"
            if problem is not None:
                self.results[index].message = problem
                self.results[index].status = "error"
                self.write(self.proto.abort())
                raise _SourceFailed(problem)
            self.write(self.proto.end())
        finally:
            src.close()
            if bar is not None:
                bar.close()

    def _read_source(self, fd: int, want: int) -> bytes:
        # Read what is there (stdin as it arrives), answering the server meanwhile.
        while True:
            p = select.poll()
            p.register(fd, select.POLLIN)
            assert self.conn is not None
            p.register(self.conn.stream.rfd, select.POLLIN)
            ready = dict(p.poll(1000))
            if self.conn.stream.rfd in ready:
                self._pump(0)
                if self.refused_current:
                    return b""
            if fd in ready:
                try:
                    return os.read(fd, want)
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise RstashError(f"read failed: {e.strerror}") from None

    def _bar(self, src: Source) -> Any:
        show = self.opts.progress
        if show is None:
            show = sys.stderr.isatty() and not self.opts.quiet
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(total=src.size, desc=src.name, unit="B", unit_scale=True, unit_divisor=1024,
                    file=sys.stderr, leave=False, dynamic_ncols=True)

    def finish(self) -> None:
        assert self.proto is not None
        self.write(self.proto.bye())
        deadline = self._deadline()
        while self.done is None:
            if time.monotonic() > deadline:
                raise PeerTimeout("timed out waiting for the server's receipts")
            self._pump(max(0.01, deadline - time.monotonic()))
            if self.proto.state is protocol.ClientState.CLOSED and self.done is None:
                raise TransportError(self._closed_message())

    def _report(self, res: Result) -> None:
        if self.opts.json:
            print(json.dumps({"name": res.name, "final_name": res.final_name, "status": res.status,
                              "code": res.code, "bytes": res.bytes, "sha256": res.sha256,
                              "message": res.message}), flush=True)
        if self.opts.quiet and res.status in ("stored", "would_store"):
            return
        if res.status == "stored":
            final = "" if res.final_name == res.name else f" as {res.final_name}"
            line = f"stored {res.name}{final} {human_size(res.bytes)} sha256:{res.sha256}"
        elif res.status == "would_store":
            line = f"would store {res.name}"
        elif res.status == "exists" and self.opts.ignore_existing:
            line = f"exists {res.name} (ignored)"
        else:
            verb = "not stored" if res.code == Reply.ABORTED else "refused"
            line = f"{verb} {res.name}: {res.message}"
        if not self.opts.json or not self.opts.quiet:
            sys.stderr.write(line + "\n")


class _Busy(RstashError):
    exit_status = Exit.TEMPFAIL


class _SourceFailed(RstashError):
    exit_status = Exit.LOCAL


# --- main -------------------------------------------------------------------------


def _load_key(opts: Any) -> auth.Key:
    path = opts.key or os.environ.get("RSTASH_KEY_FILE")
    if not path:
        raise UsageError("no key: give -k FILE or set RSTASH_KEY_FILE")
    return auth.load_key_file(path, client=True)


def _err(message: str) -> None:
    sys.stderr.write(f"rstash-send: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    raw = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in raw:
        i = raw.index("--")
        raw, cmd = raw[:i], raw[i + 1:]
    opts = parser.parse_args(raw)
    if cmd:
        opts.files = list(opts.files) + cmd
    try:
        return run(opts)
    except KeyFileError as e:
        _err(e.message)
        return Exit.LOCAL
    except RstashError as e:
        if opts.json and not opts.stdout:
            # "code" is a reply the server sent (set on the instance), never a class default:
            # our own timeout is not a "421", a receipt failing its MAC is not a "500".
            code = vars(e).get("reply")
            print(json.dumps({"status": "error", "code": code, "message": e.message}), flush=True)
        _err(e.message)
        return int(e.exit_status)
    except KeyboardInterrupt:
        return 130


def run(opts: Any) -> int:
    if opts.version:
        print(f"rstash-send {__version__} (protocol {PROTOCOL})")
        return Exit.OK
    if opts.fingerprint:
        print(_load_key(opts).describe())
        return Exit.OK
    if opts.dest is None:
        raise UsageError("no destination given (see --help)")
    if opts.stdout:
        return run_pipe(opts)
    dest = parse_dest(opts.dest)
    key = _load_key(opts)
    sources: list[Source] = [] if opts.test else make_sources(opts)
    bwlimit = None
    if opts.bwlimit:
        from .units import parse_size

        try:
            bwlimit = parse_size(opts.bwlimit)
        except ValueError as e:
            raise UsageError(f"--bwlimit: {e}") from None
    deadline = time.monotonic() + opts.busy_wait
    delay = 1.0
    while True:
        try:
            return _one_session(opts, dest, key, sources, bwlimit)
        except _Busy:
            import random

            left = deadline - time.monotonic()
            if left <= 0:
                raise RstashError("server busy: try later", exit_status=Exit.TEMPFAIL,
                                  reply=Reply.BUSY) from None
            pause = min(left, random.uniform(0.5, 1.0) * delay)
            if opts.verbose:
                _err(f"server busy; retrying in {pause:.1f} s")
            time.sleep(pause)
            delay = min(delay * 2, 30.0)


def _one_session(opts: Any, dest: Dest, key: auth.Key, sources: list[Source],
                 bwlimit: int | None) -> int:
    conn = connect(dest, opts)
    sess = Session(opts, key, dest.box, conn,
                   protocol.ClientConnection(key, dest.box, server_id=opts.server_id))
    session_status: int = Exit.OK
    try:
        try:
            sess.handshake()
            if opts.test:
                sess.finish()
                assert sess.proto is not None
                if not sess.proto.authenticated:
                    raise RemoteProtocolError("221 before 235")
                print(f"{PROTOCOL} ok: {opts.dest} key {key.fingerprint}")
                return Exit.OK
            for index, src in enumerate(sources):
                try:
                    sess.send_file(index, src, bwlimit)
                except _SourceFailed as e:
                    _err(f"{src.label}: {e.message}: nothing stored")
                    session_status = worst_exit(session_status, Exit.LOCAL)
            sess.finish()
        except (RemoteProtocolError, TransportError) as e:
            if isinstance(e, TransportError) and not isinstance(e, PeerTimeout) \
                    and not sess.got_bytes and not e.message.startswith("ssh failed: "):
                last = conn.last_stderr_line()
                if last:
                    raise TransportError(f"ssh failed: {last}") from None
            raise
    finally:
        conn.close()
    statuses: list[int] = [session_status]
    for index in range(len(sources)):
        res = sess.results.get(index)
        if res is None:
            continue
        statuses.append(res.exit_status(opts.ignore_existing))
    return worst_exit(*statuses)


def run_pipe(opts: Any) -> int:
    """Pipe mode: write a whole one-way session to stdout; the server's lines go to nc."""
    if opts.json:
        raise UsageError("--json cannot be used with --stdout (nothing comes back to read)")
    if os.isatty(1):
        raise UsageError("refusing to write a stream to a terminal: pipe it (… | nc -N host 7370)")
    box = opts.dest
    if not is_box_name(box):
        raise UsageError(f"{box!r} is not a box name")
    if opts.dry_run or opts.test:
        raise UsageError("--dry-run and --test need a reply: not with --stdout")
    key = _load_key(opts)
    sources = make_sources(opts)
    import secrets

    proto = protocol.ClientConnection(key, box, pipe=True, server_id=opts.server_id)
    out = FdStream(os.open("/dev/null", os.O_RDONLY), 1)

    def w(data: bytes) -> None:
        # nc may stall on a slow link: --timeout bounds each wait (poll() takes no 10**9 s).
        out.write(data, time.monotonic() + float(opts.timeout))

    w(proto.hello(secrets.token_bytes(32), int(time.time())))
    status = Exit.OK
    for src in sources:
        w(proto.file(src.name.encode("utf-8"), src.size, src.mtime))
        src.open()
        fd = src.read_fd()
        sent = 0
        try:
            while src.size is None or sent < src.size:
                want = CHUNK if src.size is None else min(CHUNK, src.size - sent)
                chunk = os.read(fd, want)
                if not chunk:
                    break
                w(proto.data_header(len(chunk)))
                proto.data_sent(chunk)
                w(chunk)
                sent += len(chunk)
        finally:
            src.close()
        problem = src.failed()
        if problem is None and src.size is not None and sent != src.size:
            problem = "file shrank while sending"
        if problem is not None:
            _err(f"{src.label}: {problem}: nothing stored")
            w(proto.abort())
            status = Exit.LOCAL
        else:
            w(proto.end())
    w(proto.bye())
    return status


if __name__ == "__main__":
    sys.exit(main())
