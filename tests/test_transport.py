"""Moving bytes (rstash/transport.py): FdStream, deadlines, the one peer-address lookup."""

from __future__ import annotations

import os
import socket
import time

import pytest

from rstash.errors import PeerTimeout
from rstash.transport import (
    FdStream,
    PeerClosed,
    is_listening_socket,
    is_socket,
    normalise_address,
    peer_address,
)


def test_bytes_go_both_ways_and_are_counted() -> None:
    a, b = socket.socketpair()
    with a, b:
        stream = FdStream(a.fileno())
        stream.write(b"hello", time.monotonic() + 30)
        assert b.recv(5) == b"hello"
        b.sendall(b"back")
        assert stream.read(time.monotonic() + 30) == b"back"
        b.shutdown(socket.SHUT_WR)
        assert stream.read(time.monotonic() + 30) == b""
        assert (stream.bytes_in, stream.bytes_out) == (4, 5)


def test_a_silent_peer_past_the_deadline_is_a_timeout() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(PeerTimeout):
        FdStream(a.fileno()).read(time.monotonic() - 1)


def test_writing_to_a_closed_peer_is_peer_closed() -> None:
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(PeerClosed):
        FdStream(a.fileno()).write(b"x" * 65536, time.monotonic() + 30)


def test_peer_address_of_a_tcp_socket_ignores_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "203.0.113.9 5555 10.0.0.1 22")
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert is_listening_socket(server.fileno())
        with socket.create_connection(server.getsockname(), timeout=30) as client:
            conn, _ = server.accept()
            with conn:
                assert peer_address(conn.fileno()) == "127.0.0.1"
                assert is_socket(conn.fileno()) and not is_listening_socket(conn.fileno())
                assert peer_address(client.fileno()) == "127.0.0.1"


def test_peer_address_under_ssh_comes_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "::ffff:192.0.2.5 5555 10.0.0.1 22")
    r, w = os.pipe()
    try:
        assert not is_socket(r)
        assert peer_address(r) == "192.0.2.5"
        monkeypatch.delenv("SSH_CONNECTION")
        monkeypatch.delenv("SSH_CLIENT", raising=False)
        assert peer_address(r) is None
    finally:
        os.close(r)
        os.close(w)


def test_a_unix_socket_has_no_peer_address() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_address(a.fileno()) is None


def test_normalise_address() -> None:
    assert normalise_address("::ffff:10.1.2.3") == "10.1.2.3"
    assert normalise_address("fe80::1%eth0") == "fe80::1"
    assert normalise_address("2001:DB8::1") == "2001:db8::1"
