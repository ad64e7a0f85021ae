"""Key files on disk: reading them with their permission checks, writing new ones.

This module owns the file side of keys (rstash-recv.toml(5) KEYS): refusing a
symlink, a non-regular file or one readable by others, ``--gen-key`` writing a
new key without ever overwriting, and loading every configured key of a
server before a greeting. The key format and all cryptography are
:mod:`rstash.auth`'s.

It must never write a key over an existing file, follow a symlink to a key,
or put a key's secret in a message.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from rstash.auth import Key, format_key, generate_key, parse_key_text
from rstash.errors import KeyFileError

if TYPE_CHECKING:
    from rstash.config import Config
    from rstash.log import Logger


def load_key_file(path: str | os.PathLike[str], *, client: bool = False) -> Key:
    """Read a key file with the checks of rstash-recv.toml(5) KEYS.

    Refused: a symlink, anything not a regular file, a world-readable file, and
    (``client=True``, like ssh with a private key) a group-readable one.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW: the last component is a symlink
            raise KeyFileError(f"{name}: key file is a symlink: refused") from None
        raise KeyFileError(f"{name}: cannot read key: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{name}: key file is not a regular file: refused")
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise KeyFileError(
                f"{name}: permissions {stat.S_IMODE(st.st_mode):04o} are too open: "
                "a key must not be readable or writable by others")
        if client and st.st_mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IWOTH):
            raise KeyFileError(
                f"{name}: permissions {stat.S_IMODE(st.st_mode):04o} are too open: "
                "a client key must be 0600 (chmod 600 it)")
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{name}: not an rstash key (not UTF-8)") from None
    return parse_key_text(text, name)


def write_key_file(target: str, comment: str = "") -> tuple[bytes, str]:
    """A new key: its file text and its one-line description (fingerprint and comment).

    ``target`` "-" writes nothing (the caller prints the text); any other path is
    created 0600 and never overwritten. Raises :class:`KeyFileError`.
    """
    if "\n" in comment or "\r" in comment:
        raise KeyFileError("--comment must be one line")
    secret = generate_key()
    text = format_key(secret, comment).encode("ascii")
    desc = Key(secret, comment).describe()
    if target == "-":
        return text, desc
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{target}: already exists: not overwritten") from None
    except OSError as e:
        raise KeyFileError(f"{target}: {e.strerror}") from None
    try:
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    return text, desc


def load_box_keys(cfg: Config, log: Logger) -> dict[str, list[Key]]:
    """Every configured key of every box; a key that cannot be read is logged and left out.

    Read before the greeting, so that judging a HELLO is the same in-memory work
    whatever box it names (rstash(7) RULES, rule 1).
    """
    loaded: dict[str, list[Key]] = {}
    for name, box in cfg.boxes.items():
        keys = loaded[name] = []
        for path in box.keys:
            try:
                keys.append(load_key_file(path))
            except KeyFileError as e:
                log.error(event="key", box=name, outcome="error", detail=e.message)
    return loaded
