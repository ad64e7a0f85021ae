"""Hostile names at the protocol level, against the real rstash-recv (rstash(7) NAMES).

Every name goes out in a correctly tagged FILE frame from a client holding the box key: the
attacker here is a key holder, the only one who gets a name past the proof. The oracle below is
written from rstash(7) NAMES, not from rstash/names.py: a stored name that breaks it, or any new
path outside the box, fails the test.

Figure: ``names N tried, 0 outside the box, 0 rule-breaking stored``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import unicodedata

import pytest

from adversarial.adv_support import Served, Site, count, event, file_frames, login, record, temps, tree
from adversarial.adv_wire import wire
from e2e_support import make_box
from rstash import auth

pytestmark = pytest.mark.e2e

#: Look-alikes of the path characters and invisible or non-characters that rstash(7) NAMES
#: refuses besides the category rule.
LOOKALIKES = "\u2215\u2044\uff0f\u29f8\u2024\uff0e"
INVISIBLE = "\u3164\u2800\ufffe"


def rule_problem(raw: bytes) -> str | None:
    """rstash(7) NAMES, from the text: why ``raw`` may not be stored, or None."""
    try:
        name = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        return "utf-8"
    if not raw or len(raw) > 255:
        return "length"
    if "/" in name or name in (".", ".."):
        return "path"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Co") for c in name):
        return "category"
    if name[0] in ".-" or name != name.strip():
        return "edge"
    if unicodedata.normalize("NFC", name) != name:
        return "nfc"
    return pending_problem(raw)


def pending_problem(raw: bytes) -> str | None:
    """The look-alike, invisible, non-character and leading-combining-mark rules."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(c in LOOKALIKES or c in INVISIBLE for c in name):
        return "look-alike or invisible"
    if any(0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE for c in name):
        return "noncharacter"
    if name and unicodedata.category(name[0]).startswith("M"):
        return "leading combining mark"
    return None


def hostile_names() -> list[bytes]:
    """At least 300 names, each a separate attack on the box or on a reader of it."""
    names: list[bytes] = []
    add = names.append
    for base in ("../x", "../../etc/passwd", "..", ".", "./x", "x/..", "x/../../y", "a/b",
                 "/etc/passwd", "/x", "//x", "x/", "../boxes/other/x", "....//x", "..././x",
                 "%2e%2e%2fx", "..%2fx", "..\\x", "..\\..\\x", "\\x", "C:\\x", "x\\..\\..\\y",
                 "\\\\server\\share", "~/x", "~root", "$HOME", "`id`", "$(id)", "x;rm -rf",
                 "x|y", "x>y", "x\"y", "x'y", "x y", "*", "?", "[a-z]", "*.txt", "x*",
                 "[!a]", "{a,b}", "**", "x[", "]", ".*", "-rf", "--help", "-", ".hidden",
                 ". x", "- x", " x", "x ", " ", "  ", "\u00a0x", "x\u00a0", "\u3000x",
                 "\u2003x", "x\u2028", "con", "nul", "aux", "COM1", "x.", "x..", "x...",
                 "...", "....", "x:y", "x::$DATA", "\u00e9", "e\u0301", "\u212b", "A\u030a",
                 "\u1e9b\u0323", "\ufb01", "\uac00", "\u1100\u1161"):
        add(base.encode())
    for code in [*list(range(0, 32)), 127, *list(range(128, 160))]:
        add(b"x" + chr(code).encode() + b"y")
        add(chr(code).encode() + b"x")
    for raw in (b"x\x00", b"\x00", b"x\x00/../y", b"\xff", b"\xfe\xff", b"x\x80", b"\xc0\xaf",
                b"\xc0\x2f", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xc0\xae\xc0\xae\x2fx",
                b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
                b"x\xc3", b"\xc3(", b"\xe2\x82", b"\xa0\xa1", b"%\xff%"):
        add(raw)
    for c in ("\u202e", "\u202d", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e", "\u200f",
              "\u061c", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e",
              "\ue000", "\U000f0000", "\u2029", "\u2028", "\U000e0041", "\u034f"):
        add(f"x{c}y".encode())
        add(f"{c}x".encode())
    add("evil\u202etxt.exe".encode())
    for c in LOOKALIKES + INVISIBLE + "\u0301\u20dd\u0338":
        add(f"{c}{c}{c}x".encode())
        add(f"x{c}y".encode())
    for twin in ("\u2024\u2024\u2215x", "\uff0e\uff0e\uff0fx", "\u2024\u2024", "\uff0e\uff0e",
                 "\u2024\u2024\u29f8x", "\u3164", "\u2800", "\ufffe", "\u0301x", "\u0300"):
        add(twin.encode())
    for n in (254, 255, 256, 300, 1000, 4000):
        add(b"a" * n)
    add("\u00e9".encode() * 127 + b"a")        # 255 bytes
    add("\u00e9".encode() * 128)               # 256 bytes
    add(b"a" * 254 + "\u00e9".encode())        # 256 bytes, the last character split at 255
    add("\U0001f600".encode() * 64)            # 256 bytes of 4-byte sequences
    for pat in ("db.tar.zst", "db~1.tar.zst", "db", "db~1", "db~999", "README", ".db",
                "db.", "db..x", "~1", "~1.x", "x~0", "db~1~1.tar"):
        add(pat.encode())
    return names


