"""The statements behind claims and task slots of the PostgreSQL journal (one transaction each).

Every function takes a connection inside the caller's transaction.  Locks are always taken in
the same order, a job's row before the account's row, so two workers never wait on each other
in a circle.

* :func:`claim_one` claims the next job with ``SELECT ... FOR UPDATE SKIP LOCKED`` (so two
  workers never claim the same job, and neither waits for the other), and in the same
  transaction the task slot it needs: ``held + 1`` only where ``held < lim``.  A job that holds
  a slot already (its task may be running: its worker died or stopped) is claimed first and
  needs none.  Jobs of workers whose lease has expired are claimed before new ones.
* :func:`give_back` frees a job's slot when its task has ended; a task that ended counts as a
  clean finish, and after ``lim`` of them the shared limit grows by one (as
  :class:`kling_async._slots.TaskSlots` does in one process).
* :func:`lower_limit` is a 1303: the limit becomes the slots held less one, for every worker.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import attrs
from psycopg import AsyncConnection

from .._errors import ValidationError

__all__ = [
    "Claimed",
    "claim_one",
    "dead_workers",
    "give_back",
    "load_jobs",
    "lower_limit",
    "release_claims",
    "renew_lease",
    "take_slot",
]

Conn = AsyncConnection[tuple[Any, ...]]

#: Jobs written per statement batch when loading.
_LOAD_CHUNK = 1000

_JOB_COLUMNS = "key, request_hash, video_url, state, slot, result, final, reported"


@attrs.frozen(kw_only=True)
class Claimed:
    """A job row this worker has just claimed, and its stage rows."""

    row: tuple[Any, ...]
    stages: list[tuple[Any, ...]]


async def dead_workers(conn: Conn) -> list[str]:
    """Workers whose lease has expired and who may still have jobs to take over."""
    cur = await conn.execute(
        "SELECT id FROM kling_workers WHERE expires_at < clock_timestamp() AND NOT drained"
    )
    return [str(row[0]) for row in await cur.fetchall()]


async def claim_one(conn: Conn, *, worker: str, skip: Collection[str]) -> Claimed | str | None:
    """Claim a job for ``worker``, in the caller's transaction.

    Returns the claim, ``"no-slot"``, ``"none"`` (nothing left to claim now) or None (every
    job is done, or claimed by this worker).  Keys in ``skip`` (jobs this worker cannot run)
    are left alone.
    """
    skipped = list(skip)
    row = None
    dead = await dead_workers(conn)
    if dead:
        cur = await conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM kling_jobs WHERE worker = ANY(%s)"
            " AND (state = 'claimed' OR (state = 'done' AND NOT reported))"
            " AND NOT (key = ANY(%s)) ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
            (dead, skipped),
        )
        row = await cur.fetchone()
        if row is None:  # nothing of theirs left (or being taken right now by another)
            await conn.execute(
                "UPDATE kling_workers w SET drained = true WHERE id = ANY(%s) AND NOT EXISTS"
                " (SELECT 1 FROM kling_jobs j WHERE j.worker = w.id"
                " AND (j.state = 'claimed' OR (j.state = 'done' AND NOT j.reported)))",
                (dead,),
            )
    if row is None:
        cur = await conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM kling_jobs WHERE state = 'pending'"
            " AND NOT (key = ANY(%s)) ORDER BY slot DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED",
            (skipped,),
        )
        row = await cur.fetchone()
    if row is None:
        cur = await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM kling_jobs WHERE NOT (key = ANY(%s)) AND"
            " (state = 'pending' OR (state = 'claimed' AND worker IS DISTINCT FROM %s)"
            " OR (state = 'done' AND NOT reported AND worker = ANY(%s))))",
            (skipped, worker, dead),
        )
        found = await cur.fetchone()
        return "none" if found is not None and found[0] else None
    key, state, slot = row[0], row[3], row[4]
    if state != "done" and not slot and not await take_slot(conn):
        return "no-slot"
    await conn.execute(
        "UPDATE kling_jobs SET worker = %s, touched_at = clock_timestamp(),"
        " state = CASE WHEN state = 'done' THEN 'done' ELSE 'claimed' END,"
        " slot = CASE WHEN state = 'done' THEN slot ELSE true END WHERE key = %s",
        (worker, key),
    )
    cur = await conn.execute(
        "SELECT key, stage, status, intent_at, task_id, snapshot FROM kling_stages WHERE key = %s",
        (key,),
    )
    return Claimed(row=row, stages=list(await cur.fetchall()))


async def take_slot(conn: Conn) -> bool:
    """Take one of the account's slots if the shared limit allows."""
    cur = await conn.execute(
        "UPDATE kling_account SET held = held + 1 WHERE id = 1 AND held < lim RETURNING held"
    )
    return await cur.fetchone() is not None


