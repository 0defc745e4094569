"""The PostgreSQL journal's task slots: a kept one always goes back, none is waited for in vain.

A task reported ``TIMED_OUT`` keeps its job's slot in ``kling_account`` until its worker sees
it end or stops following it.  These tests drive the ways that slot could stay held for good
(every other worker then waits for a slot that never frees): the worker letting go while the
result is being written, the batch ending, the worker dying (or its lease running out) with the
slot kept; and a dead worker's job that needs a slot while the slots are held by jobs waiting
to be claimed.
"""

from __future__ import annotations

import contextlib

import anyio
import psycopg
import pytest
from helpers import kling_client, text_job
from pg import PgServer, journal_worker, slots_held

import kling_async as ka
from kling_async.journal import PostgresJournal, SharedBackend, open_journal
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio


def rows(count: int) -> list[tuple[str, str, str | None]]:
    return [(f"k{n}", f"hash-{n}", f"https://e.com/{n}.mp4") for n in range(count)]


def timed_out(key: str, task_id: str) -> ka.JobResult:
    return ka.JobResult(key=key, task_id=task_id, state=ka.TaskState.TIMED_OUT)


async def start_task(journal: SharedBackend, key: str, task_id: str) -> None:
    assert await journal.claim() == key
    await journal.submitting(key, "lip-sync", 1.0)
    await journal.created(key, "lip-sync", task_id)


async def test_a_kept_slot_let_go_while_its_result_is_written_goes_back(pg_url: str) -> None:
    """The batch's follower of a timed-out task may end before the result's write commits.

    (A batch stopped just as a task timed out cancels the follower at once.)  Its slot must
    still go back: it was kept by nobody once the write committed.
    """
    journal = await journal_worker(pg_url, 1)
    await journal.load(rows(1))
    await start_task(journal, "k0", "t0")
    written = anyio.Event()

    async def finish() -> None:
        await journal.finished(timed_out("k0", "t0"), final=False)
        written.set()

    async with await psycopg.AsyncConnection.connect(pg_url) as blocker:
        async with anyio.create_task_group() as group:
            async with blocker.transaction():
                # The result's write waits on the job's row while the batch lets go of it.
                await blocker.execute("SELECT 1 FROM kling_jobs WHERE key = 'k0' FOR UPDATE")
                group.start_soon(finish)
                await anyio.sleep(0.2)
                assert not written.is_set()
                journal.slot_ended("k0")
            with anyio.fail_after(5):
                await written.wait()
    await journal.close()
    assert slots_held(pg_url) == (0, 0)


@pytest.mark.parametrize("reported", [True, False])
async def test_a_dead_workers_kept_slot_goes_back_to_the_account(
    pg_url: str, reported: bool
) -> None:
    """A worker dies while its timed-out task keeps the account's only slot.

    Nobody follows that task any more: its slot must go back, or the other workers wait for it
    forever (claim() answering None: no slot).
    """
    dead = await journal_worker(pg_url, 1, lease=0.3, renew=0.1)
    alive = await journal_worker(pg_url, 1)
    await dead.load(rows(2))
    await alive.load(rows(2))
    await start_task(dead, "k0", "t0")
    await dead.finished(timed_out("k0", "t0"), final=False)
    assert slots_held(pg_url) == (1, 1)
    if reported:
        async with anyio.create_task_group() as group:
            group.start_soon(dead.commit_marks)
            dead.reported("k0")
            with anyio.fail_after(5):
                while not await reported_in_db(pg_url, "k0"):  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()
    # dead now "dies": it renews its lease no more and never closes.
    got: list[object] = []
    async with anyio.create_task_group() as group:
        group.start_soon(alive.commit_marks)
        with anyio.fail_after(5):
            while (claim := await alive.claim()) != "k1":
                assert claim is not False
                if isinstance(claim, ka.JobResult):
                    got.append(claim)
                    alive.reported(claim.key)
                else:
                    await alive.wait_for_slot()
        await alive.finished(
            ka.JobResult(key="k1", task_id="t1", state=ka.TaskState.SUCCEEDED), final=True
        )
        group.cancel_scope.cancel()
    # An unreported result is the taker's to report (once), a reported one is nobody's.
    assert [r.key for r in got if isinstance(r, ka.JobResult)] == ([] if reported else ["k0"])
    await alive.close()
    assert slots_held(pg_url) == (0, 0)
    with contextlib.suppress(ka.JournalError):  # (fenced out where its job was taken over)
        await dead.close()
    assert slots_held(pg_url) == (0, 0)


