"""Admission to the accept loop (rstash/admission.py): limits, address groups, allow_from at
accept, and which silent session is ended to make room (rstash-recv(8) DESCRIPTION, Limits). No network."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from rstash.admission import (
    NOT_ALLOWED,
    SILENT_GRACE,
    SILENT_LONG,
    Decision,
    Slot,
    Stage,
    allowed_networks,
    decide,
    peer_group,
)
from rstash.config import load_config

NOW = 1000.0


def slot(pid: int, peer: str, age: float, stage: Stage = Stage.SILENT) -> Slot:
    return Slot(pid, peer_group(peer), NOW - age, stage)


def admit(slots: list[Slot], peer: str, *, max_sessions: int = 64, per_peer: int = 4) -> Decision:
    return decide(slots, peer, NOW, max_sessions=max_sessions, max_preauth_per_peer=per_peer)


def attack(addresses: int = 4, each: int = 4, age: float = 30.0) -> list[Slot]:
    """``addresses`` peers, 127.0.0.2 on, each holding ``each`` silent slots; older pids first."""
    slots = []
    for i in range(addresses * each):
        a, n = i % addresses, i // addresses
        slots.append(slot(100 + i, f"127.0.0.{2 + a}", age - n - a / 10))
    return slots


# --------------------------------------------------------------------------- groups


def test_an_ipv6_slash_64_is_one_group_and_ipv4_addresses_are_not_grouped() -> None:
    assert peer_group("2001:db8:1:2::1") == peer_group("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert peer_group("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert peer_group("2001:db8:1:3::1") != peer_group("2001:db8:1:2::1")
    assert peer_group("192.0.2.1") == "192.0.2.1" != peer_group("192.0.2.2")
    assert peer_group(None) == "unknown"


def test_one_ipv6_slash_64_gets_max_preauth_per_peer_however_many_addresses_it_uses() -> None:
    slots = [slot(i, f"2001:db8::{i:x}", 0.1) for i in range(1, 5)]
    assert admit(slots, "2001:db8::99") == Decision(False, "max_preauth_per_peer")
    assert admit(slots, "2001:db8:0:1::1").admit


# --------------------------------------------------------------------------- limits


def test_below_every_limit_a_connection_is_admitted_without_ending_anyone() -> None:
    assert admit([slot(1, "192.0.2.1", 5)], "192.0.2.2") == Decision(True)


def test_max_preauth_per_peer_refuses_the_same_address_even_with_old_silent_slots() -> None:
    slots = [slot(i, "192.0.2.1", 60) for i in range(4)]
    assert admit(slots, "192.0.2.1") == Decision(False, "max_preauth_per_peer")


def test_authenticated_sessions_do_not_count_against_the_preauth_share() -> None:
    slots = [slot(i, f"192.0.2.{i}", 60, Stage.AUTHENTICATED) for i in range(1, 16)]
    assert admit(slots, "192.0.2.200", max_sessions=16) == Decision(True)


def test_max_sessions_full_of_authenticated_sessions_is_busy() -> None:
    slots = [slot(i, f"192.0.2.{i}", 60, Stage.AUTHENTICATED) for i in range(1, 17)]
    assert admit(slots, "192.0.2.200", max_sessions=16) == Decision(False, "max_sessions")


def test_evicted_slots_no_longer_count() -> None:
    slots = [slot(1, "192.0.2.1", 60, Stage.HELLO)]
    assert admit(slots, "192.0.2.2", max_sessions=2) == Decision(False, "preauth_sessions")
    slots[0].evicted = True
    assert admit(slots, "192.0.2.2", max_sessions=2) == Decision(True)


# --------------------------------------------------------------------------- eviction


def test_under_attack_a_newcomer_ends_the_oldest_silent_slot_of_the_biggest_group() -> None:
    slots = attack()
    slots.append(slot(1, "127.0.0.2", 60, Stage.HELLO))  # older, but it sent a HELLO
    d = admit(slots, "127.0.0.1", max_sessions=68)
    assert d.admit and d.evict is not None
    assert d.evict.stage is Stage.SILENT
    oldest = min((s for s in slots if s.stage is Stage.SILENT), key=lambda s: s.started)
    assert d.evict is oldest and d.evict.pid == 100


def test_the_biggest_group_goes_first_even_when_another_has_an_older_slot() -> None:
    slots = [slot(1, "192.0.2.1", 100)] + [slot(10 + i, "192.0.2.9", 10 + i) for i in range(3)]
    d = admit(slots, "192.0.2.50", max_sessions=16)
    assert d.evict is not None and d.evict.pid == 12  # 192.0.2.9 holds 3, its oldest


def test_a_session_that_sent_its_hello_or_authenticated_is_never_ended() -> None:
    for stage in (Stage.HELLO, Stage.AUTHENTICATED):
        slots = [slot(i, "192.0.2.9", 60, stage) for i in range(4)]
        d = admit(slots, "192.0.2.1", max_sessions=4)
        assert d.evict is None and not d.admit, stage


def test_a_slot_silent_for_less_than_the_grace_is_never_ended() -> None:
    # A legitimate client's HELLO is one round trip behind its greeting.
    slots = [slot(i, "192.0.2.9", SILENT_GRACE * 0.9) for i in range(4)]
    assert admit(slots, "192.0.2.1", max_sessions=16) == Decision(False, "preauth_sessions")
    slots[0].started = NOW - SILENT_GRACE
    assert admit(slots, "192.0.2.1", max_sessions=16).evict is slots[0]


def test_attackers_refilling_cannot_end_each_other_in_a_loop() -> None:
    slots = attack()
    d = admit(slots, "127.0.0.1")
    assert d.evict is not None
    d.evict.evicted = True
    victim_group = d.evict.group
    # The victim's address reconnects: it holds 3, every other attacker 4, all young
    # enough (under SILENT_LONG): ending one of theirs would only move the imbalance.
    young = [slot(s.pid, f"127.0.0.{2 + i % 4}", SILENT_LONG - 1) if not s.evicted else s
             for i, s in enumerate(slots)]
    slots = [*young, slot(999, "127.0.0.1", 0.01, Stage.HELLO)]
    assert admit(slots, victim_group) == Decision(False, "preauth_sessions")


def test_a_slot_silent_for_long_can_be_ended_by_a_group_holding_one_fewer() -> None:
    # Sixteen addresses holding one slot each: a newcomer holding none ends the oldest,
    # once it has been silent for SILENT_LONG.
    slots = [slot(i, f"192.0.2.{i}", SILENT_LONG - 2 + i / 100) for i in range(16)]
    assert admit(slots, "198.51.100.1") == Decision(False, "preauth_sessions")
    slots[3].started = NOW - SILENT_LONG - 1
    assert admit(slots, "198.51.100.1").evict is slots[3]


def test_a_group_never_ends_its_own_silent_slots() -> None:
    slots = [slot(i, "192.0.2.1", 60) for i in range(3)] + [slot(9, "192.0.2.2", 0.1)]
    assert admit(slots, "192.0.2.1", max_sessions=16) == Decision(False, "preauth_sessions")


def test_eviction_also_makes_room_when_max_sessions_is_full() -> None:
    slots = [slot(i, f"192.0.2.{i}", 60, Stage.AUTHENTICATED) for i in range(1, 13)]
    slots += [slot(20 + i, "198.51.100.7", 30 - i) for i in range(4)]
    d = admit(slots, "203.0.113.1", max_sessions=16)
    assert d.admit and d.evict is not None and d.evict.pid == 20


def test_the_exchange_makes_the_table_fairer_every_time() -> None:
    # Whatever the order of arrivals from five groups, every eviction takes from a
    # group holding more than the newcomer's: the sum of squares of the groups' counts
    # never grows, and with young slots it strictly falls, so refilling cannot loop.
    slots = attack(age=SILENT_LONG - 0.5)
    pid = 1000
    for step in range(200):
        peer = f"127.0.0.{1 + step % 5}"
        live = [s for s in slots if not s.evicted]
        before = _squares(live)
        d = admit(slots, peer)
        if not d.admit:
            continue
        assert d.evict is not None
        d.evict.evicted = True
        pid += 1
        slots.append(slot(pid, peer, SILENT_GRACE * 2))
        assert _squares([s for s in slots if not s.evicted]) < before
    assert pid - 1000 < 20


def _squares(slots: list[Slot]) -> int:
    from collections import Counter

    return sum(n * n for n in Counter(s.group for s in slots).values())


# --------------------------------------------------------------------------- allow_from


def _config(tmp_path: Path, *allow: list[str], top: str = "") -> Path:
    lines = [f'state_dir = "{tmp_path}/state"', top, ""]
    for i, nets in enumerate(allow):
        (tmp_path / f"box{i}").mkdir()
        (tmp_path / f"key{i}").write_text("")
        lines += [f"[box.b{i}]", f'path = "{tmp_path}/box{i}"', f'keys = ["{tmp_path}/key{i}"]']
        if nets:
            lines.append("allow_from = [" + ", ".join(f'"{n}"' for n in nets) + "]")
        lines.append("")
    conf = tmp_path / "rstash-recv.toml"
    conf.write_text("\n".join(lines))
    return conf


def test_allow_from_of_every_box_is_enforced_at_accept(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, ["192.0.2.0/24"], ["2001:db8::/32", "198.51.100.7"]))
    nets = allowed_networks(cfg, None)
    assert nets is not None
    assert set(nets) == {ipaddress.ip_network(n) for n in
                         ("192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32")}

    def verdict(peer: str | None) -> Decision:
        return decide([], peer, NOW, max_sessions=64, max_preauth_per_peer=4, networks=nets)

    assert verdict("192.0.2.9") == Decision(True)
    assert verdict("2001:db8::1") == Decision(True)
    refused = verdict("203.0.113.1")
    assert refused == Decision(False, NOT_ALLOWED) and not refused.busy
    assert not verdict(None).admit
    assert Decision(False, "preauth_sessions").busy


def test_one_box_open_to_all_turns_the_check_at_accept_off(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, ["192.0.2.0/24"], []))
    assert allowed_networks(cfg, None) is None
    # ... unless --box leaves only restricted boxes served.
    nets = allowed_networks(cfg, frozenset({"b0"}))
    assert nets == (ipaddress.ip_network("192.0.2.0/24"),)


@pytest.mark.parametrize("peer", ["192.0.2.1", "2001:db8::1"])
def test_no_allow_from_anywhere_admits_every_address(tmp_path: Path, peer: str) -> None:
    cfg = load_config(_config(tmp_path, [], []))
    assert allowed_networks(cfg, None) is None
    assert decide([], peer, NOW, max_sessions=64, max_preauth_per_peer=4,
                  networks=allowed_networks(cfg, None)).admit


# --------------------------------------------------------------------------- the parent


def test_the_parent_reads_every_childs_word_then_ends_the_silent_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve.Server._handle: a HELLO reported through the pipe protects the older child."""
    import os
    import signal
    import socket
    import subprocess
    import time

    from rstash import serve
    from rstash.log import Logger

    cfg = load_config(_config(tmp_path, [], top="max_sessions = 4"))  # a pre-auth share of one
    server = serve.Server(str(tmp_path / "rstash-recv.toml"), cfg, Logger(str(tmp_path / "log")))
    forked: list[str | None] = []

    def fork(conn: socket.socket, peer: str | None) -> None:
        forked.append(peer)
        conn.close()

    monkeypatch.setattr(server, "_fork", fork)
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    pipes = [os.pipe2(os.O_NONBLOCK) for _ in sleepers]
    try:
        old = time.monotonic() - 30
        for i, (p, (r, _w)) in enumerate(zip(sleepers, pipes, strict=True)):
            # the older child has sent its HELLO, but the parent has not read its pipe yet
            server.children[p.pid] = serve._Child(p.pid, "192.0.2.9", old + i, peer="192.0.2.9",
                                                 pipe=r)
        os.write(pipes[0][1], b"H")
        a, b = socket.socketpair()
        with b:
            server._handle(a, None)
        assert forked == [None]
        assert server.children[sleepers[0].pid].stage is Stage.HELLO
        assert not server.children[sleepers[0].pid].evicted
        assert server.children[sleepers[1].pid].evicted
        assert sleepers[1].wait(10) == -signal.SIGTERM
        assert sleepers[0].poll() is None
        assert "outcome=silent reason=evicted" in (tmp_path / "log").read_text()
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
        for _r, w in pipes:
            os.close(w)
        server.children.clear()
        server._close()


# --------------------------------------------------------------------------- lingering sessions


def test_a_session_lingering_after_its_535_holds_no_preauth_slot() -> None:
    # Bad HELLOs answered with 535 and closed within their linger must not keep the share
    # full: they are not counted as pre-auth and the newcomer gets in without ending anyone.
    slots = [slot(100 + i, f"127.0.0.{2 + i % 4}", 0.5, Stage.DONE) for i in range(16)]
    assert admit(slots, "127.0.0.1") == Decision(True)
    assert admit(slots, "127.0.0.2") == Decision(True)


def test_when_every_process_is_taken_a_lingering_session_is_ended_before_a_silent_one() -> None:
    lingering = slot(7, "127.0.0.9", 0.1, Stage.DONE)
    slots = [*attack(), lingering, *(slot(200 + i, "127.0.0.1", 1, Stage.AUTHENTICATED) for i in range(47))]
    assert len(slots) == 64
    assert admit(slots, "127.0.0.1") == Decision(True, evict=lingering)
