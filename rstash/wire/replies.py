"""Server → client reply lines of rstash/1: making them and taking them apart (rstash(7)).

A reply line is ``NNN text`` in printable ASCII, at most 1024 bytes with its
CRLF. Names in lines are percent-encoded. This module makes every line the
server sends and parses the parts the client reads (greeting, receipts,
``221``). It must never verify a MAC or keep state: the client role does that
with its session keys and the FILEs it sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import auth
from ..errors import LocalProtocolError, RemoteProtocolError, Reply
from .frames import GREETING_RESUME

#: The longest reply line, CRLF included.
MAX_LINE = 1024
#: What a reply line may hold: printable ASCII.
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
#: The greeting's fixed prefix; the challenge follows it.
GREETING_PREFIX = "220 rstash/1 methods=hmac-sha256 challenge="
#: The same for a server that offers method ssh too (rstash(7) CONSTRUCTION 11).
SSH_GREETING_PREFIX = "220 rstash/1 methods=hmac-sha256,ssh challenge="
#: How many bytes of a refused name are echoed (the MAC covers the whole name).
ECHO_LIMIT = 255


# --- names in reply lines ------------------------------------------------------

_PCT_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%")}
_PCT_PAIR = re.compile(r"[0-9A-F]{2}")


def pct_encode(raw: bytes) -> str:
    """Percent-encode a name for a reply line (uppercase hex, rstash(7) REPLY LINES)."""
    return "".join(chr(b) if b in _PCT_SAFE else f"%{b:02X}" for b in raw)


def pct_decode(text: str) -> bytes:
    """The inverse of :func:`pct_encode`; ValueError for anything it never writes."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            pair = text[i + 1:i + 3]
            if not _PCT_PAIR.fullmatch(pair):
                raise ValueError("bad percent escape")
            out.append(int(pair, 16))
            i += 3
        else:
            if ord(c) not in _PCT_SAFE:
                raise ValueError("unencoded byte in name")
            out.append(ord(c))
            i += 1
    return bytes(out)


# --- making lines (the server) ---------------------------------------------------

#: The text of each per-file refusal code, as in rstash(7) REPLY LINES.
RECEIPT_TEXT: dict[int, str] = {
    Reply.EXISTS: "exists",
    Reply.NAME_NOT_ALLOWED: "name not allowed",
    Reply.INSUFFICIENT_STORAGE: "insufficient storage",
    Reply.LOCAL_ERROR: "local error",
    Reply.ABORTED: "aborted",
}

#: Session-level lines without a MAC.
SESSION_LINES: dict[int, str] = {
    Reply.BUSY: "421 busy",
    Reply.AUTH_FAILED: "535 authentication failed",
    Reply.VERSION_NOT_SUPPORTED: "505 version not supported",
    Reply.METHOD_NOT_SUPPORTED: "504 method not supported",
    Reply.PIPE_MODE_OFF: "530 pipe mode off",
    Reply.REPLAYED: "532 replayed session",
    Reply.LOCAL_ERROR: "451 local error",
    Reply.PROTOCOL_ERROR: "500 protocol error",
}


def line(text: str) -> bytes:
    """``text`` as a line on the wire; too long or unprintable is our own mistake."""
    data = text.encode("ascii") + b"\r\n"
    if len(data) > MAX_LINE or not _PRINTABLE.fullmatch(data, 0, len(data) - 2):
        raise LocalProtocolError("reply line too long or not printable")
    return data


def greeting_line(challenge: bytes, *, resume: bool = False, ssh: bool = False) -> str:
    """The greeting's text (the transcript hash binds it without its CRLF)."""
    prefix = SSH_GREETING_PREFIX if ssh else GREETING_PREFIX
    return prefix + auth.b64url(challenge) + (" " + GREETING_RESUME if resume else "")


def _mac(keys: auth.SessionKeys, mac: str) -> str:
    """`` mac=…``, or nothing under method ssh, whose channel the SSH server protects."""
    return f" mac={mac}" if keys.macs else ""


def auth_ok_line(keys: auth.SessionKeys) -> bytes:
    return line(f"{Reply.AUTH_OK} ok{_mac(keys, auth.auth_mac(keys.k_s2c))}")


