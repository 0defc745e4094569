"""Dialects: the pure protocol code of each family of servers (no I/O).

A new gateway is a new module here and nothing else; see :mod:`kling_async.dialects._base`.
"""

from typing import TYPE_CHECKING, Any

from ._base import Dialect, LipSyncFlow, Submit, decode_envelope

if TYPE_CHECKING:
    from .apimodels import ApimodelsDialect
    from .kling import KlingDialect

# Each dialect module is imported on first use (module __getattr__): a client of one dialect
# does not pay for building the other's wire converters at start-up.
_LAZY = {"ApimodelsDialect": ".apimodels", "KlingDialect": ".kling"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ApimodelsDialect",
    "Dialect",
    "KlingDialect",
    "LipSyncFlow",
    "Submit",
    "decode_envelope",
]
