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
            raise KeyFileError.at(name, "key file is a symlink: refused") from None
        raise KeyFileError.at(name, f"cannot read key: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError.at(name, "key file is not a regular file: refused")
        mode = stat.S_IMODE(st.st_mode)
        # One message per side, each with its fix: the client's key is its owner's
        # alone (like ssh's), the server's is shared with the service user's group.
        if client and mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH):
            raise KeyFileError.at(name, f"permissions {mode:04o} are too open: a client key "
                                        f"must be readable by its owner only (chmod 600 {name})")
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise KeyFileError.at(name, f"permissions {mode:04o} are too open: a key must not "
                                        f"be readable or writable by others (chmod 640 {name})")
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


#: Per box, the key files refused when the keys were loaded.
UnusableKeys = dict[str, list[KeyFileError]]
#: The log's reason for a key file the server refuses to use (rstash-recv(8) LOGGING):
#: the admin's to fix, never a peer's failure (the fail2ban filter ignores it).
KEY_UNUSABLE = "key file unusable"


def load_box_keys(cfg: Config, log: Logger, unusable: UnusableKeys | None = None) -> dict[str, list[Key]]:
    """Every configured key of every box; a key that cannot be read is logged, left out
    and, when ``unusable`` is given, recorded there under its box.

    Read before the greeting, so that judging a HELLO is the same in-memory work
    whatever box it names (rstash(7) RULES, rule 1).
    """
    loaded: dict[str, list[Key]] = {}
    if unusable is None:
        unusable = {}
    for name, box in cfg.boxes.items():
        keys = loaded[name] = []
        for path in box.keys:
            try:
                keys.append(load_key_file(path))
            except KeyFileError as e:
                unusable.setdefault(name, []).append(e)
                log.error(event="key", box=name, outcome="error", reason=KEY_UNUSABLE,
                          path=str(path), detail=e.why or e.message)
    return loaded


def why_auth_failed(reason: str | None, box: bytes, unusable: UnusableKeys
                    ) -> dict[str, str | None]:
    """The log's ``reason`` (and ``path``, ``detail``) for a failed HELLO naming ``box``.

    A HELLO whose key id matches no key of a box with a refused key file likely
    holds the right key: the admin's to fix, not a peer's failure, so it is
    logged as :data:`KEY_UNUSABLE` (which the fail2ban filter does not count).
    """
    broken = unusable.get(box.decode("utf-8", "replace"))
    if broken and reason == "unknown key id":
        return {"reason": KEY_UNUSABLE, "path": broken[0].path, "detail": broken[0].why}
    return {"reason": reason}
