#!/usr/bin/env python3
"""Independent rstash/1 test vectors, written from rstash(7) alone.

Never import the rstash package here: these vectors exist to catch the
implementation and the specification drifting apart.  Standard library only
(hashlib, hmac, struct, base64, json).  Run it to rewrite vectors.json next to
this file; ``--check`` exits 1 if the file on disk differs.

vectors.json (bytes are lowercase hex strings, lines are ASCII strings
without CRLF, integers are JSON numbers):

  inputs            fixed inputs: key, box, key_comment, challenge, nc, t,
                    ext, content, file {name, size, mtime, flags, tid,
                    offset}, refused_name
  key_file_line     the key file's line for inputs.key with inputs.key_comment
  fingerprint       "SHA256:" + unpadded standard base64
  fingerprint_line  as printed by --fingerprint / --gen-key
  prk, key_id       PRK = HMAC(b"rstash/1", K); key_id = E(b"key-id\\0", 8)
  interactive       mode 1: greeting (G), hello_without_proof, th, proof,
                    hello_payload, k_c2s, k_s2c, auth_line (the 235 line)
  file0             FILE i=0 under interactive keys: hdr, hdr_sha256, tag,
                    payload, content_sha256 (D), end_tag, end_payload,
                    receipt_mac, receipt_line (250), abort_payload (i=0)
  bye1_payload      BYE with count 1; done_line: "221 bye 1 mac=..."
  refusal           receipt for i=1 code 553 name inputs.refused_name:
                    receipt_mac, receipt_line
  sessions          interactive and pipe: client_hex (whole client byte
                    stream, frame headers included), server_lines, server_hex
                    (the lines joined with CRLF, each CRLF-terminated); pipe
                    also carries its own hello_without_proof, th, proof,
                    k_c2s, k_s2c (mode 2, G empty)
  percent_encoding  {input, output}: a name and its form in reply lines
  more              further cases, all under the interactive keys unless
                    said otherwise:
    would_store     dry-run FILE i=0 (flags 1) of inputs.file: hdr, payload,
                    receipt_line ("250 would store", n = 0, D = zeros)
    aborted         ABORT of file i=0 (payload) and its "426 aborted" line
    renamed         file i=1 "hello.txt" stored as "hello~1.txt" (a receipt
                    for i > 0 whose final name is not the requested one):
                    hdr, payload, end_payload, receipt_line
    utf8_name       file i=2 named inputs' utf8 name: hdr, payload,
                    end_payload, receipt_line (UTF-8 and "%" percent-encoded)
    unknown_size    file i=3 "db.sql.gz", size 2^64-1 (streamed), content
                    inputs.content: hdr, payload, end_payload, receipt_line
    server_id       HELLO (mode 1, G = the greeting) carrying ext tag 1 =
                    inputs.server_id: ext, hello_without_proof, th, proof,
                    k_c2s, k_s2c, auth_line
    resume          a session whose greeting carries "resume" (G =
                    greeting), same Nc and t: k_c2s, k_s2c; the waited FILE
                    i=0 of inputs.resume (hdr, payload); go_line; the 350
                    line offering inputs.resume.offset bytes (prefix_sha256,
                    resume_line); content_sha256 (D of the whole content),
                    end_payload (n = size) and receipt_line (250); then a
                    re-run's FILE i=0 in a session with the same keys
                    answered by already_line (251)
    ssh_method      method 0 (ssh), mode 1, G = the greeting offering
                    "hmac-sha256,ssh": greeting, hello_without_proof (key_id
                    8 zero bytes), th, hello_payload (proof 32 zero bytes),
                    k_c2s and k_s2c (derived with K = 32 zero bytes),
                    auth_line ("235 ok", no MAC), file0 payload and
                    end_payload under these keys, receipt_line (no MAC),
                    bye_payload (count 1), done_line ("221 bye 1", no MAC),
                    refusal_line (i=1, 553, inputs.refused_name, no MAC)
  negative          inputs that must be refused:
    bad_file_tag    FILE payload of file0 with the last tag byte XOR 0x01;
                    the server answers reply_line (no NAME) and ends
    non_canonical_auth_line     the 235 line with a non-canonical MAC (the
                    same 16 bytes, last character's unused bits set)
    non_canonical_receipt_line  the file0 receipt likewise
    macless_receipt_line        the file0 receipt without its MAC field,
                    as method ssh sends it: a client that sent method 1
                    must refuse it
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import sys
from typing import Any

HELLO, FILE, DATA, END, ABORT, BYE = 1, 2, 3, 4, 5, 6


def mac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def s(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BI", kind, len(payload)) + payload


def pct(name: str) -> str:
    return "".join(
        chr(c) if 0x21 <= c <= 0x7E and c != 0x25 else f"%{c:02X}" for c in name.encode("utf-8")
    )


K = bytes(range(0x00, 0x20))
BOX = "vm1"
COMMENT = "vm1"
CHALLENGE = bytes(range(0x20, 0x40))
NC = bytes(range(0x40, 0x60))
T = 1767225600
NAME, SIZE, MTIME, FLAGS, TID, OFFSET = "hello.txt", 14, 1767225000, 0, bytes(16), 0
CONTENT = b"hello, rstash\n"
REFUSED = "../etc/passwd"
UTF8_NAME = "Gr\u00fc\u00dfe 100%.txt"
STREAM_NAME = "db.sql.gz"
SERVER_ID = "backup.example"
UNKNOWN = 2**64 - 1
GREETING = "220 rstash/1 methods=hmac-sha256 challenge=" + b64url(CHALLENGE)
GREETING_RESUME = GREETING + " resume"
# The resumable file: 64 MiB (the smallest waited size), byte k is k mod 251.
BIG_NAME, BIG_SIZE, BIG_OFFSET = "backup.tar", 2**26, 2**25
BIG_TID = bytes(range(0x60, 0x70))

PRK = mac(b"rstash/1", K)


def E(info: bytes, n: int = 32) -> bytes:
    return mac(PRK, info + b"\x01")[:n]


KEY_ID = E(b"key-id\0", 8)


def handshake(mode: int, g: str, ext: bytes = b"") -> dict[str, bytes]:
    body = bytes([1, mode, 1]) + s(BOX.encode()) + KEY_ID + NC + u64(T) + s(ext)
    th = hashlib.sha256(b"rstash/1 hello\0" + s(g.encode()) + body).digest()
    proof = E(b"c2s proof\0" + th)
    return dict(
        hello_without_proof=body,
        th=th,
        proof=proof,
        hello_payload=body + proof,
        k_c2s=E(b"c2s tags\0" + th),
        k_s2c=E(b"s2c receipts\0" + th),
    )


SSH_GREETING = "220 rstash/1 methods=hmac-sha256,ssh challenge=" + b64url(CHALLENGE)


def ssh_method() -> dict[str, Any]:
    """rstash(7) CONSTRUCTION 11: method 0, key_id and proof all zeros, the keys
    derived as for an all-zero K, and every server line without its MAC field."""
    prk0 = mac(b"rstash/1", bytes(32))

    def e0(info: bytes) -> bytes:
        return mac(prk0, info + b"\x01")

    body = bytes([1, 1, 0]) + s(BOX.encode()) + bytes(8) + NC + u64(T) + s(b"")
    th = hashlib.sha256(b"rstash/1 hello\0" + s(SSH_GREETING.encode()) + body).digest()
    k_c2s = e0(b"c2s tags\0" + th)
    hdr = header(0, NAME, SIZE)
    d = hashlib.sha256(CONTENT).digest()
    end = mac(k_c2s, b"END\0" + hashlib.sha256(hdr).digest() + u64(len(CONTENT)) + d)
    return dict(
        greeting=SSH_GREETING,
        hello_without_proof=body,
        th=th,
        hello_payload=body + bytes(32),
        k_c2s=k_c2s,
        k_s2c=e0(b"s2c receipts\0" + th),
        auth_line="235 ok",
        file_payload=hdr + mac(k_c2s, b"FILE\0" + hdr),
        end_payload=u64(len(CONTENT)) + end,
        receipt_line=f"250 stored {len(CONTENT)} sha256:{d.hex()} {pct(NAME)}",
        bye_payload=u64(1) + mac(k_c2s, b"BYE\0" + u64(1)),
        done_line="221 bye 1",
        refusal_line=f"553 name not allowed {pct(REFUSED)}",
    )


def receipt(k_s2c: bytes, i: int, code: int, name: str, n: int = 0, d: bytes = bytes(32)) -> str:
    return b64url(
        mac(k_s2c, b"RCPT\0" + u64(i) + struct.pack(">H", code) + s(name.encode()) + u64(n) + d)[
            :16
        ]
    )


def file_vectors(hs: dict[str, bytes]) -> dict[str, Any]:
    hdr = (
        u64(0)
        + s(NAME.encode())
        + u64(SIZE)
        + struct.pack(">q", MTIME)
        + bytes([FLAGS])
        + TID
        + u64(OFFSET)
    )
    tag = mac(hs["k_c2s"], b"FILE\0" + hdr)
    d = hashlib.sha256(CONTENT).digest()
    end_tag = mac(hs["k_c2s"], b"END\0" + hashlib.sha256(hdr).digest() + u64(len(CONTENT)) + d)
    rm = receipt(hs["k_s2c"], 0, 250, NAME, len(CONTENT), d)
    return dict(
        hdr=hdr,
        hdr_sha256=hashlib.sha256(hdr).digest(),
        tag=tag,
        payload=hdr + tag,
        content_sha256=d,
        end_tag=end_tag,
        end_payload=u64(len(CONTENT)) + end_tag,
        receipt_mac=rm,
        receipt_line=f"250 stored {len(CONTENT)} sha256:{d.hex()} {pct(NAME)} mac={rm}",
        abort_payload=mac(hs["k_c2s"], b"ABORT\0" + u64(0)),
    )


def session(hs: dict[str, bytes]) -> tuple[dict[str, Any], bytes, str, str, dict[str, Any]]:
    f = file_vectors(hs)
    bye = u64(1) + mac(hs["k_c2s"], b"BYE\0" + u64(1))
    done = "221 bye 1 mac=" + b64url(mac(hs["k_s2c"], b"DONE\0" + u64(1) + u64(1))[:16])
    auth = "235 ok mac=" + b64url(mac(hs["k_s2c"], b"AUTH\0")[:16])
    client = (
        frame(HELLO, hs["hello_payload"])
        + frame(FILE, f["payload"])
        + frame(DATA, CONTENT)
        + frame(END, f["end_payload"])
        + frame(BYE, bye)
    )
    lines = [GREETING, auth, f["receipt_line"], done]
    server = "".join(line + "\r\n" for line in lines).encode("ascii")
    return f, bye, done, auth, dict(client_hex=client, server_lines=lines, server_hex=server)


def header(i: int, name: str, size: int, flags: int = 0) -> bytes:
    return (u64(i) + s(name.encode()) + u64(size) + struct.pack(">q", MTIME) + bytes([flags])
            + TID + u64(OFFSET))


def stored(hs: dict[str, bytes], i: int, name: str, size: int, final: str) -> dict[str, Any]:
    hdr = header(i, name, size)
    d = hashlib.sha256(CONTENT).digest()
    end = mac(hs["k_c2s"], b"END\0" + hashlib.sha256(hdr).digest() + u64(len(CONTENT)) + d)
    rm = receipt(hs["k_s2c"], i, 250, final, len(CONTENT), d)
    return dict(
        hdr=hdr,
        payload=hdr + mac(hs["k_c2s"], b"FILE\0" + hdr),
        end_payload=u64(len(CONTENT)) + end,
        receipt_line=f"250 stored {len(CONTENT)} sha256:{d.hex()} {pct(final)} mac={rm}",
    )


def non_canonical(line: str) -> str:
    """The line with its 22-character MAC's last character replaced by one that
    decodes to the same 16 bytes under a lenient decoder (low 4 bits set)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(line[-1])
    assert last & 0x0F == 0
    return line[:-1] + alphabet[last | 0x01]


