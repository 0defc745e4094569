"""Dialects: the pure protocol code of each family of servers (no I/O).

A new gateway is a new module here and nothing else; see :mod:`kling_async.dialects._base`.
"""

from ._base import Dialect, LipSyncFlow, Submit, decode_envelope

__all__ = ["Dialect", "LipSyncFlow", "Submit", "decode_envelope"]
