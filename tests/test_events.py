"""run_batch(..., on_event=callback): typed events, sync or async, a failing callback ignored."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
from helpers import kling_client, requests_sent, text_job

import kling_async as ka
from kling_async import events
from kling_async.testing import FakeKlingServer, FaultPlan


@pytest.mark.anyio
async def test_sync_callback_sees_every_submit_poll_refusal_and_result() -> None:
    seen: list[events.Event] = []
    async with FakeKlingServer(task_duration=0.05, task_limit=2) as server:
        async with kling_client(server, max_in_flight=4) as client:
            results = [
                r async for r in client.run_batch(map(text_job, range(6)), on_event=seen.append)
            ]
    kinds = Counter(type(event).__name__ for event in seen)
    assert kinds["Submitted"] == 6 and kinds["Finished"] == 6
    assert {e.result.key for e in seen if isinstance(e, events.Finished)} == {
        r.key for r in results
    }
    submitted = {e.task_id for e in seen if isinstance(e, events.Submitted)}
    assert submitted == {r.task_id for r in results}
    # 1303: the account runs two tasks at once, and each refusal says the limit now in force.
    refusals = [e for e in seen if isinstance(e, events.Refused)]
    assert refusals and all(e.code == 1303 and 1 <= e.limit < 4 for e in refusals)
    polled = [e for e in seen if isinstance(e, events.Polled)]
    assert sum(e.tasks for e in polled) >= 6
    # Every request the server saw is accounted for by an event.
    assert len(refusals) + 6 + sum(e.requests for e in polled) == requests_sent(server)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        refusals[0].limit = 9  # type: ignore[misc]


@pytest.mark.anyio
async def test_async_callback_gets_every_event_in_order() -> None:
    seen: list[events.Event] = []

    async def record(event: events.Event) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(event)

    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            results = [r async for r in client.run_batch(map(text_job, range(5)), on_event=record)]
    finished = [e.result.key for e in seen if isinstance(e, events.Finished)]
    assert finished == [r.key for r in results]
    firsts: dict[tuple[str, str], int] = {}
    for index, event in enumerate(seen):
        if isinstance(event, (events.Submitted, events.Finished)):
            key = event.key if isinstance(event, events.Submitted) else event.result.key
            firsts.setdefault((type(event).__name__, key), index)
    assert all(firsts["Submitted", r.key] < firsts["Finished", r.key] for r in results)


@pytest.mark.anyio
async def test_a_failing_callback_is_logged_once_and_never_breaks_the_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    def broken(event: events.Event) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("metrics backend down")

    async def broken_async(event: events.Event) -> None:
        raise RuntimeError("async metrics backend down")

    caplog.set_level(logging.WARNING, logger="kling_async")
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            for callback in (broken, broken_async):
                caplog.clear()
                done = [
                    r async for r in client.run_batch(map(text_job, range(4)), on_event=callback)
                ]
                assert len(done) == 4 and all(r.ok for r in done)
                warnings = [r for r in caplog.records if "on_event" in r.getMessage()]
                assert len(warnings) == 1 and warnings[0].exc_info is not None
    assert calls > 4


@pytest.mark.anyio
async def test_retries_downloads_and_resumes_are_reported(tmp_path: Path) -> None:
    seen: list[events.Event] = []
    journal = tmp_path / "j.journal"
    faults = FaultPlan(query_error_rate=0.3)
    async with FakeKlingServer(task_duration=0.02, faults=faults, seed=3) as server:
        async with kling_client(server) as client:
            jobs = [text_job(n, key=f"k{n}") for n in range(4)]
            batch = client.run_batch(
                jobs, on_event=seen.append, journal=journal, download_to=tmp_path / "v"
            )
            results = [r async for r in batch]
            assert all(r.ok for r in results)
            downloaded = {e.key: e.path for e in seen if isinstance(e, events.Downloaded)}
            assert downloaded == {r.key: r.path for r in results}
            # A rerun: the journal opens with every result already taken, and nothing is sent.
            seen.clear()
            before = requests_sent(server)
            again = [r async for r in client.run_batch(jobs, on_event=seen.append, journal=journal)]
            assert again == [] and requests_sent(server) == before
            (resumed,) = seen
            assert isinstance(resumed, events.Resumed)
            assert sorted(r.key for r in resumed.results) == ["k0", "k1", "k2", "k3"]


@pytest.mark.anyio
async def test_retried_requests_are_reported() -> None:
    seen: list[events.Event] = []
    faults = FaultPlan(http_500_rate=0.4)
    async with FakeKlingServer(task_duration=0.02, faults=faults, seed=5) as server:
        async with kling_client(server) as client:
            async for _ in client.run_batch(map(text_job, range(6)), on_event=seen.append):
                pass
            retried = [e for e in seen if isinstance(e, events.Retried)]
            assert retried and all(e.attempt >= 1 and e.error for e in retried)
            # Outside a batch (a plain get_task, retried too) no event is reported anywhere.
            count = len(seen)
            for _ in range(10):
                await client.get_task(
                    retried[0].path
                    and next(e.task_id for e in seen if isinstance(e, events.Submitted))
                )
            assert len(seen) == count


@pytest.mark.anyio
async def test_a_callback_must_be_callable() -> None:
    async with ka.KlingClient.kling(api_key="sk-x") as client:
        with pytest.raises(ka.ValidationError, match="on_event"):
            client.run_batch([], on_event="print")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_running_task_ids_after_leaving_the_loop_early() -> None:
    async with FakeKlingServer(task_duration=5.0) as server:
        async with kling_client(server, max_in_flight=3) as client:
            three = anyio.Event()

            def count(event: events.Event) -> None:
                if isinstance(event, events.Submitted) and server.tasks_created == 3:
                    three.set()

            batch = client.run_batch(map(text_job, range(5)), on_event=count)
            async with batch:
                with anyio.fail_after(5):
                    await three.wait()
            running = batch.running_task_ids
    assert len(set(running)) == 3 == server.tasks_created


@pytest.mark.anyio
async def test_first_delay_is_a_first_guess_that_quick_tasks_go_below() -> None:
    # Tasks take 20 ms and the first query waits 0.4 s: once the batch has learnt that, its
    # later tasks are polled sooner than that first guess (not once each, at 0.4 s).
    poll = ka.PollPolicy(first_delay=0.4, max_interval=1.0, list_queries=False, timeout=10.0)
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, poll=poll, max_in_flight=10) as client:
            results = [r async for r in client.run_batch(map(text_job, range(60)))]
    assert all(r.ok for r in results)
    waits = [r.finished_at - r.submitted_at for r in results if r.finished_at and r.submitted_at]
    late = sorted(waits[-20:])
    assert late[len(late) // 2] < 0.3, late


@pytest.mark.anyio
async def test_a_lost_submit_found_by_a_lookup_is_reported_as_adopted() -> None:
    seen: list[events.Event] = []
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            batch = [text_job(n) for n in range(4)]

            async def jobs() -> Any:
                yield batch[0]
                await anyio.sleep(0.05)  # the first answer calibrates the server's clock
                server.faults = FaultPlan(lost_answer_rate=1.0)  # answers cut off, tasks made
                for job in batch[1:]:
                    yield job

            results = [r async for r in client.run_batch(jobs(), on_event=seen.append)]
    assert all(r.ok for r in results), [str(r.error) for r in results]
    adopted = {e.key: e.task_id for e in seen if isinstance(e, events.Adopted)}
    assert adopted == {r.key: r.task_id for r in results if r.adopted} and len(adopted) == 3
    submitted = {e.key for e in seen if isinstance(e, events.Submitted)}
    assert submitted == {r.key for r in results if not r.adopted}  # (the first job's)


@pytest.mark.anyio
async def test_jobs_held_back_by_the_budget_are_reported() -> None:
    seen: list[events.Event] = []
    jobs = [
        ka.LipSyncJob.from_audio(
            video_url="https://example.com/v.mp4",
            audio_url=f"https://example.com/line-{n}.mp3",
            sound_end_time=7000,  # estimated 1.0 unit; charged 0.5 by the fake server
            key=f"k{n}",
        )
        for n in range(8)
    ]
    async with FakeKlingServer(task_duration=0.01) as server:
        async with kling_client(server, max_in_flight=1) as client:
            batch = client.run_batch(jobs, budget=ka.Budget(units=3.0), on_event=seen.append)
            results = {r.key: r async for r in batch}
    held = [e for e in seen if isinstance(e, events.BudgetExceeded)]
    stopped = {k for k, r in results.items() if isinstance(r.error, ka.BudgetExceededError)}
    assert stopped and {e.key for e in held} == stopped
    assert all(e.limit == 3.0 and e.units == 1.0 and e.spent + e.units > 3.0 for e in held)
