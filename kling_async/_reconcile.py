"""Finding the task a submit may have created when its answer never arrived.

A submit that got no clear answer (the process died with the request in flight, the answer
timed out or was cut off, a proxy's 502/504, 5000/5002) may or may not have created a task.

* **Exactly, by external task id** (official advanced lip-sync, docs/protocol.md): the id is
  looked up, first with the single-task query, then among the list pages' ``task_info``.  Found,
  it is this job's task; not found, nothing was created and the submit may go again with the
  same id (the server refuses a second task with it, so it cannot pay twice).
* **Provably, by video and time** (every dialect with a list query): a listed task is adopted
  only when the submit's answer proved that a task was created (a success whose body was cut
  off), and the task is the only one on the job's ``video_url`` that no job owns, created inside
  the submit's own window (from its intent to its failed answer, the server's clock offset
  taken from this batch's own answers by :class:`ClockOffset`) with no other task on that video
  from anyone in a surrounding window of :data:`NEIGHBOURHOOD` seconds, and no other job of the
  batch awaits a submit on that video.  After a time-out, a 5xx, a proxy's error page or a
  crash nothing proves that a lone task there is not another client's (the same clip dubbed at
  the same moment): the outcome stays unknown, naming the candidates.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from typing import Final, Protocol

import anyio
import attrs

from ._errors import (
    KlingError,
    MalformedResponseError,
    NotFoundError,
    SubmitOutcomeUnknownError,
)
from ._requester import Requester
from ._results import TaskSnapshot
from .dialects import Dialect

__all__ = [
    "ABSENT",
    "CLOCK_SKEW",
    "LATEST_CREATE",
    "NEIGHBOURHOOD",
    "ClockOffset",
    "Ledger",
    "Match",
    "MemoryLedger",
    "Reconciler",
]

logger = logging.getLogger("kling_async")

#: Seconds the server's clock is assumed to be off at most before any answer calibrated it.
CLOCK_SKEW = 60.0
#: Seconds after the intent by which a submit's task must exist when no answer bounds it (a run
#: that died mid-submit): a request's whole life plus retries of answers that created nothing.
LATEST_CREATE = 900.0
#: Seconds around a submit's window in which no other task on the same video may exist.
NEIGHBOURHOOD = 60.0
#: Seconds between looks at whether other submits are still on their way.
_CONFIRM_RECHECK = 0.05
#: Newest tasks looked at, at most: pages of ``_PAGE_SIZE``.
_MAX_PAGES = 5
_PAGE_SIZE = 100
# Server timestamps are whole milliseconds.
_TICK = 0.001


class ClockOffset:
    """The server clock's offset from ours (server minus local, seconds), as an interval.

    Every submit answer narrows it: a task created at server time ``c`` by a request sent at
    local ``sent`` and answered at ``received`` means ``c - received <= offset <= c - sent``
    (plus a tick for the server's millisecond rounding).  Any answer naming a task's time ``t``
    at local ``received`` means ``offset >= t - received``.  Until both ends are known it is
    ``±`` :data:`CLOCK_SKEW` around what is known.  Should the bounds cross (the server's clock
    jumped), the interval starts again from the newest observation.
    """

    def __init__(self, lo: float = -math.inf, hi: float = math.inf) -> None:
        self.lo = lo
        self.hi = hi
        #: Called with (lo, hi) whenever the interval narrows (a journal keeps it).
        self.on_change: Callable[[float, float], None] | None = None

    def observe(self, sent: float, received: float, created: float | None) -> None:
        """A submit sent at ``sent`` and answered at ``received`` says its task's ``created``."""
        if created is None or received < sent:
            return
        self._narrow(created - received, created + _TICK - sent)

    def observe_seen(self, received: float, server_time: float | None) -> None:
        """An answer received at ``received`` names ``server_time`` (the offset's lower bound)."""
        if server_time is not None:
            self._narrow(server_time - received, math.inf)

    def _narrow(self, lo: float, hi: float) -> None:
        new_lo, new_hi = max(self.lo, lo), min(self.hi, hi)
        if new_lo > new_hi:
            new_lo, new_hi = lo, hi
        if (new_lo, new_hi) == (self.lo, self.hi):
            return
        changed = new_hi - new_lo < self.hi - self.lo - _TICK
        self.lo, self.hi = new_lo, new_hi
        if changed and self.on_change is not None and math.isfinite(self.width):
            self.on_change(self.lo, self.hi)

    @property
    def width(self) -> float:
        """How uncertain the offset is, in seconds (infinite until calibrated)."""
        return self.hi - self.lo

    def bounds(self) -> tuple[float, float]:
        """``(lo, hi)``, each end :data:`CLOCK_SKEW` from the other when unknown."""
        lo, hi = self.lo, self.hi
        if math.isinf(lo) and math.isinf(hi):
            return -CLOCK_SKEW, CLOCK_SKEW
        if math.isinf(hi):
            return lo, lo + 2 * CLOCK_SKEW
        if math.isinf(lo):
            return hi - 2 * CLOCK_SKEW, hi
        return lo, hi


class Ledger(Protocol):
    """What the batch knows of its own tasks and submits (a journal, or memory without one)."""

    def owner(self, task_id: str) -> str | None:
        """The key of the job that owns ``task_id``, or None."""
        ...

    def unresolved(self, key: str, stage: str, video_url: str, near: float, within: float) -> int:
        """How many jobs besides ``key`` await a ``stage`` submit of ``video_url`` near ``near``."""
        ...


@attrs.frozen(kw_only=True)
class Match:
    """The outcome of one search: the adopted task, or why there is none and who might be it."""

    snapshot: TaskSnapshot | None = None
    reason: str = ""
    candidates: tuple[str, ...] = ()


@attrs.frozen
class _Listing:
    """The newest tasks on the account, as far as :meth:`Reconciler._pages` read them."""

    #: The readable rows, newest first.
    snapshots: list[TaskSnapshot]
    #: Whether they reach back past the time asked for (False: the pages read held newer only).
    complete: bool
    #: Why each unreadable row could not be read (an unknown state word, a missing field).
    unreadable: list[MalformedResponseError]

    def unreadable_rows(self) -> str:
        """The unreadable rows, for a message: how many, and the first one's fault."""
        count = len(self.unreadable)
        rows = "1 row" if count == 1 else f"{count} rows"
        return f"{rows} of the task list could not be read ({self.unreadable[0]!s:.200})"


class _Absent(enum.Enum):
    ABSENT = "absent"


#: :meth:`Reconciler.find_external`'s answer when no task carries the external id.
ABSENT: Final = _Absent.ABSENT


class Reconciler:
    """Searches the server's tasks for the one an unanswered submit created.

    Searches run one at a time, so that two jobs never adopt the same task; the caller records
    an adopted task (its ledger's :meth:`Ledger.owner` knows it) before the next search.
    """

    def __init__(
        self,
        *,
        dialect: Dialect,
        requester: Requester,
        ledger: Ledger,
        offset: ClockOffset,
        clock: Callable[[], float],
        confirm_wait: float = 60.0,
    ) -> None:
        self._dialect = dialect
        self._requester = requester
        self.ledger = ledger
        self.offset = offset
        self._clock = clock
        #: Longest wait (seconds) for the server to show that it keeps external ids (see
        #: :meth:`confirm_external`) before an absent one may be sent again.
        self.confirm_wait = confirm_wait
        self._lock = anyio.Lock()
        #: Ids of the tasks adopted by lookups (a result of one of them says ``adopted``).
        self.adopted: set[str] = set()
        self._confirmed = anyio.Event()
        #: Called once the server has shown that it keeps external ids (a journal keeps that).
        self.on_confirm: Callable[[], None] | None = None
        #: How many submits of the batch are on their way or about to be (their answers may yet
        #: confirm external ids), the one being resolved included when it was sent in this run;
        #: the batch's submitter sets it.
        self.sending: Callable[[], int] = lambda: 0

    # -- exactly, by external id ---------------------------------------------------------

    def confirm_external(self) -> None:
        """A submit answer echoed its external id: this server keeps them.

        Until then, an external id that no task carries proves nothing (a gateway may drop the
        field silently), so nothing is sent again on its strength.
        """
        if not self._confirmed.is_set():
            self._confirmed.set()
            if self.on_confirm is not None:
                self.on_confirm()

    @property
    def external_confirmed(self) -> bool:
        """Whether :meth:`confirm_external` was called."""
        return self._confirmed.is_set()

    async def _await_confirmation(self, counted: bool) -> None:
        """Wait while other submits of the batch may still show that external ids are kept.

        Not a fixed time: under load the batch's other answers may take longer than any
        guess, and a lone job must not wait for answers that will never come.  The wait ends
        once confirmed, once no other submit is on its way (:attr:`sending`, less the one being
        resolved when ``counted``), or after :attr:`confirm_wait` seconds.
        """
        deadline = anyio.current_time() + self.confirm_wait
        own = 1 if counted else 0
        while not self.external_confirmed and self.sending() > own:
            left = deadline - anyio.current_time()
            if left <= 0:
                return
            with anyio.move_on_after(min(left, _CONFIRM_RECHECK)):
                await self._confirmed.wait()

    async def find_external(
        self,
        stage: str,
        external_id: str,
        key: str | None = None,
        cause: KlingError | None = None,
    ) -> TaskSnapshot | _Absent:
        """The task whose external id is ``external_id``, or :data:`ABSENT` when none has it.

        The single-task query first, then the list pages.  A query or list error other than
        "not found" is raised (the answer is then unknown, not absent).  With ``key`` (the job
        looking), a task that another job owns is never handed over: the same external id was
        given to two jobs, and the one that created the task keeps it
        (:class:`SubmitOutcomeUnknownError`, naming ``cause``, for this one).

        A list row that cannot be read (an unknown state word, a missing field) does not hide
        the readable row carrying the id: the server keeps external ids unique, so no other row
        carries it too.  But while one is unreadable, a readable list without the id does not
        prove it absent (the unreadable row may be its task): that is
        :class:`SubmitOutcomeUnknownError`, never :data:`ABSENT`.
        """
        request = self._dialect.query_request(stage, external_id)
        try:
            found = await self._requester.call(
                request, lambda answer: self._dialect.parse_external(stage, external_id, answer)
            )
        except NotFoundError:
            async with self._lock:
                listing = await self._pages(stage, -math.inf)
            listed = [s for s in listing.snapshots if s.external_task_id == external_id]
            if listed:
                found = listed[0]
            elif listing.unreadable:
                detail = (
                    f"no readable task carries external id {external_id}, but"
                    f" {listing.unreadable_rows()}: it may be its task"
                )
                raise SubmitOutcomeUnknownError(stage, cause=cause, detail=detail) from None
            else:
                return ABSENT
        if key is not None and self._others(found.task_id, key):
            detail = (
                f"external id {external_id} is carried by task {found.task_id}, which another"
                " job owns (two jobs were given the same external id)"
            )
            raise SubmitOutcomeUnknownError(stage, cause=cause, detail=detail)
        self.adopted.add(found.task_id)
        return found

    async def resolve(
        self,
        *,
        key: str,
        stage: str,
        external_id: str | None,
        video_url: str | None,
        intent_at: float,
        answered_at: float | None,
        cause: KlingError | None,
        counted: bool = True,
    ) -> TaskSnapshot | _Absent:
        """What became of job ``key``'s unclear ``stage`` submit: its task, or :data:`ABSENT`.

        :data:`ABSENT` only with an external id (nothing carries it: the submit may go again
        with it).  Otherwise raises :class:`SubmitOutcomeUnknownError` naming the candidates,
        or the fatal error a lookup met.  ``counted``: the submit is one :attr:`sending`
        counts (False: an earlier run's, resolved before this run sends anything for it).
        """
        if external_id is not None and self._dialect.external_ids:
            try:
                found = await self.find_external(stage, external_id, key, cause)
            except SubmitOutcomeUnknownError:
                raise
            except KlingError as exc:
                if exc.fatal:
                    raise
                detail = f"looking up external id {external_id} failed: {type(exc).__name__}"
                raise SubmitOutcomeUnknownError(stage, cause=cause, detail=detail) from exc
            if found is not ABSENT:
                logger.info("%s: found task %s by its external id", key, found.task_id)
                return found
            await self._await_confirmation(counted)
            if not self.external_confirmed:
                detail = (
                    f"no task carries external id {external_id}, but this server has not shown"
                    " (by echoing one back) that it keeps external ids"
                )
                raise SubmitOutcomeUnknownError(stage, cause=cause, detail=detail)
            return ABSENT
        # A success whose body was cut off proves its task exists, unless this server may send
        # a refusal with a 2xx status too (a gateway): then it proves nothing.
        exists = (
            isinstance(cause, MalformedResponseError)
            and cause.status is not None
            and 200 <= cause.status < 300
            and not self._dialect.refusals_may_be_2xx
        )
        match = await self.find(key, stage, video_url, intent_at, answered_at, exists=exists)
        if match.snapshot is None:
            logger.info("%s: %s submit outcome unknown: %s", key, stage, match.reason)
            raise SubmitOutcomeUnknownError(
                stage, cause=cause, detail=match.reason, candidates=match.candidates
            )
        return match.snapshot

    # -- provably, by video and time -----------------------------------------------------

    def can_search(self, stage: str, video_url: str | None) -> bool:
        """Whether a search could find anything for this stage and video."""
        return (
            video_url is not None
            and self._dialect.list_page_size > 0
            and self._dialect.list_request(stage, 1, 1) is not None
        )

    async def find(
        self,
        key: str,
        stage: str,
        video_url: str | None,
        intent_at: float,
        answered_at: float | None = None,
        *,
        exists: bool = False,
    ) -> Match:
        """The task to adopt for job ``key``'s ``stage`` submit of ``video_url``.

        The submit was about to leave at ``intent_at`` (local seconds) and failed at
        ``answered_at`` (None: never answered, the run died).  ``exists``: its answer proved that
        it created a task (a success whose body was cut off).  Only then is a task adopted:
        the one unowned task on the video around the submit, when no other job awaits a submit
        there.  Without that proof a lone task there may be another client's (the same clip
        dubbed elsewhere at the same moment), so it is only named as a candidate.

        Transient list errors are retried (a list query is idempotent); one that persists
        leaves the match unknown.  A fatal error (bad key) is raised.  So does a list row that
        cannot be read: it may be the job's own task (or the other task on its video that
        makes a lone one ambiguous), so nothing is adopted while one is unreadable, and the
        reason says so.
        """
        if video_url is None:
            return Match(reason="a video_id job has no video URL to recognise its task by")
        if not self.can_search(stage, video_url):
            return Match(reason="no list query to look for it")
        lo, hi = self.offset.bounds()
        latest = answered_at if answered_at is not None else intent_at + LATEST_CREATE
        async with self._lock:
            try:
                listing = await self._pages(stage, intent_at - NEIGHBOURHOOD + lo)
            except KlingError as exc:
                if exc.fatal:
                    raise
                return Match(reason=f"listing recent tasks failed: {type(exc).__name__}")
            complete = listing.complete
            near: list[TaskSnapshot] = []
            inside: list[TaskSnapshot] = []
            for snapshot in listing.snapshots:
                created = snapshot.created_at
                if created is None or snapshot.parent_video_url != video_url:
                    continue
                if self._owned(snapshot.task_id):
                    continue  # another job's task: accounted for
                # When, on our clock, the server may have created it.
                earliest, last = created - hi, created + _TICK - lo
                if last < intent_at - NEIGHBOURHOOD or earliest > latest + NEIGHBOURHOOD:
                    continue
                (inside if last >= intent_at and earliest <= latest else near).append(snapshot)
            within = latest - intent_at + NEIGHBOURHOOD
            rivals = self.ledger.unresolved(key, stage, video_url, intent_at, within)
            ids = tuple(s.task_id for s in inside + near)  # the likeliest first
            readable = not listing.unreadable
            if exists and complete and readable and len(inside) == 1 and not near and rivals == 0:
                self.adopted.add(ids[0])  # (before the lock is let go: no second adopter)
                logger.info("%s: adopted task %s: the only one on its video", key, ids[0])
                return Match(snapshot=inside[0])
        if listing.unreadable:
            # Skipping the row would be unsafe: it may be this job's task, or another client's
            # on the same video (then a lone readable task there is not provably its own).
            found = f"; readable tasks on its video: {', '.join(ids[:5])}" if ids else ""
            return Match(
                reason=f"{listing.unreadable_rows()}, and an unreadable row may be its task{found}",
                candidates=ids,
            )
        if not ids:
            return Match(reason="no task on its video around the submit")
        shown = ", ".join(ids[:5])
        counts = f"{len(inside)} inside its window, {len(near)} around it ({shown})"
        if not exists:
            why = "its answer never said whether a task was created, and another client's task"
            return Match(
                reason=f"{why} on the same video cannot be told from its own: {counts}",
                candidates=ids,
            )
        return Match(
            reason=f"ambiguous: tasks on its video {counts}, {rivals} other job(s) awaiting a"
            " submit there" + ("" if complete else "; the newest tasks did not reach back to it"),
            candidates=ids,
        )

    def _owned(self, task_id: str) -> bool:
        return task_id in self.adopted or self.ledger.owner(task_id) is not None

    def _others(self, task_id: str, key: str) -> bool:
        """Whether ``task_id`` belongs to a job other than ``key``.

        (A ledger without keys, :class:`MemoryLedger`, records a job's task only once its
        submit is resolved: a task it knows is then another job's.)
        """
        owner = self.ledger.owner(task_id)
        return owner != key if owner is not None else task_id in self.adopted

    async def _pages(self, stage: str, oldest: float) -> _Listing:
        """Newest-first list pages until one reaches back past server time ``oldest``.

        Also whether they did (False: :data:`_MAX_PAGES` pages held newer tasks only), and the
        rows that could not be read: one such row no longer fails the whole search (whoever
        searches decides what an unreadable row means to it).
        """
        page_size = min(self._dialect.list_page_size, _PAGE_SIZE)
        listing = _Listing([], False, [])
        if page_size <= 0:
            return listing
        for number in range(1, _MAX_PAGES + 1):
            request = self._dialect.list_request(stage, number, page_size)
            if request is None:
                break
            snapshots, unreadable = await self._requester.call(
                request, lambda response: self._dialect.parse_list_rows(stage, response)
            )
            times = [s.created_at for s in snapshots if s.created_at is not None]
            self.offset.observe_seen(self._clock(), max(times, default=None))
            listing.snapshots.extend(snapshots)
            listing.unreadable.extend(unreadable)
            rows = len(snapshots) + len(unreadable)
            if rows < page_size or (times and min(times) < oldest):
                return attrs.evolve(listing, complete=True)  # newest first: the rest is older
        return listing


class MemoryLedger:
    """The :class:`Ledger` of a batch without a journal: its tasks and unanswered submits."""

    def __init__(self) -> None:
        # Only whether a task is owned matters here: a set is half a dictionary's memory.
        self._owned: set[str] = set()
        self._intents: dict[str, tuple[str, str | None, float]] = {}

    def owner(self, task_id: str) -> str | None:
        """``"?"`` when some job of the batch owns ``task_id`` (which one is not kept), or None."""
        return "?" if task_id in self._owned else None

    def unresolved(self, key: str, stage: str, video_url: str, near: float, within: float) -> int:
        """How many jobs besides ``key`` await a ``stage`` submit of ``video_url`` near ``near``."""
        return sum(
            1
            for other, (other_stage, url, at) in self._intents.items()
            if other != key
            and other_stage == stage
            and url == video_url
            and abs(at - near) <= within
        )

    def submitting(self, key: str, stage: str, video_url: str | None, at: float) -> None:
        """Job ``key``'s ``stage`` submit of ``video_url`` is about to leave at ``at``."""
        self._intents[key] = (stage, video_url, at)

    def created(self, key: str, task_id: str) -> None:
        """Job ``key``'s submit is resolved: it owns ``task_id``."""
        self._owned.add(task_id)
        self._intents.pop(key, None)

    def cleared(self, key: str) -> None:
        """Job ``key``'s submit is resolved without a task."""
        self._intents.pop(key, None)