async def reported_in_db(url: str, key: str) -> bool:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT reported FROM kling_jobs WHERE key = %s", (key,))
        row = await cur.fetchone()
    return bool(row and row[0])


async def test_a_batch_ending_with_a_timed_out_task_closes_cleanly(pg_url: str) -> None:
    """The last job times out: the batch ends, lets go of its task's slot, and closes cleanly.

    Its follower is cancelled as the batch ends, just before the journal closes: that slot goes
    back to the account with the close (the batch no longer follows the task), and the close
    raises nothing.
    """
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.05, multiplier=1.0, timeout=0.2)
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=1.0, claim_poll=0.02)
    async with FakeKlingServer(task_duration=5.0) as server:
        # Two slots: the runner done with the job finds a free one, and nothing to claim.
        async with kling_client(server, max_in_flight=2, poll=poll) as client:
            with anyio.fail_after(3):
                results = [
                    r async for r in client.run_batch([text_job(0, key="slow")], journal=journal)
                ]
    assert [(r.key, r.state) for r in results] == [("slow", ka.TaskState.TIMED_OUT)]
    assert slots_held(pg_url) == (0, 0)


async def test_a_job_holding_a_slot_is_claimed_while_a_dead_workers_job_waits_for_one(
    pg_url: str,
) -> None:
    """Orphans come first, but not one that needs a slot when none is free.

    A worker stopped early: its job (its task may run) waits, pending, with the account's
    slot.  Another died after a 1303 had taken its job's slot away (the limit lowered to what
    is held).  That orphan can get no slot until the pending job runs and ends; the pending job
    needs none: it must be claimed, or every worker waits for ever.
    """
    stopped = await journal_worker(pg_url, max_in_flight=2)
    dead = await journal_worker(pg_url, max_in_flight=2, lease=0.3, renew=0.1)
    alive = await journal_worker(pg_url, max_in_flight=2)
    for journal in (stopped, dead, alive):
        await journal.load(rows(2))
    await start_task(stopped, "k0", "t0")
    assert await dead.claim() == "k1"
    await dead.submitting("k1", "lip-sync", 2.0)
    await dead.refused("k1", "lip-sync")
    await dead.concurrency_refused("k1")  # the account sustains 1: k0's
    await stopped.close()  # k0 pending, holding its slot: its task may be running
    assert slots_held(pg_url) == (1, 1)
    # dead "dies" waiting for a slot again (its lease runs out: 0.3 s).
    await anyio.sleep(0.45)
    async with anyio.create_task_group() as group:
        group.start_soon(alive.commit_marks)
        with anyio.fail_after(3):
            while (claim := await alive.claim()) != "k0":
                assert claim is None, claim
                await alive.wait_for_slot()
        await alive.finished(
            ka.JobResult(key="k0", task_id="t0", state=ka.TaskState.SUCCEEDED), final=True
        )
        with anyio.fail_after(3):  # k0's slot is free: now the orphan gets it
            while (claim := await alive.claim()) != "k1":
                assert claim is None, claim
                await alive.wait_for_slot()
        group.cancel_scope.cancel()
    await alive.close()
    assert slots_held(pg_url) == (0, 0)
    with contextlib.suppress(ka.JournalError):  # (fenced out: its job was taken over)
        await dead.close()


async def test_a_timed_out_result_that_could_not_be_written_leaves_the_slot_with_the_job(
    pg_server: PgServer,
) -> None:
    """The database is out of reach as a task times out: its result is not written.

    The batch stops; at close the job is handed on still holding its slot (its task may run),
    as any claimed job with a task is: its slot is not given back as a kept one's would be.
    """
    url = pg_server.new_database()
    name = url.rsplit("/", 1)[1]
    journal = await journal_worker(url, 1, connect_timeout=0.2)
    await journal.load(rows(1))
    await start_task(journal, "k0", "t0")

    def allow(yes: bool) -> None:
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(yes).lower()}')

    try:
        allow(False)
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        with pytest.raises(ka.JournalError):
            await journal.finished(timed_out("k0", "t0"), final=False)
        journal.slot_ended("k0")  # the batch stops: its follower lets go
    finally:
        allow(True)
    with anyio.fail_after(10):
        while True:  # until its connections are back (the pool backs off meanwhile)
            try:
                await journal.refresh()
                break
            except ka.JournalError:
                await anyio.sleep(0.05)
    await journal.close()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT state, slot FROM kling_jobs WHERE key = 'k0'").fetchone()
    assert row == ("pending", True)
    assert slots_held(url) == (1, 1)


