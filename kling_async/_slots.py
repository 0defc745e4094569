"""Task slots: how many tasks the client keeps running on the server at once.

The vendor limits *running tasks* per account, not requests (docs/protocol.md, Concurrency):
a slot is taken before a submit and given back only when the task has ended.  When the server
answers 1303 anyway (other clients share the account, or ``max_in_flight`` is above the
resource pack's limit), the limit shrinks to what the account sustains, and creeps back up
after tasks finish cleanly, so that 1303 costs waiting, never a job.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import anyio
from anyio.abc import TaskGroup

from ._errors import ConcurrencyLimitError, KlingError, NotFoundError
from ._results import TaskSnapshot

__all__ = ["SlotHold", "StuckTasks", "TaskSlots", "slot_wait_error"]

logger = logging.getLogger("kling_async")


def slot_wait_error(waited: float, blocking: Iterable[str]) -> ConcurrencyLimitError:
    """The error of a job that waited ``waited`` seconds for a slot in vain.

    ``blocking_task_ids`` names the tasks known to hold the account's slots (this batch's own,
    including those that outlived ``PollPolicy.timeout``); other clients' are not known.
    """
    ids = tuple(dict.fromkeys(blocking))
    held = f"held by tasks {', '.join(ids[:10])}" if ids else "held by other clients' tasks"
    error = ConcurrencyLimitError(
        f"no task slot freed within RetryPolicy.max_slot_wait ({waited:g} s): the account's"
        f" task limit is {held}; the job was not submitted",
        status=429,
        code=1303,
    )
    error.blocking_task_ids = ids
    return error


class TaskSlots:
    """A limiter whose limit adapts between 1 and ``capacity``.

    ``acquire`` waits while ``in_use >= limit``.  :meth:`shrink` (on a 1303) lowers the limit to
    the number of tasks the server accepted from us; after ``limit`` clean finishes in a row,
    :meth:`finished` raises it by one, probing whether the account has room again.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.limit = capacity
        self.in_use = 0
        self._clean_finishes = 0
        self._waiters: deque[anyio.Event] = deque()
        #: Set when a wait for a slot ran out of patience; cleared when a slot frees.
        self.starved = False

    def try_acquire(self) -> bool:
        """Take a slot if one is free (and nobody waits for one); no waiting."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting for one to free (first come, first served)."""
        if self.try_acquire():
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                # Handed a slot just as we were cancelled: pass it on.
                self.in_use -= 1
                self._wake()
            else:
                self._waiters.remove(event)
            raise

    async def acquire_within(self, patience: float) -> bool:
        """Take a slot, waiting at most ``patience`` seconds; False when none freed in time.

        Once a wait has run out, later ones give up at once (no slot has freed since: the
        account is held), until a slot frees: the jobs still waiting then end together instead
        of each waiting its own ``patience`` in turn.
        """
        if self.try_acquire():
            return True
        if self.starved or patience <= 0:
            self.starved = True
            return False
        with anyio.move_on_after(patience):
            await self.acquire()
            return True
        self.starved = True
        return False

    def release(self) -> None:
        """Give a slot back (its task ended, or it was never created)."""
        self.in_use -= 1
        self.starved = False
        self._wake()

    def shrink(self) -> None:
        """The server refused a task for concurrency (1303) while we held ``in_use`` slots.

        The refused job still holds its slot, so the account sustains ``in_use - 1`` of ours.
        """
        self.limit = max(1, self.in_use - 1)
        self._clean_finishes = 0

    def finished(self) -> None:
        """A task ended; after enough clean finishes, let one more run."""
        self._clean_finishes += 1
        if self.limit < self.capacity and self._clean_finishes >= self.limit:
            self.limit += 1
            self._clean_finishes = 0
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            self.in_use += 1
            self._waiters.popleft().set()


class SlotHold:
    """One job's hold on a task slot (taken before the job starts), released at most once."""

    __slots__ = ("_held", "_slots")

    def __init__(self, slots: TaskSlots, *, held: bool = True) -> None:
        self._slots = slots
        self._held = held

    def release(self) -> None:
        """Give the slot back, unless already given."""
        if self._held:
            self._held = False
            self._slots.release()

    async def acquire(self) -> None:
        """Take a slot again (after a 1303 refusal gave it back)."""
        await self._slots.acquire()
        self._held = True

    async def acquire_within(self, patience: float) -> bool:
        """Take a slot again, waiting at most ``patience`` seconds (see TaskSlots)."""
        self._held = await self._slots.acquire_within(patience)
        return self._held


class StuckTasks:
    """Tasks reported ``TIMED_OUT`` that keep their slots until they are seen to end.

    Such a task still counts against the account's task limit: giving its slot back would only
    earn 1303 refusals.  Each is looked at every ``interval`` seconds (``get_task(task_id,
    stage=...)``) in ``group`` (the batch's, while it runs); its slot is released once it has
    ended, once the server has answered ``not_found`` times in a row that it knows no such task
    (it no longer counts against the limit either; if it still did, the next submit's 1303
    says so, and the jobs wait for a slot as after any 1303), or when the batch stops.
    """

    def __init__(
        self,
        slots: TaskSlots,
        get_task: Callable[..., Awaitable[TaskSnapshot]],
        interval: float,
        not_found: int,
    ) -> None:
        self._slots = slots
        self._get_task = get_task
        self._interval = interval
        self._not_found = not_found
        #: Where followers run (None while the batch does not run: no slot is kept then).
        self.group: TaskGroup | None = None
        #: Ids of the tasks followed now.
        self.ids: set[str] = set()

    def follow(self, task_id: str, stage: str, slot: SlotHold) -> bool:
        """Keep ``slot`` for ``task_id`` until it ends; False when no batch runs to follow it."""
        if self.group is None:
            return False
        self.ids.add(task_id)
        self.group.start_soon(self._follow, task_id, stage, slot)
        return True

    async def _follow(self, task_id: str, stage: str, slot: SlotHold) -> None:
        missing = 0  # "no such task" answers in a row
        try:
            while True:
                await anyio.sleep(self._interval)
                try:
                    snapshot = await self._get_task(task_id, stage=stage)
                except NotFoundError:
                    missing += 1
                    if missing >= self._not_found:
                        logger.warning(
                            "task %s, reported timed out, is unknown to the server now: its"
                            " slot is free",
                            task_id,
                        )
                        return
                    continue
                except KlingError as exc:
                    if exc.fatal:
                        return
                    missing = 0
                    continue
                missing = 0
                if snapshot.state.is_terminal:
                    logger.info("task %s, reported timed out, has ended: its slot is free", task_id)
                    self._slots.finished()
                    return
        finally:
            self.ids.discard(task_id)
            slot.release()
