"""run_batch and track against the fake server: slots, failures, quirks, cancellation."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path

import anyio
import pytest
from helpers import (
    FAST_POLL,
    FAST_RETRY,
    WAV,
    apimodels_client,
    audio_job,
    dmx_client,
    engine,
    jwt_client,
    kling_client,
    requests_sent,
    text_job,
)

import kling_async as ka
from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio


def our_tasks() -> list[str]:
    """Names of the running asyncio tasks of kling_async's engine (anyio names them by function)."""
    return [
        task.get_name()
        for task in asyncio.all_tasks()
        if task.get_name().startswith("kling_async.") and not task.done()
    ]


async def collect(
    results: ka.KlingClient | object,
    jobs: Iterable[ka.LipSyncJob] | AsyncIterable[ka.LipSyncJob],
) -> list[ka.JobResult]:
    assert isinstance(results, ka.KlingClient)
    out = []
    with anyio.fail_after(30):
        async for result in results.run_batch(jobs):
            out.append(result)
    return out


async def test_200_jobs_under_a_task_limit_of_5() -> None:
    jobs = [text_job(n, key=f"job-{n}") for n in range(200)]
    async with FakeKlingServer(task_duration=0.02, task_limit=5) as server:
        async with dmx_client(server, max_in_flight=20, prefix="/kling") as client:
            results = await collect(client, jobs)
    assert sorted(r.key for r in results) == sorted(j.key for j in jobs if j.key)
    assert all(r.ok and r.video_url for r in results)
    assert server.tasks_created == 200  # 1303 refusals created nothing; nothing submitted twice
    assert len({r.task_id for r in results}) == 200
    assert server.max_running_seen <= 5
    assert server.requests["rejected"] >= 1 or server.requests["submit"] >= 200


async def test_failures_are_values_with_the_server_reason() -> None:
    jobs = [text_job(n) for n in range(6)]
    jobs.append(
        ka.LipSyncJob.from_text(
            video_url="https://example.com/no-human.mp4", text="hi", voice_id="v", key="bad"
        )
    )
    async with FakeKlingServer(task_duration=0.02) as server, kling_client(server) as client:
        results = await collect(client, jobs)
    by_key = {r.key: r for r in results}
    bad = by_key.pop("bad")
    assert not bad.ok and bad.state is ka.TaskState.FAILED
    assert isinstance(bad.error, ka.TaskFailedError)
    assert "there is no human in the video" in str(bad.error)
    assert bad.task_id in server.tasks
    assert all(r.ok for r in by_key.values()) and len(by_key) == 6
    assert sorted(by_key) == [str(n) for n in range(6)]  # keys default to the index


async def test_rejected_submit_is_a_failed_result_and_the_batch_goes_on() -> None:
    async with FakeKlingServer(task_duration=0.01) as server, kling_client(server) as client:
        server.script("submit", status=400, code=1301, message="content policy")
        results = await collect(client, [text_job(n) for n in range(4)])
    failed = [r for r in results if not r.ok]
    assert len(failed) == 1
    assert isinstance(failed[0].error, ka.ContentPolicyError)
    assert failed[0].task_id is None and "content policy" in str(failed[0].error)
    assert sum(r.ok for r in results) == 3


async def test_1303_as_http_200_and_data_as_list() -> None:
    faults = FaultPlan(errors_as_http_200=True, data_as_list=True)
    async with FakeKlingServer(task_duration=0.02, task_limit=3, faults=faults) as server:
        async with kling_client(server, max_in_flight=10) as client:
            results = await collect(client, [audio_job(n) for n in range(30)])
    assert all(r.ok for r in results) and len(results) == 30
    assert server.tasks_created == 30
    assert server.max_running_seen <= 3


async def test_query_errors_never_fail_a_task() -> None:
    faults = FaultPlan(query_error_rate=0.2, http_500_rate=0.0)
    async with FakeKlingServer(task_duration=0.02, faults=faults, seed=7) as server:
        async with kling_client(server, max_in_flight=10) as client:
            results = await collect(client, [text_job(n) for n in range(40)])
    assert all(r.ok for r in results), [str(r.error) for r in results if not r.ok]
    assert server.tasks_created == 40


