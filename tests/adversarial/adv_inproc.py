"""The server role, session and store in one process, for thousands of hostile streams.

:class:`Box` is a real box directory, state_dir and key under ``tmp_path``, loaded through the
real configuration loader; :meth:`Box.run` feeds one client stream to a real ``ServerSession``
(stdin a regular file holding the stream, stdout a file) and returns what it said. With
``challenge`` fixed (:func:`fixed_challenge`), a captured interactive stream authenticates again,
so mutations reach the frames after the proof. This module must never open a socket.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from adversarial.adv_wire import wire
from rstash import auth, session
from rstash.config import Config, load_config
from rstash.log import Logger
from rstash.session import ServerSession
from rstash.sessionlog import SessionResult
from rstash.transport import FdStream

TEMP_PREFIX = ".rstash-tmp-"


@dataclass
class Box:
    root: Path
    name: str
    path: Path
    key: bytes
    cfg: Config
    log: Logger

    def run(self, stream: bytes, *, peer: str = "192.0.2.7") -> tuple[bytes, SessionResult]:
        """One session fed ``stream`` then end of stream; (everything it wrote, its result)."""
        with tempfile.TemporaryFile(dir=self.root) as fin, \
                tempfile.TemporaryFile(dir=self.root) as fout:
            fin.write(stream)
            fin.seek(0)
            result = ServerSession(self.cfg, FdStream(fin.fileno(), fout.fileno()), self.log,
                                   peer=peer).run()
            fout.seek(0)
            return fout.read(), result

    def entries(self) -> dict[str, tuple[int, int]]:
        out = {}
        for n in os.listdir(self.path):
            st = os.lstat(self.path / n)
            out[n] = (st.st_ino, st.st_mtime_ns)
        return out

    def temps(self) -> list[str]:
        return [n for n in os.listdir(self.path) if n.startswith(TEMP_PREFIX)]


def make_box(root: Path, name: str = "fuzz", **settings: Any) -> Box:
    path = root / "boxes" / name
    path.mkdir(parents=True, mode=0o750)
    state = root / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    secret = secrets.token_bytes(32)
    key = root / f"{name}.key"
    key.write_text(auth.format_key(secret, name))
    key.chmod(0o600)
    lines = [f'state_dir = "{state}"', 'log = "stderr"', "idle_timeout = 2",
             "preauth_timeout = 2", "", f'[box."{name}"]', f'path = "{path}"',
             f'keys = ["{key}"]']
    for k, v in settings.items():
        lines.append(f"{k} = {'true' if v is True else 'false' if v is False else repr(v)}"
                     .replace("'", '"'))
    conf = root / "rstash-recv.toml"
    conf.write_text("\n".join(lines) + "\n")
    return Box(root, name, path, secret, load_config(conf), Logger("stderr", "critical"))


class _FixedSecrets:
    """Stands in for the ``secrets`` module inside rstash.session: a known challenge."""

    def __init__(self, challenge: bytes) -> None:
        self.challenge = challenge

    def token_bytes(self, n: int) -> bytes:
        assert n == len(self.challenge)
        return self.challenge


@contextlib.contextmanager
def fixed_challenge(challenge: bytes) -> Iterator[str]:
    """Every session greets with ``challenge``; yields the greeting line without its CR LF."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "secrets", _FixedSecrets(challenge))
        yield wire.greeting_line(challenge, resume=True)


def reply_lines(out: bytes) -> list[bytes]:
    return out.split(b"\r\n")[:-1] if out.endswith(b"\r\n") else out.split(b"\r\n")
