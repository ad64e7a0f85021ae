"""One server session: greeting, proof, files, receipts, bye.

The driver between the transport (bytes with deadlines), the protocol (events)
and the store (files). It decides every reply and writes nothing to the
connection but reply lines. Exit status of a session (rstash-recv(8)): 0 when
it ended the way the protocol defines (stored, refused, authentication
failed, busy), 1 when the peer broke the protocol (garbage, truncation,
timeout), 2 for our own failure.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import auth, wire
from .config import BoxConfig, Config
from .errors import (
    Exit,
    KeyFileError,
    PeerTimeout,
    RemoteProtocolError,
    Reply,
    RstashError,
    TransportError,
    outcome_of,
)
from .log import Logger
from .names import check_name
from .transport import FdStream

#: Files whose 250 lines may wait for one shared directory fsync.
MAX_BATCH = 64

#: A random key per process: an unknown box or key id still runs the full
#: proof check, so that timing and replies cannot tell "no such box" from
#: "wrong key" (rstash(7) RULES, rule 1).
_DUMMY_KEY = auth.Key(secrets.token_bytes(auth.KEY_LEN), "dummy")


@dataclass
class SessionResult:
    status: int = Exit.OK
    files: int = 0
    stored: int = 0
    box: str | None = None
    outcome: str = "truncated"


@dataclass
class _FileState:
    header: wire.FileHeader
    name: str
    upload: Any = None  # store.Upload while receiving
    replied: bool = False
    started: float = field(default_factory=time.monotonic)


def peer_allowed(peer: str | None, networks: tuple[Any, ...]) -> bool:
    if not networks:
        return True
    if peer is None:
        return False  # unknown address + allow_from = refused
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


class ServerSession:
    def __init__(self, cfg: Config, stream: FdStream, log: Logger, *, peer: str | None = None,
                 allowed_boxes: frozenset[str] | None = None,
                 on_authenticated: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.stream = stream
        self.log = log
        self.peer = peer
        self.allowed_boxes = allowed_boxes
        self.conn = wire.ServerConnection()
        self.result = SessionResult()
        self.started = time.monotonic()
        self.preauth_deadline = self.started + cfg.preauth_timeout
        self.box: BoxConfig | None = None
        self.key: auth.Key | None = None
        self.keys: auth.SessionKeys | None = None
        self.store: Any = None
        self.hooks: Any = None
        self.mode = "interactive"
        #: called once the 235 line is out (the accept loop counts pre-auth sessions)
        self.on_authenticated = on_authenticated
        #: the delivery log: None until first used, False when state_dir is unfit
        self._db: Any = None
        #: verified files (END checked) whose commit, directory fsync and reply are pending
        self._ended: list[tuple[_FileState, Any, wire.End]] = []

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
            self._log_session("integrity", Reply.INTEGRITY, detail=e.message,
                              sha256=e.sha256.hex() if e.sha256 else None)
            self._try_send(wire.integrity_line(e.name))
            self.result.status = Exit.REFUSED
        except RemoteProtocolError as e:
            self._abort_current()
            code = e.reply or Reply.PROTOCOL_ERROR
            if self.keys is None and code not in (Reply.VERSION_NOT_SUPPORTED,
                                                  Reply.METHOD_NOT_SUPPORTED):
                code = Reply.AUTH_FAILED
            self._log_session("protocol_error", code, detail=e.message)
            self._try_send(wire.session_line(code))
            self.result.status = Exit.REFUSED
        except PeerTimeout as e:
            self._abort_current()
            self._log_session("timeout", Reply.BUSY, detail=e.message)
            self._try_send(wire.line("421 timeout"))
            self.result.status = Exit.REFUSED
        except TransportError as e:
            self._abort_current()
            self._log_session("truncated", None, detail=e.message)
            self.result.status = Exit.REFUSED
        finally:
            self._close()
        return self.result

    def _try_send(self, data: bytes) -> None:
        try:
            self.stream.write(data, time.monotonic() + min(5.0, self.cfg.idle_timeout))
        except RstashError:
            pass

    def _run(self) -> None:
        self._load_keys()
        challenge = secrets.token_bytes(32)
        greeting = wire.greeting_line(challenge)
        self.send(wire.line(greeting))
        event = self._next()
        if isinstance(event, wire.ConnectionClosed):
            self._log_session("truncated", None, detail="closed before HELLO")
            self.result.status = Exit.REFUSED
            return
        assert isinstance(event, wire.Hello)
        if not self._judge_hello(event, greeting.encode("ascii")):
            return
        self._serve_files()

    def _judge_hello(self, hello: wire.Hello, greeting: bytes) -> bool:
        pipe = hello.mode == wire.MODE_PIPE
        self.mode = "pipe" if pipe else "interactive"
        box, candidates, why = self._find_key(hello)
        # The proof is always computed, with the dummy key when no key id matched,
        # and with every key whose id matches (ids are 8 bytes: they may collide).
        key: auth.Key | None = None
        keys: auth.SessionKeys | None = None
        for cand in candidates or [_DUMMY_KEY]:
            derived = auth.session_keys(cand, b"" if pipe else greeting, hello.signed)
            if auth.verify(derived.proof, hello.proof) and cand is not _DUMMY_KEY:
                key, keys = cand, derived
                break
        if why is None:
            if key is None:
                why = "bad proof" if candidates else "unknown key id"
            elif self.cfg.server_id and hello.server_id != self.cfg.server_id:
                why = "server_id mismatch"
            elif not self.cfg.server_id and hello.server_id is not None:
                why = "client sent a server_id; none is configured"
        if why is not None or key is None or keys is None or box is None:
            self.log.warning(event="auth", outcome="auth_failed", code=Reply.AUTH_FAILED,
                             peer=self.peer or "unknown", box=hello.box, mode=self.mode,
                             reason=why)
            # Authentication failures go to the log (fail2ban reads it), never to the
            # delivery database: a peer without a key must not be able to grow it.
            self.send(wire.session_line(Reply.AUTH_FAILED))
            self.result.outcome = "auth_failed"
            return False
        self.box, self.key, self.keys = box, key, keys
        self.result.box = box.name
        self.conn.authenticate(keys)
        if pipe:
            refusal = self._judge_pipe(hello)
            if refusal is not None:
                self.send(refusal)
                return False
        self.send(wire.auth_ok_line(keys))
        if self.on_authenticated is not None:
            self.on_authenticated()
        # An interactive session's time is not checked (its proof binds our challenge);
        # it is logged, so a client with a wrong clock can be found.
        self.log.info(event="session", box=box.name, peer=self.peer, key=key.log_name(),
                      mode=self.mode, outcome="authenticated", code=Reply.AUTH_OK,
                      client_time=hello.time)
        return True

    def _load_keys(self) -> None:
        """Read every configured key before the greeting.

        Judging a HELLO is then the same in-memory work whatever box it names, so
        timing cannot tell an unknown box from a wrong key (rstash(7) RULES, rule 1).
        """
        self._box_keys: dict[str, list[auth.Key]] = {}
        for name, box in self.cfg.boxes.items():
            loaded = []
            for path in box.keys:
                try:
                    loaded.append(auth.load_key_file(path))
                except KeyFileError as e:
                    self.log.error(event="key", box=name, outcome="error", detail=e.message)
            self._box_keys[name] = loaded

    def _find_key(self, hello: wire.Hello) -> tuple[BoxConfig | None, list[auth.Key], str | None]:
        """The box, the keys whose id matches, and why the HELLO fails already (or None)."""
        try:
            name: str | None = hello.box.decode("utf-8")
        except UnicodeDecodeError:
            name = None
        box = self.cfg.boxes.get(name) if name is not None else None
        why: str | None = None
        if name is None:
            why = "box name not UTF-8"
        elif box is None:
            why = "unknown box"
        elif self.allowed_boxes is not None and name not in self.allowed_boxes:
            why = "box excluded by --box"
        elif not peer_allowed(self.peer, box.allow_from):
            why = "peer not in allow_from"
        keys = self._box_keys.get(name or "", []) if box is not None else []
        candidates = [k for k in keys or [_DUMMY_KEY] if auth.verify(k.key_id, hello.key_id)]
        return box, [k for k in candidates if k is not _DUMMY_KEY], why

    def _judge_pipe(self, hello: wire.Hello) -> bytes | None:
        box = self.box
        assert box is not None
        if not box.pipe_mode:
            self.log.warning(event="session", box=box.name, peer=self.peer, mode="pipe",
                             outcome="refused", code=Reply.PIPE_MODE_OFF, reason="pipe mode off")
            self.result.outcome = "refused"
            return wire.session_line(Reply.PIPE_MODE_OFF)
        from . import state

        skew = hello.time - int(time.time())
        try:
            problem = state.check_state_dir(self.cfg.state_dir)
            if problem is not None:
                raise state.StateUnavailable(problem)
            with state.StateDB(self.cfg.state_dir) as db:
                db.check_replay(box.name, hello.nonce, hello.time, self.cfg.replay_window)
        except state.ClockSkew as e:
            skew = getattr(e, "skew", skew)
            self.log.warning(event="session", box=box.name, peer=self.peer, mode="pipe",
                             outcome="refused", code=Reply.CLOCK_SKEW, reason=f"clock skew {skew:+d} s")
            self.result.outcome = "refused"
            return wire.skew_line(skew)
        except state.ReplayRefused as e:
            # detail tells "nonce already seen" from "not above the box's floor" (a stream
            # made before the replay cache existed): the reply line must not, the admin must.
            self.log.warning(event="session", box=box.name, peer=self.peer, mode="pipe",
                             outcome="refused", code=Reply.REPLAYED, reason="replayed session",
                             detail=e.message)
            self.result.outcome = "refused"
            return wire.session_line(Reply.REPLAYED)
        except RstashError as e:
            # The replay cache fails closed.
            self.log.error(event="session", box=box.name, peer=self.peer, mode="pipe",
                           outcome="error", code=Reply.LOCAL_ERROR, detail=e.message)
            self.result.outcome = "error"
            return wire.session_line(Reply.LOCAL_ERROR)
        return None

    def _serve_files(self) -> None:
        from .hooks import HookRunner
        from .store import BoxStore

        box = self.box
        assert box is not None and self.keys is not None
        try:
            self.store = BoxStore(box.path, overwrite=box.overwrite, file_mode=box.file_mode,
                                  max_file_size=box.max_file_size, quota=box.quota,
                                  min_free=box.min_free, allow_names=box.allow_names,
                                  deny_names=box.deny_names)
        except RstashError as e:
            self.log.error(event="session", box=box.name, outcome="error", code=Reply.LOCAL_ERROR,
                           detail=e.message)
            self.send(wire.session_line(Reply.LOCAL_ERROR))
            self.result.status = Exit.LOCAL
            return
        except OSError as e:
            self.log.error(event="session", box=box.name, outcome="error", code=Reply.LOCAL_ERROR,
                           detail=f"{box.path}: {e.strerror}")
            self.send(wire.session_line(Reply.LOCAL_ERROR))
            self.result.status = Exit.LOCAL
            return
        try:
            self.store.sweep(self.cfg.idle_timeout)
        except (OSError, RstashError):
            pass
        self.hooks = HookRunner(self.cfg.hook_timeout, self.log)
        cur: _FileState | None = None
        self._cur = cur
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
                self.result.outcome = "complete"
                self._log_session("complete", Reply.BYE)
            elif isinstance(event, wire.ConnectionClosed):
                self._flush_ended()
                if event.clean:
                    return
                self._abort_current()
                self._log_session("truncated", None)
                self.result.status = Exit.REFUSED
                return

    # -- files --

    def _reply(self, st: _FileState, code: int, reason: str | None = None, **kw: Any) -> None:
        # Replies go out in FILE order: earlier files' 250 lines first.
        self._flush_ended()
        self._send_receipt(st, code, reason, **kw)

    def _send_receipt(self, st: _FileState, code: int, reason: str | None = None, **kw: Any) -> None:
        assert self.keys is not None
        st.replied = True
        self.send(wire.receipt_line(self.keys, st.header.index, code, st.header.name,
                                        reason=reason, **kw))

    def _refuse(self, st: _FileState, code: int, reason: str, detail: str = "") -> None:
        if not st.header.dry_run:
            self.conn.discard_current()
        self._log_file(st, outcome_of(code), code, reason=reason, detail=detail or None)
        self._reply(st, code, reason)

    def _on_file(self, hdr: wire.FileHeader) -> _FileState:
        from .store import Refused

        box = self.box
        assert box is not None
        self.result.files += 1
        st = _FileState(hdr, hdr.name.decode("utf-8", "replace"))
        problem = check_name(hdr.name, box.allow_names, box.deny_names)
        if problem is not None:
            self._refuse(st, Reply.NAME_NOT_ALLOWED, "name not allowed", problem)
            return st
        try:
            upload = self.store.begin(st.name, hdr.size)
        except Refused as e:
            self._refuse(st, int(e.reply or Reply.LOCAL_ERROR), e.reason, e.detail)
            return st
        except OSError as e:
            self._refuse(st, Reply.LOCAL_ERROR, "local error", e.strerror or str(e))
            return st
        if hdr.dry_run:
            upload.abort()
            self._log_file(st, "would_store", Reply.STORED)
            self._reply(st, Reply.STORED, dry_run=True)
            return st
        st.upload = upload
        return st

    def _on_data(self, data: bytes | memoryview) -> None:
        from .store import Refused, SizeMismatch

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
            self._refuse(st, int(e.reply or Reply.LOCAL_ERROR), e.reason, e.detail)

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
        from .store import Refused

        batch, self._ended = self._ended, []
        if not batch:
            return
        done: list[tuple[_FileState, wire.End, str | None, Refused | None]] = []
        for st, upload, end in batch:
            try:
                done.append((st, end, upload.commit(sync_dir=False), None))
            except Refused as e:
                upload.abort()
                done.append((st, end, None, e))
            except OSError as e:
                upload.abort()
                done.append((st, end, None, Refused(Reply.LOCAL_ERROR, "local error", e.strerror or str(e))))
        if any(final is not None for _st, _end, final, _e in done):
            try:
                self.store.sync_dir()
            except Refused as e:
                done = [(st, end, None, e if final is not None else err) for st, end, final, err in done]
        box = self.box
        assert box is not None
        # Every file of the batch is logged (and its hook queued) even when the client
        # is gone before all its lines are out: the files are stored either way.
        lost: RstashError | None = None

        def say(st: _FileState, code: int, reason: str | None = None, **kw: Any) -> None:
            nonlocal lost
            if lost is None:
                try:
                    self._send_receipt(st, code, reason, **kw)
                except RstashError as e:
                    lost = e

        for st, end, final, err in done:
            if err is not None or final is None:
                assert err is not None
                code = int(err.reply or Reply.LOCAL_ERROR)
                self._log_file(st, outcome_of(code), code, reason=err.reason, detail=err.detail or None)
                say(st, code, err.reason)
                continue
            self.result.stored += 1
            digest = end.sha256.hex()
            say(st, Reply.STORED, final_name=final.encode("utf-8"), n=end.n, sha256=end.sha256)
            self._log_file(st, "stored", Reply.STORED, bytes_=end.n, sha256=digest, final=final)
            if box.on_receive:
                self.hooks.submit(box.on_receive, Delivery(
                    box=box.name, name=final, requested_name=st.name,
                    path=str(box.path / final), size=end.n, sha256=digest,
                    client_mtime=st.header.mtime))
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
        if not st.replied:
            self._log_file(st, "aborted", Reply.ABORTED)
            self._reply(st, Reply.ABORTED)

    def _abort_current(self) -> None:
        # Verified files are stored: commit them, make their names durable, say so first.
        try:
            self._flush_ended()
        except (RstashError, OSError):
            pass
        st = getattr(self, "_cur", None)
        if st is not None and st.upload is not None:
            try:
                st.upload.abort()
            except (OSError, RstashError):
                pass
            st.upload = None
            self._log_file(st, "error", None, detail="session ended before END")

    # -- logging --

    def _log_file(self, st: _FileState, outcome: str, code: int | None, *, bytes_: int = 0,
                  sha256: str | None = None, final: str | None = None, reason: str | None = None,
                  detail: str | None = None) -> None:
        box = self.box
        fields: dict[str, Any] = {
            "event": "file", "box": box.name if box else None, "name": st.header.name,
            "final": final if final != st.name else None, "bytes": bytes_, "sha256": sha256,
            "peer": self.peer, "key": self.key.log_name() if self.key else None,
            "outcome": outcome, "code": code, "reason": reason, "detail": detail,
            "dur": time.monotonic() - st.started,
        }
        if st.header.dry_run:
            fields["mode"] = "dry-run"
        (self.log.info if outcome in ("stored", "would_store") else self.log.warning)(**fields)
        self._record(box=box.name if box else "", name=st.name if final is None else final,
                     outcome=outcome, code=code or 0, bytes_=bytes_, sha256=sha256)

    def _record(self, *, box: str, name: str | None, outcome: str, code: int, bytes_: int = 0,
                sha256: str | None = None) -> None:
        # The delivery log fails open: a database problem is logged, never a reply.
        try:
            from . import state

            db = self._db
            if db is None:
                # Judged once per session: a state_dir unfit for the replay cache
                # keeps the delivery log off too.
                if state.check_state_dir(self.cfg.state_dir) is not None:
                    self._db = False
                    return
                db = self._db = state.StateDB(self.cfg.state_dir)
            elif db is False:
                return
            db.log_event(box=box, name=name, outcome=outcome, code=code, bytes=bytes_,
                         sha256=sha256, peer=self.peer,
                         key=self.key.log_name() if self.key else None)
        except Exception as e:
            self.log.debug(event="state", outcome="error", detail=str(e))

    def _log_session(self, outcome: str, code: int | None, **extra: Any) -> None:
        self.result.outcome = outcome
        fields: dict[str, Any] = {
            "event": "session", "box": self.box.name if self.box else None, "peer": self.peer,
            "key": self.key.log_name() if self.key else None, "mode": self.mode,
            "outcome": outcome if outcome != "complete" else f"complete {self.result.files}",
            "code": code, "dur": time.monotonic() - self.started,
            "stored": self.result.stored, **extra,
        }
        if outcome == "truncated":
            fields["outcome"] = f"truncated after {self.result.files}"
        (self.log.info if outcome == "complete" else self.log.warning)(**fields)

    def _close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
        if self.store is not None:
            self.store.close()
        if self._db:
            self._db.close()
