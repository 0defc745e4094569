"""One coroutine that tracks every live task of a batch.

Instead of a sleeping coroutine per task, the tracker keeps a heap of next-poll times and a few
worker coroutines (``PollPolicy.max_concurrent_queries``) that send the status requests.  A
tracked task is a small :class:`Watch` record; whoever waits for it gets a callback.

When to poll comes from :mod:`._backoff`: a fixed back-off until the tracker has learnt, per
stage, how long tasks take (:func:`~._backoff.fit_durations`), then a schedule dense where
finishes are likely and sparse elsewhere.  Where the dialect has a list query (a page holds up
to 500 tasks, docs/protocol.md, Query many) one request refreshes every live task on a page:
:mod:`._listing` decides which pages to read and when.  Callbacks feed :meth:`Tracker.update`
and finish a task at once.  Transient query errors (5xx, transport, 1302) only postpone the next
poll; they never fail a task.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Callable

import anyio
import anyio.lowlevel

from ._backoff import DurationModel, poll_delay, retry_delay
from ._config import PollPolicy, RetryPolicy
from ._errors import KlingError
from ._http import HttpRequest, HttpResponse
from ._listing import ListPages
from ._requester import Requester
from ._results import TaskSnapshot, TaskState
from ._watch import Learner, Waiter, Watch, loop_time
from .dialects import Dialect
from .events import Event, Polled, Retried

__all__ = ["Tracker", "Watch"]

logger = logging.getLogger("kling_async")

#: The shortest interval a learnt schedule asks for, in first_delays (1 s for the default 10 s).
LEARNT_FLOOR = 0.1
#: Longest interval before a model exists, in first_delays.
_COLD_INTERVALS = 3


class Tracker:
    """Polls every watched task on one schedule; see the module docstring.

    ``on_fatal`` is called with an account-level error (bad key, no balance): the batch stops.
    """

    def __init__(
        self,
        *,
        dialect: Dialect,
        requester: Requester,
        poll: PollPolicy,
        retry: RetryPolicy,
        rng: random.Random,
        on_fatal: Callable[[KlingError], None],
        callbacks: bool = False,
    ) -> None:
        self._dialect = dialect
        self._requester = requester
        self._poll = poll
        self._retry = retry
        self._rng = rng
        self._on_fatal = on_fatal
        self.callbacks = callbacks
        self._watches: dict[str, Watch] = {}
        self._heap: list[tuple[float, Watch]] = []
        self._wakeup = anyio.Event()
        self._sleep_until = math.inf
        self._queue: deque[Watch | str] = deque()  # a watch to query, or a stage to list
        self._idle: deque[anyio.Event] = deque()  # one per worker waiting for work
        self._learners: dict[str, Learner] = {}
        first = poll.first_delay or poll.max_interval / 100
        self._floor = min(first, poll.max_interval)
        # first_delay is a guess made before anything is known: a learnt schedule may go below
        # it (2-second tasks with the default 10 s were each polled once, at 10 s).
        self._learnt_floor = self._floor * LEARNT_FLOOR
        self._lists = ListPages(self, dialect, poll)
        self.requests = 0
        #: Called with each task id the tracker stops watching; the client remembers them so
        #: that a late or repeated callback about the task is answered 2xx, without effect.
        self.on_unwatch: Callable[[str], None] | None = None
        #: Called with a callback's snapshot of a task the tracker does not follow (a task
        #: another worker polls for, ``_shared_poll``); True when it concerned one.
        self.on_news: Callable[[TaskSnapshot], bool] | None = None
        #: The batch's event sink (:mod:`kling_async.events`), if it has a callback.
        self.on_event: Callable[[Event], None] | None = None
        #: Takes the terminal snapshot a callback brought before the task was tracked, if one
        #: did (the client's :class:`~._early.EarlyCallbacks`).
        self.early: Callable[[str], TaskSnapshot | None] | None = None
        self._ends: dict[str, TaskSnapshot] = {}  # such snapshots of watches not yet ended

    @property
    def live(self) -> int:
        """How many tasks are being tracked."""
        return len(self._watches)

    def model(self, stage: str) -> DurationModel | None:
        """What has been learnt of ``stage``'s durations (None: nothing yet, or not adaptive)."""
        learner = self._learners.get(stage)
        return learner.model if learner else None

    # -- what jobs call ------------------------------------------------------------------

    def watch(self, task_id: str, stage: str, on_done: Callable[[Watch], None]) -> Watch:
        """Track a live task; ``on_done(watch)`` runs once it ends (``watch.result`` set).

        A task already tracked keeps its watch, and both callbacks run.  After ``timeout`` the
        result is ``TIMED_OUT``.  :meth:`unwatch` stops tracking without a result.
        """
        return self._add(task_id, stage, on_done)[0]

    def _add(
        self, task_id: str, stage: str, on_done: Callable[[Watch], None], inline: bool = False
    ) -> tuple[Watch, bool]:
        """:meth:`watch`; with ``inline``, True when the caller is to query the task at once."""
        existing = self._watches.get(task_id)
        if existing is not None:
            first = existing.on_done

            def both(watch: Watch) -> None:
                first(watch)
                on_done(watch)

            existing.on_done = both
            return existing, False
        now = loop_time()
        watch = Watch(task_id, stage, now, on_done)
        self._watches[task_id] = watch
        early = self.take_early(task_id)
        if early is not None:
            # Its end was called back before it was tracked: it ends on the loop's next turn
            # (not inside this call: the caller has not kept the watch yet), and teaches
            # nothing of durations (when it ended, on our clock, is not known).
            self._ends[task_id] = early
            self._schedule(watch, now)
            return watch, False
        if self._poll.adaptive:
            self._learner(stage).add(watch, len(self._watches))
        delay = self._delay(watch, now)
        if delay <= 0 and not self._poll.list_queries:
            # Due at once (first_delay 0): to a worker without waking the loop, or, while a
            # worker idles, asked by the waiting task itself (see wait).
            watch.busy = True
            if inline and self._idle:
                return watch, True
            self._queue.append(watch)
            self._kick()
        else:
            self._schedule(watch, now + delay)
        return watch, False

    def unwatch(self, watch: Watch) -> None:
        """Stop tracking ``watch`` (its waiter went away); no callback runs."""
        if watch.result is None and watch.ended is None:
            watch.ended = -(anyio.current_time() - watch.started)
        self._drop(watch)

    async def wait(self, snapshot: TaskSnapshot, stage: str) -> tuple[TaskSnapshot, int]:
        """Track ``snapshot``'s task until it ends; return its terminal snapshot and poll count.

        A task still running after ``PollPolicy.timeout`` comes back as ``TIMED_OUT``.  A task
        whose end was called back before it was tracked ends with that callback at once.
        """
        if snapshot.state.is_terminal:
            return snapshot, 0
        early = self.take_early(snapshot.task_id)
        if early is not None:
            return early, 0
        waiter = Waiter()
        watch, ask = self._add(snapshot.task_id, stage, waiter, inline=True)
        try:
            if ask:
                # This task queries on an idle worker's turn (max_concurrent_queries holds):
                # handing it over, and the answer back, would cost two trips through the loop.
                turn = self._idle.popleft()
                try:
                    await self._refresh_one(watch)
                finally:
                    self._idle.appendleft(turn)
                    self._kick()
            if watch.result is None:
                await waiter.wait()
        finally:
            if watch.result is None:
                self.unwatch(watch)
        assert watch.result is not None
        return watch.result, watch.polls

    def take_early(self, task_id: str) -> TaskSnapshot | None:
        """The terminal snapshot a callback brought before ``task_id`` was tracked, or None."""
        return self.early(task_id) if self.early is not None else None

    def update(self, snapshot: TaskSnapshot) -> bool:
        """Apply news from outside (a callback); True when it concerned a tracked task."""
        watch = self._watches.get(snapshot.task_id)
        if watch is None:
            return self.on_news is not None and self.on_news(snapshot)
        if snapshot.state.is_terminal:
            now = anyio.current_time()
            self._learn(watch, snapshot, now, now)  # callbacks come as the task ends
            self._finish(watch, snapshot)
        return True

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled (the batch cancels it when its jobs are done)."""
        async with anyio.create_task_group() as group:
            for _ in range(self._poll.max_concurrent_queries):
                group.start_soon(self._worker)
            while True:
                now = anyio.current_time()
                self._dispatch(now)
                wake = min(self._heap[0][0] if self._heap else math.inf, self._lists.next_due())
                if wake <= now:
                    await anyio.lowlevel.checkpoint()
                    continue
                self._sleep_until = wake
                with anyio.move_on_after(wake - now):
                    await self._wakeup.wait()
                self._sleep_until = -math.inf
                self._wakeup = anyio.Event()

    def _dispatch(self, now: float) -> None:
        """Hand every due task (and every stage whose list refresh is due) to the workers."""
        heap = self._heap
        due: list[Watch] = []
        while heap and heap[0][0] <= now:
            when, watch = heapq.heappop(heap)
            if watch.result is not None or watch.busy or watch.due != when:
                continue  # finished, in flight, or rescheduled since
            end = self._ends.pop(watch.task_id, None) if self._ends else None
            if end is not None:
                self._finish(watch, end)  # called back before it was tracked
                continue
            if now - watch.started >= self._poll.timeout:
                timed_out = TaskSnapshot(task_id=watch.task_id, state=TaskState.TIMED_OUT)
                watch.ended = -(now - watch.started)
                self._finish(watch, timed_out)
                continue
            watch.busy = True
            due.append(watch)
        pages = self._lists.take_due(now) if self._poll.list_queries else []
        if not due and not pages:
            return
        if not self._poll.list_queries:
            self._queue.extend(due)
        else:
            by_stage: dict[str, tuple[list[Watch], set[int]]] = {}
            for stage, page in pages:
                by_stage.setdefault(stage, ([], set()))[1].add(page)
            for watch in due:
                by_stage.setdefault(watch.stage, ([], set()))[0].append(watch)
            for stage, (watches, turns) in by_stage.items():
                if self._lists.listed(stage):
                    self._lists.plan(stage, watches, turns)
                else:
                    self._queue.extend(watches)
        self._kick()

    def _schedule(self, watch: Watch, when: float) -> None:
        when = min(when, watch.started + self._poll.timeout)
        watch.due = when
        heapq.heappush(self._heap, (when, watch))
        self.wake(when)

    async def _worker(self) -> None:
        queue = self._queue
        while True:
            if queue:
                item = queue.popleft()
                if isinstance(item, str):
                    await self._lists.refresh(item)
                elif item.result is None:
                    await self._refresh_one(item)
                continue
            idle = anyio.Event()
            self._idle.append(idle)
            await idle.wait()

    def _kick(self) -> None:
        """Wake one idle worker per queued item (not all of them: no thundering herd)."""
        for _ in range(min(len(self._queue), len(self._idle))):
            self._idle.popleft().set()

    # -- refreshing ----------------------------------------------------------------------

    async def _refresh_one(self, watch: Watch) -> None:
        request = self._dialect.query_request(watch.stage, watch.task_id)
        try:
            self.requests += 1
            asked = loop_time()
            response = await self._requester.transport.send(request)
            snapshot = self._dialect.parse_query(watch.stage, watch.task_id, response)
        except KlingError as exc:
            self.query_failed(watch, exc)
            if self.on_event is not None:
                self.on_event(Polled(stage=watch.stage, tasks=0, requests=1))
            return
        if watch.result is None:
            self.apply(watch, snapshot, loop_time(), asked)
        if self.on_event is not None:
            self.on_event(Polled(stage=watch.stage, tasks=1, requests=1))

    def apply(
        self, watch: Watch, snapshot: TaskSnapshot, now: float, asked: float | None = None
    ) -> None:
        """Take an answer about ``watch``'s task, come at ``now``: finish it or poll again.

        ``asked``: when the request was sent, what the answer is as recent as.  Durations are
        learnt from it: the answer's arrival would add a round trip to each, a lag that tasks
        shorter than a few round trips would never unlearn (they would be polled later and
        later).  The next poll is planned from ``now``.
        """
        seen = now if asked is None else asked
        watch.busy = False
        watch.polls += 1
        watch.errors = 0
        before, watch.polled = watch.polled, seen
        if snapshot.state.is_terminal:
            self._learn(watch, snapshot, seen, (before + seen) / 2)
            self._finish(watch, snapshot)
            return
        self._schedule(watch, now + self._delay(watch, now))

    def _delay(self, watch: Watch, now: float) -> float:
        model = self.model(watch.stage)
        listed = self._poll.list_queries and watch.depth >= 0 and self._lists.listed(watch.stage)
        if listed and self._lists.is_deep(watch):
            # Only a deeper list page shows it, among few of our tasks: the page's own schedule
            # reads it (and the time-out still ends it).
            return math.inf
        if model is None:
            delay = poll_delay(self._poll, watch.polls, self._rng)
            if self._poll.adaptive:
                # Until the first model, keep looking every few first_delays: the back-off's
                # long intervals would cost the first tasks a long lag for a few saved polls.
                delay = min(delay, _COLD_INTERVALS * self._floor * (1 + self._poll.jitter))
        else:
            age = now - watch.started
            after = model.next_poll(age)
            base = self._poll.max_interval if after is None else after - age
            delay = min(max(base, self._learnt_floor), self._poll.max_interval)
            if not listed:
                # With list queries the earliest task sets the pace for all: no jitter there,
                # it would only pull every refresh earlier.
                delay *= 1.0 + self._poll.jitter * (2.0 * self._rng.random() - 1.0)
        if self.callbacks:
            # Callbacks finish tasks; polls only catch the ones that got lost.
            delay = max(delay, self._poll.callback_safety_interval)
        return delay

    def query_failed(self, watch: Watch, error: KlingError) -> None:
        """A status request about ``watch`` failed: stop the batch, fail the task, or retry."""
        watch.busy = False
        watch.errors += 1
        if error.fatal:
            self._on_fatal(error)
            return
        # A query creates nothing, and its task exists and may well succeed: any refusal short
        # of a fatal one is asked again, RetryPolicy.max_attempts times in all, before the job
        # fails with it (not found: the server may not show a new task yet; an unexpected code:
        # a gateway in trouble).  Failing at once lost the video of a task that went on.
        transient = error.retryable or watch.errors < self._retry.max_attempts
        if not transient:
            watch.ended = -(anyio.current_time() - watch.started)
            self._finish(watch, _failed(watch.task_id, error))
            return
        delay = retry_delay(
            self._retry, watch.errors, self._rng, retry_after=getattr(error, "retry_after", None)
        )
        logger.debug("query of %s failed (%s); next in %.2f s", watch.task_id, error, delay)
        if self.on_event is not None:
            request = self._dialect.query_request(watch.stage, watch.task_id)
            self.on_event(
                Retried(
                    method=request.method,
                    path=request.path,
                    attempt=watch.errors,
                    delay=delay,
                    error=type(error).__name__,
                )
            )
        self._schedule(watch, anyio.current_time() + max(delay, 0.0))

    def _finish(self, watch: Watch, snapshot: TaskSnapshot) -> None:
        if watch.result is not None:
            return
        watch.result = snapshot
        watch.busy = False
        self._drop(watch)
        watch.on_done(watch)

    def _drop(self, watch: Watch) -> None:
        if self._watches.get(watch.task_id) is watch:
            del self._watches[watch.task_id]
            self._ends.pop(watch.task_id, None)
            if self.on_unwatch is not None:
                self.on_unwatch(watch.task_id)

    # -- learning ------------------------------------------------------------------------

    def _learner(self, stage: str) -> Learner:
        learner = self._learners.get(stage)
        if learner is None:
            learner = self._learners[stage] = Learner()
        return learner

    def _learn(self, watch: Watch, snapshot: TaskSnapshot, now: float, ended: float) -> None:
        """Record how long ``watch``'s task took; it ended by ``now``, about at ``ended``."""
        if not self._poll.adaptive or watch.ended is not None:
            return
        learner = self._learner(watch.stage)
        first = learner.model is None
        learner.finished(watch, snapshot, now, ended, self._poll)
        if first and learner.model is not None:
            self._reschedule(watch.stage, now)

    def _reschedule(self, stage: str, now: float) -> None:
        """Bring polls forward that the back-off had put later than the new model asks."""
        for watch in self._watches.values():
            if watch.stage == stage and not watch.busy and watch.result is None:
                when = watch.polled + self._delay(watch, watch.polled)
                if when < watch.due:
                    self._schedule(watch, max(when, now))

    # -- what ListPages calls ----------------------------------------------------------

    def watched(self, stage: str) -> dict[str, Watch]:
        """The live watches of ``stage`` that the task list can show, by task id."""
        return {w.task_id: w for w in self._watches.values() if w.stage == stage and w.depth >= 0}

    def live_in(self, stage: str) -> int:
        """How many tasks of ``stage`` are tracked, counting no further than two."""
        count = 0
        for watch in self._watches.values():
            if watch.stage == stage:
                count += 1
                if count > 1:
                    break
        return count

    async def send(self, request: HttpRequest) -> HttpResponse:
        """Send a status request."""
        return await self._requester.transport.send(request)

    def query_each(self, watches: list[Watch]) -> None:
        """Have ``watches`` queried one by one."""
        self._queue.extend(watches)
        self._kick()

    def queue_list(self, stage: str) -> None:
        """Have a worker run the pending list refresh of ``stage``."""
        self._queue.append(stage)
        self._kick()

    def reschedule(self, watch: Watch, now: float) -> None:
        """Schedule ``watch``'s next poll afresh (its place in the list changed)."""
        self._schedule(watch, now + self._delay(watch, now))

    def fatal(self, error: KlingError) -> None:
        """An account-level error: the batch stops."""
        self._on_fatal(error)

    def wake(self, when: float) -> None:
        """Something falls due at ``when``: wake the loop if it sleeps past that."""
        if when < self._sleep_until:
            self._wakeup.set()


def _failed(task_id: str, error: KlingError) -> TaskSnapshot:
    code = getattr(error, "code", None)
    return TaskSnapshot(
        task_id=task_id,
        state=TaskState.FAILED,
        message=str(error),
        error_code=code if isinstance(code, int) else None,
    )
