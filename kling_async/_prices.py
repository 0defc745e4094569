"""The published default prices as plain numbers (see :mod:`._cost` for where each comes from).

:class:`~._cost.Prices` defaults to them; the command line's price options show them in
``--help`` without importing the price records (attrs, the job records): start-up time.
"""

from __future__ import annotations

__all__ = ["PRICE_DEFAULTS"]

#: ``Prices`` field -> its default.
PRICE_DEFAULTS: dict[str, float] = {
    "units_per_5s": 0.5,
    "identify_face_units": 0.005,
    "unknown_seconds": 60.0,
    "usd_per_unit": 0.14,
}
