"""The PostgreSQL journal's connections: two pools, and how a statement or transaction runs.

Two pools: connections that commit asynchronously (``synchronous_commit=off``: everything but
a submit's intent) and connections with the server's default, which wait for the disk (the
intents).  Either way one write is one statement where it can be (see :meth:`Db.one`).
Every failure becomes a :class:`~kling_async.JournalError` naming the database (without its
password); once :attr:`Db.broken` is set, nothing more is written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .._errors import JournalError
from ._config import PostgresJournal, redact
from ._pg_claims import Conn

__all__ = ["Db"]

T = TypeVar("T")


class Db:
    """One worker's connections to a shared journal; build it with :meth:`open`."""

    def __init__(self, config: PostgresJournal, max_in_flight: int) -> None:
        self.path = redact(config.url)
        self._connect_timeout = config.connect_timeout
        size = max(2, min(8, max_in_flight // 4 + 2))
        self._pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            config.url,
            min_size=1,
            max_size=size,
            open=False,
            kwargs={"autocommit": True},
            configure=_configure,
        )
        self._durable: AsyncConnectionPool[Any] = AsyncConnectionPool(
            config.url, min_size=1, max_size=size, open=False, kwargs={"autocommit": True}
        )
        #: Statements and transactions committed so far.
        self.transactions = 0
        #: Set when the journal may no longer be written (lease lost, job taken over).
        self.broken: JournalError | None = None

    async def open(self) -> None:
        """Connect both pools (JournalError when the server cannot be reached)."""
        try:
            await self._pool.open(wait=True, timeout=self._connect_timeout)
            await self._durable.open(wait=True, timeout=self._connect_timeout)
        except (psycopg.Error, PoolTimeout) as exc:
            await self.close()
            raise JournalError(f"journal {self.path}: {reason(exc)}") from None

    async def close(self) -> None:
        """Close both pools."""
        await self._pool.close()
        await self._durable.close()

    async def one(
        self, statement: str, params: dict[str, Any], *, durable: bool = False
    ) -> tuple[Any, ...]:
        """Run one statement (its own transaction) and return its first row.

        ``durable``: on the server's disk on return (a connection of the durable pool, with the
        server's default ``synchronous_commit``).  Only a submit's intent must survive the
        database server's own crash (as a SQLite intent survives a power cut).  Everything
        else commits asynchronously (the other pool's ``synchronous_commit=off``): it survives
        any worker dying, the server loses at most its last fraction of a second if *it*
        crashes (any later durable commit flushes everything before it), and above all a
        transaction does not hold its row locks while the disk syncs: every claim and every
        finished job updates the one ``kling_account`` row, and waiting for the disk there
        made slot accounting the batch's bottleneck (benchmarks/README.md, "Many workers").
        """
        if self.broken is not None:
            raise self.broken
        try:
            async with (self._durable if durable else self._pool).connection() as conn:
                cur = await conn.execute(statement, params)
                row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise JournalError(f"journal {self.path}: {reason(exc)}") from None
        self.transactions += 1
        assert row is not None  # (every statement here answers one row)
        return tuple(row)

    async def auto(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``work`` on a connection outside any transaction (each statement its own)."""
        if self.broken is not None:
            raise self.broken
        try:
            async with self._pool.connection() as conn:
                result = await work(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            raise JournalError(f"journal {self.path}: {reason(exc)}") from None
        self.transactions += 1
        return result

    async def tx(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction (committed asynchronously: see :meth:`one`)."""
        if self.broken is not None:
            raise self.broken
        try:
            async with self._pool.connection() as conn, conn.transaction():
                result = await work(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            raise JournalError(f"journal {self.path}: {reason(exc)}") from None
        self.transactions += 1
        return result


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Every connection commits asynchronously unless told otherwise (see ``PgJournal._one``)."""
    await conn.execute("SET synchronous_commit = off")


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
