"""The session driver (rstash/client/session.py) without a server: per-file exit statuses,
and the streaming loop in pipe mode, where the frames can be read back from a pipe.
Interactive sessions against the real server are in tests/test_e2e_client.py."""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rstash import auth, wire
from rstash.client.options import Options
from rstash.client.session import Result, Session
from rstash.client.sources import Source, make_sources
from rstash.errors import Exit
from rstash.transport import FdStream

KEY_HEX = "00" * 31 + "01"
CHECKOUT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("status", "ignore", "want"), [
    ("stored", False, 0), ("would_store", False, 0), ("exists", False, 1), ("exists", True, 0),
    ("refused", True, 1), ("temporary", False, 75), ("error", False, 2),
])
def test_per_file_exit_status(status: str, ignore: bool, want: int) -> None:
    assert Result("x", status=status).exit_status(ignore) == want


@pytest.fixture
def key(tmp_path: Path) -> auth.Key:
    path = tmp_path / "vm1.key"
    path.write_text(f"rstash-key-v1 {KEY_HEX} # test key\n")
    path.chmod(0o600)
    return auth.load_key_file(str(path), client=True)


def frame_types(stream: bytes) -> list[int]:
    """The type of every frame in a stream, split by the 5-byte header of rstash(7)."""
    types = []
    pos = 0
    while pos < len(stream):
        ftype, length = struct.unpack(">BI", stream[pos:pos + 5])
        types.append(ftype)
        pos += 5 + length
    assert pos == len(stream)
    return types


def pipe_session(key: auth.Key, sources: list[Source], opts: Options) -> tuple[int, bytes]:
    """A pipe-mode session into an os.pipe(); its status and the bytes written."""
    r, w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        sess = Session(opts, wire.ClientConnection(key, "vm1", pipe=True), FdStream(devnull, w))
        sess.handshake()
        status = sess.send_all(sources)
        sess.finish()
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        return status, b"".join(chunks)
    finally:
        for fd in (r, w, devnull):
            if fd >= 0:
                os.close(fd)


F = wire.FrameType


def test_a_file_that_shrinks_is_aborted_with_the_interactive_line(
        tmp_path: Path, key: auth.Key, capsys: pytest.CaptureFixture[str]) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"0123456789")
    src = Source(str(short), "db.sql", 100, 0)  # announced 100 bytes, has 10
    status, stream = pipe_session(key, [src], Options(progress=False, timeout=5))
    assert status == Exit.LOCAL
    assert frame_types(stream) == [F.HELLO, F.FILE, F.DATA, F.ABORT, F.BYE]
    assert capsys.readouterr().err == (
        f"rstash-send: {short}: file shrank while sending (10 of 100 bytes): nothing stored\n")


def test_a_failing_producer_is_aborted_and_the_next_file_still_sent(
        tmp_path: Path, key: auth.Key, capsys: pytest.CaptureFixture[str]) -> None:
    opts = Options(from_command=True, name="dump.sql", files=("sh", "-c", "echo partial; exit 3"),
                   progress=False, timeout=5)
    good = tmp_path / "good"
    good.write_bytes(b"x" * 1000)  # the whole stream fits in the pipe: nobody reads it meanwhile
    sources = [*make_sources(opts), Source(str(good), "good", 1000, 0)]
    status, stream = pipe_session(key, sources, opts)
    assert status == Exit.LOCAL
    assert frame_types(stream) == [F.HELLO, F.FILE, F.DATA, F.ABORT,
                                   F.FILE, F.DATA, F.END, F.BYE]
    assert capsys.readouterr().err == (
        "rstash-send: sh -c echo partial; exit 3: command exited with status 3: nothing stored\n")


