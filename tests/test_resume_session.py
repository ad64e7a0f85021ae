"""Resume and re-runs in the server session, in-process (rstash(7) RESUME AND RE-RUNS).

Files just over the 64 MiB waited size; the sessions run over a socketpair.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from rstash import auth, wire
from rstash.config import load_config
from rstash.log import Logger
from rstash.partials import CHUNK, PARTIALS_DIR, Partials
from rstash.session import ServerSession
from rstash.store import BoxStore
from rstash.transport import FdStream

SIZE = wire.WAIT_SIZE + 3 * 2**20
TID = bytes(range(16))
CONTENT = (bytes(range(251)) * (SIZE // 251 + 1))[:SIZE]


def _site(tmp_path: Path, extra: str = "", keys: int = 1) -> tuple[list[auth.Key], Path]:
    (tmp_path / "box").mkdir(mode=0o750)
    (tmp_path / "state").mkdir(mode=0o700)
    out = []
    for i in range(keys):
        raw = secrets.token_bytes(32)
        (tmp_path / f"k{i}.key").write_text(auth.format_key(raw, f"k{i}"))
        os.chmod(tmp_path / f"k{i}.key", 0o600)
        out.append(auth.Key(raw))
    paths = ", ".join(f'"{tmp_path / f"k{i}.key"}"' for i in range(keys))
    (tmp_path / "recv.toml").write_text(
        f'state_dir = "{tmp_path / "state"}"\nlog = "{tmp_path / "recv.log"}"\n'
        f'[box.vm1]\npath = "{tmp_path / "box"}"\nkeys = [{paths}]\n{extra}')
    return out, tmp_path / "recv.toml"


class Peer:
    """One session: a real ServerSession on one end, a wire client driven by the test."""

    def __init__(self, conf: Path, key: auth.Key) -> None:
        self.srv, self.cli = socket.socketpair()
        session = ServerSession(load_config(conf), FdStream(self.srv.fileno()),
                                Logger(str(conf.parent / "recv.log")), peer="192.0.2.1")
        self.thread = threading.Thread(target=session.run, daemon=True)
        self.thread.start()
        self.cli.settimeout(30)
        self.rf = self.cli.makefile("rb")
        self.c = wire.ClientConnection(key, "vm1")
        self.c.receive_data(self.rf.readline())
        assert isinstance(self.c.next_event(), wire.Greeting) and self.c.resume
        self.cli.sendall(self.c.hello(secrets.token_bytes(32), int(time.time())))
        assert isinstance(self.event(), wire.AuthOk)
        self.sent = 0

    def event(self) -> object:
        while True:
            ev = self.c.next_event()
            if ev is not wire.NEED_DATA:
                return ev
            self.c.receive_data(self.rf.readline())

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.cli.sendall(data)

    def file(self, content: bytes = CONTENT, tid: bytes = TID, name: bytes = b"big.img",
             stop_at: int | None = None) -> object:
        """Send one file the way rstash-send does; ``stop_at``: cut the connection there."""
        self.send(self.c.file(name, len(content), 0, tid=tid))
        if not self.c.waits:  # pipelined: no first line to wait for
            self.send(self.c.data(content) + self.c.end())
            return self.event()
        first = self.event()
        start = 0
        if isinstance(first, wire.ResumeOffer):
            prefix = hashlib.sha256(content[:first.offset])
            if prefix.digest() != first.prefix:
                self.send(self.c.abort())
                assert self.event().code == 426  # type: ignore[attr-defined]
                return self.file(content, tid, name, stop_at)
            self.c.resume_from(first.offset, prefix)
            start = first.offset
        elif not isinstance(first, wire.Go):
            if self.c.state is wire.ClientState.IN_FILE:  # a pipelined file's refusal
                self.send(self.c.abort())
            return first
        for pos in range(start, len(content), wire.MAX_DATA):
            if stop_at is not None and pos >= stop_at:
                self.close()
                return None
            self.send(self.c.data(content[pos:pos + wire.MAX_DATA]))
        self.send(self.c.end())
        return self.event()

    def bye(self) -> None:
        self.send(self.c.bye())
        assert isinstance(self.event(), wire.Done)
        self.close()

    def close(self) -> None:
        self.cli.shutdown(socket.SHUT_RDWR)
        self.rf.close()
        self.cli.close()
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.srv.close()


def _parts(tmp_path: Path) -> list[str]:
    d = tmp_path / "box" / PARTIALS_DIR
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".part")) if d.exists() else []


def test_a_cut_transfer_resumes_from_a_checkpoint_and_is_stored_whole(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path)
    first = Peer(conf, key)
    assert first.file(stop_at=40 * 2**20) is None
    assert len(_parts(tmp_path)) == 1
    again = Peer(conf, key)
    receipt = again.file()
    again.bye()
    assert isinstance(receipt, wire.Receipt) and receipt.ok
    assert (tmp_path / "box" / "big.img").read_bytes() == CONTENT
    # Only what the kept checkpoint lacked crossed again (plus frame headers).
    kept = (40 * 2**20 // CHUNK) * CHUNK
    assert again.sent < SIZE - kept + 2**20
    assert _parts(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["big.img"]  # no hidden dir left


def test_a_rerun_after_storing_is_answered_already_stored_without_data(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path)
    p = Peer(conf, key)
    assert p.file().ok  # type: ignore[attr-defined]
    p.bye()
    again = Peer(conf, key)
    receipt = again.file()
    again.bye()
    assert isinstance(receipt, wire.Receipt) and receipt.already and receipt.final_name == b"big.img"
    assert receipt.sha256 == hashlib.sha256(CONTENT).hexdigest()
    assert again.sent < 4096
    # Another file under the name, with another tid, is still refused.
    other = Peer(conf, key)
    refused = other.file(tid=bytes(15) + b"\x01")
    other.bye()
    assert isinstance(refused, wire.Receipt) and refused.code == 550


def test_a_changed_file_restarts_from_zero(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path)
    assert Peer(conf, key).file(stop_at=40 * 2**20) is None
    changed = b"X" + CONTENT[1:]
    again = Peer(conf, key)
    receipt = again.file(changed)
    again.bye()
    assert isinstance(receipt, wire.Receipt) and receipt.ok
    assert (tmp_path / "box" / "big.img").read_bytes() == changed
    assert again.sent > SIZE


def test_another_key_of_the_box_neither_resumes_nor_sees_the_partial(tmp_path: Path) -> None:
    (k0, k1), conf = _site(tmp_path, keys=2)
    assert Peer(conf, k0).file(stop_at=40 * 2**20) is None
    other = Peer(conf, k1)
    other.send(other.c.file(b"big.img", SIZE, 0, tid=TID))
    assert isinstance(other.event(), wire.Go)  # what an unknown tid gets
    other.close()
    assert len(_parts(tmp_path)) == 1  # k0's partial is untouched
    again = Peer(conf, k0)
    assert again.file().ok  # type: ignore[attr-defined]
    again.bye()
    assert again.sent < SIZE - 32 * 2**20 + 2**20


def test_an_expired_partial_is_not_offered_and_is_removed(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path, 'resume_ttl = "1h"\n')
    assert Peer(conf, key).file(stop_at=40 * 2**20) is None
    old = time.time() - 7200
    for p in (tmp_path / "box" / PARTIALS_DIR).iterdir():
        os.utime(p, (old, old))
    with BoxStore(tmp_path / "box") as store:
        assert len(Partials(store, "", 3600).expired()) == 1
    again = Peer(conf, key)
    assert again.file().ok  # type: ignore[attr-defined]
    again.bye()
    assert again.sent > SIZE
    assert _parts(tmp_path) == []


def test_resume_ttl_0_keeps_nothing(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path, "resume_ttl = 0\n")
    assert Peer(conf, key).file(stop_at=40 * 2**20) is None
    assert _parts(tmp_path) == []
    assert [p.name for p in (tmp_path / "box").iterdir() if not p.name.startswith(".")] == []


def test_a_kept_partial_counts_against_the_quota(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path, f"quota = {SIZE + 2**20}\n")
    assert Peer(conf, key).file(stop_at=40 * 2**20) is None
    small = Peer(conf, key)
    refused = small.file(b"x" * (2 * 2**20), tid=wire.NO_TID, name=b"small")
    small.bye()
    assert isinstance(refused, wire.Receipt) and refused.code == 552


def test_a_partial_held_by_another_session_is_not_shared(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path)
    assert Peer(conf, key).file(stop_at=40 * 2**20) is None
    with BoxStore(tmp_path / "box") as store:
        held = Partials(store, key.fingerprint, 86400).open(TID, b"big.img", SIZE)
        assert held is not None and held.offset == 32 * 2**20
        racer = Peer(conf, key)
        racer.send(racer.c.file(b"big.img", SIZE, 0, tid=TID))
        assert isinstance(racer.event(), wire.Go)
        racer.close()
        held.keep((held.offset, held.prefix.digest()))
    again = Peer(conf, key)
    assert again.file().ok  # type: ignore[attr-defined]
    again.bye()
    assert (tmp_path / "box" / "big.img").read_bytes() == CONTENT


def test_a_small_file_rerun_is_answered_251_and_the_box_shows_no_hidden_entry(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path)
    p = Peer(conf, key)
    assert p.file(b"small", name=b"s.txt").ok  # type: ignore[attr-defined]
    p.bye()
    assert [q.name for q in (tmp_path / "box").iterdir()] == ["s.txt"]
    assert len(list((tmp_path / "state" / "rerun" / "vm1").iterdir())) == 1
    again = Peer(conf, key)
    receipt = again.file(b"small", name=b"s.txt")  # pipelined: 251 at the FILE, then ABORT
    again.bye()
    assert isinstance(receipt, wire.Receipt) and receipt.already and receipt.code == 251
    assert [q.name for q in (tmp_path / "box").iterdir()] == ["s.txt"]


def test_a_resume_needs_room_for_the_file_once_not_twice(tmp_path: Path) -> None:
    (key,), conf = _site(tmp_path, f"quota = {SIZE + 2**20}\n")
    assert Peer(conf, key).file(stop_at=40 * 2**20) is None
    again = Peer(conf, key)
    receipt = again.file()
    again.bye()
    assert isinstance(receipt, wire.Receipt) and receipt.ok and again.sent < SIZE
