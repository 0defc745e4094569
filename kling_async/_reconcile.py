"""Finding the task a submit may have created when its answer never arrived.

A submit that got no clear answer (the process died with the request in flight, the answer
timed out, 5000/5002) may or may not have created a task.  Where the dialect has a list query
(docs/protocol.md, Query many: newest first), the task can be recognised: its parent video is
the job's ``video_url`` and it was created no earlier than the recorded intent (less a margin for
clock skew between this machine and the server) and no later than a submit can take.  Only a
single, unowned match is adopted: two candidates, or another unresolved job on the same video,
could swap two jobs' videos, so those stay unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import attrs

from ._errors import KlingError
from ._requester import Requester
from ._results import TaskSnapshot
from .dialects import Dialect

__all__ = ["CLOCK_SKEW", "Match", "Reconciler"]

logger = logging.getLogger("kling_async")

#: Seconds the server's clock may run behind ours (a task may look created before the intent).
CLOCK_SKEW = 60.0
#: Seconds after the intent by which a submit's task must exist: a request's whole life
#: (``Timeouts.total`` is 180 s by default) plus retries of answers that created nothing.
LATEST_CREATE = 900.0
#: Newest tasks looked at, at most: pages of ``_PAGE_SIZE``.
_MAX_PAGES = 5
_PAGE_SIZE = 100


@attrs.frozen(kw_only=True)
class Match:
    """The outcome of one search: the adopted task, or why there is none."""

    snapshot: TaskSnapshot | None = None
    reason: str = ""


class Reconciler:
    """Searches recent tasks for the one an unanswered submit created.

    ``owned`` tells whether a task id already belongs to some job; ``unresolved(key, stage,
    video_url, intent_at)`` how many jobs other than ``key`` wait on a submit of the same stage
    and video sent near the same time.  Searches run one at a time, so
    that two jobs never adopt the same task.
    """

    def __init__(
        self,
        *,
        dialect: Dialect,
        requester: Requester,
        owned: Callable[[str], bool],
        unresolved: Callable[[str, str, str, float], int],
    ) -> None:
        self._dialect = dialect
        self._requester = requester
        self._owned = owned
        self._unresolved = unresolved
        self._lock = anyio.Lock()

    def can_search(self, stage: str, video_url: str | None) -> bool:
        """Whether a search could find anything for this stage and video."""
        return (
            video_url is not None
            and self._dialect.list_page_size > 0
            and self._dialect.list_request(stage, 1, 1) is not None
        )

    async def find(self, key: str, stage: str, video_url: str | None, intent_at: float) -> Match:
        """The task to adopt for job ``key``'s ``stage`` submit of ``video_url`` at ``intent_at``.

        Transient list errors are retried (a list query is idempotent); one that persists
        leaves the match unknown.  A fatal error (bad key) is raised.  The caller must record
        the adopted task's id before the next search (:meth:`find` holds no reservation).
        """
        if video_url is None or not self.can_search(stage, video_url):
            return Match(reason="no list query to look for it")
        async with self._lock:
            try:
                candidates = await self._search(stage, video_url, intent_at)
            except KlingError as exc:
                if exc.fatal:
                    raise
                return Match(reason=f"listing recent tasks failed: {type(exc).__name__}")
            rivals = self._unresolved(key, stage, video_url, intent_at)
        if len(candidates) == 1 and rivals == 0:
            logger.info("adopted task %s: created by a submit whose answer was lost", candidates[0])
            return Match(snapshot=candidates[0])
        if not candidates:
            return Match(reason="no matching task among the newest")
        ids = ", ".join(c.task_id for c in candidates[:5])
        return Match(
            reason=f"ambiguous: {len(candidates)} matching task(s) ({ids}) for "
            f"{rivals + 1} job(s) on the same video"
        )

    async def _search(self, stage: str, video_url: str, intent_at: float) -> list[TaskSnapshot]:
        earliest, latest = intent_at - CLOCK_SKEW, intent_at + LATEST_CREATE
        page_size = min(self._dialect.list_page_size, _PAGE_SIZE)
        found: list[TaskSnapshot] = []
        for page in range(1, _MAX_PAGES + 1):
            request = self._dialect.list_request(stage, page, page_size)
            if request is None:
                break
            snapshots = await self._requester.call(
                request, lambda response: self._dialect.parse_list(stage, response)
            )
            for snapshot in snapshots:
                created = snapshot.created_at
                if (
                    snapshot.parent_video_url == video_url
                    and created is not None
                    and earliest <= created <= latest
                    and not self._owned(snapshot.task_id)
                ):
                    found.append(snapshot)
            oldest = min((s.created_at for s in snapshots if s.created_at is not None), default=0)
            if len(snapshots) < page_size or oldest < earliest:
                break  # newest first: the rest is older than the submit
        return found