@pytest.mark.parametrize(("bar", "tqdm_loaded"), [("--no-progress", False), ("--progress", True)])
def test_tqdm_is_imported_only_for_a_bar_and_pydantic_never(
        tmp_path: Path, bar: str, tqdm_loaded: bool) -> None:
    keyfile = tmp_path / "k"
    keyfile.write_text(f"rstash-key-v1 {KEY_HEX}\n")
    keyfile.chmod(0o600)
    data = tmp_path / "a"
    data.write_bytes(b"hello\n")
    probe = ("import sys\nfrom rstash import send\n"
             f"rc = send.main(['-k', {str(keyfile)!r}, {bar!r}, '--stdout', 'vm1', {str(data)!r}])\n"
             "sys.stderr.write(repr(('tqdm' in sys.modules, 'pydantic' in sys.modules, int(rc))))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30, check=False,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                               "PYTHONPATH": str(CHECKOUT)})
    assert proc.stderr.decode().endswith(repr((tqdm_loaded, False, 0))), proc.stderr


# --- what a failing server looks like to the user --------------------------------------------


def _session_against(server_bytes: bytes, key: auth.Key, box: str = "vm1",
                     after_hello: bytes = b"") -> str:
    """Run a session against a peer that sends ``server_bytes``, then ``after_hello`` once
    it has read a HELLO, and hangs up; the error."""
    import socket
    import threading

    from rstash.client.connect import Connection
    from rstash.errors import RstashError

    ours, theirs = socket.socketpair()
    theirs.settimeout(10)

    def peer() -> None:
        theirs.sendall(server_bytes)
        if after_hello:
            theirs.recv(65536)
            theirs.sendall(after_hello)
        theirs.shutdown(socket.SHUT_WR)

    threading.Thread(target=peer, daemon=True).start()
    opts = Options.from_namespace(_namespace(), [])
    stream = FdStream(ours.fileno())
    sess = Session(opts, wire.ClientConnection(key, box), stream, Connection(stream, [ours.close]))
    try:
        with pytest.raises(RstashError) as info:
            sess.handshake()
            sess.finish()
    finally:
        ours.close()
        theirs.close()
    return info.value.message


def _namespace() -> argparse.Namespace:
    from rstash.send import _parser

    return _parser().parse_args(["rstash://127.0.0.1/vm1"])


def test_a_server_that_closes_before_its_greeting_is_told_apart(key: auth.Key) -> None:
    message = _session_against(b"", key)
    assert message.startswith("the server closed the connection before its greeting: "
                              "rstash-recv could not start there")
    assert "rstash-recv --check-config" in message and "inetd or system log" in message


def test_a_535_names_the_key_the_box_and_every_cause(key: auth.Key) -> None:
    greeting = wire.line(wire.greeting_line(os.urandom(32)))
    message = _session_against(greeting, key, "vm-1", b"535 authentication failed\r\n")
    assert message.startswith("authentication failed (535 authentication failed): key "
                              f"{key.fingerprint} was refused for box 'vm-1': ")
    assert key.fingerprint.startswith("SHA256:")
    for cause in ("wrong key for the box", "box name misspelt", "allow_from", "event=auth"):
        assert cause in message


def test_a_451_says_the_server_could_not_write_into_the_box(
        key: auth.Key, capsys: pytest.CaptureFixture[str]) -> None:
    greeting = wire.line(wire.greeting_line(os.urandom(32)))
    message = _session_against(greeting, key, "vm1", b"451 local error\r\n")
    assert message == ("server: 451 local error: the server could not write into the box; ask "
                       "its admin to run rstash-recv --check-config and read its log")
    # A file refused 451 in a receipt says the same.
    opts = Options.from_namespace(_namespace(), [])
    sess = Session(opts, wire.ClientConnection(key, "vm1"), FdStream(0, 1))
    sess._report(Result("a.tar", status="temporary", code=451, message="local error"))
    assert capsys.readouterr().err == (
        "refused a.tar: local error (451): the server could not write into the box; ask its "
        "admin to run rstash-recv --check-config and read its log\n")
