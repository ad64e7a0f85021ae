"""Judging a HELLO: which box, which key, whether the proof holds, whether a pipe session is fresh.

This module owns the server's decision after a HELLO (rstash(7) RULES): the
box and its allow_from and ``--box`` limits, the proof checked against every
key whose id matches, always (with a per-process dummy key when none does, so
that timing and replies cannot tell "no such box" from "wrong key"), the
server_id, and for pipe mode the box's pipe_mode and the replay check.

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

#: A random key per process: an unknown box or key id still runs the full
#: proof check, so that timing and replies cannot tell "no such box" from
#: "wrong key" (rstash(7) RULES, rule 1).
DUMMY_KEY = auth.Key(secrets.token_bytes(auth.KEY_LEN), "dummy")


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
                 allowed_boxes: frozenset[str] | None = None) -> None:
        self.cfg = cfg
        self.box_keys = box_keys
        self.allowed_boxes = allowed_boxes

    def judge(self, hello: wire.Hello, greeting: bytes, peer: str | None) -> Verdict:
        """Authenticate ``hello`` (the greeting is ignored in pipe mode)."""
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
            elif self.cfg.server_id and hello.server_id != self.cfg.server_id:
                why = "server_id mismatch"
            elif not self.cfg.server_id and hello.server_id is not None:
                why = "client sent a server_id; none is configured"
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
        from rstash.statedir import check_state_dir

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
