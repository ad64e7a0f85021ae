"""Hand-written mutants: the planted bugs mutmut does not generate (flags, constants, deleted calls).

Each is one exact piece of source text and what replaces it; run.py applies one at a time to a copy
and runs the module's own unit tests. A mutant whose text is no longer found is reported as stale.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HandMutant:
    name: str
    path: str
    old: str
    new: str


AUTH = "rstash/auth.py"

HAND_MUTANTS: list[HandMutant] = [
    # --- auth: secrets out of repr, and the constants of the construction
    HandMutant("auth-secret-in-repr", AUTH, "secret: bytes = field(repr=False)", "secret: bytes"),
    HandMutant("auth-proof-in-repr", AUTH, "proof: bytes = field(repr=False)", "proof: bytes"),
    HandMutant("auth-k_c2s-in-repr", AUTH, "k_c2s: bytes = field(repr=False)", "k_c2s: bytes"),
    HandMutant("auth-k_s2c-in-repr", AUTH, "k_s2c: bytes = field(repr=False)", "k_s2c: bytes"),
    HandMutant("auth-line-mac-15", AUTH, "LINE_MAC_LEN = 16", "LINE_MAC_LEN = 15"),
    HandMutant("auth-key-id-7", AUTH, "KEY_ID_LEN = 8", "KEY_ID_LEN = 7"),
    HandMutant("auth-no-comment-strip", AUTH, "(m.group(2) or \"\").strip()", "(m.group(2) or \"\")"),
    HandMutant("auth-log-name-no-rstrip", AUTH, "{self.comment}\".rstrip()", "{self.comment}\""),
]
