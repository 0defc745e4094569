"""Task slots: how many tasks the client keeps running on the server at once.

The vendor limits *running tasks* per account, not requests (docs/protocol.md, Concurrency):
a slot is taken before a submit and given back only when the task has ended.  When the server
answers 1303 anyway (other clients share the account, or ``max_in_flight`` is above the
resource pack's limit), the limit shrinks to what the account sustains, and creeps back up
after tasks finish cleanly, so that 1303 costs waiting, never a job.
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["SlotHold", "TaskSlots"]


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

    def release(self) -> None:
        """Give a slot back (its task ended, or it was never created)."""
        self.in_use -= 1
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

    def __init__(self, slots: TaskSlots) -> None:
        self._slots = slots
        self._held = True

    def release(self) -> None:
        """Give the slot back, unless already given."""
        if self._held:
            self._held = False
            self._slots.release()

    async def acquire(self) -> None:
        """Take a slot again (after a 1303 refusal gave it back)."""
        await self._slots.acquire()
        self._held = True
