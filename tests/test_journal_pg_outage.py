"""The PostgreSQL journal when its connections break: work runs again, nothing is doubled.

The database ends every connection of the batch (as a restarted or failed-over server, or a
proxy dropping idle connections, would): each worker's writes run again on new connections,
and the batch ends with every job once, as if nothing had happened.  A database gone for
longer than ``connect_timeout`` still stops the batch with :class:`~kling_async.JournalError`.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import psycopg
import pytest
from helpers import kling_client, text_job
from pg import PgServer, journal_worker, slots_held

import kling_async as ka
from kling_async.journal import PostgresJournal
from kling_async.journal._pg_claims import claim_one
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio

POLL = ka.PollPolicy(first_delay=0.02, max_interval=0.04, multiplier=1.5, timeout=30.0)


def end_connections(url: str, admin_url: str | None = None) -> int:
    """End every connection to ``url``'s database but the admin's; how many there were."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url or url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return sum(1 for (ended,) in rows if ended)


def allow_connections(pg_server: PgServer, url: str, yes: bool) -> None:
    """Open or close ``url``'s database to new connections (as a server down for good would)."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(yes).lower()}')


async def test_a_batch_rides_through_the_database_ending_its_connections(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Twice mid-batch every connection of two workers is ended: every job still runs once."""
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=0.5, claim_poll=0.02)
    jobs = [text_job(n, key=f"k{n}") for n in range(30)]
    results: list[ka.JobResult] = []
    ended: list[int] = []
    caplog.set_level(logging.WARNING, logger="kling_async")
    async with FakeKlingServer(task_duration=0.1, task_limit=6) as server:

        async def run() -> None:
            async with kling_client(server, max_in_flight=6, poll=POLL) as client:
                async for item in client.run_batch(jobs, journal=journal):
                    results.append(item)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(run)
                group.start_soon(run)
                for mark in (8, 18):
                    while len(results) < mark:  # noqa: ASYNC110
                        await anyio.sleep(0.005)
                    ended.append(end_connections(pg_url))
    assert min(ended) >= 4  # (both workers' pools and poll seats, at least)
    assert sorted(r.key for r in results) == sorted(j.key for j in jobs if j.key)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert server.tasks_created == len(jobs)  # no job submitted twice
    assert slots_held(pg_url) == (0, 0)  # every slot given back exactly once
    assert any("trying again" in r.getMessage() for r in caplog.records)


async def test_a_claim_whose_answer_was_lost_is_handed_back_before_the_next(
    pg_url: str,
) -> None:
    """A claim committed, its answer lost with the connection: the worker does not know the job.

    Its next claim (on a new connection) hands that job back first, so it is claimed again,
    by someone who knows it, and its slot is not counted twice.
    """
    journal = await journal_worker(pg_url)
    try:
        await journal.load([(f"k{n}", f"hash-{n}", None) for n in range(3)])
        # The lost claim: committed for this worker, on a connection whose answer never came.
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as lost:
            got = await claim_one(lost, worker=journal.worker, skip=())
        assert got is not None and not isinstance(got, str)
        assert end_connections(pg_url) >= 2  # the worker's pooled connections break too
        claimed = []
        while (key := await journal.claim()) not in (None, False):
            claimed.append(key)
        assert sorted(claimed) == ["k0", "k1", "k2"]  # the lost one (k0) among them
        assert slots_held(pg_url) == (3, 3)  # one slot each, none leaked
    finally:
        await journal.close()
    assert slots_held(pg_url) == (0, 0)


async def test_a_database_gone_for_longer_than_connect_timeout_still_stops_the_batch(
    pg_server: PgServer,
) -> None:
    """Connections refused for good (the database closed to them): JournalError in time."""
    url = pg_server.new_database()
    journal = PostgresJournal(url=url, lease=5.0, renew=1.0, claim_poll=0.02, connect_timeout=1.0)
    jobs = [text_job(n, key=f"k{n}") for n in range(6)]
    seen = 0

    async def consume(client: ka.KlingClient) -> None:
        nonlocal seen
        async for _ in client.run_batch(jobs, journal=journal):
            seen += 1
            if seen == 1:  # the database refuses connections from now on
                allow_connections(pg_server, url, False)
                end_connections(url, admin_url=pg_server.url())

    async with FakeKlingServer(task_duration=0.2) as server:
        async with kling_client(server, max_in_flight=2, poll=POLL) as client:
            with anyio.fail_after(30), pytest.raises(ka.JournalError) as info:
                await consume(client)
    assert seen < len(jobs)
    assert url.rsplit("/", 1)[1] in str(info.value)