def receipt_line(keys: auth.SessionKeys, index: int, code: int, name: bytes, *,
                 reason: str | None = None, final_name: bytes | None = None,
                 n: int = 0, sha256: bytes = auth.ZERO_DIGEST, dry_run: bool = False) -> bytes:
    """The one reply line for FILE ``index``. Refusals MAC n = 0, D = zeros, the requested name."""
    if code == Reply.STORED:
        if dry_run:
            mac = auth.receipt_mac(keys.k_s2c, index, code, name)
            return line(f"250 would store {pct_encode(name)}{_mac(keys, mac)}")
        final = name if final_name is None else final_name
        mac = auth.receipt_mac(keys.k_s2c, index, code, final, n, sha256)
        return line(f"250 stored {n} sha256:{sha256.hex()} {pct_encode(final)}{_mac(keys, mac)}")
    text = reason or RECEIPT_TEXT[code]
    mac = auth.receipt_mac(keys.k_s2c, index, code, name)
    return line(f"{code} {text} {pct_encode(name[:ECHO_LIMIT])}{_mac(keys, mac)}")


def resume_line(keys: auth.SessionKeys, index: int, offset: int, prefix: bytes, name: bytes) -> bytes:
    """The offer of a kept prefix to a waited FILE (rstash(7) RESUME AND RE-RUNS)."""
    mac = auth.resume_mac(keys.k_s2c, index, offset, prefix, name)
    return line(f"{Reply.RESUME} resume {offset} sha256:{prefix.hex()} {pct_encode(name)}{_mac(keys, mac)}")


#: A waited FILE is sent from its first byte. No MAC: forging it only costs the transfer.
GO_LINE = "354 go"


def already_line(keys: auth.SessionKeys, index: int, final_name: bytes, n: int, sha256: bytes) -> bytes:
    mac = auth.already_mac(keys.k_s2c, index, final_name, n, sha256)
    return line(f"{Reply.ALREADY_STORED} already stored {n} sha256:{sha256.hex()} "
                f"{pct_encode(final_name)}{_mac(keys, mac)}")


def integrity_line(name: bytes) -> bytes:
    return line(f"{Reply.INTEGRITY} integrity check failed {pct_encode(name[:ECHO_LIMIT])}".rstrip())


def bye_line(keys: auth.SessionKeys, count: int, stored: int) -> bytes:
    return line(f"{Reply.BYE} bye {stored}{_mac(keys, auth.done_mac(keys.k_s2c, count, stored))}")


def session_line(code: int) -> bytes:
    return line(SESSION_LINES[code])


def skew_line(skew: int) -> bytes:
    return line(f"{Reply.CLOCK_SKEW} clock skew {skew:+d} s")


# --- taking lines apart (the client) ------------------------------------------------

_LINE_RE = re.compile(r"([2-5][0-9]{2}) (.*)\Z")
_RECEIPT_RE = re.compile(r"(?P<text>.*?) ?(?P<name>[^ ]*) mac=(?P<mac>[A-Za-z0-9_-]{22})\Z")
#: A receipt of method ssh: no MAC field, NAME after the last space (may be empty).
_PLAIN_RECEIPT_RE = re.compile(r"(?P<text>[^ ]+(?: [^ ]+)*?) (?P<name>[^ ]*)\Z")
#: Per-file codes; a method-ssh line with another code, or with a session line's
#: exact text (``451 local error``), ends the session.
_PER_FILE_CODES = frozenset({Reply.STORED, Reply.ALREADY_STORED, Reply.RESUME, *RECEIPT_TEXT,
                             Reply.TOO_LARGE})
_STORED_RE = re.compile(r"stored (?P<n>[0-9]{1,20}) sha256:(?P<hex>[0-9a-f]{64}) (?P<name>[^ ]+)\Z")
_ALREADY_RE = re.compile(r"already " + _STORED_RE.pattern)
_RESUME_RE = re.compile(r"resume (?P<n>[0-9]{1,20}) sha256:(?P<hex>[0-9a-f]{64}) (?P<name>[^ ]*)\Z")


def quote(raw: bytes) -> str:
    """Up to 120 bytes of what the peer sent, safe to print in one line."""
    return repr(raw[:120].decode("ascii", "backslashreplace"))


def take_line(buf: bytearray) -> bytes | None:
    """Cut the first whole line (without CR LF or LF) off ``buf``; None if none is whole yet.

    A line is refused the moment it is longer than :data:`MAX_LINE`, whole or not.
    """
    nl = buf.find(b"\n")
    if (nl < 0 and len(buf) > MAX_LINE) or nl + 1 > MAX_LINE:
        raise RemoteProtocolError("reply line longer than 1024 bytes")
    if nl < 0:
        return None
    raw = bytes(buf[:nl])
    del buf[:nl + 1]
    return raw.removesuffix(b"\r")


@dataclass(frozen=True)
class ReplyLine:
    code: int
    #: the text after the code and its space
    rest: str
    text: str


def parse_line(raw: bytes) -> ReplyLine:
    if not _PRINTABLE.fullmatch(raw):
        raise RemoteProtocolError(f"not an rstash reply: {quote(raw)}")
    text = raw.decode("ascii")
    m = _LINE_RE.match(text)
    if m is None:
        raise RemoteProtocolError(f"not an rstash reply: {quote(raw)}")
    return ReplyLine(int(m.group(1)), m.group(2), text)


