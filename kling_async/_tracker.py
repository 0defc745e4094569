"""One coroutine that tracks every live task of a batch.

Instead of a sleeping coroutine per task, the tracker keeps a heap of next-poll times and a few
worker coroutines (``PollPolicy.max_concurrent_queries``) that send the status requests.  A
tracked task is a small :class:`Watch` record; whoever waits for it gets a callback.

When to poll comes from :mod:`._backoff`: a fixed back-off until the tracker has learnt, per
stage, how long tasks take (:func:`~._backoff.fit_durations`), then a schedule dense where
finishes are likely and sparse elsewhere.  Where the dialect has a list query (a page holds up
to 500 tasks, API.md section 1 "Query many") one request refreshes every live task of a stage:
it goes out when any task is due, or earlier once about ``PollPolicy.list_yield`` finishes are
expected.  Callbacks feed :meth:`Tracker.update` and finish a task at once.  Transient query
errors (5xx, transport, 1302) only postpone the next poll; they never fail a task.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from ._backoff import DurationModel, fit_durations, poll_delay, retry_delay
from ._config import PollPolicy, RetryPolicy
from ._errors import KlingError, NotFoundError
from ._requester import Requester
from ._results import TaskSnapshot, TaskState
from .dialects import Dialect

__all__ = ["Tracker", "Watch"]

logger = logging.getLogger("kling_async")

#: Tasks (the most recently started of a stage) the duration model is fitted to.
_SAMPLE_SIZE = 256
#: Finished tasks needed before a model replaces the fixed back-off.
_MIN_SAMPLES = 8
#: Most finishes between two refits of a model.
_REFIT_EVERY = 8
#: Most list pages read in one refresh; tasks not found by then are queried one by one.
_MAX_LIST_PAGES = 3


class Watch:
    """One tracked task: its schedule, poll count and, once it ends, its terminal snapshot.

    Kept small (slots, no event of its own): a tracker may hold a hundred thousand of them.
    ``on_done(watch)`` is called once, when ``result`` has been set.
    """

    __slots__ = (
        "busy",
        "due",
        "ended",
        "errors",
        "on_done",
        "polled",
        "polls",
        "result",
        "stage",
        "started",
        "task_id",
        "unlisted",
    )

    def __init__(
        self, task_id: str, stage: str, started: float, on_done: Callable[[Watch], None]
    ) -> None:
        self.task_id = task_id
        self.stage = stage
        self.started = started
        self.on_done = on_done
        self.due = math.inf
        self.polled = started  # when the last answer about the task came
        self.polls = 0
        self.errors = 0
        self.busy = False
        self.unlisted = False  # too old for the list pages: queried on its own
        # Seconds from start to a finish the server reported; negative: tracking stopped
        # otherwise after that many seconds (the task ran at least that long).
        self.ended: float | None = None
        self.result: TaskSnapshot | None = None

    def __repr__(self) -> str:
        return f"Watch({self.task_id!r}, stage={self.stage!r}, polls={self.polls})"

    def __lt__(self, other: Watch) -> bool:
        # Ties in the heap (equal due times) are broken by task id: any order will do.
        return self.task_id < other.task_id


class _Learner:
    """The recent tasks of one stage and the duration model fitted to them."""

    __slots__ = ("cohort", "fresh", "model")

    def __init__(self) -> None:
        self.cohort: deque[Watch] = deque(maxlen=_SAMPLE_SIZE)
        self.fresh = 0
        self.model: DurationModel | None = None

    def refit(self, now: float, lag_share: float) -> None:
        self.fresh = 0
        observations = [
            (now - w.started, False)
            if w.ended is None
            else (w.ended, True)
            if w.ended >= 0
            else (-w.ended, False)
            for w in self.cohort
        ]
        self.model = fit_durations(observations, lag_share, min_finished=_MIN_SAMPLES) or (
            self.model
        )


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
        self._callbacks = callbacks
        self._watches: dict[str, Watch] = {}
        self._heap: list[tuple[float, Watch]] = []
        self._wakeup = anyio.Event()
        self._sleep_until = math.inf
        self._queue: deque[Watch | str] = deque()  # a watch to query, or a stage to list
        self._work = anyio.Event()
        self._learners: dict[str, _Learner] = {}
        self._listable: dict[str, bool] = {}
        self._listing: dict[str, list[Watch]] = {}  # stage -> due watches the list must cover
        self._list_due: dict[str, float] = {}
        first = poll.first_delay or poll.max_interval / 100
        self._floor = min(first, poll.max_interval)
        self.requests = 0
        #: Called with each task id the tracker stops watching; the client remembers them so
        #: that a late or repeated callback about the task is answered 2xx, without effect.
        self.on_unwatch: Callable[[str], None] | None = None

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
        existing = self._watches.get(task_id)
        if existing is not None:
            first = existing.on_done

            def both(watch: Watch) -> None:
                first(watch)
                on_done(watch)

            existing.on_done = both
            return existing
        now = anyio.current_time()
        watch = Watch(task_id, stage, now, on_done)
        self._watches[task_id] = watch
        if self._poll.adaptive:
            self._learner(stage).cohort.append(watch)
        self._schedule(watch, now + self._delay(watch, now))
        return watch

    def unwatch(self, watch: Watch) -> None:
        """Stop tracking ``watch`` (its waiter went away); no callback runs."""
        if watch.result is None and watch.ended is None:
            watch.ended = -(anyio.current_time() - watch.started)
        self._drop(watch)

    async def wait(self, snapshot: TaskSnapshot, stage: str) -> tuple[TaskSnapshot, int]:
        """Track ``snapshot``'s task until it ends; return its terminal snapshot and poll count.

        A task still running after ``PollPolicy.timeout`` comes back as ``TIMED_OUT``.
        """
        if snapshot.state.is_terminal:
            return snapshot, 0
        ended = anyio.Event()
        watch = self.watch(snapshot.task_id, stage, lambda _: ended.set())
        try:
            await ended.wait()
        finally:
            if watch.result is None:
                self.unwatch(watch)
        assert watch.result is not None
        return watch.result, watch.polls

    def update(self, snapshot: TaskSnapshot) -> bool:
        """Apply news from outside (a callback); True when it concerned a tracked task."""
        watch = self._watches.get(snapshot.task_id)
        if watch is None:
            return False
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
                wake = min([self._heap[0][0] if self._heap else math.inf, *self._list_due.values()])
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
            if now - watch.started >= self._poll.timeout:
                timed_out = TaskSnapshot(task_id=watch.task_id, state=TaskState.TIMED_OUT)
                watch.ended = -(now - watch.started)
                self._finish(watch, timed_out)
                continue
            watch.busy = True
            due.append(watch)
        stages = [stage for stage, when in self._list_due.items() if when <= now]
        for stage in stages:
            del self._list_due[stage]
        if not due and not stages:
            return
        if not self._poll.list_queries:
            self._queue.extend(due)
        else:
            by_stage: dict[str, list[Watch]] = {stage: [] for stage in stages}
            for watch in due:
                by_stage.setdefault(watch.stage, []).append(watch)
            for stage, watches in by_stage.items():
                self._plan_refresh(stage, watches)
        self._work.set()

    def _plan_refresh(self, stage: str, due: list[Watch]) -> None:
        alone = [w for w in due if w.unlisted]
        if alone:
            self._queue.extend(alone)
            due = [w for w in due if not w.unlisted]
        listing = self._listing.get(stage)
        if listing is not None:
            listing.extend(due)  # the refresh in flight answers for them too
        elif self._listed(stage) and (len(due) > 1 or self._live_in(stage) > 1):
            self._listing[stage] = due
            self._queue.append(stage)
        else:
            # One task: a single query costs the same and never misses (list pages hold only
            # the newest tasks).
            self._queue.extend(due)

    def _schedule(self, watch: Watch, when: float) -> None:
        when = min(when, watch.started + self._poll.timeout)
        watch.due = when
        heapq.heappush(self._heap, (when, watch))
        if when < self._sleep_until:
            self._wakeup.set()

    async def _worker(self) -> None:
        queue = self._queue
        while True:
            if queue:
                item = queue.popleft()
                if isinstance(item, str):
                    await self._refresh_by_list(item)
                elif item.result is None:
                    await self._refresh_one(item)
                continue
            if self._work.is_set():
                self._work = anyio.Event()
            await self._work.wait()

    # -- refreshing ----------------------------------------------------------------------

    async def _refresh_one(self, watch: Watch) -> None:
        request = self._dialect.query_request(watch.stage, watch.task_id)
        try:
            self.requests += 1
            response = await self._requester.transport.send(request)
            snapshot = self._dialect.parse_query(watch.stage, watch.task_id, response)
        except KlingError as exc:
            self._query_failed(watch, exc)
            return
        if watch.result is None:
            self._apply(watch, snapshot, anyio.current_time())

    async def _refresh_by_list(self, stage: str) -> None:
        wanted = {
            w.task_id: w for w in self._watches.values() if w.stage == stage and not w.unlisted
        }
        page_size = min(self._dialect.list_page_size, max(30, 2 * len(wanted)))
        found: dict[str, TaskSnapshot] = {}
        try:
            for page in range(1, _MAX_LIST_PAGES + 1):
                request = self._dialect.list_request(stage, page, page_size)
                if request is None:
                    break
                self.requests += 1
                response = await self._requester.transport.send(request)
                snapshots = self._dialect.parse_list(stage, response)
                found.update((s.task_id, s) for s in snapshots if s.task_id in wanted)
                # Read further only for a task that is due: the others can wait their turn.
                due = self._listing.get(stage, ())
                if len(snapshots) < page_size or all(w.task_id in found for w in due):
                    break
        except KlingError as exc:
            for watch in self._listing.pop(stage, []):
                self._query_failed(watch, exc)
            return
        now = anyio.current_time()
        for task_id, snapshot in found.items():
            watch = wanted[task_id]
            if watch.result is None:
                self._apply(watch, snapshot, now)
        for watch in self._listing.pop(stage, []):
            if watch.result is None and watch.task_id not in found:
                # Not on the newest pages (newer tasks crowd them): ask directly, from now on.
                watch.unlisted = True
                self._queue.append(watch)
                self._work.set()
        self._plan_list(stage, now)

    def _plan_list(self, stage: str, now: float) -> None:
        """Refresh ``stage`` early once about ``list_yield`` of its tasks should have ended."""
        learner = self._learners.get(stage)
        model = learner.model if learner else None
        if model is None:
            return
        rate = sum(
            model.hazard(now - w.started)
            for w in self._watches.values()
            if w.stage == stage and w.result is None
        )
        if rate <= 0:
            return
        when = now + max(self._floor, self._poll.list_yield / rate)
        self._list_due[stage] = when
        if when < self._sleep_until:
            self._wakeup.set()

    def _apply(self, watch: Watch, snapshot: TaskSnapshot, now: float) -> None:
        watch.busy = False
        watch.polls += 1
        watch.errors = 0
        before, watch.polled = watch.polled, now
        if snapshot.state.is_terminal:
            self._learn(watch, snapshot, now, (before + now) / 2)
            self._finish(watch, snapshot)
            return
        self._schedule(watch, now + self._delay(watch, now))

    def _delay(self, watch: Watch, now: float) -> float:
        model = self.model(watch.stage)
        if model is None:
            delay = poll_delay(self._poll, watch.polls, self._rng)
        else:
            age = now - watch.started
            after = model.next_poll(age)
            base = self._poll.max_interval if after is None else after - age
            base = min(max(base, self._floor), self._poll.max_interval)
            delay = base * (1.0 + self._poll.jitter * (2.0 * self._rng.random() - 1.0))
        if self._callbacks:
            # Callbacks finish tasks; polls only catch the ones that got lost.
            delay = max(delay, self._poll.callback_safety_interval)
        return delay

    def _query_failed(self, watch: Watch, error: KlingError) -> None:
        watch.busy = False
        watch.errors += 1
        if error.fatal:
            self._on_fatal(error)
            return
        transient = error.retryable or (
            isinstance(error, NotFoundError) and watch.errors < self._retry.max_attempts
        )
        if not transient:
            watch.ended = -(anyio.current_time() - watch.started)
            self._finish(watch, _failed(watch.task_id, error))
            return
        delay = retry_delay(
            self._retry, watch.errors, self._rng, retry_after=getattr(error, "retry_after", None)
        )
        logger.debug("query of %s failed (%s); next in %.2f s", watch.task_id, error, delay)
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
            if self.on_unwatch is not None:
                self.on_unwatch(watch.task_id)

    # -- learning ------------------------------------------------------------------------

    def _learner(self, stage: str) -> _Learner:
        learner = self._learners.get(stage)
        if learner is None:
            learner = self._learners[stage] = _Learner()
        return learner

    def _learn(self, watch: Watch, snapshot: TaskSnapshot, now: float, ended: float) -> None:
        """Record how long ``watch``'s task took; it ended by ``now``, about at ``ended``."""
        if not self._poll.adaptive or watch.ended is not None:
            return
        # The server's own timestamps say when the task ended; our poll only saw it later, and
        # learning "duration + lag" would stretch every schedule (by 5% at 3 minutes).
        observed = now - watch.started
        duration = ended - watch.started
        if snapshot.created_at is not None and snapshot.updated_at is not None:
            reported = snapshot.updated_at - snapshot.created_at
            if 0 < reported <= observed + self._poll.max_interval:
                duration = reported
        watch.ended = max(duration, 0.0)
        learner = self._learner(watch.stage)
        learner.fresh += 1
        # Refit after every finish while few are known, then every few (it sorts the cohort).
        if learner.fresh >= min(_REFIT_EVERY, 1 + len(learner.cohort) // 32):
            learner.refit(now, self._poll.lag_share)

    def _listed(self, stage: str) -> bool:
        listed = self._listable.get(stage)
        if listed is None:
            listed = self._listable[stage] = (
                self._dialect.list_page_size > 0
                and self._dialect.list_request(stage, 1, 1) is not None
            )
        return listed

    def _live_in(self, stage: str) -> int:
        count = 0
        for watch in self._watches.values():
            if watch.stage == stage:
                count += 1
                if count > 1:
                    break
        return count


def _failed(task_id: str, error: KlingError) -> TaskSnapshot:
    return TaskSnapshot(
        task_id=task_id, state=TaskState.FAILED, message=str(error), error_code=_code(error)
    )


def _code(error: Any) -> int | None:
    code = getattr(error, "code", None)
    return code if isinstance(code, int) else None