def more(ia: dict[str, bytes], f: dict[str, Any]) -> dict[str, Any]:
    k_s2c = ia["k_s2c"]
    dry = header(0, NAME, SIZE, flags=1)
    ws = receipt(k_s2c, 0, 250, NAME)
    ab = receipt(k_s2c, 0, 426, NAME)
    ext = bytes([1]) + s(SERVER_ID.encode())
    sid = handshake(1, GREETING, ext)
    return dict(
        would_store=dict(
            hdr=dry,
            payload=dry + mac(ia["k_c2s"], b"FILE\0" + dry),
            receipt_line=f"250 would store {pct(NAME)} mac={ws}",
        ),
        aborted=dict(abort_payload=f["abort_payload"], reply_line=f"426 aborted {pct(NAME)} mac={ab}"),
        renamed=stored(ia, 1, NAME, SIZE, "hello~1.txt"),
        utf8_name=stored(ia, 2, UTF8_NAME, SIZE, UTF8_NAME),
        unknown_size=stored(ia, 3, STREAM_NAME, UNKNOWN, STREAM_NAME),
        server_id=dict(
            ext=ext,
            hello_without_proof=sid["hello_without_proof"],
            th=sid["th"],
            proof=sid["proof"],
            k_c2s=sid["k_c2s"],
            k_s2c=sid["k_s2c"],
            auth_line="235 ok mac=" + b64url(mac(sid["k_s2c"], b"AUTH\0")[:16]),
        ),
        resume=resume(ia),
        ssh_method=ssh_method(),
    )