async def test_list_queries_refresh_many_tasks_at_once() -> None:
    async with FakeKlingServer(task_duration=0.05) as server:
        async with kling_client(server, max_in_flight=20) as client:
            results = await collect(client, [text_job(n) for n in range(40)])
    assert all(r.ok for r in results)
    assert server.requests["list"] > 0
    status_requests = server.requests["list"] + server.requests["query"]
    assert status_requests < sum(r.polls for r in results)


async def test_bad_key_fails_fast_with_the_error_itself() -> None:
    async with FakeKlingServer() as server:
        client = ka.KlingClient.kling(api_key="sk-wrong", base_url=server.url, poll=FAST_POLL)
        async with client:
            with pytest.raises(ka.AuthenticationError):
                await collect(client, [text_job(n) for n in range(100)])
    assert requests_sent(server) <= 3
    assert server.tasks_created == 0


async def test_account_running_dry_mid_batch_stops_with_the_task_ids() -> None:
    durations = iter([0.05, 0.5, 0.5, 0.5, *[0.05] * 50])
    async with FakeKlingServer(task_duration=lambda rng: next(durations)) as server:
        async with kling_client(server, max_in_flight=4) as client:
            seen: list[ka.JobResult] = []

            async def consume() -> None:
                with anyio.fail_after(10):
                    async for result in client.run_batch(text_job(n) for n in range(50)):
                        seen.append(result)
                        server.set_account_error(1102)

            with pytest.raises(ka.AccountError) as info:
                await consume()
    ids = set(info.value.submitted_task_ids)
    assert ids, "the tasks still running must be reported"
    assert ids <= set(server.tasks)
    assert len(seen) + len(ids) <= server.tasks_created
    assert server.tasks_created <= len(seen) + 8


