"""rstash: write-only, key-authenticated drop boxes between hosts."""

from __future__ import annotations

__version__ = "0.1.0"
#: The wire protocol this package speaks (rstash(7)).
PROTOCOL = "rstash/1"
DEFAULT_PORT = 7370
