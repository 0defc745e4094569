"""Callback delivery: one background task that wakes when the next watched task changes state.

Task states are computed lazily (see ``_state``), so nothing fires by itself.  The dispatcher
keeps a heap of the moments watched tasks change state and, at each, POSTs the task's body to
its ``callback_url`` when the state differs from the one last reported.  Delivery errors are
recorded, never raised: a broken receiver must not break the server.  Only tasks submitted with
a ``callback_url`` are watched, and the background task starts with the first of them.  Given a
webhook secret, every callback is signed as Kling signs them (Standard Webhooks headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import time
from collections.abc import Callable

import aiohttp

from .._signature import WebhookSecret
from ._state import Clock, FakeTask

__all__ = ["CallbackDispatcher", "Render"]

#: Builds the body to POST for a task's current state, or None when nothing is due.
Render = Callable[[FakeTask], object]


class CallbackDispatcher:
    """Delivers callbacks; ``sent`` records ``(url, HTTP status or exception name)``."""

    def __init__(
        self,
        *,
        clock: Clock,
        render: Render,
        timeout: float,
        secret: WebhookSecret | None = None,
    ) -> None:
        self.sent: list[tuple[str, int | str]] = []
        self._secret = secret
        self._messages = itertools.count(1)
        self._clock = clock
        self._render = render
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._heap: list[tuple[float, int, FakeTask]] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def watch(self, task: FakeTask) -> None:
        """Schedule checks at ``task``'s next state changes (call again when they move)."""
        if task.callback_url is None or self._closed:
            return
        for moment in {task.processing_at, task.ends_at}:
            heapq.heappush(self._heap, (moment, next(self._order), task))
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def close(self) -> None:
        """Stop delivering and release the HTTP session."""
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if not self._heap:
                await self._wake.wait()
                continue
            delay = self._heap[0][0] - self._clock.now()
            if delay > 0:
                timer = loop.call_later(delay, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
                continue
            await self._deliver_due()

    async def _deliver_due(self) -> None:
        now = self._clock.now()
        due: list[FakeTask] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        sends = []
        for task in due:
            state = task.state
            if state == task.notified:
                continue
            body = self._render(task)
            if body is None or task.callback_url is None:
                continue
            task.notified = state
            sends.append(self._send(task.callback_url, body))
        if sends:
            await asyncio.gather(*sends)

    async def _send(self, url: str, body: object) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            msg_id = f"msg_{next(self._messages):08d}"
            headers.update(self._secret.headers(msg_id, int(time.time()), data))
        outcome: int | str
        try:
            async with self._session.post(url, data=data, headers=headers) as response:
                outcome = response.status
        except Exception as exc:  # any failure of the receiver is recorded, never raised
            outcome = type(exc).__name__
        self.sent.append((url, outcome))
