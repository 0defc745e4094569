"""One poller for every worker of a shared journal: status polling is not multiplied by workers.

Each worker of a shared (PostgreSQL) journal runs a :class:`SharedTracking`.  One worker at a
time holds the journal's poll seat (:class:`PollSeat`: a PostgreSQL advisory lock, released
when its connection dies, so a killed poller's seat is taken within one ``interval``).  The
holder's :class:`~._tracker.Tracker` follows every live task of the batch, its own and the
other workers', and records each terminal state it sees in the journal.  The others send no
status requests: every ``interval`` one query reads the recorded states of all their waiting
tasks.  A callback still finishes a task at once on the worker that receives it, and a task
still running after ``PollPolicy.timeout`` still comes back ``TIMED_OUT`` (its slot then kept
as without a journal, see :mod:`._slots`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import anyio

from ._errors import KlingError
from ._results import TaskSnapshot, TaskState
from ._tracker import Tracker
from ._watch import Watch

__all__ = ["PollSeat", "SharedTracking"]

logger = logging.getLogger("kling_async")

#: Longest a look at the journal may hold up the batch's end (a database that hangs).
_TURN_MAX = 5.0


class PollSeat(Protocol):
    """The journal's side of the election (``kling_async.journal._pg_poll.PgPollSeat``)."""

    #: Seconds between two looks at the journal (new tasks to follow, recorded states).
    interval: float

    async def lead(self, waiting: Sequence[str]) -> tuple[bool, dict[str, TaskSnapshot]]:
        """Take the seat if free (True: held now), and read the recorded ends of ``waiting``."""

    async def live(
        self, waiting: Sequence[str]
    ) -> tuple[list[tuple[str, str]], dict[str, TaskSnapshot]] | None:
        """Every live task of the batch, and the recorded ends of ``waiting``.

        ``(task_id, stage)`` pairs and snapshots by task id; None: the seat was lost.
        """

    async def record(self, states: Sequence[tuple[str, TaskSnapshot]]) -> None:
        """Record terminal snapshots the holder saw, by task id."""

    async def close(self) -> None:
        """Give the seat up (idempotent)."""


class _Pending:
    """A task a job of this worker waits for."""

    __slots__ = ("done", "polls", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: TaskSnapshot | None = None
        self.polls = 0


class SharedTracking:
    """A worker's waits on a shared journal; see the module docstring."""

    def __init__(self, tracker: Tracker, seat: PollSeat, *, timeout: float) -> None:
        self._tracker = tracker
        self._seat = seat
        self._timeout = timeout
        #: Whether this worker holds the seat (polls for every worker) now.
        self.leading = False
        self._waiting: dict[str, _Pending] = {}
        self._followed: dict[str, Watch] = {}
        self._found: list[tuple[str, TaskSnapshot]] = []  # to record
        tracker.on_news = self._news

    async def wait(self, snapshot: TaskSnapshot, stage: str) -> tuple[TaskSnapshot, int]:
        """:meth:`Tracker.wait <._tracker.Tracker.wait>`, answered by whoever holds the seat."""
        if snapshot.state.is_terminal:
            return snapshot, 0
        early = self._tracker.take_early(snapshot.task_id)
        if early is not None:
            return early, 0  # its end was called back before it was waited for
        task_id = snapshot.task_id
        pending = self._waiting[task_id] = _Pending()
        if self.leading:
            self._follow(task_id, stage)  # at once, not at the next look at the journal
        try:
            with anyio.move_on_after(self._timeout):
                await pending.done.wait()
        finally:
            self._waiting.pop(task_id, None)
        if pending.result is None:
            return TaskSnapshot(task_id=task_id, state=TaskState.TIMED_OUT), pending.polls
        return pending.result, pending.polls

    async def run(self) -> None:
        """Hold or wait for the seat, and follow or read states, until cancelled."""
        try:
            while True:
                # Shielded (for a while): a query cancelled mid-way costs its connection, and
                # psycopg warns about it on every worker's exit.
                with anyio.CancelScope(shield=True), anyio.move_on_after(_TURN_MAX):
                    try:
                        await self._turn()
                    except KlingError as exc:  # the journal's next write reports a lasting one
                        logger.debug("shared polling: %s", exc)
                await anyio.sleep(self._seat.interval)
        finally:
            with anyio.CancelScope(shield=True):
                await self._seat.close()

    async def _turn(self) -> None:
        if not self.leading:
            self.leading, ended = await self._seat.lead(list(self._waiting))
            for task_id, snapshot in ended.items():
                self._deliver(task_id, snapshot, 0)
            if not self.leading:
                return
            logger.info("this worker now polls the server for every worker of the batch")
        found, self._found = self._found, []
        try:
            if found:
                await self._seat.record(found)
        except BaseException:
            self._found[:0] = found
            raise
        read = await self._seat.live(list(self._waiting))
        if read is None:
            self._resign()
            return
        live, ended = read
        for task_id, snapshot in ended.items():
            # Recorded by the seat's last holder, maybe after this worker took the seat over
            # (so it is not live, and no poll of this worker's would ever end its wait).
            watch = self._followed.pop(task_id, None)
            if watch is not None:
                self._tracker.unwatch(watch)
            self._deliver(task_id, snapshot, 0)
        for task_id, stage in live:
            self._follow(task_id, stage)

    def _resign(self) -> None:
        """The seat was lost (its connection broke): stop polling for others."""
        logger.info("this worker no longer polls for the other workers")
        self.leading = False
        followed, self._followed = self._followed, {}
        for watch in followed.values():
            self._tracker.unwatch(watch)

    def _follow(self, task_id: str, stage: str) -> None:
        if task_id not in self._followed:
            self._followed[task_id] = self._tracker.watch(task_id, stage, self._seen)

    def _seen(self, watch: Watch) -> None:
        self._followed.pop(watch.task_id, None)
        result = watch.result
        assert result is not None
        if result.state is TaskState.TIMED_OUT:
            return  # the tracker's own time-out, not the server's word: followed again later
        self._found.append((watch.task_id, result))
        self._deliver(watch.task_id, result, watch.polls)

    def _deliver(self, task_id: str, snapshot: TaskSnapshot, polls: int) -> None:
        pending = self._waiting.get(task_id)
        if pending is not None and pending.result is None:
            pending.result, pending.polls = snapshot, polls
            pending.done.set()

    def _news(self, snapshot: TaskSnapshot) -> bool:
        """Take a callback about a task the tracker does not follow (one this worker waits for)."""
        if snapshot.task_id not in self._waiting:
            return False
        if snapshot.state.is_terminal:
            self._deliver(snapshot.task_id, snapshot, 0)
        return True
