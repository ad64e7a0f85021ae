"""The session driver: prove the key, stream every file, verify every receipt.

One streaming loop serves both modes. Interactive: files are pipelined while the
server's replies are read as they come, a refused file is aborted at once, and a
session only ends at a verified ``221``. Pipe mode (``--stdout``): the same
frames go to standard output and nothing is read back. This module never
retries (``rstash.send`` decides that) and never prints "stored" for a file
without a receipt whose MAC it verified.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Never

from .. import PROTOCOL, auth, wire
from ..errors import (
    AuthenticationFailed,
    Exit,
    PeerTimeout,
    RemoteProtocolError,
    Reply,
    RstashError,
    TransportError,
    UsageError,
    outcome_of,
    worst_exit,
)
from ..transport import FdStream, PeerClosed
from ..units import human_size
from . import resuming
from .connect import Connection
from .options import Options
from .sources import Source

if TYPE_CHECKING:
    from tqdm import tqdm

CHUNK = 256 * 1024


def complain(message: str) -> None:
    sys.stderr.write(f"rstash-send: {message}\n")


#: Nothing came back, not even the greeting: the server side never started.
CLOSED_BEFORE_GREETING = (
    "the server closed the connection before its greeting: rstash-recv could not start there "
    "(a configuration that does not load, the wrong user, a missing program); on the server, "
    "run rstash-recv --check-config and read the inetd or system log")
#: After a 451, the file or the session failed on the server's disk, not in transit.
LOCAL_ERROR_HINT = ("the server could not write into the box; ask its admin to run "
                    "rstash-recv --check-config and read its log")


def auth_failed_message(key: auth.Key | None, box: bytes, text: str) -> str:
    """535 is the same for every cause (rstash(7) RULES, rule 1): name them all, and the key."""
    name = box.decode("utf-8", "replace")
    if key is None:
        return (f"authentication failed ({text}): the SSH login was refused for box {name!r} "
                "(method ssh): the box needs auth = \"ssh\" and this SSH key the forced command "
                f"'rstash-recv --box {name}'; the server's log line event=auth says which (reason=)")
    return (f"authentication failed ({text}): key {key.fingerprint} was refused for box "
            f"{name!r}: wrong key for the box, box name misspelt, or this address not in the "
            "box's allow_from; the server's log line event=auth says which (reason=)")


class ServerBusy(RstashError):
    """``421 busy`` before anything was sent: the whole session may be tried again."""

    exit_status = Exit.TEMPFAIL


class SourceFailed(RstashError):
    """A file shrank or a producer failed: it was aborted, nothing stored under its name."""

    exit_status = Exit.LOCAL


@dataclass
class Result:
    name: str
    final_name: str | None = None
    status: str = "error"
    code: int | None = None
    bytes: int = 0
    sha256: str | None = None
    message: str = ""
    already: bool = False  #: a re-run: the server had stored this transfer (251)
    resumed_from: int = 0  #: bytes the server held from an interrupted session (350)
    silent: bool = False  #: a FILE given up for a resume that did not match: never reported

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


class Session:
    """One session over ``stream``; ``conn`` is None in pipe mode (nothing is read back)."""

    def __init__(self, opts: Options, proto: wire.ClientConnection, stream: FdStream,
                 conn: Connection | None = None) -> None:
        self.opts = opts
        self.proto = proto
        self.stream = stream
        self.conn = conn
        self.results: dict[int, Result] = {}
        self.done: wire.Done | None = None
        self.refused_current = False
        self.got_bytes = False
        self.offer: wire.ResumeOffer | None = None
        self.sources: dict[int, Source] = {}  #: by FILE index, for the check of a 251

    # -- replies --

    def _deadline(self) -> float:
        return time.monotonic() + self.opts.timeout

    def _pump(self, timeout: float) -> None:
        """Read what the server sent within ``timeout`` and handle every event."""
        if self.conn is None or not self.stream.readable(timeout):
            return
        data = self.stream.read(self._deadline())
        if data:
            self.got_bytes = True
        self.proto.receive_data(data)
        while self.proto.state is not wire.ClientState.CLOSED:
            ev = self.proto.next_event()
            if ev is wire.NEED_DATA:
                return
            self._on_event(ev)

    def _on_event(self, ev: wire.ClientEvent) -> None:
        if isinstance(ev, wire.ResumeOffer):
            self.offer = ev
        elif isinstance(ev, wire.Receipt):
            res = self.results[ev.index]
            res.code = ev.code
            res.status = outcome_of(ev.code, dry_run=ev.dry_run)
            res.final_name = ev.final_name.decode("utf-8", "replace")
            if (ev.code == Reply.STORED and not ev.dry_run) or ev.already:
                res.bytes, res.sha256 = ev.size, ev.sha256
            res.message = ev.reason
            res.already = ev.already
            if self.proto.current_index == ev.index:
                self.refused_current = True
            if ev.already:  # stored only once its digest is checked against the file
                resuming.check_already(self, res, self.sources[ev.index])
            else:
                self._report(res)
        elif isinstance(ev, wire.Done):
            self.done = ev
        elif isinstance(ev, wire.SessionRefused):
            self._session_refused(ev.code, ev.text)
        elif isinstance(ev, wire.ConnectionClosed) and self.done is None:
            raise TransportError(self.closed_message())

    def closed_message(self) -> str:
        last = self.conn.last_stderr_line() if self.conn and not self.got_bytes else None
        if last:
            return f"ssh failed: {last}"
        if not self.got_bytes:
            return CLOSED_BEFORE_GREETING
        return "connection closed by the server before the session completed"

    def _session_refused(self, code: int, text: str) -> None:
        if code < 400:
            # A success line where only a refusal may stand (before 235, or instead of a
            # receipt): a peer without the key cannot make a 235, and must not turn
            # "the server broke the protocol" into "a file was refused" (exit 1).
            if not self.proto.authenticated:
                raise RemoteProtocolError(f"the server answered {text!r} without proving it holds the key (235)")
            raise RemoteProtocolError(f"unexpected reply from the server: {text!r}")
        if code == Reply.AUTH_FAILED:
            raise AuthenticationFailed(auth_failed_message(self.proto.key, self.proto.box, text),
                                       reply=code)
        if code == Reply.LOCAL_ERROR:
            raise RstashError(f"server: {text}: {LOCAL_ERROR_HINT}", exit_status=Exit.TEMPFAIL,
                              reply=code)
        if code in (Reply.INTEGRITY, Reply.PROTOCOL_ERROR):
            raise RemoteProtocolError(f"server: {text}", reply=code)
        if code == Reply.BUSY:
            if self.proto.state is wire.ClientState.AWAIT_GREETING:
                raise ServerBusy(text, reply=code)
            # "421 timeout" mid-session: stdin or a command may be half read, so a retry
            # would store the rest as if it were the whole stream. The session failed.
            raise TransportError(f"server: {text}", reply=code)
        status = Exit.TEMPFAIL if 400 <= code < 500 else Exit.REFUSED
        if code in (Reply.VERSION_NOT_SUPPORTED, Reply.METHOD_NOT_SUPPORTED):
            status = Exit.PROTOCOL
        raise RstashError(f"server: {text}", exit_status=status, reply=code)

    def write(self, data: bytes | memoryview) -> None:
        """Write everything, reading replies whenever the server has some (no deadlock)."""
        if self.conn is None:
            self.stream.write(data, self._deadline(), idle=self.opts.timeout)
            return
        try:
            self.stream.write(data, self._deadline(), idle=self.opts.timeout,
                              on_readable=lambda: self._pump(0))
        except PeerClosed:
            # The server closed: its last lines say why.
            self._drain()
            raise TransportError(self.closed_message()) from None

    def _drain(self) -> None:
        try:
            for _ in range(100):
                self._pump(0.5)
        except TransportError:
            pass

    # -- the protocol --

    def handshake(self) -> None:
        """Read the greeting (interactive) and send HELLO."""
        deadline = time.monotonic() + self.opts.connect_timeout
        resuming.wait_while(self, wire.ClientState.AWAIT_GREETING, deadline, "the server's greeting")
        self.write(self.proto.hello(secrets.token_bytes(32), int(time.time())))

    def send_all(self, sources: list[Source]) -> int:
        """Send every source; the exit status of the ones that failed on our side."""
        status: int = Exit.OK
        for src in sources:
            try:
                self.send_file(src)
            except SourceFailed as e:
                complain(f"{src.label}: {e.message}: nothing stored")
                status = worst_exit(status, Exit.LOCAL)
        return status

    def send_file(self, src: Source, *, offer_ok: bool = True) -> None:
        """The streaming loop: FILE, DATA until the source ends, then END (or ABORT)."""
        index = self.proto.files_sent
        res = self.results[index] = Result(src.name)
        self.sources[index] = src
        self.offer = None
        self.write(self.proto.file(src.name.encode("utf-8"), src.size, src.mtime,
                                   dry_run=self.opts.dry_run, tid=resuming.tid_for(self, src)))
        if self.opts.dry_run:
            return
        self.refused_current = False
        if self.proto.waits:
            resuming.first_line(self)
            if self.proto.state is wire.ClientState.READY:  # 251 or a refusal: no data
                return
        src.open()
        fd = src.read_fd()
        sent = 0
        if self.offer is not None:
            offset = resuming.take_offer(self, res, src, fd, offer_ok=offer_ok)
            if offset is None:
                self.send_file(src, offer_ok=False)
                return
            sent = offset
        started = time.monotonic()
        bar = self._bar(src)
        if bar is not None and sent:
            bar.update(sent)
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
                # Small chunks go out in one write with their header; large ones are not copied.
                self.write(hdr + chunk if len(chunk) < 65536 else hdr)
                if len(chunk) >= 65536:
                    self.write(chunk)
                sent += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                if self.opts.bwlimit:
                    ahead = (sent - res.resumed_from) / self.opts.bwlimit - (time.monotonic() - started)
                    if ahead > 0:
                        self._pause(ahead)
            problem = src.failed()
            if problem is None and src.size is not None and sent != src.size:
                problem = f"file shrank while sending ({sent} of {src.size} bytes)"
            if problem is not None:
                res.message = problem
                res.status = "error"
                self.write(self.proto.abort())
                raise SourceFailed(problem)
            self.write(self.proto.end())
        finally:
            src.close()
            if bar is not None:
                bar.close()

    def _pause(self, seconds: float) -> None:
        if self.conn is None:
            time.sleep(seconds)
        else:
            self._pump(seconds)  # a reply ends the pause early; the next chunk waits again

    def _read_source(self, fd: int, want: int) -> bytes:
        # Read what is there (stdin as it arrives), answering the server meanwhile.
        p = select.poll()
        p.register(fd, select.POLLIN)
        if self.conn is not None:
            p.register(self.stream.rfd, select.POLLIN)
        while True:
            ready = dict(p.poll(1000))
            if self.conn is not None and self.stream.rfd in ready:
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

    def _bar(self, src: Source) -> tqdm[Never] | None:
        show = self.opts.progress
        if show is None:
            show = sys.stderr.isatty() and not self.opts.quiet
        if not show:
            return None
        from tqdm import tqdm  # only when a bar is shown: it costs a tenth of a second to import

        return tqdm(total=src.size, desc=src.name, unit="B", unit_scale=True, unit_divisor=1024,
                    file=sys.stderr, leave=False, dynamic_ncols=True)

    def finish(self) -> None:
        """BYE; interactive: wait for the verified ``221``."""
        self.write(self.proto.bye())
        if self.conn is None:
            return
        self.conn.half_close()
        deadline = self._deadline()
        while self.done is None:
            if time.monotonic() > deadline:
                raise PeerTimeout("timed out waiting for the server's receipts")
            self._pump(max(0.01, deadline - time.monotonic()))
            if self.proto.state is wire.ClientState.CLOSED and self.done is None:
                raise TransportError(self.closed_message())

    def _report(self, res: Result) -> None:
        if res.silent:
            return
        if self.opts.json:
            print(json.dumps({"name": res.name, "final_name": res.final_name, "status": res.status,
                              "code": res.code, "bytes": res.bytes, "sha256": res.sha256,
                              "message": res.message, "already": res.already,
                              "resumed_from": res.resumed_from}), flush=True)
        # -q is for cron: a file already there under --ignore-existing is as quiet as a stored one.
        if self.opts.quiet and (res.status in ("stored", "would_store")
                                or (res.status == "exists" and self.opts.ignore_existing)):
            return
        if res.status == "stored":
            final = "" if res.final_name == res.name else f" as {res.final_name}"
            line = f"stored {res.name}{final} {human_size(res.bytes)} sha256:{res.sha256}"
            if res.already:
                line += " (already stored)"
            elif res.resumed_from:
                line += f" (resumed after {human_size(res.resumed_from)})"
        elif res.status == "would_store":
            line = f"would store {res.name}"
        elif res.status == "exists" and self.opts.ignore_existing:
            line = f"exists {res.name} (ignored)"
        else:
            verb = "not stored" if res.code == Reply.ABORTED else "refused"
            line = f"{verb} {res.name}: {res.message}"
            if res.code == Reply.LOCAL_ERROR:
                line += f" ({res.code}): {LOCAL_ERROR_HINT}"
        if not self.opts.json or not self.opts.quiet:
            sys.stderr.write(line + "\n")


def run_interactive(opts: Options, key: auth.Key | None, box: str, conn: Connection,
                    sources: list[Source]) -> int:
    """One interactive session over ``conn`` (closed on return); its exit status.

    Without a key it speaks method ssh, and only over an SSH channel of its own.
    """
    if key is None and not conn.over_ssh:
        conn.close()
        raise UsageError("no key: only an ssh:// destination can go without one")
    sess = Session(opts, wire.ClientConnection(key, box, server_id=opts.server_id), conn.stream, conn)
    try:
        try:
            sess.handshake()
            if opts.test:
                sess.finish()
                if not sess.proto.authenticated:
                    raise RemoteProtocolError("221 before 235")
                print(f"{PROTOCOL} ok: {opts.dest} " + (f"key {key.fingerprint}" if key else "ssh login"))
                return Exit.OK
            session_status = sess.send_all(sources)
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
    statuses = [session_status]
    statuses += [res.exit_status(opts.ignore_existing) for res in sess.results.values()
                 if not res.silent]
    return worst_exit(*statuses)


def run_pipe(opts: Options, key: auth.Key, box: str, sources: list[Source]) -> int:
    """Pipe mode: a whole one-way session on standard output; the server's lines go to nc."""
    out = FdStream(os.open("/dev/null", os.O_RDONLY), 1)
    sess = Session(opts, wire.ClientConnection(key, box, pipe=True, server_id=opts.server_id), out)
    sess.handshake()
    status = sess.send_all(sources)
    sess.finish()
    return status
