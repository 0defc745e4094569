"""The PostgreSQL journal: one batch, many workers, one account (tables: :mod:`._pg_schema`).

Every worker runs the same jobs against the same database.  :meth:`PgJournal.load` records the
jobs once (idempotent by key); :meth:`PgJournal.claim` hands each job to one worker, with a
task slot of the account taken in the same transaction (:mod:`._pg_claims`).  From then on the
worker writes what the SQLite journal writes (a submit's intent committed before its request
leaves, the task id, the result), each write fenced by the claim: it commits only while the job
is still this worker's.  A worker renews its lease every ``renew`` seconds; when it has not for
``lease`` seconds, the others take its jobs over: a known task is tracked (never submitted
again), a submit in flight is looked for as after a crash, and a result the dead worker
recorded but never reported is reported by the taker.  A worker whose lease expired stops at
its next write (:class:`~kling_async.JournalError`), since its jobs may be someone else's now.

Clocks: lease times are the database server's (``clock_timestamp()``), so workers on machines
whose clocks differ agree on who is dead.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

import anyio

from .._errors import JournalError
from .._identity import new_batch_id
from .._jobs import LipSyncJob
from .._results import JobResult, TaskSnapshot, TaskState
from . import _pg_sql as sql
from ._codec import request_hash, result_to_json, snapshot_to_json
from ._config import PostgresJournal, redact
from ._contract import Claim
from ._facts import ServerFacts
from ._pg_claims import (
    Claimed,
    Conn,
    claim_one,
    job_from_rows,
    load_jobs,
    parse_offset,
    read_stages,
    release_claims,
    store_begun,
    unclaim,
)
from ._pg_conn import Db
from ._pg_marks import MarkWriter
from ._pg_poll import PgPollSeat
from ._pg_schema import prepare
from ._sqlite import REFUSED, SUBMITTING, JournalJob, JournalStage

__all__ = ["PgJournal"]

T = TypeVar("T")


class PgJournal(ServerFacts):
    """A worker's view of a shared PostgreSQL journal; build it with :meth:`open`.

    Keeps :class:`~kling_async.journal.JournalBackend` (reads answer from the jobs this worker
    has claimed, in memory) and :class:`~kling_async.journal.SharedBackend`.
    """

    @property
    def transactions(self) -> int:
        """Statements and transactions committed since the journal opened."""
        return self._db.transactions

    def __init__(
        self,
        db: Db,
        config: PostgresJournal,
        worker: str,
        meta: dict[str, str] | None = None,
    ):
        meta = meta or {}
        #: The batch's id (written by the first worker: all derive the same external ids).
        self.batch_id = meta.get("batch_id") or new_batch_id()
        #: The server clock's offset interval a worker measured, if any.
        self.clock_offset = parse_offset(meta.get("clock_offset"))
        #: Whether a worker saw the server echo an external id.
        self.external_ids_confirmed = meta.get("external_ids") == "confirmed"
        self._db = db
        self._config = config
        self.path = redact(config.url)
        self.worker = worker
        self._writer = MarkWriter(db, config, worker, self.path, self._end_slots)
        self._jobs: dict[str, JournalJob] = {}  # the jobs this worker claimed (or began)
        self._owners: dict[str, str] = {}  # task id -> job key, every worker's (refresh())
        self._others: list[tuple[str, str, str | None, float]] = []  # unresolved submits
        self._known: set[str] = set()  # keys this worker can run (it loaded them)
        self._skip: set[str] = set()  # keys it cannot (another worker's job file)
        self._kept: set[str] = set()  # timed-out jobs whose slot is kept (see finished)
        self._slotless: set[str] = set()  # jobs claimed without a slot (claim's without_slot)
        self._charges: dict[str, float] = {}  # budget charges to write with their results
        self._freed = anyio.Event()  # set (and replaced) when a job of this worker ends
        self._closed = False

    @classmethod
    async def open(
        cls,
        config: PostgresJournal,
        *,
        dialect: str,
        stage: str,
        base_url: str,
        max_in_flight: int,
    ) -> PgJournal:
        """Connect, create or check the tables, set the account's limit, start this worker's lease.

        ``max_in_flight`` becomes the account's capacity for every worker (the last worker to
        start sets it).  Raises :class:`ValidationError` for a journal of another dialect or
        server, :class:`JournalError` when the database cannot be used.
        """
        where = redact(config.url)
        db = Db(config, max_in_flight)
        await db.open()
        worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        meta = {
            "dialect": dialect,
            "stage": stage,
            "base_url": base_url,
            "batch_id": new_batch_id(),
        }

        async def setup(conn: Conn) -> dict[str, str]:
            stored = await prepare(conn, where, meta)
            await conn.execute(
                "INSERT INTO kling_account (id, capacity, lim) VALUES (1, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET capacity = EXCLUDED.capacity,"
                " lim = LEAST(kling_account.lim, EXCLUDED.capacity)",
                (max_in_flight, max_in_flight),
            )
            await conn.execute(
                "INSERT INTO kling_workers (id, host, pid, expires_at) VALUES"
                " (%s, %s, %s, clock_timestamp() + make_interval(secs => %s))"
                " ON CONFLICT (id) DO NOTHING",  # (run again after a lost answer: see Db)
                (worker, socket.gethostname(), os.getpid(), config.lease),
            )
            return stored

        try:
            stored = await db.tx(setup)
        except BaseException:
            await db.close()
            raise
        return cls(db, config, worker, stored)

    # -- reading -------------------------------------------------------------------------

    def job(self, key: str) -> JournalJob | None:
        """The record of ``key`` if this worker claimed it, else None."""
        return self._jobs.get(key)

    def jobs(self) -> list[JournalJob]:
        """The jobs this worker has claimed (or begun)."""
        return list(self._jobs.values())

    def owner(self, task_id: str) -> str | None:
        """The key of the job that owns ``task_id`` (as of the last :meth:`refresh`), or None."""
        return self._owners.get(task_id)

    def unresolved(self, key: str, stage: str, video_url: str, near: float, within: float) -> int:
        """Jobs besides ``key`` (any worker's, as of :meth:`refresh`) with an unanswered submit."""
        mine = sum(
            1
            for job in self._jobs.values()
            if job.key != key and job.waits_on(stage, video_url, near, within)
        )
        others = sum(
            1
            for other, other_stage, url, at in self._others
            if other != key
            and other not in self._jobs
            and other_stage == stage
            and url == video_url
            and abs(at - near) <= within
        )
        return mine + others

    # -- the contract's writes -----------------------------------------------------------

    def begin(self, key: str, job: LipSyncJob) -> JournalJob:
        """Start a record for ``key``, running ``job``, outside :meth:`load`.

        It is written, and claimed by this worker, with its first change.
        """
        record = JournalJob(
            key=key, request_hash=request_hash(job), video_url=job.video_url, stored=False
        )
        self._jobs[key] = record
        return record

    async def submitting(
        self, key: str, stage: str, at: float, external_id: str | None = None
    ) -> None:
        """Record that ``stage``'s request of ``key`` is about to leave: committed on return.

        Durably: on the database server's disk before the request leaves (see :meth:`_one`).
        ``external_id`` is the external task id the request carries, if any.
        """
        job = self._jobs[key]
        job.stages[stage] = JournalStage(status=SUBMITTING, intent_at=at, external_id=external_id)
        params = {"stage": stage, "at": at, "external_id": external_id}
        await self._fenced(job, sql.SUBMITTING, params, durable=True)

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

        ``adopted``: the task was found by a lookup.
        """
        job = self._jobs[key]
        record = job.mark_created(stage, task_id, snapshot, adopted)
        self._owners[task_id] = key
        text = snapshot_to_json(snapshot) if snapshot is not None else None
        params = {
            "stage": stage,
            "at": record.intent_at,
            "task_id": task_id,
            "snapshot": text,
            "external_id": record.external_id,
            "adopted": adopted,
        }
        await self._fenced(job, sql.CREATED, params)

    async def refused(self, key: str, stage: str) -> None:
        """Record that ``stage``'s request of ``key`` created nothing (it may be sent again)."""
        job = self._jobs[key]
        record = job.stages.get(stage)
        if record is None or record.status != SUBMITTING:
            return
        record.status = REFUSED
        await self._fenced(job, sql.REFUSED, {"stage": stage})

    async def finished(self, result: JobResult, *, final: bool) -> None:
        """Record ``result`` (the job is done) and give its task slot back to the account."""
        job = self._jobs[result.key]
        job.result, job.final, job.reported = result, final, False
        # A timed-out task may still run: its slot stays the job's until the batch's follower
        # sees it end (slot_ended), as the batch's own slot does (kling_async._slots).
        keep = result.state is TaskState.TIMED_OUT and result.task_id is not None
        params = {
            "result": result_to_json(result),
            "final": final,
            "ended": result.task_id is not None,
            "keep": keep,
        }
        charge = self._charges.pop(result.key, None)
        if charge is not None:  # (the budget's charge for the task that ended, first)
            await self._fenced(job, sql.CHARGE, _charge_params(charge, settled=True))
        if keep:
            # Kept before the write: the batch may let go of the slot while it is under way
            # (its follower cancelled as the batch stops), and slot_ended must not miss it.
            # An early SLOT_ENDED frees the slot first; FINISHED then finds none to keep.
            self._kept.add(result.key)
        try:
            await self._fenced(job, sql.FINISHED, params)
        except BaseException:
            # Not recorded: the job holds its slot as a claimed job does (close hands it on).
            self._kept.discard(result.key)
            raise
        if not keep:
            self._wake()

    async def reserve_charge(
        self, key: str, units: float, *, limit: float, force: bool
    ) -> tuple[bool, float]:
        """Reserve ``units`` of the batch's budget for ``key`` (replacing its earlier charge).

        Atomic across every worker: granted only if the batch's total stays within ``limit``
        (or ``force``).  Returns whether it was granted, and the batch's total after it (or as
        it stands, when refused).
        """
        params = _charge_params(units, settled=False, limit=limit, force=force)
        row = await self._fenced(self._jobs[key], sql.CHARGE, params)
        return bool(row[2]), float(row[3])

    def charge(self, key: str, units: float, settled: bool) -> None:
        """Record what ``key``'s task cost (``settled``): written with its result (finished).

        A reservation (not ``settled``) is :meth:`reserve_charge`'s, never this one's.
        """
        if settled:
            self._charges[key] = units

    def slot_ended(self, key: str) -> None:
        """The batch let go of ``key``'s slot: a kept one (timed out) goes back to the account.

        Not waited for: committed with the next marks (and at close at the latest).
        """
        if key in self._kept and not self._closed:
            self._kept.discard(key)
            self._writer.end_slots([key])

    def _set_meta(self, name: str, value: str) -> None:
        if not self._closed:
            self._writer.set_meta(name, value)

    def reported(self, key: str) -> None:
        """Mark ``key``'s result as taken by the consumer (:meth:`commit_marks` commits it)."""
        job = self._jobs.get(key)
        if job is None or job.reported or self._closed:
            return
        job.reported = True
        self._writer.mark(key)

    async def commit_marks(self) -> None:
        """Commit marks as they come and renew this worker's lease, until cancelled.

        See :meth:`._pg_marks.MarkWriter.run`: an outage shorter than the lease loses nothing.
        """
        await self._writer.run()

    async def close(self) -> None:
        """Commit marks, hand back the jobs this worker claimed but did not finish, end its lease.

        A job whose submit never left gives its slot back; one whose task may exist keeps it
        (the task may be running) for whichever worker claims it next.
        """
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                if self._db.broken is None:
                    # The batch follows no task any more: a slot still kept goes back now.
                    self._writer.end_slots(self._kept)
                    self._kept.clear()
                    await self._writer.flush()
                    await self._db.tx(functools.partial(release_claims, worker=self.worker))
            finally:
                await self._db.close()

    # -- the shared part -----------------------------------------------------------------

    async def load(self, jobs: Sequence[tuple[str, str, str | None]]) -> None:
        """Record every ``(key, request_hash, video_url)`` once; see :class:`SharedBackend`.

        Also makes the jobs an earlier run left unfinished (a result a rerun does not keep,
        of a worker no longer alive) claimable again, as a rerun of a SQLite journal does.
        """
        self._known.update(key for key, _, _ in jobs)
        await self._db.tx(functools.partial(load_jobs, jobs=jobs))

    async def claim(self, skip: Sequence[str] = (), *, without_slot: bool = False) -> Claim:
        """The next job for this worker, as :data:`~kling_async.journal.Claim` says.

        Its key, a dead worker's unreported result, None (nothing to claim now: wait and ask
        again) or False (every job is done).  ``without_slot``: a pending job is claimed even
        when no task slot is free, without one (see :meth:`holds_slot`).
        """
        while True:
            skipped = self._skip.union(skip)
            claim = functools.partial(
                claim_one, worker=self.worker, skip=skipped, without_slot=without_slot
            )
            got = await self._db.auto(
                claim,
                # A claim whose answer was lost is handed back before claiming again.
                recover=functools.partial(release_claims, worker=self.worker, keep=self._jobs),
            )
            if got is None:
                return False
            if not isinstance(got, Claimed):
                return None
            key = str(got.row[0])
            if key not in self._known:
                # Not among this worker's jobs: hand it back (another worker runs it).
                self._skip.add(key)
                await self._db.tx(
                    functools.partial(unclaim, key=key, row=got.row, worker=self.worker)
                )
                continue
            job = job_from_rows(got.row, got.stages)
            self._jobs[key] = job
            if got.slot:
                self._slotless.discard(key)
            else:
                self._slotless.add(key)
            for stage in job.stages.values():
                if stage.task_id is not None:
                    self._owners[stage.task_id] = key
            if got.row[3] == "done" and got.row[4]:
                # A dead worker's timed-out task kept its slot: nobody follows it now.
                await self._fenced(job, sql.SLOT_ENDED, {"ended": False})
            if got.row[3] == "done" and job.result is not None:
                return job.result  # finished by a worker that died before reporting it
            return key

    def holds_slot(self, key: str) -> bool:
        """Whether this worker's claim of ``key`` came with a task slot (or held one already)."""
        return key not in self._slotless

    async def concurrency_refused(self, key: str) -> None:
        """A 1303 for ``key``: lower the shared limit and free the job's slot."""
        await self._fenced(self._jobs[key], sql.LOWER_LIMIT, {})

    async def regain_slot(self, key: str) -> None:
        """Wait until the shared limit lets ``key`` hold a slot again, and take it."""
        job = self._jobs[key]
        while True:
            row = await self._fenced(job, sql.REGAIN_SLOT, {})
            if row[1] or row[2]:  # held one already, or took one now
                return
            await self.wait_for_slot()

    async def refresh(self) -> None:
        """Re-read every worker's task ids and unanswered submits (see :meth:`unresolved`)."""
        rows = await self._db.tx(read_stages)
        self._others = []
        for key, stage, status, intent_at, task_id, url in rows:
            if task_id is not None:
                self._owners[task_id] = key
            if status == SUBMITTING:
                self._others.append((key, stage, url, intent_at))

    def poll_seat(self) -> PgPollSeat:
        """The claim of this worker on the seat of the one worker that polls for all."""
        return PgPollSeat(self._db, self._config, self.batch_id)

    async def wait_for_slot(self) -> None:
        """Return when a job of this worker ends, or after ``claim_poll`` seconds.

        Either way a slot may be free now (another worker's job may have ended meanwhile).
        """
        with anyio.move_on_after(self._config.claim_poll):
            await self._freed.wait()

    # -- internals -----------------------------------------------------------------------

    def _wake(self) -> None:
        freed, self._freed = self._freed, anyio.Event()
        freed.set()

    async def _fenced(
        self,
        job: JournalJob,
        statement: str,
        params: dict[str, Any],
        *,
        durable: bool = False,
        closing: bool = False,
    ) -> tuple[Any, ...]:
        """Run a :mod:`._pg_sql` statement on ``job`` (else raise: it is another worker's).

        A job begun outside :meth:`load` is written (and claimed) first, with its first change.
        ``closing``: a write :meth:`close` makes itself (after the journal closed to the batch).
        """
        if self._closed and not closing:
            raise JournalError(f"journal {self.path} is closed")
        with anyio.CancelScope(shield=True):  # memory and database must agree
            if not job.stored:
                job.stored = True
                await self._db.tx(functools.partial(store_begun, job=job, worker=self.worker))
            row = await self._db.one(
                statement, {**params, "key": job.key, "worker": self.worker}, durable=durable
            )
        if not row[0]:
            self._db.broken = JournalError(
                f"journal {self.path}: job {job.key!r} is no longer this worker's (its lease"
                " expired and another worker took it over); this worker stops"
            )
            raise self._db.broken
        return row

    async def _end_slots(self, keys: list[str]) -> None:
        """Give the kept slots of ``keys`` back to the account (at close too)."""
        for key in keys:
            await self._fenced(self._jobs[key], sql.SLOT_ENDED, {"ended": True}, closing=True)
        self._wake()


def _charge_params(
    units: float, *, settled: bool, limit: float = 0.0, force: bool = True
) -> dict[str, Any]:
    """Parameters of :data:`._pg_sql.CHARGE` (a settled charge is never refused)."""
    return {"units": float(units), "settled": settled, "limit": float(limit), "force": force}
