"""Sending a request with the retry rules of :class:`RetryPolicy`, and parsing its answer.

Queries are retried on transient errors (5xx, transport, 1302).  A request that creates a task
is retried only when the server certainly created nothing (:func:`created_nothing`): a paid job
must never run twice because an answer got lost.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TypeVar

import anyio

from ._backoff import retry_delay
from ._config import RetryPolicy
from ._emit import CURRENT
from ._errors import ConcurrencyLimitError, KlingError, created_nothing
from ._http import HttpRequest, HttpResponse
from ._transport import Transport
from .events import Retried

__all__ = ["Requester"]

logger = logging.getLogger("kling_async")

T = TypeVar("T")


class Requester:
    """Sends requests through a :class:`Transport`, parses answers and retries per policy."""

    def __init__(self, transport: Transport, policy: RetryPolicy, rng: random.Random) -> None:
        self.transport = transport
        self.policy = policy
        self._rng = rng

    async def call(
        self,
        request: HttpRequest,
        parse: Callable[[HttpResponse], T],
        *,
        retry_concurrency_limit: bool = True,
    ) -> T:
        """Send ``request`` and return ``parse(answer)``, retrying what is safe to retry.

        ``parse`` raises the error an answer stands for.  With ``retry_concurrency_limit`` False a
        1303 answer is raised at once, for callers that wait for a task slot instead.
        """
        retry = 0
        while True:
            try:
                return parse(await self.transport.send(request))
            except KlingError as exc:
                retry += 1
                if not self._may_retry(exc, request, retry, retry_concurrency_limit):
                    raise
                delay = retry_delay(
                    self.policy, retry, self._rng, retry_after=getattr(exc, "retry_after", None)
                )
                logger.debug(
                    "%s %s failed (%s); retry %d in %.2f s",
                    request.method,
                    request.path,
                    type(exc).__name__,
                    retry,
                    delay,
                )
                sink = CURRENT.get()
                if sink is not None:  # a batch's request, and the batch has an on_event callback
                    error = type(exc).__name__
                    sink(Retried(method=request.method, path=request.path, attempt=retry,
                                 delay=delay, error=error))  # fmt: skip
                await anyio.sleep(delay)

    def _may_retry(
        self, error: KlingError, request: HttpRequest, retry: int, concurrency: bool
    ) -> bool:
        if retry >= self.policy.max_attempts or not error.retryable:
            return False
        if isinstance(error, ConcurrencyLimitError) and not concurrency:
            return False
        return request.idempotent or created_nothing(error)