async def test_breaking_out_leaves_nothing_running(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    async with FakeKlingServer(task_duration=0.05) as server:
        async with kling_client(server, max_in_flight=5) as client:
            async for _result in client.run_batch(text_job(n) for n in range(1000)):
                assert our_tasks()  # the batch runs in tasks of its own...
                break
            await anyio.sleep(0.1)
            created = server.tasks_created
            await anyio.sleep(0.1)
            assert server.tasks_created == created  # nothing more is submitted
            assert our_tasks() == []  # ...and none of them is left
    assert created <= 5 + 1
    assert "batch ended" in caplog.text


async def test_breaking_out_stops_the_batch_while_the_caller_still_holds_it() -> None:
    """``results = client.run_batch(...)``, ``async for ... in results: break``: stopped too.

    The README reads ``results.running_task_ids`` after such a loop, which needs the name.  Only
    the iterator's own end stopped the batch, so while it was held the runners went on
    submitting paid tasks (until the pipe's places ran out), missing from those ids.
    """
    durations = iter([0.05, *[2.0] * 100])
    async with FakeKlingServer(task_duration=lambda rng: next(durations)) as server:
        async with kling_client(server, max_in_flight=5) as client:
            results = client.run_batch(text_job(n) for n in range(100))
            async for _result in results:
                break
            running = set(results.running_task_ids)
            unfinished = {i for i, task in server.tasks.items() if not task.terminal}
            created = server.tasks_created
            await anyio.sleep(0.3)
            assert server.tasks_created == created  # nothing more is submitted
            assert our_tasks() == []
            assert running and unfinished <= running  # every task still running, named


async def test_leaving_on_a_result_finds_no_newer_submit() -> None:
    # The runner that hands a result over lets the consumer run before it submits another job:
    # a consumer that leaves on that result stops the batch with nothing more sent.
    async with FakeKlingServer(task_duration=0.05) as server:
        async with kling_client(server, max_in_flight=3) as client:
            async for _result in client.run_batch(text_job(n) for n in range(50)):
                break
            created = server.tasks_created
            await anyio.sleep(0.1)
            assert server.tasks_created == created == 3


async def test_cancelling_the_consumer_cancels_the_batch() -> None:
    async with FakeKlingServer(task_duration=0.5) as server:
        async with kling_client(server, max_in_flight=3) as client:
            with anyio.move_on_after(0.1):
                async for _ in client.run_batch(text_job(n) for n in range(100)):
                    pass
            created = server.tasks_created
            await anyio.sleep(0.15)
            assert server.tasks_created == created
            assert created <= 3


async def test_context_manager_form_stops_the_batch() -> None:
    async with FakeKlingServer(task_duration=0.02) as server, kling_client(server) as client:
        async with client.run_batch([text_job(n) for n in range(50)]) as results:
            first = await results.__anext__()
        created = server.tasks_created
        await anyio.sleep(0.1)
    assert first.ok
    assert server.tasks_created == created < 50


async def test_a_million_jobs_are_read_lazily() -> None:
    produced = itertools.count()

    def jobs() -> Iterator[ka.LipSyncJob]:
        for n in range(1_000_000):
            next(produced)
            yield text_job(n)

    async with FakeKlingServer(task_duration=0.01) as server:
        async with kling_client(server, max_in_flight=4) as client:
            got = 0
            async for _ in client.run_batch(jobs()):
                got += 1
                if got == 20:
                    break
    assert next(produced) < 20 + 4 + 2 * 4 + 2


async def test_async_iterable_of_jobs_and_completion_order() -> None:
    async def jobs() -> AsyncIterator[ka.LipSyncJob]:
        for n in range(5):
            yield text_job(n, key=f"k{n}")

    durations = iter([0.3, 0.01, 0.01, 0.01, 0.01])
    async with FakeKlingServer(task_duration=lambda rng: next(durations)) as server:
        async with kling_client(server) as client:
            results = await collect(client, jobs())
    assert [r.key for r in results][-1] == "k0"  # the slow one comes last
    assert all(r.polls >= 1 and r.submitted_at and r.finished_at for r in results)


async def test_time_out_keeps_the_task_id() -> None:
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.02, timeout=0.1)
    async with FakeKlingServer(task_duration=5.0) as server:
        async with kling_client(server, poll=poll) as client:
            results = await collect(client, [text_job(1)])
    (result,) = results
    assert result.state is ka.TaskState.TIMED_OUT and not result.ok
    assert result.task_id in server.tasks
    assert isinstance(result.error, ka.TaskTimedOutError)


async def test_track_follows_tasks_submitted_elsewhere() -> None:
    async with FakeKlingServer(task_duration=0.03) as server, kling_client(server) as client:
        ids = [(await client.submit(text_job(n))).task_id for n in range(3)]
        with anyio.fail_after(5):
            results = [r async for r in client.track([*ids, "404404404404404404"])]
    by_key = {r.key: r for r in results}
    assert all(by_key[i].ok for i in ids)
    assert by_key["404404404404404404"].state is ka.TaskState.FAILED


async def test_track_follows_every_id_at_once_whatever_max_in_flight() -> None:
    # The tasks run already: none waits for a slot or for the consumer to take a result.  The
    # last id ends first and must be reported first; tracking a few at a time (as before, two
    # per max_in_flight) would report the first ids first.
    durations = iter([0.6] * 7 + [0.02])
    server = FakeKlingServer(task_duration=lambda rng: next(durations), task_limit=None)
    async with server, kling_client(server, max_in_flight=1) as client:
        ids = [(await client.submit(text_job(n))).task_id for n in range(8)]
        with anyio.fail_after(5):
            results = [r async for r in client.track([*ids, ids[0]])]
    assert results[0].task_id == ids[-1]
    assert Counter(r.task_id for r in results) == Counter([*ids, ids[0]])  # one result per id
    assert all(r.ok for r in results)


