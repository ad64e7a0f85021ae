"""Keys, fingerprints and the rstash/1 construction (rstash(7) CONSTRUCTION).

Pure functions over bytes: the key format, fingerprints, key derivation,
tags and MACs. No sockets, no files (reading and writing key files is
rstash.keys'), no clock, no randomness except in ``generate_key``. Every
comparison of secret-derived values goes through ``hmac.compare_digest``.
This module must never log or print a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property

from .errors import KeyFileError

KEY_LEN = 32
KEY_ID_LEN = 8
NONCE_LEN = 32
MAC_LEN = 32
#: Lines carry the first 16 bytes of a MAC: 128 bits is beyond forgery for a
#: live session and keeps reply lines short.
LINE_MAC_LEN = 16
UNKNOWN_SIZE = 2**64 - 1
ZERO_DIGEST = bytes(32)

_KEY_LINE = re.compile(r"rstash-key-v1 ([0-9a-f]{64})(?: # ?(.*))?\Z")


def b64url(data: bytes) -> str:
    """Unpadded base64url, as every rstash line field is written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url`; raises ValueError on anything else.

    Only the canonical text is accepted: a last character whose unused low bits
    are set decodes to the same bytes, so accepting it would give one value two
    spellings (rstash(7) Notation).
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise ValueError("not canonical base64url")
    return data


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def s(data: bytes) -> bytes:
    """s(x) = u16 length ‖ bytes."""
    if len(data) > 0xFFFF:
        raise ValueError("field longer than 65535 bytes")
    return u16(len(data)) + data


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def fingerprint(key: bytes) -> str:
    """``SHA256:`` + unpadded base64 of SHA-256(b"rstash/1 fingerprint\\0" ‖ K)."""
    digest = hashlib.sha256(b"rstash/1 fingerprint\0" + key).digest()
    return "SHA256:" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Key:
    """A box key: 32 secret bytes, the comment of its file, and derived names."""

    secret: bytes = field(repr=False)
    comment: str = ""
    path: str = ""

    @cached_property
    def prk(self) -> bytes:
        return _hmac(b"rstash/1", self.secret)

    @cached_property
    def key_id(self) -> bytes:
        return expand(self.prk, b"key-id\0", KEY_ID_LEN)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.secret)

    def describe(self) -> str:
        """``256 SHA256:… comment (rstash-hmac)``, like ``ssh-keygen -l``."""
        comment = self.comment or "no comment"
        return f"256 {self.fingerprint} {comment} (rstash-hmac)"

    def log_name(self) -> str:
        """How the log and the status database name this key."""
        return f"{self.fingerprint} {self.comment}".rstrip()


def expand(prk: bytes, info: bytes, n: int = 32) -> bytes:
    """E(info, n) = HMAC(PRK, info ‖ 0x01)[:n]: HKDF-Expand, one block."""
    return _hmac(prk, info + b"\x01")[:n]


def parse_key_text(text: str, origin: str = "key") -> Key:
    """The key of a key file's text: one ``rstash-key-v1 <hex>`` line, ``#`` lines ignored."""
    found: list[Key] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = _KEY_LINE.match(line.rstrip("\r"))
        if m is None:
            raise KeyFileError(f"{origin}: not an rstash key (expected 'rstash-key-v1 <64 hex>')")
        found.append(Key(bytes.fromhex(m.group(1)), (m.group(2) or "").strip(), origin))
    if len(found) != 1:
        raise KeyFileError(f"{origin}: expected exactly one key line, found {len(found)}")
    return found[0]


def format_key(secret: bytes, comment: str = "") -> str:
    line = f"rstash-key-v1 {secret.hex()}"
    if comment:
        line += f" # {comment}"
    return line + "\n"


def load_key_file(path: str | os.PathLike[str], *, client: bool = False) -> Key:
    """Read a key file; the reading and its checks live in :mod:`rstash.keys`."""
    from rstash.keys import load_key_file as load

    return load(path, client=client)


def generate_key() -> bytes:
    import secrets

    return secrets.token_bytes(KEY_LEN)


# --- the session construction -------------------------------------------------


@dataclass(frozen=True)
class SessionKeys:
    """Everything a verified HELLO derives: the transcript hash and both keys."""

    th: bytes
    proof: bytes = field(repr=False)
    k_c2s: bytes = field(repr=False)
    k_s2c: bytes = field(repr=False)
    #: False for method ssh: its lines carry no MAC field (rstash(7) CONSTRUCTION 11)
    macs: bool = True


def transcript_hash(greeting: bytes, hello_without_proof: bytes) -> bytes:
    """th = SHA-256(b"rstash/1 hello\\0" ‖ s(G) ‖ HELLO-without-proof)."""
    return hashlib.sha256(b"rstash/1 hello\0" + s(greeting) + hello_without_proof).digest()


def session_keys(key: Key | bytes, greeting: bytes, hello_without_proof: bytes) -> SessionKeys:
    prk = key.prk if isinstance(key, Key) else _hmac(b"rstash/1", key)
    th = transcript_hash(greeting, hello_without_proof)
    return SessionKeys(
        th=th,
        proof=expand(prk, b"c2s proof\0" + th),
        k_c2s=expand(prk, b"c2s tags\0" + th),
        k_s2c=expand(prk, b"s2c receipts\0" + th),
    )


def ssh_session_keys(greeting: bytes, hello_without_proof: bytes) -> SessionKeys:
    """Method ssh: the keys of an all-zero K, so that one code path makes and checks every
    tag; they authenticate nothing (the SSH server did), hence no MACs in lines."""
    keys = session_keys(bytes(KEY_LEN), greeting, hello_without_proof)
    return SessionKeys(keys.th, bytes(MAC_LEN), keys.k_c2s, keys.k_s2c, macs=False)


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def file_tag(k_c2s: bytes, hdr: bytes) -> bytes:
    return _hmac(k_c2s, b"FILE\0" + hdr)


def end_tag(k_c2s: bytes, hdr: bytes, n: int, digest: bytes) -> bytes:
    return _hmac(k_c2s, b"END\0" + hashlib.sha256(hdr).digest() + u64(n) + digest)


def abort_tag(k_c2s: bytes, index: int) -> bytes:
    return _hmac(k_c2s, b"ABORT\0" + u64(index))


def bye_tag(k_c2s: bytes, count: int) -> bytes:
    return _hmac(k_c2s, b"BYE\0" + u64(count))


def auth_mac(k_s2c: bytes) -> str:
    """The ``mac=`` of ``235 ok``: the server shows it holds the key too."""
    return b64url(_hmac(k_s2c, b"AUTH\0")[:LINE_MAC_LEN])


def receipt_mac(k_s2c: bytes, index: int, code: int, final_name: bytes,
                n: int = 0, digest: bytes = ZERO_DIGEST) -> str:
    msg = b"RCPT\0" + u64(index) + u16(code) + s(final_name) + u64(n) + digest
    return b64url(_hmac(k_s2c, msg)[:LINE_MAC_LEN])


def resume_mac(k_s2c: bytes, index: int, offset: int, prefix: bytes, name: bytes) -> str:
    """The ``mac=`` of ``350 resume``: the server's offer of the ``offset`` bytes it holds."""
    msg = b"RESUME\0" + u64(index) + u64(offset) + prefix + s(name)
    return b64url(_hmac(k_s2c, msg)[:LINE_MAC_LEN])


def already_mac(k_s2c: bytes, index: int, final_name: bytes, n: int, digest: bytes) -> str:
    """The ``mac=`` of ``251 already stored``, apart from every receipt by its label."""
    msg = b"ALREADY\0" + u64(index) + s(final_name) + u64(n) + digest
    return b64url(_hmac(k_s2c, msg)[:LINE_MAC_LEN])


def done_mac(k_s2c: bytes, count: int, stored: int) -> str:
    return b64url(_hmac(k_s2c, b"DONE\0" + u64(count) + u64(stored))[:LINE_MAC_LEN])


def verify_line_mac(expected: str, got: str) -> bool:
    return hmac.compare_digest(expected.encode("ascii"), got.encode("ascii", "replace"))