def greeting_methods(text: str) -> list[str]:
    """The methods a greeting offers (the last ``methods=`` field counts)."""
    fields = dict(w.partition("=")[::2] for w in text.split(" ")[2:])
    return fields.get("methods", "").split(",")


def parse_greeting(text: str) -> bytes:
    """The challenge of a ``220 rstash/1 …`` greeting that offers hmac-sha256."""
    words = text.split(" ")
    if len(words) < 3 or words[1] != "rstash/1":
        raise RemoteProtocolError(f"unsupported greeting: {quote(text.encode())}")
    fields = dict(w.partition("=")[::2] for w in words[2:])
    if "hmac-sha256" not in fields.get("methods", "").split(","):
        raise RemoteProtocolError("the server offers no method this client speaks")
    try:
        challenge = auth.b64url_decode(fields.get("challenge", ""))
    except ValueError:
        raise RemoteProtocolError("malformed greeting challenge") from None
    if len(challenge) < 16:
        raise RemoteProtocolError("greeting challenge too short")
    return challenge


def offers_resume(text: str) -> bool:
    """The greeting carries the field ``resume`` (the last of equal names counts)."""
    fields = dict(w.partition("=")[::2] for w in text.split(" ")[2:])
    return fields.get(GREETING_RESUME) == ""


def parse_auth_ok(rest: str) -> str:
    """The MAC of a ``235 ok mac=…`` line (compared, not trusted, by the caller)."""
    return rest.removeprefix("ok mac=")


def parse_bye(r: ReplyLine, *, macs: bool = True) -> tuple[int, str]:
    """STORED and the MAC of a ``221 bye STORED mac=…`` line (method ssh: no MAC, "")."""
    parts = r.rest.split(" ")
    if macs:
        ok = len(parts) == 3 and parts[2].startswith("mac=")
    else:
        ok = len(parts) == 2
    if not ok or parts[0] != "bye" or not parts[1].isdigit() or len(parts[1]) > 20:
        raise RemoteProtocolError(f"malformed 221 line: {quote(r.text.encode())}")
    return int(parts[1]), parts[2][4:] if macs else ""


@dataclass(frozen=True)
class ReceiptFields:
    """A line shaped like a receipt: ``TEXT NAME mac=MAC``; nothing in it is verified."""

    text: str
    name: str
    mac: str


def parse_receipt(rest: str) -> ReceiptFields | None:
    """The fields of a receipt, or None when the line has no receipt's shape."""
    m = _RECEIPT_RE.match(rest)
    return None if m is None else ReceiptFields(m["text"], m["name"], m["mac"])


def parse_plain_receipt(r: ReplyLine) -> ReceiptFields | None:
    """A method-ssh receipt (``TEXT NAME``, MAC ""), or None for a line that ends the session."""
    if r.code not in _PER_FILE_CODES or r.text in SESSION_LINES.values():
        return None
    m = _PLAIN_RECEIPT_RE.match(r.rest)
    return None if m is None else ReceiptFields(m["text"], m["name"], "")


def parse_stored(r: ReplyLine, f: ReceiptFields) -> tuple[str, str, str]:
    """The decimal size, the hex digest and the encoded final name of ``250 stored …``."""
    sm = _STORED_RE.match(f.text + " " + f.name)
    if sm is None:
        raise RemoteProtocolError(f"malformed receipt: {quote(r.text.encode())}")
    return sm["n"], sm["hex"], sm["name"]


def parse_already(r: ReplyLine, f: ReceiptFields) -> tuple[str, str, str]:
    """SIZE, HEX and the encoded final name of ``251 already stored …``."""
    sm = _ALREADY_RE.match(f.text + " " + f.name)
    if sm is None:
        raise RemoteProtocolError(f"malformed 251 line: {quote(r.text.encode())}")
    return sm["n"], sm["hex"], sm["name"]


def parse_resume(r: ReplyLine, f: ReceiptFields) -> tuple[int, bytes]:
    """OFFSET and the prefix digest of ``350 resume …`` (the MAC is the caller's)."""
    sm = _RESUME_RE.match(f.text + " " + f.name)
    if sm is None:
        raise RemoteProtocolError(f"malformed 350 line: {quote(r.text.encode())}")
    return int(sm["n"]), bytes.fromhex(sm["hex"])


def decode_name(r: ReplyLine, name: str) -> bytes:
    """A percent-encoded name from line ``r``; a malformed one is the peer's fault."""
    try:
        return pct_decode(name)
    except ValueError:
        raise RemoteProtocolError(f"malformed name in receipt: {quote(r.text.encode())}") from None
