"""One server session: greeting, proof, files, receipts, bye.

The driver between the transport (bytes with deadlines), the protocol (events),
the HELLO judge (rstash.hello) and the store (files). It turns every outcome
into its reply line and log line through the outcome table, and writes
nothing to the connection but reply lines. Exit status of a session (rstash-recv(8)): 0 when
it ended the way the protocol defines (stored, refused, authentication
failed, busy), 1 when the peer broke the protocol (garbage, truncation,
timeout), 2 for our own failure.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from . import auth, wire
from .delivery import DeliveryLog
from .errors import (
    Exit,
    Outcome,
    PeerTimeout,
    Refused,
    RemoteProtocolError,
    Reply,
    RstashError,
    TransportError,
    box_refusal,
    box_write_failure,
)
from .hello import HelloJudge, Verdict
from .keys import UnusableKeys, load_box_keys, why_auth_failed
from .log import Logger
from .names import check_name
from .partials import CHUNK, Partials
from .resume import ResumeFiles
from .sessionlog import FileState, SessionLogging, SessionResult
from .settings import BoxConfig, Config
from .sshlogin import UNKNOWN_KEY, SshLogin
from .transport import FdStream

#: Files whose 250 lines may wait for one shared directory fsync.
MAX_BATCH = 64


class ServerSession(SessionLogging):
    def __init__(self, cfg: Config, stream: FdStream, log: Logger, *, peer: str | None = None,
                 allowed_boxes: frozenset[str] | None = None, login: SshLogin | None = None,
                 on_stage: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.stream = stream
        self.log = log
        self.peer = peer
        self.allowed_boxes = allowed_boxes
        self.conn = wire.ServerConnection(resume=True, checkpoint_every=CHUNK)
        self.resume: ResumeFiles | None = None
        self.result = SessionResult()
        self.started = time.monotonic()
        self.preauth_deadline = self.started + cfg.preauth_timeout
        self.box: BoxConfig | None = None
        #: what authorised the session, for logs and --status: the box key or the SSH key
        self.key_name: str | None = None
        #: whose partials and re-run records this session sees (None: nobody's)
        self._owner: str | None = None
        self.keys: auth.SessionKeys | None = None
        self.store: Any = None
        self.hooks: Any = None
        self.mode = "interactive"
        #: told "hello" once a whole HELLO is in, "authenticated" once the 235 line is out
        #: (the accept loop counts pre-auth sessions and ends silent ones first)
        self.on_stage = on_stage or (lambda _stage: None)
        self.deliveries = DeliveryLog(cfg.state_dir, log, peer=peer)
        #: the file being received (FILE seen, END or ABORT not yet)
        self._cur: FileState | None = None
        self.judge = HelloJudge(cfg, {}, allowed_boxes=allowed_boxes, login=login)
        self.unusable_keys: UnusableKeys = {}  # refused key files, per box: the log's only
        #: verified files (END checked) whose commit, directory fsync and reply are pending
        self._ended: list[tuple[FileState, Any, wire.End]] = []

    # -- I/O --

    def _deadline(self) -> float:
        idle = time.monotonic() + self.cfg.idle_timeout
        if self.keys is None:
            return min(idle, self.preauth_deadline)
        return idle

    def send(self, data: bytes) -> None:
        self.stream.write(data, self._deadline())

    def _next(self) -> wire.ServerEvent:
        while True:
            event = self.conn.next_event()
            if event is not wire.NEED_DATA:
                return event
            if self._ended:
                # Nothing more is buffered: reply to what is verified before waiting.
                self._flush_ended()
            self.conn.receive_data(self.stream.read(self._deadline()))

    # -- the session --

    def run(self) -> SessionResult:
        try:
            self._run()
        except wire.IntegrityError as e:
            self._abort_current()
            self._log_session(Outcome.INTEGRITY, detail=e.message,
                              sha256=e.sha256.hex() if e.sha256 else None)
            self._try_send(wire.integrity_line(e.name))
            self.result.status = Exit.REFUSED
        except RemoteProtocolError as e:
            self._abort_current()
            outcome = Outcome.of_protocol_error(e.reply, authenticated=self.keys is not None)
            self._log_session(outcome, detail=e.message)
            self._try_send(wire.line(outcome.line))
            self.result.status = Exit.REFUSED
        except PeerTimeout as e:
            self._abort_current(keep=True)
            self._log_session(Outcome.TIMEOUT, detail=e.message)
            self._try_send(wire.line(Outcome.TIMEOUT.line))
            self.result.status = Exit.REFUSED
        except TransportError as e:
            self._abort_current(keep=True)
            self._log_session(Outcome.TRUNCATED, detail=e.message)
            self.result.status = Exit.REFUSED
        finally:
            # The last line is out: close our direction and take what the peer still sends
            # (bounded), so that its unread bytes do not turn our close into a reset that
            # destroys the line (rstash(7) "Closing the connection"). Hooks run after.
            if self.keys is None:
                self.on_stage("done")  # a pre-auth linger holds no slot a newcomer needs
            self.stream.finish()
            self._close()
        return self.result

    def _try_send(self, data: bytes) -> None:
        try:
            self.stream.write(data, time.monotonic() + min(5.0, self.cfg.idle_timeout))
        except RstashError:
            pass

    def _run(self) -> None:
        self.judge.box_keys = load_box_keys(self.cfg, self.log, self.unusable_keys)
        challenge = secrets.token_bytes(32)
        greeting = wire.greeting_line(challenge, resume=True, ssh=self.judge.offers_ssh)
        self.send(wire.line(greeting))
        event = self._next()
        if isinstance(event, wire.ConnectionClosed):
            self._log_session(Outcome.TRUNCATED, detail="closed before HELLO")
            self.result.status = Exit.REFUSED
            return
        assert isinstance(event, wire.Hello)
        self.on_stage("hello")
        if not self._judge_hello(event, greeting.encode("ascii")):
            return
        self._serve_files()

    def _judge_hello(self, hello: wire.Hello, greeting: bytes) -> bool:
        self.mode = "pipe" if (pipe := hello.mode == wire.MODE_PIPE) else "interactive"
        verdict = self.judge.judge(hello, greeting, self.peer)
        if verdict.outcome is not None or verdict.keys is None or verdict.box is None:
            self.log.warning(event="auth", outcome=Outcome.AUTH_FAILED.log,
                             code=Outcome.AUTH_FAILED.code, peer=self.peer or "unknown",
                             box=hello.box, mode=self.mode,
                             **why_auth_failed(verdict.reason, hello.box, self.unusable_keys))
            # Authentication failures go to the log (fail2ban reads it), never to the
            # delivery database: a peer without a key must not be able to grow it.
            self.send(wire.line(Outcome.AUTH_FAILED.line))
            self.result.outcome = Outcome.AUTH_FAILED.log
            return False
        box, keys = verdict.box, verdict.keys
        self.box, self.key_name, self.keys = box, verdict.key_name, keys
        if verdict.key is not None:
            self._owner = verdict.key.fingerprint
        elif verdict.login is not None and verdict.login.key_name != UNKNOWN_KEY:
            self._owner = verdict.login.key_name
        self.result.box = box.name
        self.conn.authenticate(keys)
        if pipe:
            refusal = self.judge.judge_pipe(box, hello)
            if refusal is not None:
                self._refuse_pipe(refusal)
                return False
        self.send(wire.auth_ok_line(keys))
        self.on_stage("authenticated")
        # An interactive session's time is not checked (its proof binds our challenge);
        # it is logged, so a client with a wrong clock can be found.
        self.log.info(event="session", box=box.name, peer=self.peer, key=self.key_name, mode=self.mode,
                      outcome="authenticated", code=Reply.AUTH_OK, client_time=hello.time,
                      **verdict.login_fields())
        return True

    def _refuse_pipe(self, verdict: Verdict) -> None:
        outcome = verdict.outcome
        assert outcome is not None and self.box is not None
        from .replay import utc  # sqlite3 with it: never before the greeting

        emit = self.log.error if outcome is Outcome.SESSION_ERROR else self.log.warning
        after = None if verdict.floor is None else utc(verdict.floor)
        emit(event="session", box=self.box.name, peer=self.peer, mode="pipe",
             outcome=outcome.log, code=outcome.code, reason=verdict.reason, detail=verdict.detail,
             floor=verdict.floor, accepted_after=after)
        self.result.outcome = outcome.log
        if outcome is Outcome.CLOCK_SKEW and verdict.skew is not None:
            self.send(wire.skew_line(verdict.skew))
        else:
            self.send(wire.line(outcome.line))

    def _serve_files(self) -> None:
        from .hooks import HookRunner
        from .store import BoxStore

        box = self.box
        assert box is not None and self.keys is not None
        try:
            self.store = BoxStore.serving(box, self.cfg.boxes.values())
        except (RstashError, OSError) as e:
            detail = e.message if isinstance(e, RstashError) else box_write_failure(box.path, e)
            failed = Outcome.SESSION_ERROR
            self.log.error(event="session", box=box.name, outcome=failed.log, code=failed.code,
                           detail=detail)
            self.send(wire.line(failed.line))
            self.result.status = Exit.LOCAL
            return
        try:
            self.store.sweep(self.cfg.idle_timeout)
        except (OSError, RstashError):
            pass
        # Partials and records belong to the key that authenticated: the box key, or under
        # method ssh the SSH key; an SSH key sshd did not expose gets none (rstash(7)).
        owner = self._owner
        partials = Partials(self.store, owner or "", box.resume_ttl if owner else 0.0,
                            self.cfg.state_dir / "rerun" / box.name)
        if owner:
            partials.sweep()
        self.resume = ResumeFiles(self, partials)
        self.hooks = HookRunner(self.cfg.hook_timeout, self.log)
        while True:
            event = self._next()
            if isinstance(event, wire.File):
                self._cur = self._on_file(event.header)
            elif isinstance(event, wire.Data):
                self._on_data(event.data)
            elif isinstance(event, wire.End):
                self._on_end(event)
            elif isinstance(event, wire.Abort):
                self._on_abort()
            elif isinstance(event, wire.Bye):
                self._flush_ended()
                self.send(wire.bye_line(self.keys, event.count, self.result.stored))
                self._log_session(Outcome.COMPLETE, files=event.count)
                return  # BYE is the client's last frame: after 221 the server closes
            elif isinstance(event, wire.ConnectionClosed):
                self._flush_ended()
                if event.clean:
                    return
                self._abort_current(keep=True)
                self._log_session(Outcome.TRUNCATED)
                self.result.status = Exit.REFUSED
                return

    # -- files --

    def _reply(self, st: FileState, outcome: Outcome, **kw: Any) -> None:
        # Replies go out in FILE order: earlier files' 250 lines first.
        self._flush_ended()
        self._send_receipt(st, outcome, **kw)

    def _send_receipt(self, st: FileState, outcome: Outcome, **kw: Any) -> None:
        assert self.keys is not None and outcome.code is not None
        st.replied = True
        self.send(wire.receipt_line(self.keys, st.header.index, outcome.code, st.header.name,
                                        reason=outcome.text, **kw))

    def _refuse(self, st: FileState, refused: Refused) -> None:
        if not st.header.dry_run:
            self.conn.discard_current()
        self._log_file(st, refused.outcome, reason=refused.reason, detail=refused.detail or None)
        self._reply(st, refused.outcome)
        if self.conn.state is wire.ServerState.AWAIT_GO:
            self.conn.finish_waited()
        if self.resume is not None:
            self.resume.ended(st)

    def _on_file(self, hdr: wire.FileHeader) -> FileState:
        box = self.box
        assert box is not None
        self.result.files += 1
        st = FileState(hdr, hdr.name.decode("utf-8", "replace"))
        problem = check_name(hdr.name, box.allow_names, box.deny_names)
        if problem is not None:
            self._refuse(st, Refused(Outcome.NAME_NOT_ALLOWED, problem))
            return st
        if self.resume is not None and self.resume.on_file(st):
            return st
        try:
            upload = self.store.begin(st.name, hdr.size)
        except (Refused, OSError) as e:
            self._refuse(st, box_refusal(box.path, e))
            return st
        if hdr.dry_run:
            upload.abort()
            self._log_file(st, Outcome.WOULD_STORE)
            self._reply(st, Outcome.WOULD_STORE, dry_run=True)
            return st
        st.upload = upload
        return st

    def _on_data(self, data: bytes | memoryview) -> None:
        from .store import SizeMismatch

        st = self._cur
        if st is None or st.upload is None:
            return  # a refused file's data is discarded up to its END
        try:
            st.upload.write(data)
        except SizeMismatch as e:
            raise RemoteProtocolError(e.message) from None
        except Refused as e:
            st.upload.abort()
            st.upload = None
            self._refuse(st, e)

    def _on_end(self, end: wire.End) -> None:
        st = self._cur
        self._cur = None
        if st is None or st.upload is None:
            return
        upload = st.upload
        st.upload = None
        # The file is verified; it is committed with the files the client has already
        # pipelined behind it (many small files), so that their fsyncs come back to
        # back and one directory fsync covers them all, before any of their 250 lines.
        self._ended.append((st, upload, end))
        if len(self._ended) >= MAX_BATCH:
            self._flush_ended()

    def _flush_ended(self) -> None:
        """Commit the verified files, fsync the box directory, then send their replies in order."""
        from .hooks import Delivery

        batch, self._ended = self._ended, []
        if not batch:
            return
        finals = self.store.commit_batch([upload for _st, upload, _end in batch])
        box = self.box
        assert box is not None
        # Every file of the batch is logged (and its hook queued) even when the client
        # is gone before all its lines are out: the files are stored either way.
        lost: RstashError | None = None

        def say(st: FileState, outcome: Outcome, **kw: Any) -> None:
            nonlocal lost
            if lost is None:
                try:
                    self._send_receipt(st, outcome, **kw)
                except RstashError as e:
                    lost = e

        for (st, upload, end), final in zip(batch, finals, strict=True):
            if isinstance(final, Refused):
                self._log_file(st, final.outcome, reason=final.reason, detail=final.detail or None)
                say(st, final.outcome)
                if self.resume is not None:
                    self.resume.ended(st)
                continue
            self.result.stored += 1
            self.result.finals.append(final)
            digest = end.sha256.hex()
            say(st, Outcome.STORED, final_name=final.encode("utf-8"), n=end.n, sha256=end.sha256)
            if self.resume is not None:
                self.resume.stored(st, final, end)
            self._log_file(st, Outcome.STORED, bytes_=end.n, sha256=digest, final=final)
            if box.on_receive:
                self.hooks.submit(box.on_receive, Delivery.of_upload(box, upload, st.name, end, st.header.mtime))
        if lost is not None:
            raise lost

    def _on_abort(self) -> None:
        st = self._cur
        self._cur = None
        if st is None:
            return
        if st.upload is not None:
            st.upload.abort()
            st.upload = None
        if self.resume is not None:
            self.resume.ended(st)
        if not st.replied:
            self._log_file(st, Outcome.ABORTED)
            self._reply(st, Outcome.ABORTED)

    def _abort_current(self, *, keep: bool = False) -> None:
        """``keep``: the session was cut (timeout, EOF), so a partial may be kept."""
        # Verified files are stored: commit them, make their names durable, say so first.
        try:
            self._flush_ended()
        except (RstashError, OSError):
            pass
        st = self._cur
        if st is not None and self.resume is not None and self.resume.keep(st, keep=keep):
            st.upload = None
        if st is not None and st.upload is not None:
            try:
                st.upload.abort()
            except (OSError, RstashError):
                pass
            st.upload = None
            self._log_file(st, Outcome.UNFINISHED, detail="session ended before END")

    def _close(self) -> None:
        self.deliveries.log_repeats(box=self.result.box, key=self.key_name)
        if self.hooks is not None:
            self.hooks.close()
        if self.store is not None:
            from .retention import after_store  # only once files may have been stored

            after_store(self.store, self.box, self.result.finals, self.log, self.deliveries,
                        key=self.key_name, peer=self.peer)  # after replies
            self.store.close()
        self.deliveries.close()


def run_session(cfg: Config, log: Logger, rfd: int, wfd: int | None = None, *,
                peer: str | None, boxes: frozenset[str] | None, login: SshLogin | None = None,
                on_stage: Callable[[str], None] | None = None) -> int:
    """Run one session on ``rfd`` (and ``wfd``, for a pipe pair) and return its exit status.

    The one top-level handler of every deployment shape (stdio, a connected
    socket, a forked child): an unexpected error is logged, never sent on the wire.
    """
    try:
        return ServerSession(cfg, FdStream(rfd, wfd), log, peer=peer, allowed_boxes=boxes,
                             login=login, on_stage=on_stage).run().status
    except Exception as e:
        log.error(event="session", outcome="error", peer=peer, detail=f"{type(e).__name__}: {e}")
        return Exit.LOCAL
