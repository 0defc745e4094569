"""ResultPipe: the places that bound a batch, and results on their way to the consumer."""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import kling_async as ka
from kling_async._pipe import ResultPipe

pytestmark = pytest.mark.anyio


def result(n: int) -> ka.JobResult:
    return ka.JobResult(key=str(n), task_id=f"t{n}", state=ka.TaskState.SUCCEEDED)


async def test_places_bound_jobs_plus_results_not_taken() -> None:
    pipe = ResultPipe(2)
    assert pipe.try_reserve() and pipe.try_reserve()
    assert not pipe.try_reserve()  # full: two jobs running, or results waiting
    pipe.put(result(1))
    assert not pipe.try_reserve()  # a result not yet taken still holds its place
    assert pipe.take_nowait() == result(1)
    assert pipe.try_reserve()  # taking it freed the place


async def test_waiting_reservers_get_places_first_come_first_served() -> None:
    pipe = ResultPipe(1)
    assert pipe.try_reserve()
    order: list[str] = []

    async def reserve(name: str) -> None:
        await pipe.reserve()
        order.append(name)

    async with anyio.create_task_group() as group:
        for name in "abc":
            group.start_soon(reserve, name)
            await wait_all_tasks_blocked()
        assert not pipe.try_reserve()  # nobody jumps the queue
        for n in range(3):
            pipe.put(result(n))
            pipe.take_nowait()
            await wait_all_tasks_blocked()
            assert order == list("abc"[: n + 1])
    assert not pipe.try_reserve()  # "c" still holds the one place


async def test_a_place_handed_to_a_cancelled_reserver_passes_on() -> None:
    pipe = ResultPipe(1)
    assert pipe.try_reserve()
    got: list[str] = []
    first = anyio.CancelScope()

    async def reserve(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await pipe.reserve()
            got.append(name)

    with anyio.fail_after(1):  # a lost place would leave "b" waiting for ever
        async with anyio.create_task_group() as group:
            group.start_soon(reserve, "a", first)
            await wait_all_tasks_blocked()
            group.start_soon(reserve, "b", anyio.CancelScope())
            await wait_all_tasks_blocked()
            first.cancel()  # "a" is being cancelled...
            pipe.put(result(1))
            pipe.take_nowait()  # ...when the freed place is handed to it
    assert got == ["b"]
    assert not pipe.try_reserve()  # the place was passed on, not lost or doubled


async def test_take_waits_for_a_result_and_ends_after_close() -> None:
    pipe = ResultPipe(4)
    taken: list[ka.JobResult] = []

    async def consume() -> None:
        try:
            while True:
                taken.append(await pipe.take())
        except anyio.EndOfStream:
            taken.append(result(-1))

    async with anyio.create_task_group() as group:
        group.start_soon(consume)
        await wait_all_tasks_blocked()
        pipe.put(result(1))
        pipe.put(result(2))
        await wait_all_tasks_blocked()
        assert taken == [result(1), result(2)]
        pipe.put(result(3))
        pipe.close()  # what came before the close is still taken
    assert taken == [result(1), result(2), result(3), result(-1)]
    with pytest.raises(anyio.EndOfStream):
        await pipe.take()


async def test_an_abandoned_pipe_drops_results_and_keeps_their_task_ids() -> None:
    pipe = ResultPipe(3)
    pipe.put(result(1))
    pipe.put(result(2))
    assert pipe.take_nowait() == result(1)
    assert pipe.untaken() == ["t2"]  # waiting: not taken yet
    pipe.abandon()
    pipe.put(result(3))
    assert pipe.take_nowait() is None
    assert pipe.untaken() == ["t2", "t3"]  # paid tasks the consumer never got: named at a stop


async def test_a_cancelled_taker_loses_no_result() -> None:
    pipe = ResultPipe(2)
    with anyio.move_on_after(0.01):
        await pipe.take()
    pipe.put(result(1))
    assert pipe.take_nowait() == result(1)