def big_content() -> bytes:
    block = bytes(range(251))
    return (block * (BIG_SIZE // 251 + 1))[:BIG_SIZE]


def resume(ia: dict[str, bytes]) -> dict[str, Any]:
    rs = handshake(1, GREETING_RESUME)
    k_c2s, k_s2c = rs["k_c2s"], rs["k_s2c"]
    content = big_content()
    hdr = (u64(0) + s(BIG_NAME.encode()) + u64(BIG_SIZE) + struct.pack(">q", MTIME) + bytes([0])
           + BIG_TID + u64(0))
    prefix = hashlib.sha256(content[:BIG_OFFSET]).digest()
    d = hashlib.sha256(content).digest()
    offer = b64url(mac(k_s2c, b"RESUME\0" + u64(0) + u64(BIG_OFFSET) + prefix
                       + s(BIG_NAME.encode()))[:16])
    end = mac(k_c2s, b"END\0" + hashlib.sha256(hdr).digest() + u64(BIG_SIZE) + d)
    rm = receipt(k_s2c, 0, 250, BIG_NAME, BIG_SIZE, d)
    already = b64url(mac(k_s2c, b"ALREADY\0" + u64(0) + s(BIG_NAME.encode()) + u64(BIG_SIZE)
                         + d)[:16])
    return dict(
        greeting=GREETING_RESUME,
        k_c2s=k_c2s,
        k_s2c=k_s2c,
        hdr=hdr,
        payload=hdr + mac(k_c2s, b"FILE\0" + hdr),
        go_line="354 go",
        prefix_sha256=prefix,
        resume_line=f"350 resume {BIG_OFFSET} sha256:{prefix.hex()} {pct(BIG_NAME)} mac={offer}",
        content_sha256=d,
        end_payload=u64(BIG_SIZE) + end,
        receipt_line=f"250 stored {BIG_SIZE} sha256:{d.hex()} {pct(BIG_NAME)} mac={rm}",
        already_line=f"251 already stored {BIG_SIZE} sha256:{d.hex()} {pct(BIG_NAME)} mac={already}",
    )


def negative(f: dict[str, Any], auth: str) -> dict[str, Any]:
    bad = bytearray(f["payload"])
    bad[-1] ^= 0x01
    return dict(
        bad_file_tag=dict(payload=bytes(bad), reply_line="554 integrity check failed"),
        non_canonical_auth_line=non_canonical(auth),
        non_canonical_receipt_line=non_canonical(f["receipt_line"]),
        macless_receipt_line=f["receipt_line"].rsplit(" ", 1)[0],
    )


def hexify(o: Any) -> Any:
    if isinstance(o, bytes):
        return o.hex()
    if isinstance(o, dict):
        return {k: hexify(v) for k, v in o.items()}
    if isinstance(o, list):
        return [hexify(v) for v in o]
    return o


def build() -> Any:
    ia = handshake(1, GREETING)
    f, bye, done, auth, ia_session = session(ia)
    pipe = handshake(2, "")
    _, _, _, _, pipe_session = session(pipe)
    for k in ("hello_without_proof", "th", "proof", "k_c2s", "k_s2c"):
        pipe_session[k] = pipe[k]
    rm = receipt(ia["k_s2c"], 1, 553, REFUSED)
    fp = (
        "SHA256:"
        + base64.b64encode(hashlib.sha256(b"rstash/1 fingerprint\0" + K).digest())
        .rstrip(b"=")
        .decode()
    )
    return hexify(
        {
            "inputs": {
                "key": K,
                "box": BOX,
                "key_comment": COMMENT,
                "challenge": CHALLENGE,
                "nc": NC,
                "t": T,
                "ext": b"",
                "content": CONTENT,
                "file": {
                    "name": NAME,
                    "size": SIZE,
                    "mtime": MTIME,
                    "flags": FLAGS,
                    "tid": TID,
                    "offset": OFFSET,
                },
                "refused_name": REFUSED,
                "utf8_name": UTF8_NAME,
                "stream_name": STREAM_NAME,
                "server_id": SERVER_ID,
                "resume": {
                    "name": BIG_NAME,
                    "size": BIG_SIZE,
                    "tid": BIG_TID,
                    "offset": BIG_OFFSET,
                    "content": "byte k is k mod 251",
                },
            },
            "key_file_line": f"rstash-key-v1 {K.hex()} # {COMMENT}",
            "fingerprint": fp,
            "fingerprint_line": f"256 {fp} {COMMENT} (rstash-hmac)",
            "prk": PRK,
            "key_id": KEY_ID,
            "interactive": dict(greeting=GREETING, **ia, auth_line=auth),
            "file0": f,
            "bye1_payload": bye,
            "done_line": done,
            "refusal": {
                "receipt_mac": rm,
                "receipt_line": f"553 name not allowed {pct(REFUSED)} mac={rm}",
            },
            "sessions": {"interactive": ia_session, "pipe": pipe_session},
            "percent_encoding": {"input": "a b%c\u00e9", "output": pct("a b%c\u00e9")},
            "more": more(ia, f),
            "negative": negative(f, auth),
        }
    )


if __name__ == "__main__":
    text = json.dumps(build(), indent=2, ensure_ascii=True) + "\n"
    path = __file__.rsplit("/", 1)[0] + "/vectors.json" if "/" in __file__ else "vectors.json"
    if sys.argv[1:] == ["--check"]:
        with open(path, encoding="ascii") as fh:
            sys.exit(0 if fh.read() == text else 1)
    with open(path, "w", encoding="ascii") as fh:
        fh.write(text)
