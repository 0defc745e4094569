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

from collections.abc import Collection
from typing import Any

import attrs
from psycopg import AsyncConnection

__all__ = ["Claimed", "claim_one", "dead_workers", "give_back", "lower_limit", "take_slot"]

Conn = AsyncConnection[tuple[Any, ...]]

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


async def claim_one(conn: Conn, worker: str, skip: Collection[str]) -> Claimed | str | None:
    """Claim a job for ``worker``: the claim, ``"no-slot"``, ``"none"`` (nothing left to claim
    now) or None (every job is done or claimed by this worker).

    Keys in ``skip`` (jobs this worker cannot run) are left alone.
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
        "SELECT key, stage, status, intent_at, task_id, snapshot FROM kling_stages"
        " WHERE key = %s",
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