async def give_back(conn: Conn, *, ended: bool) -> None:
    """Free one slot; ``ended``: its task ended (a clean finish, which may raise the limit)."""
    if not ended:
        await conn.execute("UPDATE kling_account SET held = held - 1 WHERE id = 1")
        return
    await conn.execute(
        "UPDATE kling_account SET held = held - 1,"
        " lim = CASE WHEN lim < capacity AND clean + 1 >= lim THEN lim + 1 ELSE lim END,"
        " clean = CASE WHEN lim < capacity AND clean + 1 >= lim THEN 0 ELSE clean + 1 END"
        " WHERE id = 1"
    )


async def lower_limit(conn: Conn) -> None:
    """A 1303 while the refused job still held its slot: the account sustains one fewer."""
    await conn.execute(
        "UPDATE kling_account SET lim = GREATEST(1, held - 1), clean = 0, held = held - 1"
        " WHERE id = 1"
    )


async def load_jobs(conn: Conn, *, jobs: Sequence[tuple[str, str, str | None]]) -> None:
    """Insert every ``(key, request_hash, video_url)`` not recorded yet, in input order.

    A key recorded with another request is refused when that request may have created a task
    (:class:`ValidationError`), and starts over otherwise.  Jobs whose latest result a rerun
    does not keep (see ``kling_async._resume.is_final``), of workers no longer alive, become
    claimable again.
    """
    rows = [(key, seq, digest, url) for seq, (key, digest, url) in enumerate(jobs)]
    async with conn.cursor() as cur:
        for start in range(0, len(rows), _LOAD_CHUNK):
            await cur.executemany(
                "INSERT INTO kling_jobs (key, seq, request_hash, video_url)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (key) DO NOTHING",
                rows[start : start + _LOAD_CHUNK],
            )
    await _check_changed(conn, {key: (digest, url) for key, digest, url in jobs})
    await conn.execute(
        "UPDATE kling_jobs SET state = 'pending', worker = NULL WHERE state = 'done'"
        " AND NOT final AND (worker IS NULL OR worker IN (SELECT id FROM kling_workers"
        " WHERE expires_at < clock_timestamp()))"
    )


async def _check_changed(conn: Conn, wanted: dict[str, tuple[str, str | None]]) -> None:
    cur = await conn.execute(
        "SELECT j.key, j.request_hash, EXISTS (SELECT 1 FROM kling_stages s WHERE"
        " s.key = j.key AND s.status <> 'refused') FROM kling_jobs j WHERE j.key = ANY(%s)",
        (list(wanted),),
    )
    for key, digest, may_have_task in await cur.fetchall():
        new_digest, url = wanted[key]
        if digest == new_digest:
            continue
        if may_have_task:
            raise ValidationError(
                "key",
                f"{key!r} names another job than the one this journal recorded under it"
                " (its request differs) and that one may have created a task; give the"
                " changed job a new key, or use a new journal",
            )
        # It never created a task: its record starts over (a slot it held is freed).
        cur = await conn.execute("SELECT slot FROM kling_jobs WHERE key = %s FOR UPDATE", (key,))
        held = await cur.fetchone()
        await conn.execute(
            "UPDATE kling_jobs SET request_hash = %s, video_url = %s, state = 'pending',"
            " worker = NULL, result = NULL, final = false, reported = false, slot = false"
            " WHERE key = %s",
            (new_digest, url, key),
        )
        await conn.execute("DELETE FROM kling_stages WHERE key = %s", (key,))
        if held is not None and held[0]:
            await give_back(conn, ended=False)


async def renew_lease(conn: Conn, *, worker: str, lease: float) -> bool:
    """Extend ``worker``'s lease by ``lease`` seconds; False once it has expired (for good)."""
    cur = await conn.execute(
        "UPDATE kling_workers SET expires_at = clock_timestamp() + make_interval(secs => %s)"
        " WHERE id = %s AND NOT drained AND expires_at > clock_timestamp() RETURNING id",
        (lease, worker),
    )
    return await cur.fetchone() is not None


async def release_claims(conn: Conn, *, worker: str) -> None:
    """A worker stops: its unfinished jobs become claimable, and its lease ends now.

    A job whose submit never left gives its slot back; one whose task may exist keeps it.
    """
    cur = await conn.execute(
        "SELECT j.key, j.slot, EXISTS (SELECT 1 FROM kling_stages s WHERE s.key = j.key"
        " AND s.status <> 'refused') FROM kling_jobs j WHERE j.worker = %s"
        " AND j.state = 'claimed' FOR UPDATE",
        (worker,),
    )
    rows = await cur.fetchall()
    for key, slot, may_have_task in rows:
        await conn.execute(
            "UPDATE kling_jobs SET state = 'pending', worker = NULL, slot = %s WHERE key = %s",
            (bool(slot and may_have_task), key),
        )
        if slot and not may_have_task:
            await give_back(conn, ended=False)
    await conn.execute(
        "UPDATE kling_workers SET expires_at = LEAST(expires_at, clock_timestamp()) WHERE id = %s",
        (worker,),
    )
