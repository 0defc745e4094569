"""The event loop a command runs on: uvloop where it is installed, else asyncio's own.

uvloop (``pip install 'kling-async[speed]'``) runs the same batch on less CPU: about 1.2x the
jobs per second in benchmarks/overhead.py (benchmarks/README.md, "uvloop").  Setting
``KLING_ASYNC_LOOP=asyncio`` keeps asyncio's loop even where uvloop is installed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio

__all__ = ["LOOP_ENV", "loop_factory", "run"]

#: Environment variable choosing the loop: "uvloop" (the default where installed) or "asyncio".
LOOP_ENV = "KLING_ASYNC_LOOP"

T = TypeVar("T")


def loop_factory(environ: Mapping[str, str]) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory of uvloop if it is installed and not declined; None: asyncio's own."""
    if environ.get(LOOP_ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(func, *args)`` on the loop :func:`loop_factory` picks."""
    factory = loop_factory(os.environ)
    options = {"loop_factory": factory} if factory is not None else {}
    return anyio.run(func, *args, backend_options=options)
