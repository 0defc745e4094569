"""One budget for every worker of a PostgreSQL journal, against a real server.

The fake server charges 0.5 unit per started 5 s; each job here is estimated at 1.0 (a 7 s
trim), so a job reserves 1.0 and settles at 0.5 when its task ends (as in test_budget.py).
"""

from __future__ import annotations

import anyio
import psycopg
import pytest
from helpers import audio_job, kling_client
from pg import journal_worker as worker

import kling_async as ka
from kling_async.journal import PostgresJournal
from kling_async.journal._export import read_status
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio


def job(n: int) -> ka.LipSyncJob:
    return audio_job(n, sound_end_time=7000, key=f"k{n}")  # estimated 1.0 unit


def spend(url: str) -> tuple[float, float, int]:
    """The batch's total, the sum of its charges, and how many are settled."""
    with psycopg.connect(url) as conn:
        total = conn.execute("SELECT total FROM kling_spend").fetchone()
        charges = conn.execute(
            "SELECT COALESCE(sum(units), 0), count(*) FILTER (WHERE settled) FROM kling_charges"
        ).fetchone()
    assert total is not None and charges is not None
    return float(total[0]), float(charges[0]), int(charges[1])


def journal_config(url: str) -> PostgresJournal:
    return PostgresJournal(url=url, lease=5.0, renew=1.0, claim_poll=0.02)


async def run(
    server: FakeKlingServer, jobs: list[ka.LipSyncJob], url: str, units: float, slots: int = 1
) -> dict[str, ka.JobResult]:
    async with kling_client(server, max_in_flight=slots) as client:
        with anyio.fail_after(30):
            batch = client.run_batch(
                jobs, journal=journal_config(url), budget=ka.Budget(units=units)
            )
            return {r.key: r async for r in batch}


async def test_two_workers_never_pass_the_budget_together(pg_url: str) -> None:
    jobs = [job(n) for n in range(20)]
    async with FakeKlingServer(task_duration=0.02) as server:
        got: list[dict[str, ka.JobResult]] = [{}, {}]

        async def one(index: int) -> None:
            got[index] = await run(server, jobs, pg_url, 4.0, slots=2)

        async with anyio.create_task_group() as group:
            group.start_soon(one, 0)
            group.start_soon(one, 1)
        created = server.tasks_created
    results = {**got[0], **got[1]}
    assert sorted(results) == sorted(j.key for j in jobs if j.key)  # every job has a result
    ok = [r for r in results.values() if r.ok]
    refused = [r for r in results.values() if not r.ok]
    # Each worker alone would spend up to 4.0 (seven tasks of 0.5 each): 14 tasks together.
    # One budget: every task settles at 0.5 and the total never passes 4.0, so at most 8.
    assert created == len(ok) <= 8, (created, len(ok))
    assert sum(r.units or 0.0 for r in ok) <= 4.0
    assert refused and all(isinstance(r.error, ka.BudgetExceededError) for r in refused)
    assert all(r.task_id is None for r in refused)  # nothing created for them
    total, charged, settled = spend(pg_url)
    assert total == pytest.approx(charged) == pytest.approx(0.5 * created)
    assert settled == created


async def test_a_later_worker_goes_on_from_the_batchs_spend(pg_url: str) -> None:
    jobs = [job(n) for n in range(1, 9)]
    async with FakeKlingServer(task_duration=0.01) as server:
        first = await run(server, jobs, pg_url, 2.0)
        assert server.tasks_created == 3  # 1.5 spent; a fourth would reach 2.5
        second = await run(server, jobs, pg_url, 3.0)  # 1.5 + two more of 0.5
        assert server.tasks_created == 5
    assert sorted(k for k, r in first.items() if r.ok) == ["k1", "k2", "k3"]
    assert sorted(k for k, r in second.items() if r.ok) == ["k4", "k5"]
    assert all(isinstance(second[k].error, ka.BudgetExceededError) for k in ("k6", "k7", "k8"))
    assert spend(pg_url)[0] == pytest.approx(2.5)
    status = await read_status(pg_url)
    assert status.units_spent == pytest.approx(2.5)
    assert status.units_reserved == 0.0


async def test_a_taken_over_jobs_reservation_replaces_the_dead_workers(pg_url: str) -> None:
    dead = await worker(pg_url, lease=0.3, renew=0.1)  # never renews: it "died"
    alive = await worker(pg_url, lease=0.3, renew=0.1)
    keys = [("k0", "h0", None), ("k1", "h1", None)]
    await dead.load(keys)
    await alive.load(keys)
    assert await dead.claim() == "k0"
    assert await dead.reserve_charge("k0", 1.0, limit=1.5, force=False) == (True, 1.0)
    assert await dead.claim() == "k1"
    # Refused: 1.0 + 1.0 would pass 1.5 (nothing is written for it).
    assert await dead.reserve_charge("k1", 1.0, limit=1.5, force=False) == (False, 1.0)
    async with anyio.create_task_group() as group:
        group.start_soon(alive.commit_marks)  # renews the living worker's lease
        await anyio.sleep(0.45)
        taken = [await alive.claim(), await alive.claim()]
        group.cancel_scope.cancel()
    assert taken == ["k0", "k1"]
    # The taker reserves k0 again: it replaces the dead worker's 1.0, it does not add to it.
    assert await alive.reserve_charge("k0", 1.0, limit=1.5, force=False) == (True, 1.0)
    # A job whose task may exist is paid for anyway: forced past the limit.
    assert await alive.reserve_charge("k1", 1.0, limit=1.5, force=True) == (True, 2.0)
    # A lowering always passes, and the dead worker can no longer write its jobs.
    assert await alive.reserve_charge("k1", 0.25, limit=0.0, force=False) == (True, 1.25)
    with pytest.raises(ka.JournalError, match="no longer this worker's"):
        await dead.reserve_charge("k0", 5.0, limit=100.0, force=False)
    assert spend(pg_url)[:2] == (1.25, 1.25)
    await alive.close()
    await dead.close()


async def test_a_journal_begun_before_shared_budgets_gets_their_tables(pg_url: str) -> None:
    first = await worker(pg_url)
    await first.close()
    with psycopg.connect(pg_url) as conn:  # as an earlier version left it
        conn.execute("DROP TABLE kling_charges")
        conn.execute("DROP TABLE kling_spend")
    again = await worker(pg_url)
    await again.load([("k0", "h0", None)])
    assert await again.claim() == "k0"
    assert await again.reserve_charge("k0", 0.5, limit=1.0, force=False) == (True, 0.5)
    await again.close()
    assert spend(pg_url) == (0.5, 0.5, 0)
