"""The PostgreSQL journal's poll seat: which worker polls the server for all (``_shared_poll``).

The seat is a session-level advisory lock (its key derived from the batch id) held on a
connection of its own, outside the pools; the workers waiting for it look on theirs (and read
the recorded ends of their tasks in the same statement).  PostgreSQL releases the lock when
its connection ends: a worker that exits, is SIGKILLed or loses its machine gives the seat up
with its connection (a dead machine once TCP keepalives notice, see ``_KEEPALIVE``), and the
next worker to look takes it.  The holder reads the live tasks on that same connection, so a
broken connection is a lost seat at the next look, never two pollers for long.  Terminal
states go to ``kling_task_states`` (:mod:`._pg_schema`), which the other workers read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from .._results import TaskSnapshot
from ._codec import snapshot_from_json, snapshot_to_json
from ._config import PostgresJournal
from ._pg_conn import Db

__all__ = ["PgPollSeat"]

#: A machine that vanishes without closing its connection frees the seat within about a minute.
_KEEPALIVE: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 20, "keepalives_interval": 5}

#: The batch's live tasks (to follow), and the recorded ends of the tasks this worker waits
#: for: an end the seat's last holder records after this worker took the seat over is no
#: longer live, so the holder reads it as the workers without the seat do.
_LIVE = (
    "SELECT s.task_id, s.stage, NULL FROM kling_stages s JOIN kling_jobs j ON j.key = s.key"
    " WHERE s.status = 'created' AND s.task_id IS NOT NULL AND s.snapshot IS NULL"
    " AND j.state <> 'done'"
    " AND NOT EXISTS (SELECT 1 FROM kling_task_states t WHERE t.task_id = s.task_id)"
    " UNION ALL SELECT task_id, NULL, snapshot FROM kling_task_states WHERE task_id = ANY(%s)"
)


def _ends(rows: Iterable[Sequence[Any]]) -> dict[str, TaskSnapshot]:
    """Recorded task ends by task id, from ``(task_id, snapshot JSON)`` rows."""
    return {str(task_id): snapshot_from_json(str(text)) for task_id, text in rows}


def seat_key(batch_id: str) -> int:
    """The advisory lock's key: a signed 64-bit number of the batch id."""
    digest = hashlib.sha256(f"kling-poll:{batch_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PgPollSeat:
    """One worker's claim on the poll seat; keeps ``_shared_poll.PollSeat``."""

    def __init__(self, db: Db, config: PostgresJournal, batch_id: str) -> None:
        self._db = db
        self._config = config
        self._key = seat_key(batch_id)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        #: Seconds between two looks at the journal.
        self.interval = config.claim_poll

    async def lead(self, waiting: Sequence[str]) -> tuple[bool, dict[str, TaskSnapshot]]:
        """Take the seat if free, and read the recorded ends of ``waiting``: one statement.

        A worker keeps its seat connection open while it waits for the seat, so each look is
        one round trip (no connection set-up), and the seat is taken at the first look after
        its holder's connection ends.
        """
        if self._conn is None:
            try:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._config.url,
                    autocommit=True,
                    # Who polls, in pg_stat_activity (an operator's question; the kill test's).
                    application_name=f"kling_async poller {os.getpid()}",
                    connect_timeout=max(1, round(self._config.connect_timeout)),
                    **_KEEPALIVE,
                )
            except psycopg.Error:
                return False, {}
        # A worker whose journal broke (its lease expired) could record nothing: it reads
        # the ends of its tasks (its batch stops at its next write) but never takes the seat.
        lock = "false" if self._db.broken is not None else "pg_try_advisory_lock(%s)"
        params = (list(waiting),) if self._db.broken is not None else (self._key, list(waiting))
        try:
            cur = await self._conn.execute(
                f"SELECT {lock}, (SELECT array_agg(ARRAY[task_id, snapshot])"
                " FROM kling_task_states WHERE task_id = ANY(%s))",
                params,
            )
            row = await cur.fetchone()
        except psycopg.Error:
            await self.close()
            return False, {}
        assert row is not None
        return bool(row[0]), _ends(row[1] or ())

    async def live(
        self, waiting: Sequence[str]
    ) -> tuple[list[tuple[str, str]], dict[str, TaskSnapshot]] | None:
        """Every live task of the batch and the recorded ends of ``waiting``.

        Read on the seat's connection, in one statement; None: it broke, or the journal did
        (the seat is given up: nothing could be recorded).
        """
        if self._db.broken is not None:
            await self.close()
        if self._conn is None:
            return None
        try:
            cur = await self._conn.execute(_LIVE, (list(waiting),))
            rows = await cur.fetchall()
        except psycopg.Error:
            await self.close()
            return None
        live = [(str(task_id), str(stage)) for task_id, stage, text in rows if text is None]
        return live, _ends((task_id, text) for task_id, _, text in rows if text is not None)

    async def record(self, states: Sequence[tuple[str, TaskSnapshot]]) -> None:
        """Record terminal snapshots (a state recorded already stays).

        With the journal broken (this worker's lease expired) nothing can be: the seat is given
        up (:meth:`live` then answers None), and the next holder follows those tasks again.
        """
        if self._db.broken is not None:
            await self.close()
            return
        rows = [(task_id, snapshot_to_json(snapshot)) for task_id, snapshot in states]

        async def write(conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO kling_task_states (task_id, snapshot) VALUES (%s, %s)"
                    " ON CONFLICT (task_id) DO NOTHING",
                    rows,
                )

        await self._db.tx(write)

    async def close(self) -> None:
        """Give the seat up (closing its connection releases the lock)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
