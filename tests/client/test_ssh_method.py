"""rstash-send and method ssh (rstash(7) CONSTRUCTION 11; rstash-send(1) "Without a box key").

A peer that speaks method ssh sends no MAC. rstash-send believes such lines only
when it sent method 0 itself, which it does only without a key over an ssh://
channel it opened: the liar below, which answers every HELLO with mac-less
"stored" lines for content it knows, must never get a "stored" out of
rstash-send over rstash://, in pipe mode, or from a client holding a key.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from rstash import auth, send, wire
from rstash.client.connect import Connection
from rstash.client.options import Options
from rstash.client.session import run_interactive
from rstash.errors import RemoteProtocolError, UsageError
from rstash.transport import FdStream

CONTENT = b"hello, rstash\n"
SEND = [sys.executable, "-m", "rstash.send"]

#: The liar: offers method ssh, reads frames up to BYE, answers with canned lines
#: without MAC (what a method-ssh server sends), then reads to the end. It verifies
#: nothing; it answers after BYE only so that its lines never race the client's END.
LIAR = textwrap.dedent(f"""
    import hashlib, struct, sys

    def exactly(read, n):
        data = b""
        while len(data) < n:
            chunk = read(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def serve(read, write):
        write(b"220 rstash/1 methods=hmac-sha256,ssh challenge=" + b"A" * 42 + b"A\\r\\n")
        hello = None
        while True:
            head = exactly(read, 5)
            if head is None:
                return None
            body = exactly(read, struct.unpack(">I", head[1:5])[0])
            if body is None:
                return None
            hello = body if hello is None else hello
            if head[0] == 6:  # BYE
                break
        body = hello
        digest = hashlib.sha256({CONTENT!r}).hexdigest()
        write(b"235 ok\\r\\n250 stored {len(CONTENT)} sha256:" + digest.encode() + b" f.txt\\r\\n221 bye 1\\r\\n")
        while read(65536):
            pass
        return body[2]  # the HELLO's method byte

    if __name__ == "__main__":
        out = sys.stdout.buffer
        def write(data):
            out.write(data)
            out.flush()
        method = serve(sys.stdin.buffer.read1, write)
        with open(sys.argv[1], "w") as fh:
            fh.write(str(method))
""")


@pytest.fixture
def liar(tmp_path: Path) -> Path:
    script = tmp_path / "liar.py"
    script.write_text(LIAR)
    return script


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    f = tmp_path / "f.txt"
    f.write_bytes(CONTENT)
    return f


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "vm1.key"
    path.write_text(auth.format_key(os.urandom(32), "vm1"))
    path.chmod(0o600)
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RSTASH_KEY_FILE"}


def _send(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*SEND, *args], capture_output=True, env=_env(), input=input,
                          timeout=60, check=False)


def _over_ssh(liar: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[bytes], str]:
    seen = tmp_path / "method"
    rsh = f"{sys.executable} {liar} {seen}"
    # --rsh runs the liar in ssh's place: RSH ... -- HOST REMOTE; it ignores the rest.
    result = _send("--rsh", rsh, *args)
    return result, seen.read_text() if seen.exists() else ""


def test_without_a_key_ssh_uses_method_ssh_and_believes_its_lines(liar: Path, payload: Path,
                                                                    tmp_path: Path) -> None:
    result, method = _over_ssh(liar, tmp_path, "ssh://rstash@backup.example/vm1", str(payload))
    assert method == "0"
    assert result.returncode == 0, result.stderr
    assert b"stored f.txt" in result.stdout + result.stderr


def test_with_a_key_ssh_uses_the_key_and_refuses_lines_without_mac(liar: Path, payload: Path,
                                                                    key_file: Path, tmp_path: Path) -> None:
    result, method = _over_ssh(liar, tmp_path, "-k", str(key_file),
                               "ssh://rstash@backup.example/vm1", str(payload))
    assert method == "1"
    assert result.returncode != 0
    assert b"stored f.txt" not in result.stdout + result.stderr
    assert b"235 failed its MAC" in result.stderr


def _tcp_liar(liar: Path) -> tuple[socket.socket, list[int | None], threading.Thread]:
    sys.path.insert(0, str(liar.parent))
    try:
        import liar as liar_mod  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    seen: list[int | None] = []

    def run() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            seen.append(liar_mod.serve(conn.recv, conn.sendall))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return server, seen, thread


def test_over_rstash_a_key_holder_refuses_lines_without_mac(liar: Path, payload: Path,
                                                            key_file: Path) -> None:
    server, seen, thread = _tcp_liar(liar)
    with server:
        port = server.getsockname()[1]
        result = _send("-k", str(key_file), f"rstash://127.0.0.1:{port}/vm1", str(payload))
        thread.join(30)
    assert seen == [1]
    assert result.returncode != 0
    assert b"stored f.txt" not in result.stdout + result.stderr
    assert b"235 failed its MAC" in result.stderr


def test_over_rstash_no_key_means_no_connection(payload: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = _send(f"rstash://127.0.0.1:{port}/vm1", str(payload))
        # rstash-send has exited: a connection it made would be waiting in the backlog.
        pending, _, _ = select.select([server], [], [], 0)
    assert pending == []
    assert result.returncode != 0
    assert b"no key" in result.stderr


def test_a_keyless_session_needs_an_ssh_channel_of_its_own(payload: Path) -> None:
    # The second line of defence, below the command line: a stream that is not our own
    # ssh (a TCP socket, a --proxy-command) never carries method ssh.
    a, b = socket.socketpair()
    with a, b:
        conn = Connection(FdStream(a.fileno()), [])
        opts = Options.from_namespace(send._parser().parse_args(["rstash://h/vm1", str(payload)]), [], None)
        with pytest.raises(UsageError, match="only an ssh:// destination"):
            run_interactive(opts, None, "vm1", conn, [])
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)  # not even a byte was sent


def test_pipe_mode_without_a_key_is_refused(payload: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream"
    with out.open("wb") as fh:
        result = subprocess.run([*SEND, "--stdout", "vm1", str(payload)], stdout=fh,
                                stderr=subprocess.PIPE, env=_env(), timeout=60, check=False)
    assert result.returncode != 0 and b"no key" in result.stderr
    assert out.read_bytes() == b""


def test_pipe_mode_with_a_key_sends_method_1(payload: Path, key_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream"
    with out.open("wb") as fh:
        result = subprocess.run([*SEND, "-k", str(key_file), "--stdout", "vm1", str(payload)],
                                stdout=fh, stderr=subprocess.PIPE, env=_env(), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[0] == wire.FrameType.HELLO and data[5 + 2] == wire.METHOD_HMAC_SHA256


def test_a_pipe_client_with_a_key_refuses_a_235_without_mac() -> None:
    client = wire.ClientConnection(auth.Key(os.urandom(32)), "vm1", pipe=True)
    client.hello(os.urandom(32), 1767225600)
    client.receive_data(b"235 ok\r\n")
    with pytest.raises(RemoteProtocolError, match="235 failed its MAC"):
        client.next_event()


def test_a_keyless_client_checks_size_and_digest_of_mac_less_receipts() -> None:
    greeting = "220 rstash/1 methods=hmac-sha256,ssh challenge=" + auth.b64url(bytes(32))
    client = wire.ClientConnection(None, "vm1")
    client.receive_data(greeting.encode() + b"\r\n")
    client.next_event()
    client.hello(os.urandom(32), 1767225600)
    client.receive_data(b"235 ok\r\n")
    assert isinstance(client.next_event(), wire.AuthOk)
    client.file(b"f.txt", len(CONTENT), 0)
    client.data(CONTENT)
    client.end()
    wrong = hashlib.sha256(b"something else").hexdigest()
    client.receive_data(f"250 stored {len(CONTENT)} sha256:{wrong} f.txt\r\n".encode())
    with pytest.raises(RemoteProtocolError, match="another size or digest"):
        client.next_event()


def test_a_profile_without_key_names_an_ssh_only_box(liar: Path, payload: Path, tmp_path: Path) -> None:
    seen = tmp_path / "method"
    conf = tmp_path / "send.toml"
    conf.write_text(f'[dest.vm1]\nurl = "ssh://rstash@backup.example/vm1"\n'
                    f'rsh = "{sys.executable} {liar} {seen}"\n')
    conf.chmod(0o600)
    result = _send("-F", str(conf), "vm1", str(payload))
    assert result.returncode == 0, result.stderr
    assert seen.read_text() == "0"
    assert b"stored f.txt" in result.stdout + result.stderr
