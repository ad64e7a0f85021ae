"""Listening sockets and sd_notify (rstash/listen.py), on loopback only."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from rstash.listen import ListenError, adopt_fd, bind_listen, parse_listen, sd_notify, sock_name


@pytest.mark.parametrize(("spec", "parsed"), [
    ("7370", (None, "7370")), ("127.0.0.1:7370", ("127.0.0.1", "7370")),
    ("[::1]:0", ("::1", "0")), ("host.example:22", ("host.example", "22")),
])
def test_listen_addresses(spec: str, parsed: tuple[str | None, str]) -> None:
    assert parse_listen(spec) == parsed


@pytest.mark.parametrize("spec", ["::1:7370", "[::1]7370", ":7370", "[]:1", "x:65536", "x:port"])
def test_bad_listen_addresses_are_one_line_errors(spec: str) -> None:
    with pytest.raises(ListenError) as ei:
        parse_listen(spec)
    assert ei.value.message.startswith(f"--listen {spec}: ") and "\n" not in ei.value.message


def test_bound_sockets_are_nonblocking_and_close_on_exec() -> None:
    socks = bind_listen("127.0.0.1:0")
    try:
        assert len(socks) == 1
        s = socks[0]
        assert not s.getblocking() and not s.get_inheritable()
        assert sock_name(s).startswith("127.0.0.1:")
    finally:
        for s in socks:
            s.close()


def test_only_a_listening_socket_is_adopted() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        fd = os.dup(server.fileno())
        adopted = adopt_fd(fd)
        with adopted:
            assert adopted.fileno() == fd and not adopted.get_inheritable()
    a, b = socket.socketpair()
    with a, b, pytest.raises(ListenError, match="not a listening socket"):
        adopt_fd(a.fileno())


def test_sd_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        receiver.settimeout(30)
        assert receiver.recv(100) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", "relative")
    assert not sd_notify("READY=1")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")
