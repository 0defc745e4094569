"""Sending the submits of a batch: the canary, 1303 and 1302 waits, journaled intents.

The first submit of a batch goes alone (a bad key or an empty account then costs one request,
not one per job); a 1303 refusal gives the task slot back and waits, shrinking the slots
(:mod:`._slots`); a 1302 waits longer; and with a journal each attempt's intent is on disk
before it leaves, and the request then runs shielded so that a stopping batch learns its task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.lowlevel

from ._client_view import ClientView
from ._errors import (
    ConcurrencyLimitError,
    ConnectError,
    KlingError,
    RateLimitError,
    TransportTimeout,
)
from ._results import TaskSnapshot
from ._resume import Resume
from ._slots import SlotHold, TaskSlots
from .dialects import Submit
from .events import Event, Refused, Submitted

__all__ = ["SUBMIT_GRACE", "Submitter"]

logger = logging.getLogger("kling_async")

#: Seconds a stopping batch with a journal waits for the answers of submits already sent.
SUBMIT_GRACE = 5.0


class Submitter:
    """Sends one batch's submits through ``client``, holding jobs' task slots from ``slots``.

    ``on_fatal`` is called when the very first submit cannot reach the server at all.
    """

    def __init__(
        self, client: ClientView, slots: TaskSlots, on_fatal: Callable[[KlingError], None]
    ) -> None:
        self._dialect = client.dialect
        self._requester = client.requester
        self._retry = client.retry
        self._clock = client.clock
        self._slots = slots
        self._on_fatal = on_fatal
        self._first_answer = anyio.Event()
        self._answered = False  # (the event's state, read without two calls per submit)
        self._canary_taken = False
        self._submits: set[anyio.CancelScope] = set()  # journaled submits on their way
        #: The batch's event sink (:mod:`kling_async.events`), if it has a callback.
        self.on_event: Callable[[Event], None] | None = None

    def grace(self) -> None:
        """The batch stops: journaled submits on their way get :data:`SUBMIT_GRACE` seconds."""
        if self._submits:  # (only while the batch runs: __del__ may stop a batch later)
            deadline = anyio.current_time() + SUBMIT_GRACE
            for scope in self._submits:
                scope.deadline = min(scope.deadline, deadline)

    async def create(
        self, step: Submit, slot: SlotHold, key: str | None = None, resume: Resume | None = None
    ) -> TaskSnapshot:
        """Submit one step, waiting out 1303 refusals; the first submit of a batch goes alone.

        With ``key`` and ``resume`` (a journaled job) the journal records the intent before each
        attempt leaves, and the task id (or the refusal) as soon as the answer says.
        """
        canary = not self._canary_taken
        self._canary_taken = True
        if not canary and not self._answered:
            # Until one submit has been answered, send no other: a bad key or an empty account
            # then costs one request, not one per job.
            await self._first_answer.wait()
        # One trip through the event loop before anything is sent, for two reasons.  A job
        # started just as the batch was told to stop must not send its submit: anyio delivers
        # that cancellation at a yield, not at once.  And a consumer woken by a result handed
        # over just before (Batch._report) runs first: if it leaves the loop on that result, no
        # newer submit is on its way.  asyncio.sleep(0) is what anyio.lowlevel.checkpoint()
        # does on asyncio, without its backend lookup (a microsecond a job): a batch only runs
        # on asyncio, which its aiohttp session needs.
        await asyncio.sleep(0)
        refusals = 0
        while True:
            try:
                if resume is not None and key is not None:
                    snapshot = await self._send_journaled(step, resume, key)
                else:
                    snapshot = await self._send(step)
            except ConcurrencyLimitError:
                refusals += 1
                delay = await self._refused(step, refusals, key, resume)
                self._slots.shrink()
                slot.release()
                self._report_refusal(1303, step, key, delay)
                logger.debug("1303: %d tasks running; waiting %.2f s", self._slots.in_use, delay)
                await anyio.sleep(delay)
                await slot.acquire()
                continue
            except RateLimitError as exc:
                # 1302 after the requester's own retries: still not a reason to fail a job
                # whose task was never created.  Wait longer, keeping the slot.
                refusals += 1
                delay = await self._refused(step, refusals, key, resume)
                self._report_refusal(1302, step, key, max(delay, exc.retry_after or 0.0))
                logger.debug("1302: waiting %.2f s", max(delay, exc.retry_after or 0.0))
                await anyio.sleep(max(delay, exc.retry_after or 0.0))
                continue
            except BaseException as exc:
                if canary and isinstance(exc, ConnectError):
                    # The server cannot be reached at all: every job would fail the same way.
                    self._on_fatal(exc)
                # Any answer but a fatal one proves the account usable: let the others go.
                if not (isinstance(exc, KlingError) and exc.fatal):
                    self._answer()
                if resume is not None and key is not None and isinstance(exc, KlingError):
                    return await resume.submit_failed(key, step.stage, exc)
                raise
            if not self._answered:
                self._answer()
            if resume is not None and key is not None:
                await resume.created(key, step.stage, snapshot)
            if self.on_event is not None:
                self.on_event(Submitted(key=key or "", stage=step.stage, task_id=snapshot.task_id))
            return snapshot

    def _report_refusal(self, code: int, step: Submit, key: str | None, delay: float) -> None:
        if self.on_event is not None:
            limit = self._slots.limit  # (after a 1303, already the shrunk one)
            self.on_event(
                Refused(key=key or "", stage=step.stage, code=code, limit=limit, delay=delay)
            )

    async def _refused(
        self, step: Submit, refusals: int, key: str | None, resume: Resume | None
    ) -> float:
        """A 1303 or 1302 refusal (number ``refusals``): record it; the wait before the next try.

        Nothing was created, so a journaled intent is cleared; the wait doubles from
        ``RetryPolicy.concurrency_delay`` up to ``max_delay`` (docs/protocol.md, Business codes).
        """
        self._answer()
        if resume is not None and key is not None:
            await resume.journal.refused(key, step.stage)
        retry = self._retry
        return min(retry.concurrency_delay * 2.0 ** (refusals - 1), retry.max_delay)

    def _answer(self) -> None:
        """A submit has been answered (not with a fatal error): the others may go."""
        self._answered = True
        self._first_answer.set()

    def _send(self, step: Submit) -> Coroutine[Any, Any, TaskSnapshot]:
        # The requester's coroutine itself, not one wrapping it: a coroutine less per submit.
        parse = functools.partial(self._dialect.parse_submit, step.stage)
        return self._requester.call(step.request, parse, retry_concurrency_limit=False)

    async def _send_journaled(self, step: Submit, resume: Resume, key: str) -> TaskSnapshot:
        """Send ``step`` with its intent on disk first; a stopping batch lets it finish.

        Cut off mid-request, a submit's outcome would be unknown to the next run: so once the
        intent is recorded the request runs shielded, and a batch told to stop gives it
        :data:`SUBMIT_GRACE` seconds to be answered (see :meth:`grace`).
        """
        await resume.journal.submitting(key, step.stage, self._clock())
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            await resume.journal.refused(key, step.stage)  # never sent
            raise
        scope = anyio.CancelScope(shield=True)
        self._submits.add(scope)
        try:
            with scope:
                return await self._send(step)
        finally:
            self._submits.discard(scope)
        # The grace ran out: the intent stays unresolved, as after a crash.
        await anyio.lowlevel.checkpoint()  # raises the batch's cancellation
        raise TransportTimeout("the batch stopped before the submit was answered")
