"""Terminal callbacks that came before their task was tracked, kept a short while.

A task may end, and be called back, before its submit's answer has arrived (a slow answer, a
task that fails at once) or before the batch tracks it (a journal records the task first).
Such a callback concerned no tracked task: it was dropped, and the task waited for
``PollPolicy.callback_safety_interval`` before a poll found it ended.  The client keeps it here
instead, and the tracker takes it when the task is tracked.

Whatever arrives over HTTP must not grow memory without bound: the buffer holds at most
:data:`EARLY_CALLBACKS` callbacks (the oldest make room) for at most
:data:`EARLY_CALLBACK_SECONDS` each, and only callbacks that passed the receiver's checks (its
token, the signature when there is a secret) are handed to the client at all.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from ._results import TaskSnapshot

__all__ = ["EARLY_CALLBACKS", "EARLY_CALLBACK_SECONDS", "EarlyCallbacks"]

#: Most early callbacks kept: many times the submits a batch has in flight by default (20), few
#: enough to stay small (a snapshot holds what a callback body of ``max_body`` bytes said).
EARLY_CALLBACKS = 256
#: Seconds an early callback is kept: longer than a submit's answer may take (Timeouts.total,
#: 180 s by default), as long as a safety poll would take to find the task ended by default.
EARLY_CALLBACK_SECONDS = 300.0


class EarlyCallbacks:
    """Terminal snapshots of tasks not tracked yet, by task id; see the module docstring."""

    def __init__(
        self,
        *,
        size: int = EARLY_CALLBACKS,
        seconds: float = EARLY_CALLBACK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.seconds = seconds
        self._clock = clock
        # Oldest first (an entry never moves): expiry and eviction pop from the front.
        self._kept: collections.OrderedDict[str, tuple[float, TaskSnapshot]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, snapshot: TaskSnapshot) -> None:
        """Keep a terminal ``snapshot`` of a task nobody tracks (a non-terminal one is ignored).

        A task's first terminal callback is the one kept: a task that has ended ignores later
        news, as a tracked one does.
        """
        if not snapshot.state.is_terminal:
            return
        now = self._clock()
        self._expire(now)
        if snapshot.task_id in self._kept:
            return
        self._kept[snapshot.task_id] = (now, snapshot)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def take(self, task_id: str) -> TaskSnapshot | None:
        """The kept terminal snapshot of ``task_id`` (removed), or None."""
        self._expire(self._clock())
        entry = self._kept.pop(task_id, None)
        return entry[1] if entry is not None else None

    def _expire(self, now: float) -> None:
        kept = self._kept
        while kept:
            arrived, _ = next(iter(kept.values()))
            if now - arrived <= self.seconds:
                break
            kept.popitem(last=False)
