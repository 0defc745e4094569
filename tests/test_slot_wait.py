"""No endless wait: timed-out tasks keep their slots until they end; max_slot_wait ends a wait."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import FAST_RETRY, kling_client, text_job

import kling_async as ka
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio

SHORT_POLL = ka.PollPolicy(first_delay=0.01, max_interval=0.03, timeout=0.2)


async def run(client: ka.KlingClient, jobs: list[ka.LipSyncJob], **options: Any) -> list[Any]:
    out = []
    with anyio.fail_after(10):
        async for result in client.run_batch(jobs, **options):
            out.append(result)
    return out


def test_max_slot_wait_is_validated() -> None:
    assert ka.RetryPolicy().max_slot_wait == 1800.0
    for bad in (0, -1.0, float("nan"), float("inf"), True, "60"):
        with pytest.raises(ka.ValidationError, match="max_slot_wait"):
            ka.RetryPolicy(max_slot_wait=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("journal", [False, True])
async def test_stuck_tasks_filling_the_limit_end_the_waiting_jobs(
    tmp_path: Path, journal: bool
) -> None:
    retry = ka.RetryPolicy(
        max_attempts=3, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01, max_slot_wait=0.4
    )
    jobs = [text_job(n, key=f"k{n}") for n in range(5)]
    options = {"journal": tmp_path / "j"} if journal else {}
    async with FakeKlingServer(task_duration=600, task_limit=2) as server:
        async with kling_client(server, max_in_flight=2, poll=SHORT_POLL, retry=retry) as client:
            started = anyio.current_time()
            results = await run(client, jobs, **options)
            took = anyio.current_time() - started
    assert len(results) == 5
    timed_out = [r for r in results if r.state is ka.TaskState.TIMED_OUT]
    starved = [r for r in results if isinstance(r.error, ka.ConcurrencyLimitError)]
    assert len(timed_out) == 2 and all(r.task_id for r in timed_out)
    assert len(starved) == 3
    stuck = {r.task_id for r in timed_out}
    for result in starved:
        assert result.task_id is None and not result.ok
        assert set(result.error.blocking_task_ids) == stuck
        assert "max_slot_wait" in str(result.error)
    assert server.tasks_created == 2  # the stuck tasks kept their slots: nothing else was sent
    assert server.requests["limited"] == 0
    assert took < 2.0  # the waiting jobs ended together, not one max_slot_wait each


async def test_a_timed_out_task_frees_its_slot_once_seen_to_end() -> None:
    retry = ka.RetryPolicy(
        max_attempts=3, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01, max_slot_wait=5
    )
    jobs = [text_job(n, key=f"k{n}") for n in range(3)]
    async with FakeKlingServer(task_duration=600, task_limit=1) as server:
        async with kling_client(server, max_in_flight=1, poll=SHORT_POLL, retry=retry) as client:
            results = []
            with anyio.fail_after(10):
                async for result in client.run_batch(jobs):
                    results.append(result)
                    if result.state is ka.TaskState.TIMED_OUT:
                        assert server.running == 1  # still held: nothing else is sent
                        await anyio.sleep(0.1)
                        assert server.tasks_created == len(results)
                        server.finish(result.task_id or "")
    assert [r.state for r in results] == [ka.TaskState.TIMED_OUT] * 3
    assert server.tasks_created == 3
    assert server.requests["limited"] == 0


async def test_other_clients_holding_the_account_end_the_wait_without_ids() -> None:
    retry = ka.RetryPolicy(
        max_attempts=3, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01, max_slot_wait=0.3
    )
    async with FakeKlingServer(task_duration=600, task_limit=1) as server:
        async with kling_client(server, retry=FAST_RETRY) as other:
            await other.submit(text_job(99))  # another client's task fills the account
        async with kling_client(server, max_in_flight=2, retry=retry) as client:
            results = await run(client, [text_job(n, key=f"k{n}") for n in range(2)])
    for result in results:
        assert isinstance(result.error, ka.ConcurrencyLimitError), result.error
        assert result.error.blocking_task_ids == ()
        assert "other clients" in str(result.error)
    assert server.tasks_created == 1


@pytest.mark.parametrize("journal", [False, True])
async def test_a_timed_out_task_the_server_no_longer_knows_frees_its_slot(
    tmp_path: Path, journal: bool
) -> None:
    # A stuck task purged by the server answers 1203 "not found" to every look: after
    # RetryPolicy.max_attempts such answers in a row its slot is free, and the next job runs
    # (before, it was followed until the batch ended and the next job waited max_slot_wait).
    retry = ka.RetryPolicy(
        max_attempts=3, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01, max_slot_wait=30
    )
    jobs = [text_job(n, key=f"k{n}") for n in range(2)]
    target = tmp_path / "j" if journal else None
    async with FakeKlingServer(task_duration=600, task_limit=1) as server:
        async with kling_client(server, max_in_flight=1, poll=SHORT_POLL, retry=retry) as client:
            results = []
            with anyio.fail_after(5):
                async for result in client.run_batch(jobs, journal=target):
                    results.append(result)
                    if len(results) == 1:
                        assert result.state is ka.TaskState.TIMED_OUT
                        server.forget(result.task_id or "")
    assert [r.state for r in results] == [ka.TaskState.TIMED_OUT] * 2
    assert server.tasks_created == 2
    assert server.requests["limited"] == 0


@pytest.mark.parametrize("journal", [False, True])
async def test_a_batch_whose_last_tasks_time_out_ends_without_waiting_for_their_slots(
    tmp_path: Path, journal: bool
) -> None:
    # Every slot is kept by a timed-out task and no job is left: the batch ends (before, each
    # runner waited max_slot_wait for a slot before it read that no job was left).
    retry = ka.RetryPolicy(
        max_attempts=3, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01, max_slot_wait=60
    )
    jobs = [text_job(n, key=f"k{n}") for n in range(2)]
    options = {"journal": tmp_path / "j"} if journal else {}
    async with FakeKlingServer(task_duration=600) as server:
        async with kling_client(server, max_in_flight=2, poll=SHORT_POLL, retry=retry) as client:
            results = await run(client, jobs, **options)  # (within its 10 s fail_after)
    assert [r.state for r in results] == [ka.TaskState.TIMED_OUT] * 2
    assert server.tasks_created == 2
