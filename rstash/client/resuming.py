"""The client's side of transfer ids (rstash-send(1), RESUME; rstash(7) RESUME AND RE-RUNS).

Functions of a :class:`rstash.client.session.Session`: which files get a transfer id, the waits
for the greeting and for a big file's first line, the check of a ``350`` offer against the
file's own first bytes, and the check of a ``251`` against the file's whole SHA-256. They must never count a file
stored without that check, nor resume onto bytes that differ from the file's.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from .. import wire
from ..errors import PeerTimeout, TransportError
from .sources import Source
from .tids import file_sha256, hash_prefix, transfer_id

if TYPE_CHECKING:
    from .session import Result, Session


def tid_for(sess: Session, src: Source) -> bytes:
    """A transfer id for a regular file in an interactive session that may resume."""
    if (sess.conn is None or not sess.proto.resume or sess.opts.dry_run or sess.opts.no_resume
            or src.size is None or src.label == "-" or src.proc is not None):
        return wire.NO_TID
    # Method ssh has no box key: its tids are this client's own, "ssh" in place of the key.
    key = sess.proto.key
    return transfer_id(src.label, box=sess.proto.box.decode("utf-8"),
                       fingerprint="ssh" if key is None else key.fingerprint,
                       name=src.name) or wire.NO_TID


def wait_while(sess: Session, state: wire.ClientState, deadline: float, what: str) -> None:
    """Read until the protocol leaves ``state``; PeerTimeout naming ``what`` past ``deadline``."""
    while sess.proto.state is state:
        if time.monotonic() > deadline:
            raise PeerTimeout(f"timed out waiting for {what}")
        sess._pump(max(0.01, deadline - time.monotonic()))
        if sess.proto.state is wire.ClientState.CLOSED:
            raise TransportError(sess.closed_message())


def first_line(sess: Session) -> None:
    """A waited FILE: read until its first line (354, 350, 251 or a refusal) is in."""
    wait_while(sess, wire.ClientState.WAITING, sess._deadline(), "the server's answer to a file")


def check_already(sess: Session, res: Result, src: Source) -> None:
    """A 251 counts as stored only for the very content this file holds."""
    if file_sha256(src.label) == res.sha256:
        res.status = "stored"
    else:
        res.status, res.message = "error", (
            f"the server stored other content under this transfer id as {res.final_name}")
    sess._report(res)


def take_offer(sess: Session, res: Result, src: Source, fd: int, *, offer_ok: bool) -> int | None:
    """Resume after the server's offer when its prefix is this file's: the offset to go on
    from. None: the file was aborted (it changed) and must be sent again from zero."""
    from .session import SourceFailed

    offer = sess.offer
    assert offer is not None
    prefix = hash_prefix(fd, offer.offset) if offer_ok else None
    if prefix is None or prefix.digest() != offer.prefix:
        # Not the bytes this file starts with: the server forgets them (426, not reported).
        res.silent = True
        sess.write(sess.proto.abort())
        src.close()
        if not offer_ok:
            raise SourceFailed("the server offered a resume twice for one file")
        return None
    sess.proto.resume_from(offer.offset, prefix)
    os.lseek(fd, offer.offset, os.SEEK_SET)
    res.resumed_from = offer.offset
    return offer.offset
