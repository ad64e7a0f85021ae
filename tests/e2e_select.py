"""Whether a pytest ``-m`` expression may select an e2e test (tests/conftest.py asks).

This module must never import e2e code: a unit run imports it.
"""

from __future__ import annotations

from collections.abc import Callable


def _marks(*, e2e: bool, others: bool) -> Callable[..., bool]:
    def has(name: str, /, **_: object) -> bool:
        return e2e if name == "e2e" else others
    return has


def e2e_may_run(markexpr: str) -> bool:
    """False only when ``-m markexpr`` deselects an e2e test whatever other marks it carries.

    The expression is tried with ``e2e`` set and every other mark all set, then all unset; a
    run that may select an e2e test needs the plugin, and loading it needlessly costs only time.
    """
    if not markexpr.strip():
        return True
    try:
        from _pytest.mark.expression import Expression
        expr = Expression.compile(markexpr)
        return any(expr.evaluate(_marks(e2e=True, others=others)) for others in (True, False))
    except Exception:  # an unknown pytest internals change: load the plugin, never miss fixtures
        return True
