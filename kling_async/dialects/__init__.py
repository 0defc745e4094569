"""Dialects: the pure protocol code of each family of servers (no I/O).

A new gateway is a new module here and nothing else; see :mod:`kling_async.dialects._base`.
"""

from ._base import Dialect, LipSyncFlow, Submit, decode_envelope
from .apimodels import ApimodelsDialect
from .kling import KlingDialect

__all__ = [
    "ApimodelsDialect",
    "Dialect",
    "KlingDialect",
    "LipSyncFlow",
    "Submit",
    "decode_envelope",
]
