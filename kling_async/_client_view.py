"""What the batch engine needs of a client: :class:`ClientView`, a narrow, frozen view.

The engine (:mod:`._batch`, :mod:`._submitter`, :mod:`._resume`) runs on a client's dialect,
requester, policies and clock, and saves videos through its downloader.  It takes them from this
record, which :class:`~kling_async.KlingClient` builds for each batch, instead of from the client
itself: the client depends on the engine, never the other way round.
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs

from ._config import PollPolicy, RetryPolicy
from ._requester import Requester
from ._results import JobResult
from .dialects import Dialect

__all__ = ["ClientView"]


@attrs.frozen(kw_only=True)
class ClientView:
    """The parts of one :class:`~kling_async.KlingClient` a batch runs on."""

    dialect: Dialect
    base_url: str
    max_in_flight: int
    poll: PollPolicy
    retry: RetryPolicy
    requester: Requester
    rng: random.Random
    #: Wall-clock seconds (``time.time`` unless the client was given another clock).
    clock: Callable[[], float]
    #: Saves a result's video in a directory; returns the file's path
    #: (:meth:`KlingClient.download <kling_async.KlingClient.download>`).
    download: Callable[[JobResult, str | os.PathLike[str]], Awaitable[Path]]
