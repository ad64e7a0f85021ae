"""The outcome table (rstash/errors.py): one code, text and word per outcome."""

from __future__ import annotations

from rstash.errors import Exit, Outcome, Refused, Reply, file_outcome, outcome_of


def test_every_outcome_with_a_code_has_a_one_line_reply() -> None:
    for o in Outcome:
        if o.code is not None:
            assert o.line == f"{o.code} {o.text}" and "\n" not in o.line


def test_refused_says_what_happened_and_carries_its_reply() -> None:
    e = Refused(Outcome.QUOTA, "usage 10 + 5 > quota 12")
    assert (e.reply, e.reason, e.detail) == (Reply.TOO_LARGE, "quota", "usage 10 + 5 > quota 12")


def test_the_client_words_of_per_file_codes() -> None:
    assert outcome_of(250) == "stored" and outcome_of(250, dry_run=True) == "would_store"
    assert [outcome_of(c) for c in (550, 552, 553, 452, 451, 426)] == [
        "exists", "refused", "refused", "temporary", "temporary", "error"]
    assert outcome_of(499) == "temporary" and outcome_of(599) == "refused"
    assert file_outcome(452).exit == Exit.TEMPFAIL


def test_refusals_counted_by_status_exclude_aborts_and_dry_runs() -> None:
    assert not Outcome.ABORTED.refusal and not Outcome.WOULD_STORE.refusal
    assert Outcome.EXISTS.refusal and Outcome.QUOTA.refusal and Outcome.LOCAL_ERROR.refusal


def test_the_status_query_counts_exactly_the_refusal_outcomes() -> None:
    """state.py spells the refusal list in literal SQL; it must be the table's."""
    import inspect
    import re

    from rstash.errors import REFUSAL_LOG_OUTCOMES
    from rstash.state import StateDB

    source = inspect.getsource(StateDB._fill_status)
    lists = re.findall(r"outcome IN \(([^)]*)\)", source)
    assert lists
    for listed in lists:
        assert set(re.findall(r"'(\w+)'", listed)) == REFUSAL_LOG_OUTCOMES


def test_before_authentication_only_version_and_method_are_told_apart() -> None:
    of = Outcome.of_protocol_error
    assert of(Reply.VERSION_NOT_SUPPORTED, authenticated=False) is Outcome.VERSION_NOT_SUPPORTED
    assert of(Reply.PROTOCOL_ERROR, authenticated=False).line == "535 authentication failed"
    assert of(None, authenticated=True).line == "500 protocol error"


def test_every_per_file_outcome_is_a_word_of_the_delivery_log() -> None:
    from rstash.errors import DELIVERY_OUTCOMES, REFUSAL_LOG_OUTCOMES

    per_file = [Outcome.STORED, Outcome.ALREADY_STORED, Outcome.WOULD_STORE, Outcome.EXISTS, Outcome.TOO_LARGE,
                Outcome.QUOTA, Outcome.NAME_NOT_ALLOWED, Outcome.INSUFFICIENT_STORAGE,
                Outcome.LOCAL_ERROR, Outcome.ABORTED, Outcome.UNFINISHED]
    # Besides the per-file outcomes: failed authentication and retention's removals.
    assert {o.log for o in per_file} | {"auth_failed", Outcome.REMOVED.log} == DELIVERY_OUTCOMES
    assert REFUSAL_LOG_OUTCOMES < DELIVERY_OUTCOMES
    assert not Outcome.REMOVED.refusal and Outcome.REMOVED.code is None
