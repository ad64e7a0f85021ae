"""Judging a HELLO: which box, which key, whether the proof holds, whether a pipe session is fresh.

This module owns the server's decision after a HELLO (rstash(7) RULES): the
box and its allow_from and ``--box`` limits, the proof checked against every
key whose id matches, always (with a per-process dummy key when none does, so
that timing and replies cannot tell "no such box" from "wrong key"), the
server_id, the SSH login a box with ``auth = "ssh"`` or ``"key+ssh"`` needs
(method ssh, rstash(7) CONSTRUCTION 11), and for pipe mode the box's
pipe_mode and the replay check.

It returns a :class:`Verdict` naming an :class:`~rstash.errors.Outcome` and
must never touch a connection, send a line or write a log line: the session
does that with what the verdict says.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from rstash import auth, wire
from rstash.errors import ClockSkew, Outcome, ReplayRefused, RstashError, StateUnavailable
from rstash.settings import BoxConfig, Config, Network
from rstash.sshlogin import SshLogin

#: A random key per process: an unknown box or key id still runs the full
#: proof check, so that timing and replies cannot tell "no such box" from
#: "wrong key" (rstash(7) RULES, rule 1).
DUMMY_KEY = auth.Key(secrets.token_bytes(auth.KEY_LEN), "dummy")


#: Why pipe mode is refused for a box on a shared volume (rstash-recv(8) SCALING).
SHARED_PIPE = ("pipe mode refused: the box is on a network or cluster file system, and a replay "
               "through another receiver would not be seen by this receiver's replay cache")


@dataclass(frozen=True)
class Verdict:
    """What a HELLO earned. ``outcome`` None: authenticated with ``box``, ``key`` and ``keys``."""

    outcome: Outcome | None
    box: BoxConfig | None = None
    key: auth.Key | None = None
    keys: auth.SessionKeys | None = None
    #: why, for the log (never for the peer)
    reason: str | None = None
    detail: str | None = None
    #: pipe mode: the client's clock minus ours, in seconds
    skew: int | None = None
    #: pipe mode, refused as replayed for its time: the box's floor (streams made after it pass)
    floor: int | None = None

    @property
    def key_name(self) -> str | None:
        """How the log names what authorised the session: the box key, else the SSH key."""
        if self.key is not None:
            return self.key.log_name()
        return self.login.key_name if self.login is not None else None

    #: the SSH login the session came through, when the box needs one
    login: SshLogin | None = None

    def login_fields(self) -> dict[str, str]:
        """Log fields of the SSH login: method ssh, or the SSH key beside the box key."""
        if self.login is None:
            return {}
        if self.key is None:
            return {"method": "ssh"}
        return {"ssh_key": self.login.key_name}


def peer_allowed(peer: str | None, networks: tuple[Network, ...]) -> bool:
    """Whether ``peer`` may use a box limited to ``networks`` (none: anyone)."""
    if not networks:
        return True
    if peer is None:
        return False  # unknown address + allow_from = refused
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


class HelloJudge:
    """The judge of one server's HELLOs: its config, its loaded keys, its ``--box`` limit."""

    def __init__(self, cfg: Config, box_keys: Mapping[str, list[auth.Key]], *,
                 allowed_boxes: frozenset[str] | None = None, login: SshLogin | None = None) -> None:
        self.cfg = cfg
        self.box_keys = box_keys
        self.allowed_boxes = allowed_boxes
        #: set only for one session on stdin/stdout that sshd started (rstash.sshlogin)
        self.login = login

    @property
    def offers_ssh(self) -> bool:
        """Whether the greeting lists method ssh: an SSH login limited to one box with auth "ssh"."""
        login = self.login
        if login is None or self.allowed_boxes != frozenset({login.box}):
            return False
        box = self.cfg.boxes.get(login.box)
        return box is not None and box.auth == "ssh"

    def _through_login(self, box: BoxConfig) -> bool:
        """Whether this session came through the SSH login that may serve ``box``."""
        return (self.login is not None and self.login.box == box.name
                and self.allowed_boxes == frozenset({box.name}))

    def judge(self, hello: wire.Hello, greeting: bytes, peer: str | None) -> Verdict:
        """Authenticate ``hello`` (the greeting is ignored in pipe mode)."""
        if hello.method == wire.METHOD_SSH:
            return self._judge_ssh(hello, greeting, peer)
        verdict = self._judge_key(hello, greeting, peer)
        box = verdict.box
        if verdict.outcome is None and box is not None and box.auth != "key":
            # "ssh" (with a key of its own) and "key+ssh": the key counts only through the login.
            if not self._through_login(box):
                return Verdict(Outcome.AUTH_FAILED, reason=f"auth {box.auth}: not an SSH login "
                                                          "limited to this box")
            return Verdict(None, box, verdict.key, verdict.keys, login=self.login)
        return verdict

    def _judge_ssh(self, hello: wire.Hello, greeting: bytes, peer: str | None) -> Verdict:
        """Method ssh: the SSH login stands in for the key (rstash(7) CONSTRUCTION 11)."""
        box, _, why = self._find_key(hello, peer)
        keys = auth.ssh_session_keys(greeting, hello.signed)
        zero = bytes(auth.KEY_ID_LEN) + bytes(auth.MAC_LEN)
        if why is None:
            if box is None or not self.offers_ssh or not self._through_login(box):
                why = "method ssh not offered for this box"
            elif hello.mode != wire.MODE_INTERACTIVE:
                why = "method ssh in pipe mode"
            elif not auth.verify(hello.key_id + hello.proof, zero):
                why = "method ssh with a key id or proof"
            else:
                why = self._server_id_problem(hello)
        if why is not None or box is None:
            return Verdict(Outcome.AUTH_FAILED, reason=why)
        return Verdict(None, box, None, keys, login=self.login)

    def _server_id_problem(self, hello: wire.Hello) -> str | None:
        if self.cfg.server_id and hello.server_id != self.cfg.server_id:
            return "server_id mismatch"
        if not self.cfg.server_id and hello.server_id is not None:
            return "client sent a server_id; none is configured"
        return None

    def _judge_key(self, hello: wire.Hello, greeting: bytes, peer: str | None) -> Verdict:
        pipe = hello.mode == wire.MODE_PIPE
        box, candidates, why = self._find_key(hello, peer)
        # The proof is always computed, with the dummy key when no key id matched,
        # and with every key whose id matches (ids are 8 bytes: they may collide).
        key: auth.Key | None = None
        keys: auth.SessionKeys | None = None
        for cand in candidates or [DUMMY_KEY]:
            derived = auth.session_keys(cand, b"" if pipe else greeting, hello.signed)
            if auth.verify(derived.proof, hello.proof) and cand is not DUMMY_KEY:
                key, keys = cand, derived
                break
        if why is None:
            if key is None:
                why = "bad proof" if candidates else "unknown key id"
            else:
                why = self._server_id_problem(hello)
        if why is not None or key is None or keys is None or box is None:
            return Verdict(Outcome.AUTH_FAILED, reason=why)
        return Verdict(None, box, key, keys)

    def _find_key(self, hello: wire.Hello, peer: str | None
                  ) -> tuple[BoxConfig | None, list[auth.Key], str | None]:
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
        elif not peer_allowed(peer, box.allow_from):
            why = "peer not in allow_from"
        keys = self.box_keys.get(name or "", []) if box is not None else []
        candidates = [k for k in keys or [DUMMY_KEY] if auth.verify(k.key_id, hello.key_id)]
        return box, [k for k in candidates if k is not DUMMY_KEY], why

    def judge_pipe(self, box: BoxConfig, hello: wire.Hello) -> Verdict | None:
        """None when an authenticated pipe-mode session may go on, else the refusal.

        The replay cache fails closed: a state_dir that cannot hold it refuses the session.
        """
        if not box.pipe_mode:
            return Verdict(Outcome.PIPE_MODE_OFF, box, reason="pipe mode off")
        from rstash import state
        from rstash.replay import BelowFloor, BoxMark
        from rstash.statedir import check_state_dir, may_be_shared

        if may_be_shared(box.path):
            # Fails closed: another receiver sharing the box keeps its own replay cache.
            return Verdict(Outcome.SESSION_ERROR, box, detail=SHARED_PIPE)

        try:
            problem = check_state_dir(self.cfg.state_dir)
            if problem is not None:
                raise StateUnavailable(problem)
            with state.StateDB(self.cfg.state_dir) as db:
                db.check_replay(box.name, hello.nonce, hello.time, self.cfg.replay_window,
                                mark=BoxMark(box.path))
        except ClockSkew as e:
            return Verdict(Outcome.CLOCK_SKEW, box, reason=f"clock skew {e.skew:+d} s", skew=e.skew)
        except ReplayRefused as e:
            # detail tells "nonce already seen" from "not above the box's floor" (a stream
            # no later than one the box already accepted, perhaps before state_dir was lost,
            # and when streams pass again): the reply line must not, the admin must.
            return Verdict(Outcome.REPLAYED, box, reason="replayed session", detail=e.message,
                           floor=e.floor if isinstance(e, BelowFloor) else None)
        except RstashError as e:
            return Verdict(Outcome.SESSION_ERROR, box, detail=e.message)
        return None
