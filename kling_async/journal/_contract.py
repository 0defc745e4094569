"""The storage contract every journal backend keeps, and what a shared (multi-worker) one adds.

:class:`JournalBackend` is what a batch (:mod:`kling_async._resume`) asks of its journal: the
record of a job, the owner of a task, and the writes that make a rerun safe (a submit's intent
committed before its request leaves, the task id as soon as it is known, the result before it
is handed on).  The SQLite journal (one process, one file) and the PostgreSQL journal (many
workers, one database) both keep it; tests/test_journal_contract.py runs one suite against both.

:class:`SharedBackend` is the part only a journal shared by several workers has: jobs loaded
once and claimed one at a time, each with one of the account's task slots, which belongs to the
job until its task ends (see :mod:`kling_async.journal._pg`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from .._jobs import LipSyncJob
from .._results import JobResult, TaskSnapshot
from .._shared_poll import PollSeat
from ._sqlite import JournalJob

__all__ = ["Claim", "JournalBackend", "SharedBackend"]


@runtime_checkable
class JournalBackend(Protocol):
    """A batch's journal, whatever stores it; see the module docstring.

    Reads answer from memory; each ``async`` write returns once it is committed.
    """

    @property
    def path(self) -> str:
        """Where the journal lives (a file path, or a URL without its password)."""

    @property
    def transactions(self) -> int:
        """Transactions committed since the journal opened."""

    #: The batch's random id, the stem of its derived external task ids (the same for every
    #: worker of a shared journal).
    batch_id: str
    #: The server clock's offset interval ``(lo, hi)`` a run measured, if any.
    clock_offset: tuple[float, float] | None
    #: Whether a run saw the server echo an external id.
    external_ids_confirmed: bool

    def jobs(self) -> list[JournalJob]:
        """Every job this batch knows (a shared journal: the ones this worker claimed)."""

    def job(self, key: str) -> JournalJob | None:
        """The journal's record of ``key`` (as this batch knows it), or None."""

    def owner(self, task_id: str) -> str | None:
        """The key of the job that owns ``task_id``, or None."""

    def unresolved(self, key: str, stage: str, video_url: str, near: float, within: float) -> int:
        """How many jobs besides ``key`` wait on an unanswered ``stage`` submit of ``video_url``."""

    def begin(self, key: str, job: LipSyncJob) -> JournalJob:
        """Start a record for ``key``, running ``job`` (written with its first change)."""

    async def submitting(
        self, key: str, stage: str, at: float, external_id: str | None = None
    ) -> None:
        """Record that ``stage``'s request of ``key`` is about to leave: durable on return.

        ``external_id`` is the external task id the request carries, if any.
        """

    async def created(
        self,
        key: str,
        stage: str,
        task_id: str,
        snapshot: TaskSnapshot | None = None,
        *,
        adopted: bool = False,
    ) -> None:
        """Record ``stage``'s task id (and a synchronous step's terminal ``snapshot``).

        ``adopted``: the task was found by a lookup, not named by the submit's answer.
        """

    def set_clock_offset(self, lo: float, hi: float) -> None:
        """Keep the server clock's offset interval (committed with a later write)."""

    def confirm_external_ids(self) -> None:
        """Keep that the server echoes external ids (committed with a later write)."""

    async def refused(self, key: str, stage: str) -> None:
        """Record that ``stage``'s request of ``key`` created nothing."""

    async def finished(self, result: JobResult, *, final: bool) -> None:
        """Record ``result`` as its job's latest (not yet reported)."""

    def reported(self, key: str) -> None:
        """Mark ``key``'s latest result as taken by the consumer (committed soon after)."""

    async def commit_marks(self) -> None:
        """Commit marks (and keep up whatever else the backend does meanwhile) until cancelled."""

    async def close(self) -> None:
        """Commit what is pending and release the journal (idempotent)."""


#: What :meth:`SharedBackend.claim` hands out: a job to run (its key), a result finished by a
#: worker that died before reporting it, None (nothing claimable now) or False (all jobs done).
Claim = str | JobResult | None | bool


@runtime_checkable
class SharedBackend(JournalBackend, Protocol):
    """A journal several workers run one batch from (see the module docstring)."""

    async def load(self, jobs: Sequence[tuple[str, str, str | None]]) -> None:
        """Record ``(key, request_hash, video_url)`` of every job once (idempotent by key).

        Raises :class:`~kling_async.ValidationError` for a key recorded with another request
        that may have created a task.
        """

    async def claim(self, skip: Sequence[str] = (), *, without_slot: bool = False) -> Claim:
        """Claim the next job (and, unless it holds one already, a task slot) for this worker.

        ``without_slot``: when no slot is free, a pending job is claimed without one (it has
        waited ``RetryPolicy.max_slot_wait`` in vain, and ends as a result saying so).
        """

    def holds_slot(self, key: str) -> bool:
        """Whether this worker's claim of ``key`` holds a task slot (False: ``without_slot``)."""

    async def concurrency_refused(self, key: str) -> None:
        """The server answered 1303 to ``key``'s submit: lower the shared limit, free its slot."""

    async def regain_slot(self, key: str) -> None:
        """Wait for a task slot for ``key`` again (after :meth:`concurrency_refused`)."""

    async def refresh(self) -> None:
        """Re-read which tasks other workers' jobs own (before a search for a lost submit)."""

    def slot_ended(self, key: str) -> None:
        """``key``'s timed-out task has ended (or is no longer followed): free its kept slot."""

    async def wait_for_slot(self) -> None:
        """Return when a slot may have freed (a job of this worker ended), or after a while."""

    def poll_seat(self) -> PollSeat:
        """The claim of this worker on the seat of the one worker that polls for all."""
