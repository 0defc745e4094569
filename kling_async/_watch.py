"""What the tracker keeps per task (:class:`Watch`) and per stage (:class:`Learner`).

No I/O here: a watch is a small record (a tracker may hold a hundred thousand), a learner the
recent tasks of one stage and the duration model fitted to them (:mod:`._backoff`), and a
:class:`Waiter` what wakes a task waiting for its watch.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable

import anyio

from ._backoff import DurationModel, fit_durations
from ._config import PollPolicy
from ._results import TaskSnapshot

__all__ = ["Learner", "Waiter", "Watch", "loop_time"]

#: Tasks (the most recently started of a stage) the duration model is fitted to: at least this
#: many, and twice the live tasks up to _SAMPLE_MAX (see Learner).
_SAMPLE_SIZE = 256
_SAMPLE_MAX = 4096
#: Finished tasks needed before a model replaces the fixed back-off.
_MIN_SAMPLES = 8
#: Most finishes between two refits of a model.
_REFIT_EVERY = 8
#: Most times that a steady model's refits are spaced further than _REFIT_EVERY's rule.
_STRIDE_MAX = 4
#: Least time between two refits once a model exists, in seconds.  A refit costs about 0.3 ms
#: (the cohort sorted and walked); tasks that end within milliseconds would otherwise refit
#: a hundred times a second, a tenth of the batch's CPU, for schedules no finer than this.
_REFIT_GAP = 0.05


def loop_time() -> float:
    """The event loop's clock: what ``anyio.current_time()`` returns, for the per-task paths.

    ``anyio.current_time()`` looks the backend up on every call (half a microsecond, twice per
    task tracked).  A tracker only runs on asyncio, whose loop its queries' aiohttp session
    needs, where both read the same clock.
    """
    return asyncio.get_running_loop().time()


class Watch:
    """One tracked task: its schedule, poll count and, once it ends, its terminal snapshot.

    Kept small (slots, no event of its own): a tracker may hold a hundred thousand of them.
    ``on_done(watch)`` is called once, when ``result`` has been set.
    """

    __slots__ = (
        "busy",
        "depth",
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
        # Where the newest-first task list showed it last (0 for a new task); -1: beyond the
        # pages read, so it is queried on its own from then on.
        self.depth = 0
        # Seconds from start to a finish the server reported; negative: tracking stopped
        # otherwise after that many seconds (the task ran at least that long).
        self.ended: float | None = None
        self.result: TaskSnapshot | None = None

    def __repr__(self) -> str:
        return f"Watch({self.task_id!r}, stage={self.stage!r}, polls={self.polls})"

    def __lt__(self, other: Watch) -> bool:
        # Ties in the heap (equal due times) are broken by task id: any order will do.
        return self.task_id < other.task_id


class Waiter:
    """A watch's ``on_done`` that wakes a waiting task; its event exists only once one waits.

    A task due at once is usually answered by the waiting task's own query (see
    :meth:`~._tracker.Tracker.wait`), so most waits never need an event.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def __call__(self, watch: Watch) -> None:
        """Wake the waiting task, if there is one."""
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        """Wait for the call; only while the watch has no result (the call is still to come)."""
        self._event = anyio.Event()
        await self._event.wait()


class Learner:
    """The recent tasks of one stage and the duration model fitted to them.

    The cohort is the last tasks *started*: finished ones with their durations, running ones
    as "at least this long", so that the fit is not biased towards the tasks that happen to
    finish first.  It holds twice as many tasks as are live (at least ``_SAMPLE_SIZE``, at most
    ``_SAMPLE_MAX``): with 500 live tasks, the newest 256 would all be young and mostly running,
    and a fit to them overrates how soon older tasks end (a large account's list pages were
    then read half again as often as needed).
    """

    __slots__ = ("cohort", "fitted_at", "fresh", "model", "stride")

    def __init__(self) -> None:
        self.cohort: deque[Watch] = deque()
        self.fresh = 0
        self.model: DurationModel | None = None
        self.stride = 1  # finishes between refits, times the base rule's (see finished)
        self.fitted_at = -math.inf  # when the last refit was made

    def add(self, watch: Watch, live: int) -> None:
        """Take a newly tracked task into the cohort, ``live`` tasks being tracked in all."""
        cohort = self.cohort
        cohort.append(watch)
        keep = min(max(_SAMPLE_SIZE, 2 * live), _SAMPLE_MAX)
        while len(cohort) > keep:
            cohort.popleft()

    def refit(self, now: float, lag_share: float) -> None:
        self.fresh = 0
        self.fitted_at = now
        observations = [
            (now - w.started, False)
            if w.ended is None
            else (w.ended, True)
            if w.ended >= 0
            else (-w.ended, False)
            for w in self.cohort
        ]
        model = fit_durations(observations, lag_share, min_finished=_MIN_SAMPLES, keep=self.model)
        if model is None:
            return
        # While refits find what the model says already, they come further apart (up to
        # _STRIDE_MAX times the base rule); a change brings them back to the base rule.
        same = model is self.model
        self.stride = min(2 * self.stride, _STRIDE_MAX) if same else 1
        self.model = model

    def finished(
        self, watch: Watch, snapshot: TaskSnapshot, now: float, ended: float, poll: PollPolicy
    ) -> None:
        """Record that ``watch``'s task ended (seen at ``now``, about at ``ended``); maybe refit."""
        # The server's own timestamps say when the task ended; our poll only saw it later, and
        # learning "duration + lag" would stretch every schedule (by 5% at 3 minutes).
        observed = now - watch.started
        duration = ended - watch.started
        if snapshot.created_at is not None and snapshot.updated_at is not None:
            reported = snapshot.updated_at - snapshot.created_at
            if 0 < reported <= observed + poll.max_interval:
                duration = reported
        watch.ended = max(duration, 0.0)
        self.fresh += 1
        # Refit after every finish while few are known, then every 8, and in a cohort larger
        # than _SAMPLE_SIZE every 1/32 of it: a refit sorts the cohort, and at 4096 tasks one
        # refit per 64 finishes had doubled the CPU of taking a finish.
        size = len(self.cohort)
        every = max(_REFIT_EVERY, size // 32) if size >= _SAMPLE_SIZE else 1 + size // 32
        if self.fresh >= every * self.stride and (
            self.model is None or now - self.fitted_at >= _REFIT_GAP
        ):
            self.refit(now, poll.lag_share)
