"""Claims, loading, leases and slot hand-backs of the PostgreSQL journal.

Locks are always taken in the same order, a job's row before the account's row, so two
workers never wait on each other in a circle.

* :func:`claim_one` claims the next job with ``SELECT ... FOR UPDATE SKIP LOCKED`` (so two
  workers never claim the same job, and neither waits for the other), and in the same
  statement, one transaction, the task slot it needs: ``held + 1`` only where ``held < lim``.
  A job that holds a slot already (its task may be running: its worker died or stopped) is
  claimed first and needs none.  Jobs of workers whose lease has expired come before new ones
  (unless one needs a slot and none is free).
* :func:`load_jobs` records the jobs (idempotent by key); :func:`renew_lease` and
  :func:`release_claims` keep and end a worker's lease; :func:`give_back` frees a slot.
* The writes on one claimed job (the result gives its slot back, a 1303 lowers the shared
  limit for everyone) are the statements of :mod:`._pg_sql`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import attrs
from psycopg import AsyncConnection

from .._errors import ValidationError
from ._sqlite import JournalJob, job_from_row, parse_offset

__all__ = [
    "Claimed",
    "claim_one",
    "give_back",
    "job_from_rows",
    "load_jobs",
    "parse_offset",
    "read_stages",
    "release_claims",
    "renew_lease",
    "store_begun",
    "unclaim",
    "write_marks",
]

Conn = AsyncConnection[tuple[Any, ...]]

#: Jobs written per statement batch when loading.
_LOAD_CHUNK = 1000

#: Workers whose lease has expired and who may still have jobs to take over.
_DEAD = """dead AS MATERIALIZED (
    SELECT id FROM kling_workers WHERE expires_at < clock_timestamp() AND NOT drained)"""


@attrs.frozen(kw_only=True)
class Claimed:
    """A job row this worker has just claimed, and its stage rows.

    ``row``: key, request_hash, video_url, state and slot before the claim, result, final,
    reported, and the worker it was claimed from (a dead one's, or None).  ``slot``: whether
    the job holds a task slot of the account now.
    """

    row: tuple[Any, ...]
    stages: list[tuple[Any, ...]]
    slot: bool = True


#: One job's stages as a JSON array of rows (``{key}``: the job's key, a column or a parameter).
_STAGES_OF = """SELECT json_agg(json_build_array(s.key, s.stage, s.status, s.intent_at,
    s.task_id, s.snapshot, s.external_id, s.adopted)) FROM kling_stages s WHERE s.key = {key}"""


#: Claim one job in one statement (one round trip): a dead worker's job first (unless it needs a
#: slot and none is free), else the first pending one (one that holds a slot first: its task may
#: be running); a slot from the account only for a job that needs one and only while
#: ``held < lim``; the job's stages with it.  ``without_slot``: a pending job that needs a slot
#: while none is free is claimed anyway, without one (it has waited ``max_slot_wait`` in vain).
_CLAIM = f"""
WITH {_DEAD},
orphan AS (
    SELECT key, state, slot, worker FROM kling_jobs
    WHERE worker IN (SELECT id FROM dead)
      AND (state = 'claimed' OR (state = 'done' AND NOT reported))
      AND NOT (key = ANY(%(skip)s))
      -- One that needs a slot while none is free waits, and does not hold up the jobs that
      -- hold one (their slots may be the ones it waits for).
      AND (slot OR state = 'done' OR (SELECT held < lim FROM kling_account WHERE id = 1))
    ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED),
fresh AS (
    SELECT key, state, slot, worker FROM kling_jobs
    WHERE state = 'pending' AND NOT (key = ANY(%(skip)s)) AND NOT EXISTS (SELECT 1 FROM orphan)
    ORDER BY slot DESC, seq LIMIT 1 FOR UPDATE SKIP LOCKED),
chosen AS (SELECT * FROM orphan UNION ALL SELECT * FROM fresh),
acc AS (
    UPDATE kling_account SET held = held + 1
    WHERE id = 1 AND held < lim
      AND EXISTS (SELECT 1 FROM chosen WHERE state <> 'done' AND NOT slot)
    RETURNING 1),
upd AS (
    UPDATE kling_jobs j SET worker = %(worker)s, touched_at = clock_timestamp(),
        state = CASE WHEN c.state = 'done' THEN 'done' ELSE 'claimed' END,
        slot = CASE WHEN c.state = 'done' THEN c.slot
            ELSE c.slot OR EXISTS (SELECT 1 FROM acc) END
    FROM chosen c
    WHERE j.key = c.key AND (c.state = 'done' OR c.slot OR EXISTS (SELECT 1 FROM acc)
        OR (%(without_slot)s AND c.state = 'pending'))
    RETURNING j.key, j.request_hash, j.video_url, c.state, c.slot, j.result, j.final,
        j.reported, c.worker, j.slot)
SELECT (SELECT count(*) FROM chosen), upd.*, ({_STAGES_OF.format(key="upd.key")})
FROM (SELECT 1) one LEFT JOIN upd ON true
"""

#: A job's stages, read again after its claim (see :func:`claim_one`).
_STAGES = _STAGES_OF.format(key="%s")

#: Nothing claimed: the slots dead workers kept for their timed-out tasks go back to the
#: account.  Nobody follows those tasks any more (as when a batch stops, see ``_slots``), and
#: every other worker would wait for those slots for ever.
_FREE_KEPT = f"""
WITH {_DEAD},
freed AS (
    UPDATE kling_jobs SET slot = false
    WHERE EXISTS (SELECT 1 FROM dead)  -- (no scan at all while every worker is alive)
      AND worker IN (SELECT id FROM dead) AND state = 'done' AND slot
    RETURNING 1)
UPDATE kling_account SET held = held - (SELECT count(*) FROM freed)
WHERE id = 1 AND EXISTS (SELECT 1 FROM freed)
"""

#: Nothing to claim: is anything left that this worker may yet claim?  Dead workers with
#: nothing left to take over (or to free: ``_FREE_KEPT``) are marked drained on the way (not
#: looked at again).
_LEFT = f"""
WITH {_DEAD},
drain AS (
    UPDATE kling_workers w SET drained = true
    WHERE id IN (SELECT id FROM dead) AND NOT EXISTS (
        SELECT 1 FROM kling_jobs j WHERE j.worker = w.id
          AND (j.state = 'claimed' OR (j.state = 'done' AND (NOT j.reported OR j.slot)))))
SELECT EXISTS (
    SELECT 1 FROM kling_jobs WHERE NOT (key = ANY(%(skip)s)) AND (
        state = 'pending' OR (state = 'claimed' AND worker IS DISTINCT FROM %(worker)s)
        OR (state = 'done' AND NOT reported AND worker IN (SELECT id FROM dead))))
"""


async def claim_one(
    conn: Conn, *, worker: str, skip: Collection[str], without_slot: bool = False
) -> Claimed | str | None:
    """Claim a job for ``worker`` (autocommit: one statement, one transaction).

    Returns the claim, ``"no-slot"``, ``"none"`` (nothing left to claim now) or None (every
    job is done, or claimed by this worker).  Keys in ``skip`` (jobs this worker cannot run)
    are left alone.  ``without_slot``: see :data:`_CLAIM` (the claim's :attr:`Claimed.slot`
    says whether it holds one).
    """
    params = {"worker": worker, "skip": list(skip), "without_slot": without_slot}
    cur = await conn.execute(_CLAIM, params)
    row = await cur.fetchone()
    assert row is not None  # (one row always: the left join)
    chosen, job, slot, stages = row[0], row[1:10], row[10], row[11]
    if job[0] is not None:
        if job[3] == "claimed":
            # A dead worker's job: its worker, alive past its lease, may have committed a write
            # (a submit's intent, about to leave) after this statement's snapshot and before it
            # locked the row; the stages it read would miss it, and the submit go twice.  Read
            # after the claim committed, they hold every write its worker can still make.
            cur = await conn.execute(_STAGES, (job[0],))
            again = await cur.fetchone()
            stages = again[0] if again is not None else None
        return Claimed(
            row=tuple(job), stages=[tuple(stage) for stage in stages or ()], slot=bool(slot)
        )
    await conn.execute(_FREE_KEPT)
    if chosen:
        return "no-slot"
    cur = await conn.execute(_LEFT, params)
    left = await cur.fetchone()
    return "none" if left is not None and left[0] else None


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
        if not may_have_task:
            # Looked at again once the job is locked, in a statement of its own (a newer
            # snapshot): its worker may have committed a submit's intent since (it locks the
            # job's row to write it), and that submit is on its way.
            cur = await conn.execute(
                "SELECT slot, state = 'claimed' AND worker IN (SELECT id FROM kling_workers"
                " WHERE expires_at >= clock_timestamp()) FROM kling_jobs WHERE key = %s"
                " FOR UPDATE",
                (key,),
            )
            held = await cur.fetchone()
            if held is not None and held[1]:
                # Its worker may submit it any moment: starting over would stop that worker
                # (its next write finds the job no longer its own) and lose its other jobs' pace.
                raise ValidationError(
                    "key",
                    f"{key!r} names another job than the one this journal recorded under it"
                    " (its request differs), and a live worker is running that one now; give"
                    " the changed job a new key, or load it once that worker is done",
                )
            cur = await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM kling_stages WHERE key = %s AND status <> 'refused')",
                (key,),
            )
            again = await cur.fetchone()
            may_have_task = bool(again and again[0])
        if may_have_task:
            raise ValidationError(
                "key",
                f"{key!r} names another job than the one this journal recorded under it"
                " (its request differs) and that one may have created a task; give the"
                " changed job a new key, or use a new journal",
            )
        # It never created a task: its record starts over (a slot it held is freed).
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


async def release_claims(conn: Conn, *, worker: str, keep: Collection[str] | None = None) -> None:
    """A worker stops: its unfinished jobs become claimable, and its lease ends now.

    A job whose submit never left gives its slot back; one whose task may exist keeps it.
    With ``keep`` (the jobs the worker knows it holds), only the others are handed back and
    the lease goes on: a claim committed though its answer was lost (the connection broke)
    is undone, so that the job does not stay claimed by a worker that does not know it.
    """
    cur = await conn.execute(
        "SELECT j.key, j.slot, EXISTS (SELECT 1 FROM kling_stages s WHERE s.key = j.key"
        " AND s.status <> 'refused') FROM kling_jobs j WHERE j.worker = %s"
        " AND j.state = 'claimed' AND NOT (j.key = ANY(%s)) FOR UPDATE",
        (worker, list(keep or ())),
    )
    rows = await cur.fetchall()
    for key, slot, may_have_task in rows:
        await conn.execute(
            "UPDATE kling_jobs SET state = 'pending', worker = NULL, slot = %s WHERE key = %s",
            (bool(slot and may_have_task), key),
        )
        if slot and not may_have_task:
            await give_back(conn, ended=False)
    if keep is None:
        await conn.execute(
            "UPDATE kling_workers SET expires_at = LEAST(expires_at, clock_timestamp())"
            " WHERE id = %s",
            (worker,),
        )


def job_from_rows(row: tuple[Any, ...], stages: list[tuple[Any, ...]]) -> JournalJob:
    """A job as :class:`JournalJob` from its PostgreSQL row (two columns more than SQLite's)."""
    key, request_hash, video_url, _, _, result, final, reported = row[:8]
    return job_from_row(((key, request_hash, video_url, result, final, reported), stages))


async def unclaim(conn: Conn, *, key: str, row: tuple[Any, ...], worker: str) -> None:
    """Hand back a job just claimed (``row`` as :func:`claim_one` read it), and its new slot.

    A dead worker's unreported result goes back to that worker (undrained), so that a worker
    that has the job still takes it over and reports it.  Idempotent: once handed back the
    job is no longer ``worker``'s, and nothing changes.
    """
    state, slot, before = row[3], row[4], row[8]
    done = state == "done"
    cur = await conn.execute(
        "UPDATE kling_jobs SET state = %s, slot = %s, worker = %s"
        " WHERE key = %s AND worker = %s RETURNING 1",
        ("done" if done else "pending", slot, before if done else None, key, worker),
    )
    if await cur.fetchone() is None:
        return
    if done:
        await conn.execute("UPDATE kling_workers SET drained = false WHERE id = %s", (before,))
    elif not slot:
        await give_back(conn, ended=False)


async def read_stages(conn: Conn) -> list[tuple[Any, ...]]:
    """Every worker's task ids and unanswered submits.

    Rows are ``(key, stage, status, intent_at, task_id, video_url)``.
    """
    cur = await conn.execute(
        "SELECT s.key, s.stage, s.status, s.intent_at, s.task_id, j.video_url"
        " FROM kling_stages s JOIN kling_jobs j ON j.key = s.key"
        " WHERE s.task_id IS NOT NULL OR s.status = 'submitting'"
    )
    return list(await cur.fetchall())


async def store_begun(conn: Conn, *, job: JournalJob, worker: str) -> None:
    """Write (and claim for ``worker``) a job begun outside loading, replacing its stages."""
    await conn.execute(
        "INSERT INTO kling_jobs (key, request_hash, video_url, state, worker)"
        " VALUES (%s, %s, %s, 'claimed', %s) ON CONFLICT (key) DO UPDATE SET"
        " request_hash = EXCLUDED.request_hash, video_url = EXCLUDED.video_url,"
        " state = 'claimed', worker = EXCLUDED.worker, result = NULL, final = false"
        " WHERE kling_jobs.worker IS NULL OR kling_jobs.worker = EXCLUDED.worker",
        (job.key, job.request_hash, job.video_url, worker),
    )
    await conn.execute("DELETE FROM kling_stages WHERE key = %s", (job.key,))


async def write_marks(conn: Conn, *, keys: list[str], meta: dict[str, str], worker: str) -> None:
    """Mark ``keys`` (``worker``'s) as reported and keep ``meta`` (clock offset and so on)."""
    if keys:
        await conn.execute(
            "UPDATE kling_jobs SET reported = true WHERE key = ANY(%s) AND worker = %s",
            (keys, worker),
        )
    for name, value in meta.items():
        await conn.execute(
            "INSERT INTO kling_meta VALUES (%s, %s)"
            " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            (name, value),
        )
