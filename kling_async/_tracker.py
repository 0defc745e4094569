"""One coroutine that tracks every live task of a batch.

Instead of a sleeping coroutine per task, the tracker keeps a heap of next-poll times.  When
tasks fall due it refreshes them with one paged list query where the dialect has one (a page
holds up to 500 tasks, API.md section 1 "Query many"), else with single queries, at most
``PollPolicy.max_concurrent_queries`` at once.  Callbacks feed :meth:`Tracker.update` and
finish a task at once.  Transient query errors (5xx, transport, 1302) only postpone the next
poll; they never fail a task.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
import random
from collections.abc import Callable
from typing import Any

import anyio
import attrs

from ._backoff import poll_delay, retry_delay
from ._config import PollPolicy, RetryPolicy
from ._errors import KlingError, NotFoundError
from ._requester import Requester
from ._results import TaskSnapshot, TaskState
from .dialects import Dialect

__all__ = ["Tracker", "Watch"]

logger = logging.getLogger("kling_async")

#: Finished-task durations kept for learning when to poll first.
_SAMPLE_SIZE = 256
#: Samples needed before the learnt first delay replaces ``PollPolicy.first_delay``.
_MIN_SAMPLES = 8
#: Most list pages read in one refresh; tasks not found by then are queried one by one.
_MAX_LIST_PAGES = 3


@attrs.define(eq=False)
class Watch:
    """One tracked task: its schedule, poll count and, once it ends, its terminal snapshot."""

    task_id: str
    stage: str
    started: float
    due: float
    polls: int = 0
    errors: int = 0
    busy: bool = False
    generation: int = 0
    result: TaskSnapshot | None = None
    done: anyio.Event = attrs.field(factory=anyio.Event)


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
        self._heap: list[tuple[float, int, int, Watch]] = []
        self._seq = itertools.count()
        self._wakeup = anyio.Event()
        self._limiter = anyio.CapacityLimiter(poll.max_concurrent_queries)
        self._durations: list[float] = []
        self.requests = 0
        #: Called with each task id the tracker stops watching; the client remembers them so
        #: that a late or repeated callback about the task is answered 2xx, without effect.
        self.on_unwatch: Callable[[str], None] | None = None

    @property
    def live(self) -> int:
        """How many tasks are being tracked."""
        return len(self._watches)

    # -- what jobs call ------------------------------------------------------------------

    async def wait(self, snapshot: TaskSnapshot, stage: str) -> tuple[TaskSnapshot, int]:
        """Track ``snapshot``'s task until it ends; return its terminal snapshot and poll count.

        A task still running after ``PollPolicy.timeout`` comes back as ``TIMED_OUT``.
        """
        if snapshot.state.is_terminal:
            return snapshot, 0
        now = anyio.current_time()
        first = self._delay(0)
        watch = Watch(task_id=snapshot.task_id, stage=stage, started=now, due=now + first)
        self._watches[watch.task_id] = watch
        self._schedule(watch, watch.due)
        try:
            await watch.done.wait()
        finally:
            self._watches.pop(watch.task_id, None)
            if self.on_unwatch is not None:
                self.on_unwatch(watch.task_id)
        assert watch.result is not None
        return watch.result, watch.polls

    def update(self, snapshot: TaskSnapshot) -> bool:
        """Apply news from outside (a callback); True when it concerned a tracked task."""
        watch = self._watches.get(snapshot.task_id)
        if watch is None:
            return False
        if snapshot.state.is_terminal:
            self._finish(watch, snapshot)
        return True

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until cancelled (the batch cancels it when its jobs are done)."""
        async with anyio.create_task_group() as group:
            while True:
                now = anyio.current_time()
                due = self._pop_due(now)
                if due:
                    if self._use_list(due):
                        group.start_soon(self._refresh_by_list, due)
                    else:
                        for watch in due:
                            group.start_soon(self._refresh_one, watch)
                    continue
                delay = self._heap[0][0] - now if self._heap else math.inf
                with anyio.move_on_after(delay):
                    await self._wakeup.wait()
                self._wakeup = anyio.Event()

    def _pop_due(self, now: float) -> list[Watch]:
        due: list[Watch] = []
        while self._heap and self._heap[0][0] <= now:
            _, generation, _, watch = heapq.heappop(self._heap)
            if generation != watch.generation or watch.done.is_set() or watch.busy:
                continue  # rescheduled since, or finished
            if now - watch.started >= self._poll.timeout:
                self._finish(watch, TaskSnapshot(task_id=watch.task_id, state=TaskState.TIMED_OUT))
                continue
            watch.busy = True
            due.append(watch)
        return due

    def _schedule(self, watch: Watch, when: float) -> None:
        watch.generation += 1
        deadline = watch.started + self._poll.timeout
        when = min(when, deadline)
        watch.due = when
        heapq.heappush(self._heap, (when, watch.generation, next(self._seq), watch))
        if self._heap[0][3] is watch:
            self._wakeup.set()

    def _use_list(self, due: list[Watch]) -> bool:
        # One list request beats several single ones; with a single task due, a single query is
        # as cheap and never misses (list pages hold only the newest tasks).
        return (
            self._poll.list_queries
            and self._dialect.list_page_size > 0
            and (len(due) > 1 or len(self._watches) > 1)
            and all(watch.stage == due[0].stage for watch in due)
        )

    # -- refreshing ----------------------------------------------------------------------

    async def _refresh_one(self, watch: Watch) -> None:
        request = self._dialect.query_request(watch.stage, watch.task_id)
        async with self._limiter:
            try:
                self.requests += 1
                response = await self._requester.transport.send(request)
                snapshot = self._dialect.parse_query(watch.stage, watch.task_id, response)
            except KlingError as exc:
                self._query_failed(watch, exc)
                return
        self._apply(watch, snapshot)

    async def _refresh_by_list(self, due: list[Watch]) -> None:
        stage = due[0].stage
        wanted = {w.task_id: w for w in self._watches.values() if w.stage == stage}
        page_size = min(self._dialect.list_page_size, max(30, 2 * len(wanted)))
        found: dict[str, TaskSnapshot] = {}
        async with self._limiter:
            try:
                for page in range(1, _MAX_LIST_PAGES + 1):
                    request = self._dialect.list_request(stage, page, page_size)
                    if request is None:
                        break
                    self.requests += 1
                    response = await self._requester.transport.send(request)
                    snapshots = self._dialect.parse_list(stage, response)
                    found.update((s.task_id, s) for s in snapshots if s.task_id in wanted)
                    if len(snapshots) < page_size or wanted.keys() <= found.keys():
                        break
            except KlingError as exc:
                for watch in due:
                    self._query_failed(watch, exc)
                return
        for task_id, snapshot in found.items():
            watch = wanted[task_id]
            if watch.busy or watch in due:
                self._apply(watch, snapshot)
            elif snapshot.state.is_terminal:
                watch.polls += 1
                self._finish(watch, snapshot)
        for watch in due:
            if watch.task_id not in found:
                # Not on the newest pages (other clients' tasks crowd them): ask directly.
                await self._refresh_one(watch)

    def _apply(self, watch: Watch, snapshot: TaskSnapshot) -> None:
        watch.busy = False
        watch.polls += 1
        watch.errors = 0
        if snapshot.state.is_terminal:
            self._learn(anyio.current_time() - watch.started)
            self._finish(watch, snapshot)
            return
        self._schedule(watch, anyio.current_time() + self._delay(watch.polls))

    def _delay(self, polls: int) -> float:
        delay = poll_delay(self._poll, polls, self._rng, first=self._learnt_first_delay())
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
            self._finish(watch, _failed(watch.task_id, error))
            return
        delay = retry_delay(
            self._retry, watch.errors, self._rng, retry_after=getattr(error, "retry_after", None)
        )
        logger.debug("query of %s failed (%s); next in %.2f s", watch.task_id, error, delay)
        self._schedule(watch, anyio.current_time() + max(delay, 0.0))

    def _finish(self, watch: Watch, snapshot: TaskSnapshot) -> None:
        if watch.done.is_set():
            return
        watch.result = snapshot
        watch.busy = False
        watch.done.set()

    # -- learning when to poll first -----------------------------------------------------

    def _learn(self, duration: float) -> None:
        if not self._poll.adaptive:
            return
        bisect.insort(self._durations, duration)
        if len(self._durations) > _SAMPLE_SIZE:
            # Drop from alternating ends so the sample keeps its shape.
            self._durations.pop(0 if len(self._durations) % 2 else -1)

    def _learnt_first_delay(self) -> float | None:
        if not self._poll.adaptive or len(self._durations) < _MIN_SAMPLES:
            return None
        # The 10th percentile: few tasks are done before it, so earlier polls would be wasted.
        learnt = self._durations[len(self._durations) // 10]
        return max(self._poll.first_delay, learnt)


def _failed(task_id: str, error: KlingError) -> TaskSnapshot:
    return TaskSnapshot(
        task_id=task_id, state=TaskState.FAILED, message=str(error), error_code=_code(error)
    )


def _code(error: Any) -> int | None:
    code = getattr(error, "code", None)
    return code if isinstance(code, int) else None
