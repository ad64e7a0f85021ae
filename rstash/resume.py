"""The server's answers to FILEs that carry a transfer id (rstash(7) RESUME AND RE-RUNS).

Between the session driver and :mod:`rstash.partials`: a remembered transfer
gets ``251 already stored``; a waited FILE gets ``350 resume`` when this key's
partial of it is kept and verified, else ``354 go``, and is received into its
partial so that an interrupted session can keep it.

It must never answer a FILE without a tid differently from a version-1 server,
keep the bytes of a session that broke the protocol (only a timeout or a cut
connection keeps them), or send a line a FILE does not expect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import wire
from .errors import Outcome, Refused
from .partials import Partial, Partials

if TYPE_CHECKING:
    from .session import ServerSession
    from .sessionlog import FileState


class ResumeFiles:
    """Transfer ids in one authenticated session."""

    def __init__(self, session: ServerSession, partials: Partials) -> None:
        self.session = session
        self.partials = partials
        #: the partial each file with one is received into, by FILE index
        self._held: dict[int, Partial] = {}

    def on_file(self, st: FileState) -> bool:
        """Answer a FILE with a tid when it needs more than a version-1 answer; True if done."""
        s, hdr = self.session, st.header
        if not hdr.has_tid or hdr.dry_run:
            return False
        waited = s.conn.state is wire.ServerState.AWAIT_GO
        rec = self.partials.already(hdr.tid, hdr.name, hdr.size)
        if rec is not None:
            final, digest = rec
            assert s.keys is not None and hdr.size is not None
            s._flush_ended()
            st.replied = True
            if not waited:
                s.conn.discard_current()
            s.send(wire.already_line(s.keys, hdr.index, final, hdr.size, digest))
            s._log_file(st, Outcome.ALREADY_STORED, bytes_=0, sha256=digest.hex(),
                        final=final.decode("utf-8", "replace"))
            if waited:
                s.conn.finish_waited()
            return True
        if not waited:
            return False
        try:
            self._begin_waited(st)
        except Refused as e:
            s._refuse(st, e)
        except OSError as e:
            s._refuse(st, Refused(Outcome.LOCAL_ERROR, e.strerror or str(e)))
        return True

    def _begin_waited(self, st: FileState) -> None:
        s, hdr = self.session, st.header
        store = s.store
        assert hdr.size is not None and s.keys is not None
        partial = None
        if self.partials.enabled:
            if store.overwrite == "refuse" and store._entry(st.name) is not None:
                raise Refused(Outcome.EXISTS, "name taken at begin")
            if store.max_file_size is not None and hdr.size > store.max_file_size:
                raise Refused(Outcome.TOO_LARGE, f"{hdr.size} > max_file_size {store.max_file_size}")
            partial = self.partials.open(hdr.tid, hdr.name, hdr.size)
        if partial is not None:
            try:
                # The partial, named with its size, is this file's reservation: the
                # scan counts it once (a resume needs no room for the file twice).
                with store._dir_lock():
                    store._check_limits(st.name, quota_add=0, free_need=0)
            except Refused:
                # A kept part stays for a later try (it may be what fits); a new one goes.
                if partial.offset:
                    partial.release()
                else:
                    partial.drop()
                raise
        if partial is None:
            # Resume off for the box, or another session holds this partial: a
            # transfer of its own, like any file.
            st.upload = store.begin(st.name, hdr.size)
            s.send(wire.line(wire.GO_LINE))
            s.conn.go()
            return
        self._held[hdr.index] = partial
        st.upload = partial.upload(st.name)
        if partial.offset:
            s.send(wire.resume_line(s.keys, hdr.index, partial.offset, partial.prefix.digest(),
                                    hdr.name))
            s.conn.go(partial.offset, partial.prefix.copy())
            s.log.info(event="file", box=s.result.box, name=hdr.name, outcome="resuming",
                       offset=partial.offset)
        else:
            s.send(wire.line(wire.GO_LINE))
            s.conn.go()

    def stored(self, st: FileState, final: str, end: wire.End) -> None:
        hdr = st.header
        partial = self._held.pop(hdr.index, None)
        if partial is not None:
            partial.drop()
        if hdr.has_tid and hdr.size is not None:
            self.partials.remember(hdr.tid, hdr.name, hdr.size, final.encode("utf-8"), end.sha256)

    def ended(self, st: FileState) -> None:
        """The file was aborted or refused: its partial is forgotten."""
        partial = self._held.pop(st.header.index, None)
        if partial is not None:
            partial.drop()

    def keep(self, st: FileState, *, keep: bool) -> bool:
        """The session ends inside ``st``: keep its partial (True) when ``keep`` allows."""
        partial = self._held.pop(st.header.index, None)
        if partial is None:
            return False
        upload: Any = st.upload
        if not keep:
            if upload is not None:
                upload.abort()
            partial.drop()
            return True
        if upload is not None:
            upload._close()  # its descriptor only: the partial's name stays
        kept = partial.keep(self.session.conn.checkpoint)
        if kept:
            self.session.log.info(event="file", box=self.session.result.box, name=st.header.name,
                                  outcome="kept", offset=(self.session.conn.checkpoint or (0,))[0])
        return True
