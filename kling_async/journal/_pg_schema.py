"""The PostgreSQL journal's tables, created (once, by whichever worker comes first) and checked.

Tables carry a ``kling_`` prefix, so a journal can share a database with other things; one
database (or one schema: ``?options=-csearch_path%3Dmybatch`` in the URL) holds one batch::

    kling_meta(name, value)                  dialect, stage, base_url, schema version,
                                             batch_id, clock_offset, external_ids
    kling_jobs(key, seq, request_hash, video_url, state, worker, slot,
               result, final, reported, touched_at)
    kling_stages(key, stage, status, intent_at, task_id, snapshot, external_id, adopted)
    kling_account(id = 1, capacity, lim, held, clean)
    kling_workers(id, host, pid, started_at, expires_at, drained)
    kling_task_states(task_id, snapshot)     terminal states the elected poller saw
    kling_charges(key, units, settled)       each job's budget reservation or charge
    kling_spend(id = 1, total)               the sum of kling_charges.units, kept as they change

A job's ``state`` is ``pending`` (anyone may claim it), ``claimed`` (``worker`` runs it) or
``done`` (its latest result is recorded).  ``slot`` says the job holds one of the account's task
slots: taken with the claim, kept while its task may run (even across its worker's death), given
back when the result is recorded.  ``kling_account.held`` counts those slots; ``lim`` is the
shared limit (``capacity`` lowered by 1303 refusals, creeping back up after clean finishes).
``kling_task_states`` holds what the one worker that polls for all (:mod:`._pg_poll`) saw of
tasks that ended: the others read it instead of asking the server.  ``kling_charges`` and
``kling_spend`` are the batch's budget, shared by every worker (:mod:`kling_async._budget`):
``kling_spend``'s one row is what a reservation locks and checks, so that two workers never
both take the last units.
"""

from __future__ import annotations

from psycopg import AsyncConnection

from .._errors import JournalError, ValidationError

__all__ = ["SCHEMA_VERSION", "prepare"]

SCHEMA_VERSION = "1"

#: Any constant: the advisory lock that lets one worker at a time create the tables.
_SETUP_LOCK = 0x6B6C696E67  # "kling"

_TASK_STATES = """CREATE TABLE IF NOT EXISTS kling_task_states (
    task_id text PRIMARY KEY,
    snapshot text NOT NULL
)"""

#: The shared budget's tables (added after the first layout: created when missing).
_CHARGES = (
    """CREATE TABLE IF NOT EXISTS kling_charges (
        key text PRIMARY KEY,
        units double precision NOT NULL,
        settled boolean NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS kling_spend (
        id integer PRIMARY KEY CHECK (id = 1),
        total double precision NOT NULL
    )""",
    "INSERT INTO kling_spend VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kling_meta (name text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE IF NOT EXISTS kling_jobs (
        key text PRIMARY KEY,
        seq bigint NOT NULL DEFAULT 0,
        request_hash text NOT NULL,
        video_url text,
        state text NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'claimed', 'done')),
        worker text,
        slot boolean NOT NULL DEFAULT false,
        result text,
        final boolean NOT NULL DEFAULT false,
        reported boolean NOT NULL DEFAULT false,
        touched_at timestamptz
    )""",
    """CREATE INDEX IF NOT EXISTS kling_jobs_pending
        ON kling_jobs (slot DESC, seq) WHERE state = 'pending'""",
    "CREATE INDEX IF NOT EXISTS kling_jobs_worker ON kling_jobs (worker)",
    """CREATE TABLE IF NOT EXISTS kling_stages (
        key text NOT NULL REFERENCES kling_jobs(key) ON DELETE CASCADE,
        stage text NOT NULL,
        status text NOT NULL CHECK (status IN ('submitting', 'created', 'refused')),
        intent_at double precision NOT NULL,
        task_id text,
        snapshot text,
        external_id text,
        adopted boolean NOT NULL DEFAULT false,
        PRIMARY KEY (key, stage)
    )""",
    """CREATE TABLE IF NOT EXISTS kling_account (
        id integer PRIMARY KEY CHECK (id = 1),
        capacity integer NOT NULL,
        lim integer NOT NULL,
        held integer NOT NULL DEFAULT 0,
        clean integer NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS kling_workers (
        id text PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        expires_at timestamptz NOT NULL,
        drained boolean NOT NULL DEFAULT false
    )""",
    _TASK_STATES,
    *_CHARGES,
)


async def prepare(
    conn: AsyncConnection[tuple[object, ...]], where: str, meta: dict[str, str]
) -> dict[str, str]:
    """Create the tables if missing, check ``meta`` and return the stored one.

    Inside the caller's transaction.  The first worker writes ``meta`` (its ``batch_id``
    included: every worker derives external task ids from that one).

    Raises :class:`ValidationError` for a journal of another dialect or server, and
    :class:`JournalError` for one of another layout version.
    """
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK,))
    cur = await conn.execute("SELECT to_regclass('kling_meta') IS NOT NULL")
    exists = await cur.fetchone()
    if not (exists and exists[0]):
        # Only when missing: even CREATE INDEX IF NOT EXISTS locks its table against writes,
        # and workers already claiming jobs would wait for it (or deadlock with it).
        for sql in _SCHEMA:
            await conn.execute(sql)
    else:
        # Tables a journal begun by an earlier version lacks (the poller's, the budget's).
        added = (("kling_task_states", (_TASK_STATES,)), ("kling_spend", _CHARGES))
        for table, statements in added:
            cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
            found = await cur.fetchone()
            if not (found and found[0]):
                for sql in statements:
                    await conn.execute(sql)
    cur = await conn.execute("SELECT name, value FROM kling_meta")
    stored = {str(name): str(value) for name, value in await cur.fetchall()}
    if not stored:
        rows = sorted({**meta, "schema_version": SCHEMA_VERSION}.items())
        async with conn.cursor() as insert:
            await insert.executemany("INSERT INTO kling_meta VALUES (%s, %s)", rows)
        return dict(rows)
    if stored.get("schema_version") != SCHEMA_VERSION:
        raise JournalError(
            f"journal {where}: layout version {stored.get('schema_version')} is not the "
            f"supported {SCHEMA_VERSION} (written by another version of kling_async)"
        )
    for name in ("dialect", "stage", "base_url"):
        if stored.get(name) != meta.get(name):
            # Its task ids mean nothing to another server or dialect (as for SQLite journals).
            raise ValidationError(
                "journal",
                f"{where} was written by a batch for {stored.get('dialect')} "
                f"({stored.get('stage')}) at {stored.get('base_url')}, not {meta.get('dialect')}"
                f" ({meta.get('stage')}) at {meta.get('base_url')}; use another database",
            )
    return stored
