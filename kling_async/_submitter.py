"""Sending the submits of a batch: the canary, 1303 and 1302 waits, journaled intents, recovery.

The first submit of a batch goes alone (a bad key or an empty account then costs one request,
not one per job); a 1303 refusal gives the task slot back and waits, shrinking the slots
(:mod:`._slots`), at most ``RetryPolicy.max_slot_wait``; a 1302 waits longer; and with a
journal each attempt's intent is on disk before it leaves, and the request then runs shielded
so that a stopping batch learns its task.  A submit whose answer is unclear is resolved by
:mod:`._reconcile` (with the journal as ledger, or one in memory): its task found, the same
request (same external id) sent again, or :class:`~kling_async.SubmitOutcomeUnknownError`.
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
    APIError,
    ConcurrencyLimitError,
    ConnectError,
    KlingError,
    RateLimitError,
    ServerError,
    SubmitOutcomeUnknownError,
    TransportError,
    TransportTimeout,
    created_nothing,
)
from ._reconcile import ABSENT, ClockOffset, MemoryLedger, Reconciler
from ._results import TaskSnapshot
from ._resume import Resume
from ._slots import SlotHold, TaskSlots, slot_wait_error
from .dialects import Submit
from .events import Adopted, Event, Refused, Submitted

__all__ = ["SUBMIT_GRACE", "Submitter"]

logger = logging.getLogger("kling_async")

#: Longest wait (seconds) of an unclear submit for another submit's answer to show that the
#: server keeps external ids (the wait ends sooner when no other submit is on its way).
CONFIRM_WAIT = 60.0
#: Seconds a stopping batch with a journal waits for the answers of submits already sent.
SUBMIT_GRACE = 5.0
# Lookups of an external id that a resend found taken (see Submitter._refused_external).
_RELOOKUPS = 5


class Submitter:
    """Sends one batch's submits through ``client``, holding jobs' task slots from ``slots``.

    ``on_fatal`` is called when the very first submit cannot reach the server at all.
    """

    def __init__(
        self,
        client: ClientView,
        slots: TaskSlots,
        on_fatal: Callable[[KlingError], None],
        *,
        blocking: Callable[[], tuple[str, ...]] = tuple,
    ) -> None:
        self._dialect = client.dialect
        self._requester = client.requester
        self._retry = client.retry
        self._clock = client.clock
        self._slots = slots
        self._on_fatal = on_fatal
        self._blocking = blocking
        self._first_answer = anyio.Event()
        self._answered = False  # (the event's state, read without two calls per submit)
        self._canary_taken = False
        self._submits: set[anyio.CancelScope] = set()  # journaled submits on their way
        # The running backend's own scope class, for the journaled submit's shield: called
        # directly it skips anyio's per-call backend lookup (half a scope's cost, on every
        # journaled submit); at worst (another anyio) it is anyio.CancelScope itself.
        self._shield_class: type[anyio.CancelScope] = anyio.CancelScope
        self._memory = MemoryLedger()
        #: The batch's event sink (:mod:`kling_async.events`), if it has a callback.
        self.on_event: Callable[[Event], None] | None = None
        self._jobs = 0
        #: Finds the tasks of unclear submits; its ledger is the journal once one opens.
        self.reconciler = Reconciler(
            dialect=client.dialect,
            requester=client.requester,
            ledger=self._memory,
            offset=ClockOffset(),
            clock=client.clock,
            # A bound only: the wait also ends when no other submit is on its way.
            confirm_wait=max(2 * client.retry.max_delay, CONFIRM_WAIT),
        )
        self._creating = 0  # jobs inside create(): submits on their way or about to be
        self.reconciler.sending = lambda: self._creating

    def grace(self) -> None:
        """The batch stops: journaled submits on their way get :data:`SUBMIT_GRACE` seconds."""
        if self._submits:  # (only while the batch runs: __del__ may stop a batch later)
            deadline = anyio.current_time() + SUBMIT_GRACE
            for scope in self._submits:
                scope.deadline = min(scope.deadline, deadline)

    async def create(
        self,
        step: Submit,
        slot: SlotHold,
        key: str,
        resume: Resume | None = None,
        *,
        video_url: str | None = None,
        sent_before: bool = False,
    ) -> TaskSnapshot:
        """Submit one step of job ``key``, waiting out 1303 refusals; the first goes alone.

        With ``resume`` (a journaled job) the journal records the intent before each attempt
        leaves, and the task id (or the refusal) as soon as the answer says.  A submit whose
        answer is unclear is resolved (:meth:`Reconciler.resolve`): its task is found, or with
        an external id sent again, or it ends as :class:`SubmitOutcomeUnknownError`.
        ``sent_before``: an earlier run sent this very request (its external id) already.
        """
        self._creating += 1
        try:
            return await self._create(step, slot, key, resume, video_url, sent_before)
        finally:
            self._creating -= 1

    async def _create(
        self,
        step: Submit,
        slot: SlotHold,
        key: str,
        resume: Resume | None,
        video_url: str | None,
        sent_before: bool,
    ) -> TaskSnapshot:
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
        refusals = resends = 0
        waiting_since: float | None = None
        owner = key if resume is not None else self._owner(key)
        while True:
            intent = self._clock()
            try:
                if resume is not None:
                    snapshot = await self._send_journaled(step, resume, key, intent)
                else:
                    self._memory.submitting(owner, step.stage, video_url, intent)
                    snapshot = await self._send_timed(step, intent)
            except ConcurrencyLimitError:
                refusals += 1
                delay = await self._refused(step, refusals, owner, resume)
                if resume is None or resume.shared is None:
                    self._slots.shrink()
                # else the account's shared limit drops (concurrency_refused, below), and this
                # worker's own limit stays one slot per runner: runners wait for claims holding
                # a slot each, and a lowered local limit left a refused job no slot to submit
                # again with while another worker's job kept them all waiting (a deadlock of
                # two workers that a 1303 test hit once in twenty loaded runs).
                slot.release()
                self._report_refusal(1303, step, key, delay)
                if resume is not None and key is not None:
                    await resume.concurrency_refused(key)  # a shared journal: every worker's
                logger.debug("1303: %d tasks running; waiting %.2f s", self._slots.in_use, delay)
                now = anyio.current_time()
                waiting_since = waiting_since if waiting_since is not None else now
                patience = self._retry.max_slot_wait - (now - waiting_since)
                await anyio.sleep(min(delay, max(patience, 0.0)))
                patience -= anyio.current_time() - now
                if patience <= 0 or not await slot.acquire_within(patience):
                    raise slot_wait_error(self._retry.max_slot_wait, self._blocking()) from None
                if resume is not None and key is not None:
                    # A shared journal: the account's slot too, within the same patience (the
                    # other workers' tasks may hold every slot for longer than anyone waits).
                    left = self._retry.max_slot_wait - (anyio.current_time() - waiting_since)
                    with anyio.move_on_after(max(left, 0.0)):
                        await resume.regain_slot(key)
                        continue
                    slot.release()
                    raise slot_wait_error(self._retry.max_slot_wait, self._blocking()) from None
                continue
            except RateLimitError as exc:
                # 1302 after the requester's own retries: still not a reason to fail a job
                # whose task was never created.  Wait longer, keeping the slot.
                refusals += 1
                delay = await self._refused(step, refusals, owner, resume)
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
                if not isinstance(exc, KlingError):
                    if resume is None:  # (a journaled intent stays: a rerun looks it up)
                        self._memory.cleared(owner)
                    raise
                if not self._unclear(exc, step, sent_before or resends > 0):
                    await self._nothing_created(owner, step.stage, resume)
                    raise
                found = await self._resolve(step, owner, video_url, intent, exc, resume)
                if found is not None:
                    if self.on_event is not None:
                        self.on_event(Adopted(key=key, stage=step.stage, task_id=found.task_id))
                    return found
                resends += 1
                if resends >= self._retry.max_attempts:
                    detail = f"sent {resends} times with external id {step.external_id}, unanswered"
                    raise SubmitOutcomeUnknownError(step.stage, cause=exc, detail=detail) from exc
                logger.info("%s: no task has external id %s; sending again", key, step.external_id)
                retry = self._retry
                await anyio.sleep(min(retry.max_delay, retry.base_delay * 2.0 ** (resends - 1)))
                continue
            if not self._answered:
                self._answer()
            if resume is not None:
                await resume.created(key, step.stage, snapshot)
            else:
                self._memory.created(owner, snapshot.task_id)
            if self.on_event is not None:
                self.on_event(Submitted(key=key, stage=step.stage, task_id=snapshot.task_id))
            return snapshot

    def _report_refusal(self, code: int, step: Submit, key: str, delay: float) -> None:
        if self.on_event is not None:
            limit = self._slots.limit  # (after a 1303, already the shrunk one)
            self.on_event(Refused(key=key, stage=step.stage, code=code, limit=limit, delay=delay))

    def _owner(self, key: str) -> str:
        # Without a journal keys may repeat: the ledger names each job uniquely.
        self._jobs += 1
        return f"{key}#{self._jobs}"

    @staticmethod
    def _unclear(error: KlingError, step: Submit, sent_before: bool) -> bool:
        """Whether ``error`` leaves open that the submit created a task (a lookup decides).

        A time-out, a dropped connection, an unreadable answer, 5000/5002, a proxy's 5xx; and,
        for a request whose external id went out before, a refusal (a duplicate external id
        proves the earlier send created the task).
        """
        if isinstance(error, (TransportError, ServerError)) and not created_nothing(error):
            return True
        refused = isinstance(error, APIError) and not error.fatal
        return sent_before and step.external_id is not None and refused

    async def _resolve(
        self,
        step: Submit,
        owner: str,
        video_url: str | None,
        intent: float,
        error: KlingError,
        resume: Resume | None,
    ) -> TaskSnapshot | None:
        """The task an unclear submit created (recorded as adopted), or None: send again.

        Raises :class:`SubmitOutcomeUnknownError` when it cannot be known, and ``error`` itself
        for a refusal that a lookup shows created nothing.
        """
        if resume is not None:
            await resume.refresh()  # a shared journal: other workers' tasks are theirs
            record = resume.journal.job(owner)
            known = record.stages.get(step.stage) if record is not None else None
            video_url = video_url or (record.video_url if record is not None else None)
            intent = known.intent_at if known is not None and known.intent_at else intent
        # (Unknown, its intent stays in the ledger: a rival of other submits on its video.)
        found = await self.reconciler.resolve(
            key=owner,
            stage=step.stage,
            external_id=step.external_id,
            video_url=video_url,
            intent_at=intent,
            answered_at=self._clock(),
            cause=error,
        )
        if found is ABSENT and isinstance(error, APIError) and not isinstance(error, ServerError):
            found = await self._refused_external(step, error, owner)
        if found is ABSENT:
            return None
        if resume is not None:
            await resume.journal.created(owner, step.stage, found.task_id, adopted=True)
        else:
            self._memory.created(owner, found.task_id)
        return found

    async def _refused_external(self, step: Submit, error: APIError, key: str) -> TaskSnapshot:
        """A resend carrying an external id was refused, and no task carried the id yet.

        A duplicate external id proves an earlier send created the task: it may just not be
        visible yet (a slow service), so the lookup is repeated a few times, backing off.  Still
        absent, the job ends as :class:`SubmitOutcomeUnknownError` (never as a plain refusal:
        the earlier send's task may yet appear).
        """
        assert step.external_id is not None
        for attempt in range(_RELOOKUPS):
            await anyio.sleep(min(self._retry.max_delay, self._retry.base_delay * 2.0**attempt))
            found = await self.reconciler.find_external(step.stage, step.external_id, key, error)
            if found is not ABSENT:
                return found
        detail = f"external id {step.external_id} refused ({error}) but carried by no task"
        raise SubmitOutcomeUnknownError(step.stage, cause=error, detail=detail)

    async def _nothing_created(self, owner: str, stage: str, resume: Resume | None) -> None:
        if resume is not None:
            await resume.journal.refused(owner, stage)
        else:
            self._memory.cleared(owner)

    async def _refused(self, step: Submit, refusals: int, key: str, resume: Resume | None) -> float:
        """A 1303 or 1302 refusal (number ``refusals``): record it; the wait before the next try.

        Nothing was created, so a journaled intent is cleared; the wait doubles from
        ``RetryPolicy.concurrency_delay`` up to ``max_delay`` (docs/protocol.md, Business codes).
        """
        self._answer()
        await self._nothing_created(key, step.stage, resume)
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

    async def _send_timed(self, step: Submit, sent: float) -> TaskSnapshot:
        """Send ``step``; its answer's creation time calibrates the server clock's offset."""
        snapshot = await self._send(step)
        self.reconciler.offset.observe(sent, self._clock(), snapshot.created_at)
        if step.external_id is not None and snapshot.external_task_id == step.external_id:
            self.reconciler.confirm_external()
        return snapshot

    async def _send_journaled(
        self, step: Submit, resume: Resume, key: str, intent: float
    ) -> TaskSnapshot:
        """Send ``step`` with its intent on disk first; a stopping batch lets it finish.

        Cut off mid-request, a submit's outcome would be unknown to the next run: so once the
        intent is recorded the request runs shielded, and a batch told to stop gives it
        :data:`SUBMIT_GRACE` seconds to be answered (see :meth:`grace`).
        """
        if self._shield_class is anyio.CancelScope:
            self._shield_class = type(anyio.CancelScope())
        try:
            # A batch stopped while the intent is being committed: the commit is waited for
            # (a shielded wait), then the cancellation comes, and the request never leaves.
            await resume.journal.submitting(key, step.stage, intent, step.external_id)
            await anyio.lowlevel.checkpoint_if_cancelled()
        except anyio.get_cancelled_exc_class():
            # Never sent: say so, or a rerun would take the intent for a submit whose answer
            # was lost (and, without a way to look it up, fail the job as unknown).
            await resume.journal.refused(key, step.stage)
            raise
        scope = self._shield_class(shield=True)
        self._submits.add(scope)
        try:
            with scope:
                return await self._send_timed(step, self._clock())
        finally:
            self._submits.discard(scope)
        # The grace ran out: the intent stays unresolved, as after a crash.
        await anyio.lowlevel.checkpoint()  # raises the batch's cancellation
        raise TransportTimeout("the batch stopped before the submit was answered")
