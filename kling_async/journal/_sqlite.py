"""The batch journal: each job's progress in SQLite, so a rerun after a crash pays nothing twice.

One journal file belongs to one batch (one dialect at one server).  Per job key it keeps a hash
of the job's request (:func:`~._codec.request_hash`), per submit stage the state of
that submit, and the job's latest result::

    meta(name, value)           dialect, stage, base_url (checked); batch_id, clock_offset,
                                external_ids
    jobs(key, request_hash, video_url, result, final, reported)
    stages(key, stage, status, intent_at, task_id, snapshot, external_id, adopted)
    events(seq, changes)        what a running batch changed, not yet folded into the above

A stage's ``status`` is ``submitting`` (written, and committed, *before* its request leaves;
``intent_at`` is the wall-clock time), ``created`` (the task id is known: committed as soon as
the answer arrives) or ``refused`` (the server answered that it created nothing).  ``final``
marks a result a rerun keeps (success, a task that failed, a refused request); ``reported``
marks a result the consumer has taken (not waited for: committed within moments).
``external_id`` is the external task id the stage's request carries (derived from the random
``batch_id`` and the job key, :mod:`._identity`), so that a rerun looks up, and resends, the
very same id; ``adopted`` marks a task found by a lookup instead of named by its submit's
answer.  ``clock_offset`` keeps the server clock's calibrated offset (:class:`~._reconcile.
ClockOffset`) for a rerun's lookups.

What a journal backend must provide (the engine uses nothing else): ``open`` that takes the
batch exclusively (a second opener fails at once with :class:`JournalError` naming the
holder) and reads every job into memory; ``batch_id`` and ``clock_offset``; the reads
:meth:`Journal.job`, :meth:`Journal.owner`, :meth:`Journal.unresolved`; the writes
:meth:`Journal.begin`, :meth:`Journal.submitting` (durable before it returns: the request
leaves next), :meth:`Journal.created`, :meth:`Journal.refused`, :meth:`Journal.finished`,
:meth:`Journal.reported` (not waited for) with :meth:`Journal.commit_marks`,
:meth:`Journal.set_clock_offset` and :meth:`Journal.confirm_external_ids` (not waited for)
and :meth:`Journal.close`.

The file is SQLite in WAL mode, locked by one batch at a time (:mod:`._sqlite_store`).  A
running batch appends its changes to ``events`` (:mod:`._sqlite_log`), which the next open
folds into the tables before it reads them; concurrent writes share transactions, committed on
the event loop (:mod:`._sqlite_commit`).  Every commit survives the process dying; a submit's
intent is also fsynced before its request leaves (power cut included), while task ids, results
and marks are not (a power cut can lose the last ones, and then a rerun looks for the task as
after a crash mid-submit, or reports the result again).  The whole journal is read into memory
when it opens: every later lookup is a dictionary access.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import anyio
import attrs

from .._durable import sync_directory
from .._errors import JournalError, ValidationError
from .._identity import new_batch_id
from .._jobs import LipSyncJob
from .._results import JobResult, TaskSnapshot
from . import _sqlite_log as log
from ._codec import (
    UNREADABLE,
    request_values,
    result_from_json,
    result_values,
    snapshot_from_json,
    snapshot_to_json,
    unreadable,
)
from ._facts import ServerFacts
from ._sqlite_commit import Committer
from ._sqlite_store import Row, Store, journal_error

__all__ = [
    "CREATED",
    "REFUSED",
    "SUBMITTING",
    "Journal",
    "JournalJob",
    "JournalStage",
    "job_from_row",
    "parse_offset",
]

#: A stage's status: its request is about to leave, or left without a clear answer.
SUBMITTING = "submitting"
#: A stage's status: the task exists and its id is known.
CREATED = "created"
#: A stage's status: the server answered that it created nothing.
REFUSED = "refused"


@attrs.define(kw_only=True)
class JournalStage:
    """What the journal knows about one submit stage of one job."""

    status: str
    intent_at: float
    task_id: str | None = None
    snapshot: TaskSnapshot | None = None
    external_id: str | None = None
    adopted: bool = False


@attrs.define(kw_only=True)
class JournalJob:
    """What the journal knows about one job: its request hash, stages and latest result."""

    key: str
    #: The hash of the job's request (:func:`~._codec.request_hash`); None for a job begun by
    #: this run of a SQLite journal, which logs :attr:`request` instead.
    request_hash: str | None
    video_url: str | None = None
    result: JobResult | None = None
    final: bool = False
    reported: bool = False
    stages: dict[str, JournalStage] = attrs.Factory(dict)
    #: Whether the job's row exists in the file (new jobs are written with their first change).
    stored: bool = True
    #: The request's values (:func:`~._codec.request_values`) until a SQLite journal logs them.
    request: tuple[Any, ...] | None = None

    @property
    def may_have_task(self) -> bool:
        """Whether some submit of this job may have created a task (so it may not change)."""
        return any(stage.status != REFUSED for stage in self.stages.values())

    def waits_on(self, stage: str, video_url: str, near: float, within: float) -> bool:
        """Whether its ``stage`` submit of ``video_url`` near ``near`` is unanswered.

        Only a submit sent within ``within`` seconds of ``near`` counts; both backends'
        ``unresolved`` count the jobs for which this holds.
        """
        record = self.stages.get(stage)
        return (
            self.video_url == video_url
            and record is not None
            and record.status == SUBMITTING
            and abs(record.intent_at - near) <= within
        )

    def mark_created(
        self, stage: str, task_id: str, snapshot: TaskSnapshot | None, adopted: bool
    ) -> JournalStage:
        """Record in memory that ``stage`` created ``task_id``; return the stage's record.

        The intent's time and external id are kept; both backends then write the record.
        """
        record = self.stages.get(stage)
        if record is None:
            record = self.stages[stage] = JournalStage(status=CREATED, intent_at=0.0)
        record.status, record.task_id, record.snapshot = CREATED, task_id, snapshot
        record.adopted = adopted
        return record


class Journal(ServerFacts):
    """An open journal; see the module docstring.

    Build it with :meth:`open`.  :meth:`job`, :meth:`owner` and :meth:`unresolved` answer from
    memory; the writing methods change memory at once and return when the change is committed
    (except :meth:`reported`, which a background task commits).
    """

    def __init__(self, store: Store, rows: list[Row], meta: dict[str, str] | None = None) -> None:
        self._store = store
        self.path = store.path
        meta = meta or {}
        #: The batch's random id (the stem of its derived external task ids).
        self.batch_id = meta.get("batch_id") or new_batch_id()
        #: The server clock's offset interval ``(lo, hi)`` a run measured, if any.
        self.clock_offset = parse_offset(meta.get("clock_offset"))
        #: Whether a run saw the server echo an external id (it keeps them).
        self.external_ids_confirmed = meta.get("external_ids") == "confirmed"
        self._jobs = {job.key: job for job in map(job_from_row, rows)}
        self._owners = {
            stage.task_id: job.key
            for job in self._jobs.values()
            for stage in job.stages.values()
            if stage.task_id is not None
        }
        #: Keys with rows in the file (read at open, or written since).
        self._in_file = set(self._jobs)
        self._committer = Committer(store)
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        dialect: str,
        stage: str,
        base_url: str,
        lock_timeout: float = 5.0,
    ) -> Journal:
        """Open (or create) the journal at ``path`` for a batch of ``dialect`` at ``base_url``.

        Raises :class:`ValidationError` when the file belongs to another dialect or server, and
        :class:`JournalError` when it cannot be used (not a journal, or still in use after
        ``lock_timeout`` seconds: a batch that just ended in this process may still be closing
        it).
        """
        name = os.fspath(path)
        meta = {
            "dialect": dialect,
            "stage": stage,
            "base_url": base_url,
            "batch_id": new_batch_id(),
        }

        def setup() -> tuple[Store, dict[str, str], list[Row]]:
            store = Store(name, timeout=lock_timeout)
            try:
                opened = store.open(meta)
                # A new file, and the WAL each opening makes anew, last a power cut only once
                # their folder is synced: without, the synced submit intents could vanish.
                sync_directory(os.path.dirname(os.path.abspath(name)))
                return store, *opened
            except BaseException:
                store.close()
                raise

        try:
            store, stored, rows = await anyio.to_thread.run_sync(setup)
        except ValidationError:
            raise
        except sqlite3.Error as exc:
            raise journal_error(name, exc, writing=True) from None
        except OSError as exc:  # (the folder's sync failed: a disk error)
            raise JournalError(f"journal {name}: cannot sync its folder: {exc}") from None
        except UNREADABLE as exc:  # a change this version cannot read
            raise unreadable(name, exc) from None
        try:
            return cls(store, rows, stored)
        except BaseException as exc:
            # Let the file go, or this very process could never open it again ("in use").
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(store.close)
            if isinstance(exc, UNREADABLE):  # a record this version cannot read
                raise unreadable(name, exc) from None
            raise

    @property
    def transactions(self) -> int:
        """Transactions committed since the journal opened (concurrent writes share one)."""
        return self._store.transactions

    # -- reading -------------------------------------------------------------------------

    def job(self, key: str) -> JournalJob | None:
        """The journal's record of ``key``, or None."""
        return self._jobs.get(key)

    def jobs(self) -> list[JournalJob]:
        """Every job the journal knows."""
        return list(self._jobs.values())

    def owner(self, task_id: str) -> str | None:
        """The key of the job that owns ``task_id``, or None."""
        return self._owners.get(task_id)

    def unresolved(self, key: str, stage: str, video_url: str, near: float, within: float) -> int:
        """How many jobs besides ``key`` wait on an unanswered ``stage`` submit of ``video_url``.

        Only submits sent within ``within`` seconds of ``near`` count.
        """
        return sum(
            1
            for job in self._jobs.values()
            if job.key != key and job.waits_on(stage, video_url, near, within)
        )

    # -- writing -------------------------------------------------------------------------

    def begin(self, key: str, job: LipSyncJob) -> JournalJob:
        """Start a record for ``key``, running ``job`` (replacing one that never created a task).

        Nothing is written until the job's first change, which logs the request's values: its
        hash is made when the log is folded (:mod:`._sqlite_log`), not on the batch's loop.
        """
        record = JournalJob(
            key=key,
            request_hash=None,
            video_url=job.video_url,
            stored=False,
            request=request_values(job),
        )
        self._jobs[key] = record
        return record

    async def submitting(
        self, key: str, stage: str, at: float, external_id: str | None = None
    ) -> None:
        """Record that ``stage``'s request of ``key`` is about to leave: on disk on return.

        ``external_id`` is the external task id the request carries, if any.
        """
        job = self._write_job(key)
        job.stages[stage] = JournalStage(status=SUBMITTING, intent_at=at, external_id=external_id)
        self._add(log.SUBMITTING, key, stage, at, external_id)
        await self._commit(durable=True)

    async def created(
        self,
        key: str,
        stage: str,
        task_id: str,
        snapshot: TaskSnapshot | None = None,
        *,
        adopted: bool = False,
    ) -> None:
        """Record ``stage``'s task id (and, for a synchronous step, its terminal ``snapshot``).

        ``adopted``: a lookup found the task, its submit's answer did not name it.  Only an
        adoption is waited for; a submit's answer is committed at once but not waited for (see
        the comment below): a later awaited write of the job implies it.
        """
        job = self._write_job(key)
        record = job.mark_created(stage, task_id, snapshot, adopted)
        self._owners[task_id] = key
        text = snapshot_to_json(snapshot) if snapshot is not None else None
        intent_at, external_id = record.intent_at, record.external_id
        self._add(log.CREATED, key, stage, intent_at, task_id, text, external_id, int(adopted))
        if adopted:
            # The proof behind an adoption (an answer that showed a task was made) is in no
            # record: a rerun that found only the intent might not adopt again.  Rare: wait.
            await self._commit()
            return
        # A submit's own answer: the commit starts now, but the job does not wait for it.
        # Why no guarantee weakens, crash point by crash point:
        # - Before the commit is durable the file holds the submit's intent, exactly as when
        #   the writer waited for this commit and the process died meanwhile: the commit
        #   starts at the same moment and takes as long; all the job does meanwhile is poll,
        #   which the server does not charge.  A rerun resolves the intent as after a crash
        #   mid-submit (docs/protocol.md and README, "Guarantees": by external id, else a
        #   provable adoption, else SubmitOutcomeUnknownError): never a second task.
        # - The committer commits statements in the order they were queued, each transaction
        #   everything queued so far.  Whatever this job does next that must follow the task
        #   id waits for a later statement: its next stage's intent (durable before that
        #   request leaves) and its result (committed before the consumer gets it).  So no
        #   later stage and no reported result is ever on disk without this task id.
        # - A failed commit breaks the store: the next write anyone waits for raises the
        #   JournalError, which stops the batch, as this one's would have (and if nobody
        #   waits for another write, close() raises it).

    def _set_meta(self, name: str, value: str) -> None:
        if not self._closed:
            self._add(log.META, name, value)

    async def refused(self, key: str, stage: str) -> None:
        """Record that ``stage``'s request of ``key`` created nothing (it may be sent again)."""
        record = self._jobs[key].stages.get(stage)
        if record is None or record.status != SUBMITTING:
            return
        record.status = REFUSED
        self._add(log.REFUSED, key, stage)
        await self._commit()

    async def finished(self, result: JobResult, *, final: bool) -> None:
        """Record ``result`` as its job's latest (not yet reported); committed on return."""
        job = self._write_job(result.key)
        job.result, job.final, job.reported = result, final, False
        self._add(log.FINISHED_RESULT, int(final), *result_values(result))
        await self._commit()

    def charges(self) -> dict[str, tuple[float, bool]]:
        """Budget reservations and charges as read at open: key -> ``(units, settled)``."""
        return dict(self._store.charges)

    def charge(self, key: str, units: float, settled: bool) -> None:
        """Record a budget reservation or charge; committed with the next write (or close)."""
        self._add(log.CHARGE, key, float(units), int(settled))

    def reported(self, key: str) -> None:
        """Mark ``key``'s latest result as taken by the consumer.

        Not waited for: the next transaction commits it, within moments (with whatever else
        is being written then), and :meth:`close` at the latest.
        """
        job = self._jobs.get(key)
        if job is None or job.reported or self._closed:
            return
        job.reported = True
        self._add(log.REPORTED, key)

    async def commit_marks(self) -> None:
        """Wait until cancelled (a task of the batch runs this; see :meth:`reported`).

        Every change queued is committed by the loop a moment later (:mod:`._sqlite_commit`),
        marks included: nothing is left for a task of its own (a wake-up per mark saved).
        """
        await anyio.sleep_forever()

    async def close(self) -> None:
        """Commit what is pending and close the file, releasing it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            self._committer.close()
            try:
                try:
                    await anyio.to_thread.run_sync(self._committer.stop)
                finally:  # (the file is released even when its last transaction failed)
                    await anyio.to_thread.run_sync(self._store.close)
            except sqlite3.Error as exc:
                raise journal_error(self.path, exc) from None

    def _write_job(self, key: str) -> JournalJob:
        job = self._jobs[key]
        if not job.stored:
            job.stored = True
            if key in self._in_file:
                # A replaced record's stages were all refused: none of them may be tracked.
                self._add(log.JOB_RESET, key)
            else:  # no row of this key was ever written: nothing to delete (one statement less)
                self._in_file.add(key)
            request, job.request = job.request, None
            assert request is not None  # (only begin() makes a record not stored yet)
            self._add(log.JOB_REQUEST, key, *request)
        return job

    def _add(self, *change: Any) -> None:
        """Queue ``change``: an operation code and its values (:mod:`._sqlite_log`)."""
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        self._committer.add(change)

    async def _commit(self, *, durable: bool = False) -> None:
        """Return once every statement added so far is committed (:mod:`._sqlite_commit`).

        ``durable``: and on disk (a power cut keeps it).  Concurrent writers share
        transactions (group commit); waiting is shielded, so that a statement once added is
        written even if its writer is cancelled, and memory and file agree about every submit.
        """
        await self._committer.wait(self._committer.queued, durable=durable)


def job_from_row(row: Row) -> JournalJob:
    """A job as :class:`JournalJob` from its row and its stages' rows (both backends)."""
    (key, request_hash, video_url, result, final, reported), stages = row
    job = JournalJob(
        key=key,
        request_hash=request_hash,
        video_url=video_url,
        result=result_from_json(result) if result else None,
        final=bool(final),
        reported=bool(reported),
    )
    for _, stage, status, intent_at, task_id, snapshot, external_id, adopted in stages:
        job.stages[stage] = JournalStage(
            status=status,
            intent_at=intent_at,
            task_id=task_id,
            snapshot=snapshot_from_json(snapshot) if snapshot else None,
            external_id=external_id,
            adopted=bool(adopted),
        )
    return job


def parse_offset(text: str | None) -> tuple[float, float] | None:
    """The clock offset interval kept as ``"lo hi"`` in the journal's meta (or None)."""
    if not text:
        return None
    lo, _, hi = text.partition(" ")
    return float(lo), float(hi)
