"""rstash-send ends its sending direction after BYE (rstash(7) "Closing the connection").

The peer here is a strict server built from the wire package over a loopback TCP
connection: after the BYE frame it answers 221 only once it has read the client's end
of stream. A client that half-closes gets its 221; one that waits for 221 before
closing would deadlock until the bounded waits below fail the test.
"""

from __future__ import annotations

import secrets
import socket
import threading
from pathlib import Path

from rstash import auth, wire
from rstash.client.connect import connect
from rstash.client.destinations import parse_dest
from rstash.client.options import Options
from rstash.client.session import run_interactive


def strict_server(listener: socket.socket, key: auth.Key, seen: list[str]) -> None:
    sock, _ = listener.accept()
    sock.settimeout(10)
    with sock:
        greeting = wire.greeting_line(secrets.token_bytes(32))
        sock.sendall(wire.line(greeting))
        conn = wire.ServerConnection()
        keys = None
        while True:
            ev = conn.next_event()
            if ev is wire.NEED_DATA:
                conn.receive_data(sock.recv(65536))
                continue
            if isinstance(ev, wire.Hello):
                keys = auth.session_keys(key, greeting.encode("ascii"), ev.signed)
                conn.authenticate(keys)
                sock.sendall(wire.auth_ok_line(keys))
            elif isinstance(ev, wire.Bye):
                assert keys is not None
                seen.append("bye")
                try:
                    eof = sock.recv(1) == b""
                except TimeoutError:
                    eof = False
                seen.append("eof" if eof else "no eof")
                sock.sendall(wire.bye_line(keys, ev.count, 0))
                return


def test_rstash_send_half_closes_after_bye_and_still_reads_221(tmp_path: Path) -> None:
    key = auth.Key(secrets.token_bytes(32), "test")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []
    t = threading.Thread(target=strict_server, args=(listener, key, seen), daemon=True)
    t.start()
    opts = Options(dest=f"rstash://127.0.0.1:{port}/vm1", test=True, timeout=20)
    assert opts.dest is not None
    dest = parse_dest(opts.dest)
    status = run_interactive(opts, key, "vm1", connect(dest, opts), [])
    t.join(20)
    listener.close()
    assert seen == ["bye", "eof"]
    assert status == 0
