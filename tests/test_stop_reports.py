"""Nothing lost at a stop: every task of a stopped batch is delivered, journaled, or named.

A result finished on the server but not yet taken by the consumer (waiting in the batch's pipe,
or finishing in the same loop turn as the stop) is a paid task like a running one: the stopped
batch names it in ``running_task_ids`` (without a journal nothing else tells the user of it),
and with a journal a rerun reports it.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from helpers import kling_client, text_job

import kling_async as ka
from kling_async import events
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio


async def wait_counted(results: ka.BatchIterator, count: int) -> None:
    """Wait until ``count`` results have been handed to the pipe (finished, not yet taken)."""
    with anyio.fail_after(10):
        while results.progress.succeeded + results.progress.failed < count:  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def test_results_waiting_in_the_pipe_at_aclose_are_named() -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=4) as client:
            results = client.run_batch(text_job(n) for n in range(4))
            async with results:
                first = await results.__anext__()
                await wait_counted(results, 4)  # the other three wait in the pipe
            running = set(results.running_task_ids)
    assert server.tasks_created == 4
    untaken = set(server.tasks) - {first.task_id}
    assert len(untaken) == 3 and untaken <= running, (first.task_id, running)


async def test_results_waiting_in_the_pipe_at_a_break_are_named() -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=4) as client:
            results = client.run_batch(text_job(n) for n in range(4))
            taken = []
            async for result in results:
                taken.append(result.task_id)
                await wait_counted(results, 4)
                break
            await anyio.sleep(0.05)  # the batch winds down
            running = set(results.running_task_ids)
    assert set(server.tasks) - set(taken) <= running and len(server.tasks) == 4


async def test_a_cancelled_consumer_names_the_results_it_left_in_the_pipe() -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=4) as client:
            results = client.run_batch(text_job(n) for n in range(4))
            taken = []
            with anyio.CancelScope() as scope:
                async for result in results:
                    taken.append(result.task_id)
                    await wait_counted(results, 4)
                    scope.cancel()  # (Ctrl-C in the CLI is such a cancellation)
                    await anyio.sleep(1)
            await results.aclose()
            running = set(results.running_task_ids)
    assert set(server.tasks) - set(taken) <= running and len(server.tasks) == 4


async def test_results_finishing_with_the_stop_are_named() -> None:
    # Tasks that end together are answered by one list query: their runners wake in the same
    # loop turn as the consumer that leaves on the first result, after the stop.
    for _ in range(5):
        async with FakeKlingServer(task_duration=0.05) as server:
            async with kling_client(server, max_in_flight=6) as client:
                results = client.run_batch(text_job(n) for n in range(6))
                taken = []
                async with results:
                    async for result in results:
                        taken.append(result.task_id)
                        break
                running = set(results.running_task_ids)
        assert set(server.tasks) - set(taken) <= running, (taken, running)


async def test_a_result_read_in_the_turn_of_the_stop_is_named() -> None:
    # The stop comes in the very turn a task's end is read: the callback of that poll drops
    # the only reference to the loop, as a ``break`` does.  The runner of that task goes on
    # (a task whose wait is already over is not cancelled) and hands nothing more over.
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.03, list_queries=False, timeout=10.0)
    async with FakeKlingServer(task_duration=0.0) as server:
        async with kling_client(server, max_in_flight=3, poll=poll) as client:
            loops: list[object] = []
            stopped = anyio.Event()

            def stop(event: events.Event) -> None:
                if isinstance(event, events.Polled) and event.tasks and loops:
                    loops.clear()  # the loop's end stops the batch, now
                    stopped.set()

            results = client.run_batch((text_job(n) for n in range(6)), on_event=stop)
            loops.append(aiter(results))
            with anyio.fail_after(10):
                await stopped.wait()
            await results.aclose()
            running = set(results.running_task_ids)
    ended = {i for i, task in server.tasks.items() if task.terminal}
    assert ended and set(server.tasks) <= running, (set(server.tasks), running)


async def test_with_a_journal_a_rerun_reports_the_results_left_in_the_pipe(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(4)]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=4) as client:
            results = client.run_batch(jobs, journal=journal)
            async with results:
                first = await results.__anext__()
                await wait_counted(results, 4)
            with anyio.fail_after(10):
                again = [r async for r in client.run_batch(jobs, journal=journal)]
    assert server.tasks_created == 4
    assert sorted(r.key for r in again) == sorted({"k0", "k1", "k2", "k3"} - {first.key})
