"""The PostgreSQL journal's shared part, against a real server: claims, slots, leases, batches.

Every test gets its own database (tests/pg.py).  Workers are PgJournal instances in this
process (each its own worker id and connections), or whole batches on FakeKlingServer;
tests/test_journal_workers.py kills worker processes.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from typing import Any

import anyio
import psycopg
import pytest
from helpers import FAST_POLL, kling_client, text_job
from pg import journal_worker as worker

import kling_async as ka
from kling_async.journal import PostgresJournal, SharedBackend
from kling_async.journal import _pg_sql as sql
from kling_async.journal._export import read_jobs, read_status
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio


def rows(count: int, prefix: str = "k") -> list[tuple[str, str, str | None]]:
    return [(f"{prefix}{n}", f"hash-{n}", f"https://e.com/{n}.mp4") for n in range(count)]


def account(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT capacity, lim, held FROM kling_account").fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def held_by_jobs(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM kling_jobs WHERE slot").fetchone()
    assert row is not None
    return int(row[0])


def result(key: str, task_id: str | None = "t") -> ka.JobResult:
    return ka.JobResult(key=key, task_id=task_id, state=ka.TaskState.SUCCEEDED)


# -- claims ------------------------------------------------------------------------------------


async def test_two_claimants_one_job_exactly_one_wins(pg_url: str) -> None:
    first, second = await worker(pg_url), await worker(pg_url)
    for round_ in range(20):
        job = [(f"job-{round_}", "h", None)]
        await first.load(job)
        await second.load(job)
        got: list[Any] = []

        async def claim(journal: SharedBackend, into: list[Any]) -> None:
            into.append(await journal.claim())

        async with anyio.create_task_group() as group:
            group.start_soon(claim, first, got)
            group.start_soon(claim, second, got)
        assert sorted(map(str, got)) == sorted([f"job-{round_}", "None"]), got
        winner = first if first.job(f"job-{round_}") is not None else second
        await winner.finished(result(f"job-{round_}"), final=True)
    await first.close()
    await second.close()


async def test_many_claimants_claim_every_job_once(pg_url: str) -> None:
    workers = [await worker(pg_url, max_in_flight=100) for _ in range(4)]
    jobs = rows(60)
    claimed: list[str] = []

    async def drain(journal: SharedBackend) -> None:
        await journal.load(jobs)
        while (got := await journal.claim()) is not False:
            if isinstance(got, str):
                claimed.append(got)
                await journal.finished(result(got), final=True)
            else:
                await anyio.sleep(0.005)

    async with anyio.create_task_group() as group:
        for journal in workers:
            group.start_soon(drain, journal)
    assert sorted(claimed) == sorted(key for key, _, _ in jobs)
    assert account(pg_url)[2] == 0 == held_by_jobs(pg_url)
    for journal in workers:
        await journal.close()


async def test_loading_is_idempotent_and_a_changed_job_with_a_task_is_refused(
    pg_url: str,
) -> None:
    one, two = await worker(pg_url), await worker(pg_url)
    await one.load(rows(3))
    await two.load(rows(3))
    assert [job.key for job in await read_jobs(pg_url)] == ["k0", "k1", "k2"]
    key = await one.claim()
    assert key == "k0"
    await one.submitting("k0", "lip-sync", 1.0)
    changed = [("k0", "other-hash", None), *rows(3)[1:]]
    with pytest.raises(ka.ValidationError, match="'k0' names another job"):
        await two.load(changed)
    # A job that never created a task may change: its record starts over.
    await two.load([*rows(1), ("k1", "new-hash", None), rows(3)[2]])
    jobs = {job.key: job for job in await read_jobs(pg_url)}
    assert jobs["k1"].request_hash == "new-hash" and jobs["k0"].request_hash == "hash-0"
    await one.close()
    await two.close()


async def test_a_worker_claims_only_jobs_it_knows(pg_url: str) -> None:
    one, two = await worker(pg_url), await worker(pg_url)
    await one.load(rows(2, "a"))
    await two.load(rows(2, "b"))
    got = []
    while (claim := await one.claim()) not in (None, False):
        got.append(claim)
        assert isinstance(claim, str)
        await one.finished(result(claim), final=True)
    assert sorted(got) == ["a0", "a1"]
    # b0 and b1 are not in one's job file: it leaves them to two, and is done.
    assert await one.claim() is False
    assert await two.claim() == "b0"
    await one.close()
    await two.close()


# -- the account's slots -----------------------------------------------------------------------


async def test_slots_are_shared_by_every_worker_and_belong_to_the_job(pg_url: str) -> None:
    one, two = await worker(pg_url, max_in_flight=3), await worker(pg_url, max_in_flight=3)
    await one.load(rows(6))
    await two.load(rows(6))
    assert await one.claim() == "k0"
    assert await two.claim() == "k1"
    assert await one.claim() == "k2"
    assert await two.claim() is None  # three jobs hold the account's three slots
    assert account(pg_url) == (3, 3, 3) == (3, 3, held_by_jobs(pg_url))
    await one.submitting("k0", "lip-sync", 1.0)
    await one.created("k0", "lip-sync", "t0")
    await one.close()  # k0's task may run on: its slot stays with k0; k2 never left: freed
    assert account(pg_url)[2] == 2
    assert await two.claim() == "k0"  # a job holding a slot first, and it needs no other
    record = two.job("k0")
    assert record is not None and record.stages["lip-sync"].task_id == "t0"
    assert await two.claim() == "k2"
    assert await two.claim() is None
    await two.finished(result("k0"), final=True)
    assert account(pg_url)[2] == 2
    assert await two.claim() == "k3"
    await two.close()


async def test_a_1303_lowers_the_limit_for_everyone_and_it_creeps_back(pg_url: str) -> None:
    one, two = await worker(pg_url, max_in_flight=4), await worker(pg_url, max_in_flight=4)
    await one.load(rows(12))
    await two.load(rows(12))
    mine = [await one.claim(), await one.claim(), await two.claim(), await two.claim()]
    assert mine == ["k0", "k1", "k2", "k3"]
    await two.submitting("k3", "lip-sync", 1.0)
    await two.refused("k3", "lip-sync")
    await two.concurrency_refused("k3")  # the account sustains 3 of the 4
    assert account(pg_url) == (4, 3, 3)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(two.regain_slot, "k3")  # waits: 3 held, limit 3
            await anyio.sleep(0.1)
            assert account(pg_url)[2] == 3
            await one.finished(result("k0"), final=True)  # a clean finish frees a slot
    assert account(pg_url) == (4, 3, 3)  # k3 holds it again
    for key, journal in (("k1", one), ("k2", two), ("k3", two)):
        await journal.finished(result(key), final=True)
    # Three clean finishes at limit 3 (k0 counted too): one more slot again.
    assert account(pg_url) == (4, 4, 0)
    await one.close()
    await two.close()


# -- leases ------------------------------------------------------------------------------------


async def test_a_dead_workers_jobs_are_taken_over_and_it_is_fenced_out(pg_url: str) -> None:
    dead = await worker(pg_url, lease=0.3, renew=0.1)  # never renews: its commit_marks never runs
    alive = await worker(pg_url, lease=0.3, renew=0.1)
    await dead.load(rows(3))
    await alive.load(rows(3))
    assert await dead.claim() == "k0"
    await dead.submitting("k0", "lip-sync", 1.0)
    await dead.created("k0", "lip-sync", "t0")
    assert await dead.claim() == "k1"
    await dead.submitting("k1", "lip-sync", 2.0)  # in flight when it "died"
    assert await dead.claim() == "k2"
    await dead.finished(result("k2"), final=True)  # recorded, never reported

    async with anyio.create_task_group() as group:
        group.start_soon(alive.commit_marks)  # renews the living worker's lease
        assert await alive.claim() is None  # the dead one's lease still runs
        await anyio.sleep(0.45)
        taken = [await alive.claim(), await alive.claim(), await alive.claim()]
        group.cancel_scope.cancel()
    assert taken[:2] == ["k0", "k1"]
    assert taken[2] == result("k2")  # its unreported result, handed to the taker to report
    k0, k1 = alive.job("k0"), alive.job("k1")
    assert k0 is not None and k0.stages["lip-sync"].task_id == "t0"  # tracked, not resubmitted
    assert k1 is not None and k1.stages["lip-sync"].status == "submitting"  # looked for
    with pytest.raises(ka.JournalError, match="no longer this worker's"):
        await dead.created("k1", "lip-sync", "t1")
    await alive.refresh()
    assert alive.owner("t0") == "k0"
    status = await read_status(pg_url)
    assert {lease.worker: lease.jobs for lease in status.workers}[alive.worker] == 2
    await alive.close()
    await dead.close()


async def test_a_worker_whose_lease_expired_stops(pg_url: str) -> None:
    journal = await worker(pg_url, lease=0.15, renew=0.1)
    await journal.load(rows(1))
    assert await journal.claim() == "k0"
    await anyio.sleep(0.2)  # expired before its first renewal
    with anyio.fail_after(2):
        await journal.commit_marks()  # renewal finds the lease gone: the journal breaks
    with pytest.raises(ka.JournalError, match="lease expired"):
        await journal.submitting("k0", "lip-sync", 1.0)
    await journal.close()


# -- whole batches -----------------------------------------------------------------------------


async def test_two_batches_on_one_journal_share_the_jobs_and_the_account(pg_url: str) -> None:
    jobs = [text_job(n, key=f"line-{n}") for n in range(60)]
    limit = 4
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=1.0, claim_poll=0.02)
    async with FakeKlingServer(task_duration=0.03, task_limit=limit) as server:
        results: list[list[ka.JobResult]] = [[], []]

        async def run(index: int) -> None:
            async with kling_client(server, max_in_flight=limit) as client:
                with anyio.fail_after(30):
                    async for item in client.run_batch(jobs, journal=journal):
                        results[index].append(item)

        async with anyio.create_task_group() as group:
            group.start_soon(run, 0)
            group.start_soon(run, 1)
        assert server.max_running_seen <= limit
        assert server.requests["limited"] == 0  # the limit was shared, never overrun
    keys = [r.key for r in results[0] + results[1]]
    assert sorted(keys) == sorted(j.key for j in jobs if j.key)  # each once, by one of them
    assert results[0] and results[1]  # both worked
    assert all(r.ok for r in results[0] + results[1])
    assert server.tasks_created == 60
    exported = await read_jobs(pg_url)
    assert all(job.reported and job.final for job in exported)
    assert account(pg_url)[2] == 0


async def test_a_rerun_on_a_finished_journal_reports_nothing(pg_url: str) -> None:
    jobs = [text_job(n, key=f"k{n}") for n in range(5)]
    async with FakeKlingServer(task_duration=0.01) as server:
        async with kling_client(server, poll=FAST_POLL) as client:
            first = [r async for r in client.run_batch(jobs, journal=pg_url)]
            again = [r async for r in client.run_batch(jobs, journal=pg_url)]
    assert sorted(r.key for r in first) == [f"k{n}" for n in range(5)]
    assert again == []
    assert server.tasks_created == 5


def test_import_never_loads_psycopg_and_a_url_without_it_names_the_extra() -> None:
    code = (
        "import sys\n"
        "import kling_async as ka\n"
        "assert 'psycopg' not in sys.modules, 'imported psycopg'\n"
        "sys.modules['psycopg'] = None  # as if the extra were not installed\n"
        "client = ka.KlingClient.kling(api_key='k')\n"
        "try:\n"
        "    client.run_batch([], journal='postgresql://u@127.0.0.1/db')\n"
        "except ka.ValidationError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "kling-async[postgres]" in done.stdout and "journal" in done.stdout


def test_settings_are_checked_and_the_password_never_shown() -> None:
    journal = PostgresJournal(url="postgresql://me:s3cret@db.example/batch")
    assert "s3cret" not in repr(journal)
    with pytest.raises(ka.ValidationError, match="renew"):
        PostgresJournal(url="postgresql://db/x", lease=5.0, renew=5.0)
    with pytest.raises(ka.ValidationError, match="lease"):
        PostgresJournal(url="postgresql://db/x", lease=-1.0)
    with pytest.raises(ka.ValidationError, match="url"):
        PostgresJournal(url="mysql://db/x")


async def test_a_worker_that_stops_early_hands_its_jobs_to_the_next(pg_url: str) -> None:
    jobs = [text_job(n, key=f"k{n}") for n in range(30)]
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=1.0, claim_poll=0.02)
    made = itertools.count()

    def duration(_: object) -> float:
        # The first three tasks end first and the next three run on, so that the worker
        # surely leaves with tasks running: with 0.2 s for all, the six ended together and a
        # loaded CI read the status after all of them had (no slot held).
        n = next(made)
        return 0.05 if n < 3 else 1.0 if n < 6 else 0.2

    async with FakeKlingServer(task_duration=duration) as server:
        async with kling_client(server, max_in_flight=6) as client:
            first: list[ka.JobResult] = []
            async with client.run_batch(jobs, journal=journal) as results:
                async for result in results:
                    first.append(result)
                    if len(first) == 3:
                        break  # leaves with six tasks running and jobs claimed
            created = server.tasks_created
            status = await read_status(pg_url)
            assert status.slots_held and status.slots_held >= 1  # their tasks may still run
            rest = [r async for r in client.run_batch(jobs, journal=journal)]
    assert created > 3
    assert sorted(r.key for r in first + rest) == sorted(j.key for j in jobs if j.key)
    assert server.tasks_created == 30  # the tasks left running were tracked, not resubmitted
    assert all(r.ok for r in first + rest)
    assert account(pg_url)[2] == 0


async def test_1303_in_a_batch_lowers_the_shared_limit_and_every_job_still_runs(
    pg_url: str,
) -> None:
    # The account runs 3 tasks at once; both workers were told 6: the refusals teach them.
    jobs = [text_job(n, key=f"k{n}") for n in range(40)]
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=1.0, claim_poll=0.02)
    limits: list[int] = []

    def duration(_: object) -> float:
        # Until the server has refused a submit, its tasks outlast the workers' next submits,
        # so the refusal this test is about surely comes: with 50 ms tasks throughout, a
        # loaded machine submitted so slowly that the 3 tasks never overlapped a fourth.
        return 0.05 if server.requests["limited"] else 1.0

    async with FakeKlingServer(task_duration=duration, task_limit=3) as server:
        results: list[ka.JobResult] = []

        async def run() -> None:
            async with kling_client(server, max_in_flight=6) as client:
                async for item in client.run_batch(jobs, journal=journal):
                    results.append(item)
                    limits.append(account(pg_url)[1])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(run)
                group.start_soon(run)
    assert sorted(r.key for r in results) == sorted(j.key for j in jobs if j.key)
    assert all(r.ok for r in results)
    assert server.tasks_created == 40
    assert server.requests["limited"] >= 1
    assert min(limits) < 6  # lowered (to the slots held less one) for both workers at once
    capacity, _, held = account(pg_url)
    assert capacity == 6 and held == 0


async def test_an_unreachable_database_stops_the_batch_before_any_request() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://kling:s3cret@127.0.0.1:{port}/nowhere"
    journal = PostgresJournal(url=url, connect_timeout=0.3)
    async with FakeKlingServer() as server, kling_client(server) as client:
        with anyio.fail_after(10), pytest.raises(ka.JournalError) as info:
            async for _ in client.run_batch([text_job(1, key="a")], journal=journal):
                pass
    assert f"127.0.0.1:{port}/nowhere" in str(info.value) and "s3cret" not in str(info.value)
    assert server.tasks_created == 0 and sum(server.requests.values()) == 0


async def test_retry_failed_is_refused_on_a_shared_journal(pg_url: str) -> None:
    async with FakeKlingServer() as server, kling_client(server) as client:
        with pytest.raises(ka.ValidationError, match="retry_failed: is not supported"):
            client.run_batch([text_job(1)], journal=pg_url, retry_failed=True)
    assert sum(server.requests.values()) == 0


async def test_a_timed_out_task_keeps_its_shared_slot_until_it_ends(pg_url: str) -> None:
    # One slot for the account; the first task outlives PollPolicy.timeout, the second waits.
    durations = iter([0.8, 0.01])
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.05, multiplier=1.0, timeout=0.2)
    journal = PostgresJournal(url=pg_url, lease=5.0, renew=1.0, claim_poll=0.02)
    jobs = [text_job(0, key="slow"), text_job(1, key="next")]
    async with FakeKlingServer(task_duration=lambda rng: next(durations)) as server:
        async with kling_client(server, max_in_flight=1, poll=poll) as client:
            seen: list[tuple[str, int]] = []
            with anyio.fail_after(20):
                async for result in client.run_batch(jobs, journal=journal):
                    seen.append((result.key, account(pg_url)[2]))
            slow = server.tasks[next(iter(server.tasks))]
            second = [task for task in server.tasks.values() if task is not slow]
    assert [key for key, _ in seen] == ["slow", "next"]
    assert seen[0][1] == 1  # reported timed out, its task still running: its slot is kept
    assert len(second) == 1 and second[0].born >= slow.born + 0.8 - 0.01  # sent after it ended
    assert account(pg_url)[2] == 0


async def test_a_dead_workers_result_met_by_a_worker_without_its_job_stays_takeable(
    pg_url: str,
) -> None:
    """A dead worker's unreported result, claimed first by a worker whose job file lacks it.

    That worker hands it back; the result must stay a dead worker's, for a worker that has
    the job to report (else nobody ever reports it, in this batch or a rerun).
    """
    dead = await worker(pg_url, lease=0.3, renew=0.1)
    other = await worker(pg_url)  # another job file
    late = await worker(pg_url)  # the dead one's job file
    await dead.load(rows(2, "a"))
    assert await dead.claim() == "a0"
    await dead.finished(result("a0"), final=True)  # recorded, never reported
    await other.load(rows(1, "b"))
    await anyio.sleep(0.45)  # dead's lease runs out
    async with anyio.create_task_group() as group:
        group.start_soon(other.commit_marks)
        group.start_soon(late.commit_marks)
        assert await other.claim() == "b0"  # after handing a0 back
        await late.load(rows(2, "a"))
        assert await late.claim() == result("a0")
        group.cancel_scope.cancel()
    await late.close()
    await other.close()
    await dead.close()


async def test_a_takeover_sees_the_intent_its_late_worker_committed_as_it_claimed(
    pg_url: str,
) -> None:
    """A worker alive past its lease writes a submit's intent just as another takes its job.

    Its write is fenced by the claim: it commits before the taker locks the job's row, and
    then the taker must see it (the submit is about to leave: it is looked for, never sent
    again), or after, and then it is refused.  The taker's claim read the stages in the
    snapshot its statement began with, and missed an intent committed in between (28% of
    rounds here, with the dead worker's done jobs slowing the claim's scan): the job's submit
    went twice.
    """
    taker = await worker(pg_url, max_in_flight=1000)
    filler = 2000  # the late worker's earlier jobs, done and reported
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        await admin.execute(
            "INSERT INTO kling_workers (id, host, pid, expires_at)"
            " VALUES ('late', 'h', 1, clock_timestamp() - interval '1 s')"
        )
        await admin.execute(
            "INSERT INTO kling_jobs (key, seq, request_hash, state, worker, result, reported,"
            " final) SELECT 'f' || n, n, 'h', 'done', 'late', '{}', true, true"
            " FROM generate_series(1, %s) n",
            (filler,),
        )
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as late:
            missed = seen = 0
            for n in range(150):
                key = f"r{n}"
                await taker.load([(key, "h", "https://e.com/v.mp4")])
                await admin.execute(  # the late worker's claim, as claim() leaves it
                    "UPDATE kling_jobs SET state = 'claimed', worker = 'late', slot = true,"
                    " seq = %s WHERE key = %s",
                    (filler + n + 1, key),
                )
                await admin.execute("UPDATE kling_account SET held = held + 1")
                wrote: list[bool] = []

                async def intent(key: str = key, wrote: list[bool] = wrote) -> None:
                    # The late worker's own write (PgJournal.submitting's statement).
                    params = {"key": key, "worker": "late", "stage": "lip-sync", "at": 1.0}
                    cur = await late.execute(sql.SUBMITTING, {**params, "external_id": None})
                    row = await cur.fetchone()
                    wrote.append(bool(row and row[0]))

                async with anyio.create_task_group() as group:
                    group.start_soon(intent)
                    got = await taker.claim()
                if got != key:  # its row was locked by the write: the next claim takes it
                    got = await taker.claim()
                assert got == key
                record = taker.job(key)
                assert record is not None
                if wrote[0]:
                    seen += 1
                    missed += "lip-sync" not in record.stages
                await taker.finished(result(key, None), final=True)
    await taker.close()
    assert seen > 0  # the intent won the race sometimes
    assert missed == 0, f"{missed} of {seen} intents committed before the takeover were missed"


async def test_a_changed_job_is_refused_when_its_intent_commits_during_the_check(
    pg_url: str,
) -> None:
    """A worker loads a changed job just as the job's worker commits its submit's intent.

    The job may have a task now: the change is refused, the intent kept.  The check read the
    stages before it locked the job, then started the record over, deleting the intent of a
    submit on its way (that worker's task paid, the job submitted again).
    """
    one, two = await worker(pg_url), await worker(pg_url)
    await one.load(rows(1))
    assert await one.claim() == "k0"
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        async with anyio.create_task_group() as group:
            async with conn.transaction():
                # one's intent (PgJournal.submitting's statement), committed a moment later.
                params = {"key": "k0", "worker": one.worker, "stage": "lip-sync", "at": 1.0}
                await conn.execute(sql.SUBMITTING, {**params, "external_id": None})
                refused: list[BaseException] = []

                async def load_changed() -> None:
                    try:
                        await two.load([("k0", "other-hash", None)])
                    except ka.ValidationError as exc:
                        refused.append(exc)

                group.start_soon(load_changed)
                await anyio.sleep(0.3)  # two has checked, and waits for the job's row
        record = await read_jobs(pg_url)
    assert refused and "'k0' names another job" in str(refused[0])
    assert record[0].request_hash == "hash-0"
    assert record[0].stages["lip-sync"].status == "submitting"
    await one.close()
    await two.close()


async def test_a_changed_job_that_a_live_worker_runs_is_refused_not_started_over(
    pg_url: str,
) -> None:
    """A worker loads a changed job that another, live, worker has claimed but not submitted.

    Starting it over took the job from that worker: its next write (the submit's intent) found
    the job no longer its own, and the whole worker stopped.  Now the load is refused, and the
    running worker goes on.
    """
    one, two = await worker(pg_url), await worker(pg_url)
    await one.load(rows(2))
    assert await one.claim() == "k0"  # claimed, nothing submitted yet
    with pytest.raises(ka.ValidationError, match="a live worker is running that one"):
        await two.load([("k0", "other-hash", None), rows(2)[1]])
    await one.submitting("k0", "lip-sync", 1.0)  # still its job
    jobs = {job.key: job for job in await read_jobs(pg_url)}
    assert jobs["k0"].request_hash == "hash-0"
    await one.close()
    await two.close()
