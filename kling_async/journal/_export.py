"""Reading a whole journal from outside its batch: every job's latest result, and counts.

What ``kling-async results`` and ``kling-async status --journal`` print, for both backends:

* :func:`read_jobs` returns every job the journal recorded, with its stages and latest result;
* :func:`read_status` counts jobs by state, tasks running, the budget's units spent and
  reserved, and (PostgreSQL) the workers and their leases.

A SQLite journal is read from its file (read-only; a batch running on it holds the file's lock,
so it is read once that batch has ended).  A PostgreSQL journal is read while its workers run.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import attrs

from .._errors import JournalError
from ._codec import UNREADABLE, unreadable
from ._config import PostgresJournal, is_postgres_url, redact
from ._sqlite import CREATED, JournalJob, job_from_row
from ._sqlite_log import fold
from ._sqlite_store import SCHEMA_VERSION, Row, journal_error, read_rows

__all__ = ["JournalStatus", "WorkerLease", "read_jobs", "read_status"]


@attrs.frozen(kw_only=True)
class WorkerLease:
    """One worker of a shared journal and its lease (seconds left; negative: expired)."""

    worker: str
    host: str
    pid: int
    started_at: float
    expires_in: float
    jobs: int


@attrs.frozen(kw_only=True)
class JournalStatus:
    """A journal at a glance: jobs by state, tasks running, workers."""

    jobs: int
    states: dict[str, int]
    running: int
    workers: tuple[WorkerLease, ...] = ()
    limit: int | None = None
    capacity: int | None = None
    slots_held: int | None = None
    #: Budget units charged by tasks that ended, and reserved for tasks that may still run
    #: (None: the batches on this journal had no budget).
    units_spent: float | None = None
    units_reserved: float | None = None


def job_state(job: JournalJob) -> str:
    """One word for where ``job`` stands.

    The result's state (``succeeded``, ``failed``, ``timed_out``...), else ``running`` (a task
    exists), ``submitting`` (a submit's outcome is not known yet) or ``pending``.
    """
    if job.result is not None:
        return job.result.state.value
    statuses = {stage.status for stage in job.stages.values()}
    if CREATED in statuses:
        return "running"
    if "submitting" in statuses:
        return "submitting"
    return "pending"


def _target_name(target: str | os.PathLike[str] | PostgresJournal) -> str:
    if isinstance(target, PostgresJournal):
        return redact(target.url)
    return redact(str(target)) if is_postgres_url(target) else os.fspath(target)


async def read_jobs(target: str | os.PathLike[str] | PostgresJournal) -> list[JournalJob]:
    """Every job the journal at ``target`` recorded, in the order they were recorded."""
    return (await _read(target))[0]


#: A journal's budget: units spent (tasks that ended) and reserved, or None without charges.
Spend = tuple[float, float] | None

# The charges' sums, by SQL that both SQLite and PostgreSQL read alike.
_SPEND = (
    "SELECT count(*), COALESCE(sum(CASE WHEN settled THEN units ELSE 0 END), 0),"
    " COALESCE(sum(CASE WHEN settled THEN 0 ELSE units END), 0) FROM {table}"
)


def _spend(row: Any) -> Spend:
    return (float(row[1]), float(row[2])) if row and row[0] else None


async def _read(target: str | os.PathLike[str] | PostgresJournal) -> tuple[list[JournalJob], Spend]:
    if isinstance(target, PostgresJournal) or is_postgres_url(target):
        url = target.url if isinstance(target, PostgresJournal) else str(target)
        rows, spend = await _pg_rows(url)
    else:
        rows, spend = await anyio.to_thread.run_sync(_sqlite_rows, Path(target))
    try:
        return [job_from_row(row) for row in rows], spend
    except UNREADABLE as exc:
        raise unreadable(_target_name(target), exc) from None


async def read_status(target: str | os.PathLike[str] | PostgresJournal) -> JournalStatus:
    """Counts of the journal at ``target`` (see :class:`JournalStatus`)."""
    jobs, spend = await _read(target)
    states: dict[str, int] = {}
    for job in jobs:
        state = job_state(job)
        states[state] = states.get(state, 0) + 1
    status = JournalStatus(jobs=len(jobs), states=states, running=states.get("running", 0))
    if spend is not None:
        status = attrs.evolve(status, units_spent=spend[0], units_reserved=spend[1])
    if isinstance(target, PostgresJournal) or is_postgres_url(target):
        url = target.url if isinstance(target, PostgresJournal) else str(target)
        workers, account = await _pg_workers(url)
        status = attrs.evolve(
            status,
            workers=workers,
            capacity=account[0] if account else None,
            limit=account[1] if account else None,
            slots_held=account[2] if account else None,
        )
    return status


def _sqlite_rows(path: Path) -> tuple[list[Row], Spend]:
    if not path.exists():
        raise JournalError(f"journal {path}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error as exc:
        raise journal_error(str(path), exc) from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:  # (its records may not mean what this version reads)
            raise JournalError(
                f"journal {path}: layout version {version} is newer than the supported"
                f" {SCHEMA_VERSION} (written by a newer kling_async: read it with that one)"
            )
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone():
            # The last run's changes are in the log until the journal opens again: fold them
            # into a copy (the file itself is read-only here).
            copy = sqlite3.connect(":memory:")
            conn.backup(copy)
            conn.close()
            conn = copy
            fold(conn, str(path))
        spend = None
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'charges'").fetchone():
            spend = _spend(conn.execute(_SPEND.format(table="charges")).fetchone())
        return read_rows(conn), spend
    except sqlite3.Error as exc:
        raise journal_error(str(path), exc) from None
    finally:
        conn.close()


async def _pg_rows(url: str) -> tuple[list[Row], Spend]:
    import psycopg

    try:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute(
                "SELECT key, request_hash, video_url, result, final, reported FROM kling_jobs"
                " ORDER BY seq, key"
            )
            jobs: dict[str, Row] = {row[0]: (row, []) for row in await cur.fetchall()}
            cur = await conn.execute(
                "SELECT key, stage, status, intent_at, task_id, snapshot, external_id, adopted"
                " FROM kling_stages"
            )
            for row in await cur.fetchall():
                if row[0] in jobs:
                    jobs[row[0]][1].append(row)
            spend = None
            cur = await conn.execute("SELECT to_regclass('kling_charges') IS NOT NULL")
            charges = await cur.fetchone()
            if charges and charges[0]:  # (a journal begun before shared budgets has none)
                cur = await conn.execute(_SPEND.format(table="kling_charges"))
                spend = _spend(await cur.fetchone())
    except psycopg.Error as exc:
        raise JournalError(f"journal {redact(url)}: {str(exc).strip()[:300]}") from None
    return list(jobs.values()), spend


async def _pg_workers(url: str) -> tuple[tuple[WorkerLease, ...], tuple[Any, ...] | None]:
    import psycopg

    try:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute(
                "SELECT w.id, w.host, w.pid, extract(epoch FROM w.started_at),"
                " extract(epoch FROM w.expires_at - clock_timestamp()),"
                " (SELECT count(*) FROM kling_jobs j WHERE j.worker = w.id"
                "  AND j.state = 'claimed')"
                " FROM kling_workers w WHERE NOT w.drained ORDER BY w.started_at"
            )
            workers = tuple(
                WorkerLease(
                    worker=str(row[0]),
                    host=str(row[1]),
                    pid=int(row[2]),
                    started_at=float(row[3]),
                    expires_in=float(row[4]),
                    jobs=int(row[5]),
                )
                for row in await cur.fetchall()
            )
            cur = await conn.execute("SELECT capacity, lim, held FROM kling_account")
            account = await cur.fetchone()
    except psycopg.Error as exc:
        raise JournalError(f"journal {redact(url)}: {str(exc).strip()[:300]}") from None
    return workers, account