async def test_marks_that_fail_in_an_outage_keep_the_lease_and_are_written_later(
    pg_server: PgServer,
) -> None:
    """The database refuses connections for longer than connect_timeout while only marks wait.

    The marks' write fails; the batch (whose jobs are running tasks, not writing) goes on.  The
    worker must go on renewing its lease (else its jobs would be taken over while it runs
    them, and it would stop at its next write), and the marks are written once it is back.
    """
    url = pg_server.new_database()
    journal = await journal_worker(url, 2, lease=3.0, renew=0.1, connect_timeout=0.2)

    try:
        await journal.load([("k0", "hash-0", None), ("k1", "hash-1", None)])
        assert await journal.claim() == "k0"
        await journal.finished(
            ka.JobResult(key="k0", task_id="t0", state=ka.TaskState.SUCCEEDED), final=True
        )
        assert await journal.claim() == "k1"  # still running when the database comes back
        async with anyio.create_task_group() as group:
            group.start_soon(journal.commit_marks)
            allow_connections(pg_server, url, False)
            end_connections(url, admin_url=pg_server.url())
            journal.reported("k0")
            await anyio.sleep(0.8)  # the marks' write gave up (connect_timeout 0.2 s)
            allow_connections(pg_server, url, True)
            await anyio.sleep(3.5)  # longer than the lease
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT expires_at > clock_timestamp() FROM kling_workers WHERE id = %s",
                    (journal.worker,),
                ).fetchone()
            assert row is not None and row[0], "the lease was not renewed after the outage"
            group.cancel_scope.cancel()
        await journal.finished(  # its job is still its own
            ka.JobResult(key="k1", task_id="t1", state=ka.TaskState.SUCCEEDED), final=True
        )
    finally:
        allow_connections(pg_server, url, True)
        await journal.close()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT reported FROM kling_jobs WHERE key = 'k0'").fetchone()
    assert row is not None and row[0], "the mark that failed was lost"


async def test_a_lease_outlives_an_outage_shorter_than_the_lease(pg_server: PgServer) -> None:
    """The database refuses connections for less than the lease: the worker keeps its lease.

    A renewal that failed (after trying for connect_timeout) is tried again soon, not a whole
    ``renew`` later: that came after the lease had run out, though the database was back long
    before, and the worker stopped with its jobs taken over.
    """
    url = pg_server.new_database()
    journal = await journal_worker(url, 2, lease=5.0, renew=3.0, connect_timeout=0.3)

    def expires() -> tuple[Any, bool]:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT expires_at, expires_at > clock_timestamp() FROM kling_workers"
            ).fetchone()
        assert row is not None
        return row[0], bool(row[1])

    try:
        await journal.load([("k0", "hash-0", None)])
        assert await journal.claim() == "k0"
        first, _ = expires()
        async with anyio.create_task_group() as group:
            group.start_soon(journal.commit_marks)
            with anyio.fail_after(10):
                while expires()[0] == first:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # renewed: the next renewal comes in 3 s
            allow_connections(pg_server, url, False)
            end_connections(url, admin_url=pg_server.url())
            await anyio.sleep(3.4)  # the renewal due meanwhile failed; 1.6 s of lease left
            allow_connections(pg_server, url, True)
            await anyio.sleep(2.0)  # past the lease the last renewal gave (renewed since)
            _, alive = expires()
            assert alive, "the lease ran out though the database was back in time"
            group.cancel_scope.cancel()
        await journal.finished(  # its job is still its own
            ka.JobResult(key="k0", task_id="t0", state=ka.TaskState.SUCCEEDED), final=True
        )
    finally:
        allow_connections(pg_server, url, True)
        await journal.close()
