"""Refreshing many live tasks at once from the newest-first task list.

Where the dialect has a list query (docs/protocol.md, Query many: up to 500 tasks a page,
newest first, finished tasks included) one request refreshes every live task on a page.  Page
``p`` of size ``s`` holds the tasks at depths ``(p - 1) * s`` to ``p * s - 1``; a task sinks as
newer ones are created, so long-running tasks end up on deeper pages, among few of ours.

Each page is read on its own schedule: when about ``PollPolicy.list_yield`` of its tasks should
have ended since it was last read (by the learnt duration model), never more often than every
``list_min_interval`` and at least every ``max_interval``.  The first page is also read
whenever one of its tasks is due by its own schedule (with few live tasks that is what keeps
the lag short).
A task found missing from its page has sunk: it waits for the next page's turn instead of
having that page read at once (chasing every sinking task had cost a deep read per first-page
read), and past ``_MAX_PAGES`` it is queried on its own.

A list answer concerns the tasks it lists, never more: a row the client cannot read sends its
task to be queried on its own, a list query the server refuses (or that keeps failing for
``max_interval``) has the stage's tasks queried one by one (for good, or for as long).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

import anyio

from ._backoff import DurationModel
from ._config import PollPolicy
from ._errors import KlingError, MalformedResponseError
from ._http import HttpRequest, HttpResponse
from ._results import TaskSnapshot
from ._watch import Watch
from .dialects import Dialect
from .events import Event, Polled

__all__ = ["ListPages", "PageHost"]

logger = logging.getLogger("kling_async")


class PageHost(Protocol):
    """What :class:`ListPages` needs from the tracker it reads pages for (``_tracker.Tracker``).

    A narrow interface in the lower module, so that the tracker imports the page reader and not
    the other way round.
    """

    callbacks: bool
    requests: int
    #: The batch's event sink (:mod:`kling_async.events`), if it has a callback.
    on_event: Callable[[Event], None] | None

    def watched(self, stage: str) -> dict[str, Watch]:
        """The live watches of ``stage`` that the task list can show, by task id."""
        ...

    def live_in(self, stage: str) -> int:
        """How many tasks of ``stage`` are tracked, counting no further than two."""
        ...

    def model(self, stage: str) -> DurationModel | None:
        """What has been learnt of ``stage``'s durations."""
        ...

    async def send(self, request: HttpRequest) -> HttpResponse:
        """Send a status request."""
        ...

    def apply(
        self, watch: Watch, snapshot: TaskSnapshot, now: float, asked: float | None = None
    ) -> None:
        """Take an answer about ``watch``'s task, come at ``now`` to a request sent at ``asked``."""
        ...

    def query_failed(self, watch: Watch, error: KlingError) -> None:
        """A status request about ``watch`` failed."""
        ...

    def query_each(self, watches: list[Watch]) -> None:
        """Have ``watches`` queried one by one."""
        ...

    def queue_list(self, stage: str) -> None:
        """Have a worker run the pending list refresh of ``stage``."""
        ...

    def reschedule(self, watch: Watch, now: float) -> None:
        """Schedule ``watch``'s next poll afresh."""
        ...

    def fatal(self, error: KlingError) -> None:
        """An account-level error: the batch stops."""
        ...

    def wake(self, when: float) -> None:
        """Something falls due at ``when``."""
        ...


#: Deepest list page read; tasks sunk below it are queried one by one.
_MAX_PAGES = 5
#: The page number, in the schedule of pages, of the moment a failing list query is retried.
_RELIST = 0
#: Smallest page read.
_MIN_PAGE_SIZE = 30
#: Depths of the last tasks seen ending that size a stage's pages, and how many are needed.
_DEPTH_SAMPLES = 256
_DEPTH_MIN_SAMPLES = 32


