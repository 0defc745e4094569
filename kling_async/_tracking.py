"""Following tasks created elsewhere (:meth:`KlingClient.track`), all at once, until each ends."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio

from ._tracker import Tracker
from ._watch import Watch

__all__ = ["track_all"]


async def track_all(
    tracker: Tracker, task_ids: Sequence[str], stage: str, on_end: Callable[[Watch], None]
) -> None:
    """Follow ``task_ids`` with ``tracker`` until each has ended, calling ``on_end`` for each.

    The tasks are running already, so neither task slots nor a pipe's places hold them back:
    each is a tracker :class:`~._watch.Watch` (a few hundred bytes) with no coroutine of its
    own, and ``on_end`` runs from the watch's callback.  Leaving early (cancellation) stops
    following the tasks that have not ended.
    """
    remaining = len(task_ids)  # an end per id given, as many as the caller listed
    if not remaining:
        return
    all_done = anyio.Event()

    def ended(watch: Watch) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            all_done.set()
        on_end(watch)

    watches = [tracker.watch(task_id, stage, ended) for task_id in task_ids]
    try:
        await all_done.wait()
    finally:
        for watch in watches:
            if watch.result is None:
                tracker.unwatch(watch)