async def test_a_job_refused_with_1303_waits_for_a_shared_slot_at_most_max_slot_wait(
    pg_url: str,
) -> None:
    """After a 1303 the job waits for a slot of the account again, and at most ``max_slot_wait``.

    Here the account never frees one (another worker's task holds it): the job ends as a value
    (the slot-wait error, as without a journal), where it used to wait without end.
    """
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=1.0, claim_poll=0.02)
    retry = ka.RetryPolicy(
        max_attempts=6, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01, max_slot_wait=0.5
    )
    async with FakeKlingServer(task_duration=0.1) as server:
        meta = {"dialect": "kling", "stage": "lip-sync", "base_url": server.url}
        await (await open_journal(journal, **meta, max_in_flight=2)).close()
        with psycopg.connect(pg_url, autocommit=True) as other:
            other.execute("UPDATE kling_account SET held = 1")  # another worker's running task
        server.script("submit", code=1303)
        async with kling_client(server, max_in_flight=2, retry=retry) as client:
            with anyio.fail_after(10):
                got = [r async for r in client.run_batch([text_job(0, key="k0")], journal=journal)]
    assert [r.key for r in got] == ["k0"]
    assert isinstance(got[0].error, ka.ConcurrencyLimitError), got[0].error
    assert "max_slot_wait" in str(got[0].error)
    assert server.tasks_created == 0
    assert slots_held(pg_url) == (1, 0)  # only the other worker's slot is held


async def test_a_worker_whose_only_slot_a_timed_out_task_keeps_ends_when_no_job_is_left(
    pg_url: str,
) -> None:
    """One slot, kept by the last job's timed-out task: the batch ends, it does not wait for
    a slot (max_slot_wait) before it learns that nothing is left to claim.
    """
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.05, multiplier=1.0, timeout=0.2)
    retry = ka.RetryPolicy(max_attempts=3, base_delay=0.005, max_delay=0.05, max_slot_wait=60)
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=1.0, claim_poll=0.02)
    async with FakeKlingServer(task_duration=60.0) as server:
        async with kling_client(server, max_in_flight=1, poll=poll, retry=retry) as client:
            with anyio.fail_after(5):
                results = [
                    r async for r in client.run_batch([text_job(0, key="slow")], journal=journal)
                ]
    assert [(r.key, r.state) for r in results] == [("slow", ka.TaskState.TIMED_OUT)]
    assert slots_held(pg_url) == (0, 0)


async def test_stuck_tasks_filling_the_account_end_the_waiting_jobs(pg_url: str) -> None:
    """Timed-out tasks keep every slot of the account: the jobs left end after max_slot_wait.

    As without a shared journal (tests/test_slot_wait.py): each ends unsubmitted as a
    ConcurrencyLimitError result, together rather than one max_slot_wait each, and the batch
    completes (before, claims waited for a slot for ever).  They stay unfinished for a rerun.
    """
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.03, timeout=0.2)
    retry = ka.RetryPolicy(
        max_attempts=3, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01, max_slot_wait=0.4
    )
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=1.0, claim_poll=0.02)
    jobs = [text_job(n, key=f"k{n}") for n in range(5)]
    async with FakeKlingServer(task_duration=600, task_limit=2) as server:
        async with kling_client(server, max_in_flight=2, poll=poll, retry=retry) as client:
            started = anyio.current_time()
            with anyio.fail_after(8):
                results = [r async for r in client.run_batch(jobs, journal=journal)]
            took = anyio.current_time() - started
    assert len(results) == 5
    timed_out = [r for r in results if r.state is ka.TaskState.TIMED_OUT]
    starved = [r for r in results if isinstance(r.error, ka.ConcurrencyLimitError)]
    assert len(timed_out) == 2 and len(starved) == 3
    assert all(r.task_id is None for r in starved)
    assert server.tasks_created == 2  # nothing was sent for the starved jobs
    assert server.requests["limited"] == 0
    assert took < 3.0  # together, not one max_slot_wait each
    assert slots_held(pg_url) == (0, 0)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT key FROM kling_jobs WHERE NOT final ORDER BY key").fetchall()
    assert {key for (key,) in rows} >= {r.key for r in starved}  # a rerun runs them