class ListPages:
    """The list-query side of a :class:`~._tracker.Tracker`: which pages to read, and when."""

    def __init__(self, tracker: PageHost, dialect: Dialect, poll: PollPolicy) -> None:
        self._tracker = tracker
        self._dialect = dialect
        self._poll = poll
        self._floor = min(poll.list_min_interval, poll.max_interval)
        self._listable: dict[str, bool] = {}
        self._size: dict[str, int] = {}
        self._finish_depths: dict[str, deque[int]] = {}  # stage -> where tasks were seen ending
        self._read_at: dict[tuple[str, int], float] = {}  # (stage, page) -> last read
        self._due: dict[tuple[str, int], float] = {}  # (stage, page) -> next read by its schedule
        # stage -> (due first-page watches the refresh answers for, pages whose turn it is)
        self._pending: dict[str, tuple[list[Watch], set[int]]] = {}
        self._failing_since: dict[str, float] = {}  # stage -> first failed read since a good one

    def listed(self, stage: str) -> bool:
        """Whether ``stage`` has a list query at all."""
        listed = self._listable.get(stage)
        if listed is None:
            listed = self._listable[stage] = (
                self._dialect.list_page_size > 0
                and self._dialect.list_request(stage, 1, 1) is not None
            )
        return listed

    def is_deep(self, watch: Watch) -> bool:
        """Whether ``watch`` is on a deeper page than the first (read by its page's schedule)."""
        return watch.depth >= self._size.get(watch.stage, self._dialect.list_page_size)

    def next_due(self) -> float:
        """When the earliest page is due (``inf``: none)."""
        return min(self._due.values(), default=math.inf)

    def take_due(self, now: float) -> list[tuple[str, int]]:
        """The pages due by ``now``, no longer scheduled."""
        pages = [key for key, when in self._due.items() if when <= now]
        for key in pages:
            del self._due[key]
            if key[1] == _RELIST:
                self._listable.pop(key[0], None)  # the list query is tried again (_failed)
        return [key for key in pages if key[1] != _RELIST]

    def plan(self, stage: str, due: list[Watch], pages: set[int]) -> None:
        """Have ``due`` watches and the ``pages`` whose turn it is refreshed by one worker."""
        tracker = self._tracker
        alone = [w for w in due if w.depth < 0]
        if alone:
            tracker.query_each(alone)
            due = [w for w in due if w.depth >= 0]
        if not due and not pages:
            return
        pending = self._pending.get(stage)
        if pending is not None:
            pending[0].extend(due)  # the refresh in flight answers for them too
            pending[1].update(pages)
        elif len(due) > 1 or pages or tracker.live_in(stage) > 1:
            self._pending[stage] = (due, set(pages))
            tracker.queue_list(stage)
        else:
            # One task: a single query costs the same and never misses (the list holds only
            # the newest tasks).
            tracker.query_each(due)

    async def refresh(self, stage: str) -> None:
        """Read the pages the pending refresh of ``stage`` calls for; apply what they show."""
        tracker = self._tracker
        # plan() adds to these in place while a page is being read.
        due, turns = self._pending[stage]
        wanted = tracker.watched(stage)
        size = self._size[stage] = self._page_size(stage, len(wanted))
        # task id -> (snapshot, depth, when its page was asked for: see Tracker.apply)
        found: dict[str, tuple[TaskSnapshot, int, float]] = {}
        read: set[int] = set()
        bad: dict[str, KlingError] = {}  # task id -> why its row could not be read
        sent = 0
        try:
            while True:
                expected = {1 + w.depth // size for w in due if w.task_id not in found}
                unread = {p for p in expected | turns if p not in read and p <= _MAX_PAGES}
                if not unread:
                    break
                page = min(unread)
                request = self._dialect.list_request(stage, page, size)
                if request is None:
                    break
                tracker.requests += 1
                sent += 1
                asked = anyio.current_time()
                response = await tracker.send(request)
                rows, snapshots, unreadable = self._parse(stage, response, wanted)
                for task_id, error in unreadable:
                    bad[task_id] = error
                read.add(page)
                self._read_at[stage, page] = anyio.current_time()
                first = (page - 1) * size
                for index, snapshot in snapshots:
                    found[snapshot.task_id] = (snapshot, first + index, asked)
                if rows < size:
                    read.update(range(page + 1, _MAX_PAGES + 1))  # the last page: none deeper
                    break
        except KlingError as exc:
            self._failed(stage, exc)
            if tracker.on_event is not None:
                tracker.on_event(Polled(stage=stage, tasks=0, requests=sent))
            return
        if tracker.on_event is not None:
            tracker.on_event(Polled(stage=stage, tasks=len(found), requests=sent))
        del self._pending[stage]
        self._failing_since.pop(stage, None)
        now = anyio.current_time()
        depths = self._finish_depths.setdefault(stage, deque(maxlen=_DEPTH_SAMPLES))
        for task_id, (snapshot, depth, asked) in found.items():
            watch = wanted[task_id]
            watch.depth = depth
            if snapshot.state.is_terminal:
                depths.append(depth)
            if watch.result is None:
                tracker.apply(watch, snapshot, now, asked)
        for task_id, error in bad.items():
            watch = wanted[task_id]
            if task_id not in found and watch.result is None:
                self._unlisted(watch, error, now)
        for watch in wanted.values():
            if watch.task_id in found:
                continue
            page = 1 + watch.depth // size
            if page in read or page > _MAX_PAGES:
                # Beyond the pages read (a gateway's pages larger than asked for showed it
                # there, or pages have shrunk since): no read would look for it, and its own
                # schedule had left it to its page's; it is asked on its own from now on.
                self._sink(watch, size, now)
        late = [w for w in due if w.result is None and w.busy and w.task_id not in found]
        for watch in late:
            watch.busy = False
        if late:
            # Joined after their page was read: one more refresh answers for them.
            self.plan(stage, late, set())
        self._replan(stage, now)

    def _parse(
        self, stage: str, response: HttpResponse, wanted: dict[str, Watch]
    ) -> tuple[int, list[tuple[int, TaskSnapshot]], list[tuple[str, KlingError]]]:
        """A page's row count, the snapshots of ``wanted`` tasks, and the rows it cannot read.

        One unreadable row (a state word the client does not know, a success without its
        video) must not fail the page: every other task on it would wait for that task's
        time-out, and the ones older than it time out themselves.  When the page does not parse
        as a whole but its envelope does, the rows at fault are found by halving the ids
        looked for (a few parses of the page per bad row; none on a well-formed page).
        """
        dialect = self._dialect
        try:
            rows, snapshots = dialect.parse_list_page(stage, response, wanted)
            return rows, snapshots, []
        except MalformedResponseError:
            rows, _ = dialect.parse_list_page(stage, response, ())  # the page's own fault: raised
        snapshots = []
        unreadable: list[tuple[str, KlingError]] = []
        parts = [list(wanted)]
        while parts:
            ids = parts.pop()
            try:
                snapshots.extend(dialect.parse_list_page(stage, response, set(ids))[1])
            except MalformedResponseError as exc:
                if len(ids) == 1:
                    unreadable.append((ids[0], exc))
                else:
                    parts += [ids[: len(ids) // 2], ids[len(ids) // 2 :]]
        snapshots.sort(key=lambda item: item[0])
        return rows, snapshots, unreadable

    def _unlistable(self, stage: str, error: KlingError, until: float = math.inf) -> None:
        """``stage``'s list query does not work: its tasks are queried one by one ``until`` then.

        A refusal (a gateway without the list route, or with page limits of its own: 1201,
        1202, 404) is about the list request, not about the tasks it was to refresh: failing
        them had failed every running job of the batch.  A list read failing on for
        ``max_interval`` (a broken list route answering 5xx) had every task time out.
        """
        logger.warning("list query of %s failed (%s); querying tasks one by one", stage, error)
        self._listable[stage] = False
        for key in [k for k in self._due if k[0] == stage]:
            del self._due[key]
        if until < math.inf:
            self._schedule(stage, _RELIST, until)
        now = anyio.current_time()
        for watch in self._tracker.watched(stage).values():
            # Those the refresh was for, and those left to a deeper page's turn.
            watch.busy = False
            self._tracker.reschedule(watch, now)

    def _unlisted(self, watch: Watch, error: KlingError, now: float) -> None:
        """``watch``'s row could not be read: the task is asked about on its own from now on.

        Its own query may well answer it (a list row can be briefer than a task's answer); if
        not, that query's errors are its own, retried and timed out as any query's.
        """
        logger.warning(
            "task %s: its list row is unreadable (%s); querying it alone", watch.task_id, error
        )
        watch.busy = False
        watch.depth = -1
        self._tracker.reschedule(watch, now)

    def _page_size(self, stage: str, live: int) -> int:
        """How many rows a page of ``stage`` should hold, ``live`` tasks being watched.

        A page costs its rows (the server renders them, we decode them): four times the live
        tasks, the first guess, made page reads of a batch of short tasks four times the work
        they needed (benchmarks/README.md, round three).  Once enough tasks have been seen
        ending, the first page reaches where they end (the 99th percentile of their depths,
        with a quarter more room): about four times the live tasks for minutes-long tasks of
        typical spread, little more than the live tasks for tasks that end at once.  Tasks
        beyond it are found on deeper pages, and their depths widen the first page again.
        A change under a quarter is not made: page boundaries stay put while the estimate
        wavers.
        """
        cap = self._dialect.list_page_size
        current = self._size.get(stage, 0)
        depths = self._finish_depths.get(stage)
        if depths is None or len(depths) < _DEPTH_MIN_SAMPLES:
            # Nothing learnt yet: grow with the tasks to cover, never shrink (the first long
            # tasks of a batch are still found where they sank).
            return min(cap, max(_MIN_PAGE_SIZE, 4 * live, current))
        ordered = sorted(depths)
        reach = ordered[(len(ordered) - 1) * 99 // 100] + 1
        wanted = min(cap, max(_MIN_PAGE_SIZE, live + live // 4, reach + reach // 4))
        if current and abs(wanted - current) * 4 < current:
            return current
        return wanted

    def _sink(self, watch: Watch, size: int, now: float) -> None:
        """``watch`` was not on its page: newer tasks pushed it to the next one."""
        watch.busy = False
        page = 2 + watch.depth // size
        if page > _MAX_PAGES:
            # Too deep to list cheaply: asked directly, by its own schedule, from now on.
            watch.depth = -1
        else:
            watch.depth = (page - 1) * size  # it waits for that page's turn
            self._read_at.setdefault((watch.stage, page), now)  # its wait starts now
        self._tracker.reschedule(watch, now)

    def _replan(self, stage: str, now: float) -> None:
        """Set each page's next read from its last one and the finishes expected on it."""
        tracker = self._tracker
        model = tracker.model(stage)
        size = self._size.get(stage, self._dialect.list_page_size)
        rates: dict[int, float] = {}
        for watch in tracker.watched(stage).values():
            page = 1 + watch.depth // size
            hazard = model.hazard(now - watch.started) if model is not None else 0.0
            rates[page] = rates.get(page, 0.0) + hazard
        for key in [k for k in self._due if k[0] == stage and k[1] not in rates]:
            del self._due[key]
        for page, rate in rates.items():
            if page == 1 and model is None:
                continue  # before a model, first-page tasks keep their own back-off
            interval = self._poll.list_yield / rate if rate > 0 else math.inf
            interval = min(max(interval, self._floor), self._poll.max_interval)
            if tracker.callbacks:
                interval = max(interval, self._poll.callback_safety_interval)
            self._schedule(stage, page, self._read_at.get((stage, page), now) + interval)

    def _schedule(self, stage: str, page: int, when: float) -> None:
        self._due[stage, page] = when
        self._tracker.wake(when)

    def _failed(self, stage: str, error: KlingError) -> None:
        tracker = self._tracker
        due, turns = self._pending.pop(stage, ([], set()))
        if not error.fatal and not error.retryable:
            self._unlistable(stage, error)
            return
        now = anyio.current_time()
        since = self._failing_since.setdefault(stage, now)
        if not error.fatal and now - since >= self._poll.max_interval:
            # Failing for a while (a list route broken on its own, or an outage): no task
            # waits on it any longer; lists are tried again after as long.
            del self._failing_since[stage]
            self._unlistable(stage, error, until=now + self._poll.max_interval)
            return
        for watch in due:
            tracker.query_failed(watch, error)
        if not due and error.fatal:
            tracker.fatal(error)
        for page in turns:
            # Transient: the page's turn comes again after the shortest interval.
            self._schedule(stage, page, now + self._floor)
