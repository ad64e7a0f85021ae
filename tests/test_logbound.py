"""Bounds on what a key holder makes rstash-recv write (rstash/logbound.py, rstash/delivery.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rstash import delivery as delivery_mod
from rstash.delivery import DeliveryLog
from rstash.errors import Outcome
from rstash.log import Logger
from rstash.logbound import Repeats, prune_box
from rstash.state import StateDB


def test_repeats_admit_the_first_n_of_each_outcome_and_every_stored_file() -> None:
    r = Repeats(limit=3)
    assert [r.admit(Outcome.WOULD_STORE) for _ in range(5)] == [True] * 3 + [False] * 2
    assert all(r.admit(Outcome.STORED) for _ in range(10))
    assert r.admit(Outcome.EXISTS)
    assert r.unlogged() == [(Outcome.WOULD_STORE, 2)]


def test_the_summary_line_says_how_many_were_not_logged(tmp_path: Path) -> None:
    r = Repeats(limit=1)
    for _ in range(4):
        r.admit(Outcome.NAME_NOT_ALLOWED)
    log_path = tmp_path / "log"
    r.log_summary(Logger(str(log_path)), box="vm1")
    text = log_path.read_text()
    assert text.count("\n") == 1 and "repeated=3" in text and "box=vm1" in text


def _rows(state: Path) -> list[tuple[str, str, str | None]]:
    db = sqlite3.connect(state / "rstash.db")
    try:
        return db.execute("SELECT box, outcome, key FROM events ORDER BY id").fetchall()
    finally:
        db.close()


def test_pruning_keeps_the_newest_rows_and_every_keys_newest_stored_row(tmp_path: Path) -> None:
    with StateDB(tmp_path) as db:
        db.log_event(box="vm1", name="old", outcome="stored", code=250, key="k1", when=1.0)
        db.log_event(box="vm1", name="older", outcome="stored", code=250, key="k2", when=0.5)
        db.log_event(box="vm1", name="new", outcome="stored", code=250, key="k2", when=2.0)
        for i in range(50):
            db.log_event(box="vm1", name=f"x{i}", outcome="would_store", code=250, key="k1",
                         when=3.0 + i)
        db.log_event(box="vm2", name="other", outcome="refused", code=550, when=1.0)
        conn = db.connection()
        assert prune_box(conn, "vm1", keep=10) == 41
    rows = _rows(tmp_path)
    vm1 = [r for r in rows if r[0] == "vm1"]
    assert vm1[0] == ("vm1", "stored", "k1")  # k1's newest stored row, however old
    assert vm1[1] == ("vm1", "stored", "k2") and len(vm1) == 12
    assert ("vm2", "refused", None) in rows
    with StateDB(tmp_path, readonly=True) as db:
        assert db.status("vm1", since=0)["boxes"][0]["last_stored"]["name"] == "new"


def test_a_session_prunes_its_box_every_few_hundred_rows(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_mod, "PRUNE_EVERY", 7)
    monkeypatch.setattr("rstash.logbound.MAX_BOX_ROWS", 5)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    log = DeliveryLog(state, Logger(str(tmp_path / "log")), peer=None)
    for i in range(30):
        assert log.record(box="vm1", name=f"n{i}", outcome=Outcome.EXISTS, key="k")
    log.close()
    assert len(_rows(state)) <= 5 + 7