async def test_leaving_a_track_stops_following_every_task() -> None:
    durations = iter([0.01] + [30.0] * 5)
    server = FakeKlingServer(task_duration=lambda rng: next(durations), task_limit=None)
    async with server, kling_client(server) as client:
        ids = [(await client.submit(text_job(n))).task_id for n in range(6)]
        with anyio.fail_after(5):
            async with client.track(ids) as results:
                async for result in results:
                    assert result.task_id == ids[0]
                    break
            batch = engine(results)
            assert batch.tracker.live == 0 and batch.progress().running == 5
            sent = requests_sent(server)
            await anyio.sleep(0.1)  # FAST_POLL would have asked several times by now
            assert requests_sent(server) == sent


async def test_jwt_batch() -> None:
    async with FakeKlingServer(task_duration=0.01) as server:
        client = jwt_client(server, poll=FAST_POLL)
        async with client:
            results = await collect(client, [text_job(n) for n in range(10)])
    assert all(r.ok for r in results)


async def test_apimodels_two_step_flow_in_the_engine() -> None:
    jobs = [
        ka.LipSyncJob.from_audio(video_url=f"https://e.com/{n}.mp4", audio_file=WAV, key=f"a{n}")
        for n in range(5)
    ]
    jobs.append(
        ka.LipSyncJob.from_audio(
            video_url="https://e.com/no-face.mp4", audio_url="https://e.com/a.mp3", key="noface"
        )
    )
    jobs.append(text_job(99, key="text"))
    async with FakeKlingServer(task_duration=0.02) as server, apimodels_client(server) as client:
        results = await collect(client, jobs)
    by_key = {r.key: r for r in results}
    for n in range(5):
        result = by_key[f"a{n}"]
        assert result.ok and server.tasks[result.task_id or ""].stage == "advanced-lip-sync"
    noface = by_key["noface"]
    assert not noface.ok and "Face detection failed" in str(noface.error)
    assert server.tasks[noface.task_id or ""].stage == "identify-face"
    assert isinstance(by_key["text"].error, ka.ValidationError)
    assert server.tasks_created == 5 * 2 + 1


async def test_download_to_saves_every_video_before_reporting(tmp_path: Path) -> None:
    jobs = [text_job(n, key=f"ep1/line {n}") for n in range(4)]
    async with FakeKlingServer(task_duration=0.01) as server, kling_client(server) as client:
        results = [r async for r in client.run_batch(jobs, download_to=tmp_path / "videos")]
    assert all(r.ok and r.error is None for r in results)
    paths = sorted(r.path for r in results if r.path)
    assert len(paths) == 4
    assert all(p.parent == tmp_path / "videos" and p.stat().st_size > 0 for p in paths)
    assert server.requests["download"] == 4


async def test_rate_limited_submits_wait_instead_of_failing() -> None:
    async with FakeKlingServer(task_duration=0.01) as server, kling_client(server) as client:
        # More 1302 answers than the RetryPolicy's attempts: the job still goes through.
        server.script("submit", status=429, code=1302, times=FAST_RETRY.max_attempts + 3)
        results = await collect(client, [text_job(1)])
    assert results[0].ok
    assert server.tasks_created == 1


async def test_unreachable_server_stops_the_batch_at_the_first_submit() -> None:
    async with FakeKlingServer() as server:
        url = server.url
    retry = ka.RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.001)
    async with ka.KlingClient.kling(api_key="k", base_url=url, retry=retry) as client:
        with pytest.raises(ka.ConnectError):
            await collect(client, [text_job(n) for n in range(50)])


async def test_progress_counts_what_the_batch_did() -> None:
    async with FakeKlingServer(task_duration=0.05) as server:
        async with kling_client(server, max_in_flight=3) as client:
            results = client.run_batch([text_job(n) for n in range(6)])
            seen = []
            async for _ in results:
                seen.append(results.progress)
    # units: what the fake server charged, 0.5 a task (final_unit_deduction).
    assert seen[-1] == ka.BatchProgress(submitted=6, running=0, succeeded=6, failed=0, units=3.0)
    assert seen[-1].done == 6
    assert all(p.running <= 3 for p in seen)
