"""The PostgreSQL journal's connections: two pools, and how a statement or transaction runs.

Two pools: connections that commit asynchronously (``synchronous_commit=off``: everything but
a submit's intent) and connections with the server's default, which wait for the disk (the
intents).  Either way one write is one statement where it can be (see :meth:`Db.one`).

A connection that breaks (a database server restarted or failed over, a proxy or firewall
that dropped it) or a transaction the server rolled back (a deadlock) is not the end of the
batch: the work runs again on another connection, backing off, for up to the journal's
``connect_timeout``.  That is safe because every write of the journal is idempotent: run again
after it committed (its answer lost with the connection), it finds its own work done and
changes nothing.  The one exception, a claim, repairs what a lost answer leaves behind first
(see ``recover`` in :meth:`Db.auto`).  Past that time, and for any other error, the failure is
a :class:`~kling_async.JournalError` naming the database (without its password); once
:attr:`Db.broken` is set, nothing more is written.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .._errors import JournalError
from ._config import PostgresJournal, redact
from ._pg_claims import Conn

__all__ = ["Db"]

T = TypeVar("T")

logger = logging.getLogger("kling_async")

#: Failures after which the work may run again: the connection broke or could not be had
#: (the server went away, was restarted, ended the session, ran out of connections), or the
#: server rolled the transaction back (a deadlock, a serialization failure): psycopg's
#: ``OperationalError`` and its subclasses (``TransactionRollback`` among them).
_TRANSIENT = (psycopg.OperationalError, PoolTimeout)
#: First and longest pause between two attempts (seconds; doubled each time).
_FIRST_PAUSE = 0.05
_LONGEST_PAUSE = 1.0


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
            timeout=config.connect_timeout,
        )
        self._durable: AsyncConnectionPool[Any] = AsyncConnectionPool(
            config.url,
            min_size=1,
            max_size=size,
            open=False,
            kwargs={"autocommit": True},
            timeout=config.connect_timeout,
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
        The statement must be idempotent (see the module docstring).
        """

        async def work(conn: Conn) -> tuple[Any, ...]:
            cur = await conn.execute(statement, params)
            row = await cur.fetchone()
            assert row is not None  # (every statement here answers one row)
            return tuple(row)

        return await self._run(self._durable if durable else self._pool, work, None, False)

    async def auto(
        self,
        work: Callable[[Conn], Awaitable[T]],
        *,
        recover: Callable[[Conn], Awaitable[None]] | None = None,
    ) -> T:
        """Run ``work`` on a connection outside any transaction (each statement its own).

        ``recover`` runs (in a transaction of its own) before each attempt after the first:
        for work that is not idempotent, it undoes what a first attempt may have committed
        though its answer was lost.
        """
        return await self._run(self._pool, work, recover, False)

    async def tx(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """Run idempotent ``work`` in one transaction (committed asynchronously, as :meth:`one`)."""
        return await self._run(self._pool, work, None, True)

    async def _run(
        self,
        pool: AsyncConnectionPool[Any],
        work: Callable[[Conn], Awaitable[T]],
        recover: Callable[[Conn], Awaitable[None]] | None,
        transaction: bool,
    ) -> T:
        """Run ``work``, again on another connection after a transient failure (for a while)."""
        deadline: float | None = None
        pause = _FIRST_PAUSE
        while True:
            if self.broken is not None:
                raise self.broken
            try:
                async with pool.connection() as conn:
                    if deadline is not None and recover is not None:
                        async with conn.transaction():
                            await recover(conn)
                    if transaction:
                        async with conn.transaction():
                            result = await work(conn)
                    else:
                        result = await work(conn)
            except _TRANSIENT as exc:
                now = anyio.current_time()
                if isinstance(exc, PoolTimeout):  # (no connection for connect_timeout already)
                    raise JournalError(f"journal {self.path}: {reason(exc)}") from None
                if deadline is None:
                    deadline = now + self._connect_timeout
                    logger.warning(
                        "journal %s: %s; trying again for up to %g s",
                        self.path,
                        reason(exc),
                        self._connect_timeout,
                    )
                if now >= deadline:
                    raise JournalError(f"journal {self.path}: {reason(exc)}") from None
                await anyio.sleep(min(pause, deadline - now))
                pause = min(pause * 2, _LONGEST_PAUSE)
                # The pool's idle connections likely broke with this one (a restarted server):
                # drop them all now rather than meet them one attempt at a time.
                with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                    await pool.check()
                continue
            except psycopg.Error as exc:
                raise JournalError(f"journal {self.path}: {reason(exc)}") from None
            self.transactions += 1
            return result


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Every connection commits asynchronously unless told otherwise (see ``PgJournal._one``)."""
    await conn.execute("SET synchronous_commit = off")


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
