"""Admission to the accept loop: which new connection gets a process, which is refused, which makes room.

This module owns the limits of rstash-recv(8) (DESCRIPTION, Limits) as pure
decisions over the accept loop's table of sessions: ``max_sessions``; the pre-auth share
(``max(1, max_sessions // 4)``); ``max_preauth_per_peer`` counted per address
group (an IPv4 address, an IPv6 /64); the union of the boxes' ``allow_from``
checked before a process is forked; and which *silent* session (connected, no
HELLO received) is ended to make room for a newcomer.

Theory of operation
-------------------
A peer that connects and says nothing holds a pre-auth slot until
``preauth_timeout``: a few addresses doing that can keep every slot, and
refusing newcomers would lock honest clients out. As sshd's ``MaxStartups``
and ``PerSourcePenalties`` do, the answer is to make holding slots expensive,
but by *fairness* rather than chance: when the share is full, a newcomer may
end the oldest silent session of the address group that holds the most
pre-auth slots, provided that group holds at least two more than the
newcomer's group (so that the exchange makes the table fairer and cannot
loop), or, silent for :data:`SILENT_LONG` seconds, at least one more. An honest
client sends its HELLO one round trip after the greeting, so it is never silent
for :data:`SILENT_GRACE`, the minimum age of any session ended this way.

The module must never fork, signal, log or touch a socket: serve.py does that
with what :func:`decide` returns, and the tests call it without a network.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum

from .config import Config
from .hello import peer_allowed
from .settings import Network

__all__ = ["SILENT_GRACE", "SILENT_LONG", "Decision", "Slot", "Stage", "allowed_networks",
           "decide", "peer_group"]

#: A silent session younger than this is never ended: a greeting's round trip to an
#: honest client on the other side of the world is well under a second.
SILENT_GRACE = 1.0
#: A session silent this long may be ended for a group holding just one slot fewer.
SILENT_LONG = 2.0
#: Why a peer outside every served box's allow_from is refused.
NOT_ALLOWED = "peer not in allow_from"


class Stage(Enum):
    """How far a session has got, as its process reports it through its pipe."""

    #: connected and greeted; no whole HELLO received yet
    SILENT = "silent"
    #: a HELLO received, not authenticated yet
    HELLO = "hello"
    #: ``235`` sent
    AUTHENTICATED = "authenticated"
    #: its last line (``535``, ``421``…) sent before ``235``; lingering until the peer closes
    DONE = "done"


@dataclass
class Slot:
    """One running session as admission sees it."""

    pid: int
    group: str
    started: float
    stage: Stage = Stage.SILENT
    #: ended to make room; no longer counted while it is being reaped
    evicted: bool = False


@dataclass(frozen=True)
class Decision:
    """Admit (with ``evict`` naming a session to end first, or None), or refuse for ``reason``."""

    admit: bool
    reason: str | None = None
    evict: Slot | None = None

    @property
    def busy(self) -> bool:
        """A refusal the peer is told (``421 busy``); one from outside allow_from is just closed."""
        return self.reason != NOT_ALLOWED


def peer_group(peer: str | None) -> str:
    """The address group a per-peer limit counts: an IPv4 address, an IPv6 /64.

    One host gets a whole /64 as easily as one IPv4 address, so counting IPv6
    addresses one by one would give one attacker 2^64 allowances.
    """
    if peer is None:
        return "unknown"
    try:
        ip = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def allowed_networks(cfg: Config, boxes: Collection[str] | None) -> tuple[Network, ...] | None:
    """The union of the served boxes' ``allow_from``, or None when some box takes any address.

    A peer outside every box's ``allow_from`` can only ever get ``535``: it is
    refused before a process is forked for it.
    """
    served = [b for name, b in cfg.boxes.items() if boxes is None or name in boxes]
    if not served or any(not b.allow_from for b in served):
        return None
    return tuple(dict.fromkeys(net for b in served for net in b.allow_from))


def decide(slots: Iterable[Slot], peer: str | None, now: float, *, max_sessions: int,
           max_preauth_per_peer: int, networks: tuple[Network, ...] | None = None) -> Decision:
    """Whether a new connection from ``peer`` gets a process (rstash-recv(8) DESCRIPTION, Limits)."""
    if networks is not None and not peer_allowed(peer, networks):
        return Decision(False, NOT_ALLOWED)
    live = [s for s in slots if not s.evicted]
    pre = [s for s in live if s.stage in (Stage.SILENT, Stage.HELLO)]
    group = peer_group(peer)
    held = Counter(s.group for s in pre)
    if held[group] >= max_preauth_per_peer:
        return Decision(False, "max_preauth_per_peer")
    full = None
    if len(live) >= max_sessions:
        full = "max_sessions"
    elif len(pre) >= max(1, max_sessions // 4):
        full = "preauth_sessions"
    if full is None:
        return Decision(True)
    lingering = [s for s in live if s.stage is Stage.DONE]
    if lingering:  # its last line is out: ending the linger early costs its peer nothing
        return Decision(True, evict=min(lingering, key=lambda s: s.started))
    victim = _victim(pre, held, group, now)
    if victim is None:
        return Decision(False, full)
    return Decision(True, evict=victim)


def _victim(pre: list[Slot], held: Counter[str], group: str, now: float) -> Slot | None:
    """The oldest silent session of the group holding the most, if ending it is fair."""
    mine = held[group]

    def fair(s: Slot) -> bool:
        silent_for = now - s.started
        if s.stage is not Stage.SILENT or s.group == group or silent_for < SILENT_GRACE:
            return False
        return held[s.group] >= mine + 2 or (held[s.group] > mine and silent_for >= SILENT_LONG)

    candidates = [s for s in pre if fair(s)]
    if not candidates:
        return None
    return max(candidates, key=lambda s: (held[s.group], -s.started))
