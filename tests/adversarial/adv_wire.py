"""The one place the adversarial suite imports the rstash/1 wire protocol from.

Every test module here says ``from adv_wire import wire`` and uses ``wire.ClientConnection``,
``wire.frame`` and so on, so that moving the protocol module is a one-line change here. This
module must never add behaviour of its own.
"""

from __future__ import annotations

from rstash import wire

__all__ = ["wire"]
