"""Transfer ids and the client state that makes them (rstash-send(1), RESUME).

A transfer id names one sending of one regular file, so that running the same
command again continues an interrupted transfer or learns it was stored: it is
an HMAC of the box, the key's fingerprint, the remote name, the size and the
file's identity (device, inode, modification time in nanoseconds) under a
random secret kept in the client's state file. The same file sent again gets
the same id; a file replaced or modified in place (new inode or mtime) gets
another, and nobody without the state file can predict one.

This module also hashes a prefix of a file, for the check a resume needs. It
must never make an id for a stream (standard input, a command), and a state
file it cannot read or write only turns resume off: it never stops a send.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from rstash.smallfile import sha256_prefix

STATE_NAME = "tids.json"
_READ = 1 << 20


def state_dir(env: dict[str, str] | None = None) -> Path:
    """``/var/lib/rstash-send`` for root, else ``$XDG_STATE_HOME/rstash`` (``~/.local/state``)."""
    env = dict(os.environ) if env is None else env
    if os.geteuid() == 0:
        return Path("/var/lib/rstash-send")
    base = env.get("XDG_STATE_HOME") or ""
    if not base.startswith("/"):
        base = str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "rstash"


def _secret(directory: Path) -> bytes | None:
    """The state file's secret, made on first use; None when it cannot be kept."""
    path = directory / STATE_NAME
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(4096))
        secret = bytes.fromhex(data["secret"])
        if len(secret) == 32:
            return secret
    except (OSError, ValueError, KeyError, TypeError):
        pass
    secret = secrets.token_bytes(32)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{STATE_NAME}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"secret": secret.hex()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # Two sends starting at once: the first link wins, and both read it back.
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        with open(path, "rb") as fh:
            return bytes.fromhex(json.loads(fh.read(4096))["secret"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def transfer_id(path: str, *, box: str, fingerprint: str, name: str,
                directory: Path | None = None) -> bytes | None:
    """The tid for sending regular file ``path`` as ``name``; None when none can be made."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    secret = _secret(directory or state_dir())
    if secret is None:
        return None
    msg: list[Any] = [box, fingerprint, name, st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns]
    tid = hmac.new(secret, json.dumps(msg).encode("utf-8"), hashlib.sha256).digest()[:16]
    return tid if any(tid) else tid[:15] + b"\x01"  # 16 zero bytes mean "none"


def hash_prefix(fd: int, n: int) -> Any:
    """SHA-256 state of the first ``n`` bytes of ``fd``, or None when it is shorter."""
    return sha256_prefix(fd, n, _READ)


def file_sha256(path: str) -> str | None:
    """The hex SHA-256 of the whole file at ``path`` (the check of a 251 line)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        h = hash_prefix(fd, size)
        return None if h is None or os.pread(fd, 1, size) else h.hexdigest()
    finally:
        os.close(fd)