def test_hostile_names_stay_inside_the_box_and_only_rule_abiding_names_are_stored(
        site: Site) -> None:
    names = hostile_names()
    assert len(names) >= 300, len(names)
    normal = [n for n in names if pending_problem(n) is None]
    box = make_box(site.dir, "names", overwrite="rename")
    conf = site.config([box])
    before = tree(site.dir)

    stored: dict[bytes, bytes] = {}
    refused = 0
    rounds = count(2, floor=1)  # the second round makes every stored name collide (~N)
    for round_ in range(rounds):
        served = site.piped(conf)
        conn = login(served.pipe, box.key, box.name)
        for i, raw in enumerate(normal):
            served.pipe.send(file_frames(conn, raw, b"%d\n" % i))
        served.pipe.send(conn.bye())
        served.pipe.close_write()
        for i, raw in enumerate(normal):
            ev = event_or_fail(served, conn)
            assert isinstance(ev, wire.Receipt) and ev.index == i, (raw, ev)
            assert ev.name == raw[:255] or ev.name == raw, (raw, ev)
            if ev.ok:
                stored[ev.final_name] = b"%d\n" % i
            else:
                # a collision whose every NAME~N candidate breaks a rule is 550 exists
                assert ev.code == 553 or (round_ and ev.code == 550), (raw, ev)
                refused += 1
        assert isinstance(event_or_fail(served, conn), wire.Done)
        assert served.wait() == 0, served.stderr()

    # A 4096-byte name cannot fit a FILE frame: the server must refuse the frame itself.
    served = site.piped(conf)
    conn = login(served.pipe, box.key, box.name)
    assert conn.keys is not None
    hdr = wire.encode_file_header(0, b"a" * 4096, 1, 0)
    payload = hdr + auth.file_tag(conn.keys.k_c2s, hdr)
    served.pipe.send(struct.pack(">BI", wire.FrameType.FILE, len(payload)), timeout=5)
    with contextlib.suppress(OSError, TimeoutError):  # the server may close before reading it
        served.pipe.send(payload, timeout=5)
    rest = served.pipe.rest()
    assert rest.startswith(b"500 "), rest
    served.wait()

    outside = sorted(p for p in tree(site.dir) - before
                     if not p.startswith(("boxes/names/", "state/")) and not p.endswith(".err"))
    on_disk = set(os.listdir(box.path))
    breaking = [n for n in on_disk if rule_problem(os.fsencode(n)) is not None]
    record("names", tried=rounds * len(normal) + 1, outside=len(outside),
           rule_breaking=len(breaking))
    assert outside == [], outside
    assert breaking == [], breaking
    assert temps(box.path) == []
    assert all(not (box.path / n).is_symlink() and (box.path / n).is_file() for n in on_disk)
    assert {os.fsencode(n) for n in on_disk} == set(stored), "a 250 names what the box holds"
    for final, content in stored.items():
        assert (box.path / os.fsdecode(final)).read_bytes() == content
    assert refused > len(normal) * rounds // 2, "most of these names must be refused"
    # under rename, the second round stored every accepted name again as NAME~N.ext
    assert len(stored) == len(normal) * rounds - refused


def test_lookalike_invisible_and_noncharacter_names_are_refused(site: Site) -> None:
    """rstash(7) NAMES: look-alikes of '/', '\\' and '..', default-ignorable and non-characters
    and a leading combining mark are refused with 553, as a person would read them as paths or
    not see them at all."""
    names = [n for n in hostile_names() if pending_problem(n) is not None]
    assert len(names) >= 20
    box = make_box(site.dir, "twins")
    conf = site.config([box])
    served = site.piped(conf)
    conn = login(served.pipe, box.key, box.name)
    for raw in names:
        served.pipe.send(file_frames(conn, raw, b"x\n"))
    served.pipe.send(conn.bye())
    served.pipe.close_write()
    accepted = []
    for raw in names:
        ev = event_or_fail(served, conn)
        assert isinstance(ev, wire.Receipt), ev
        if ev.ok:
            accepted.append(raw.decode("utf-8", "backslashreplace"))
    served.wait()
    record("names", tried=len(names), outside=0, rule_breaking=len(os.listdir(box.path)))
    assert accepted == [], f"{len(accepted)} of {len(names)} stored: {accepted}"
    assert os.listdir(box.path) == []


def event_or_fail(served: Served, conn: object) -> object:
    return event(served.pipe, conn, timeout=30)
