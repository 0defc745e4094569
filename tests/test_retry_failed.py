"""run_batch(..., retry_failed=True) and `kling-async run --retry-failed`: failures run again.

Against FakeKlingServer: a job refused for good (1301) and a job whose task failed are submitted
again; a success, and a job whose task may still be running, never are.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import FAST_POLL, kling_client, text_job

import kling_async as ka
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio

NO_HUMAN = "https://example.com/no-human.mp4"  # the fake server fails these tasks


async def run(
    client: ka.KlingClient, jobs: Iterable[ka.LipSyncJob], journal: Path, **options: Any
) -> list[ka.JobResult]:
    with anyio.fail_after(20):
        return [r async for r in client.run_batch(jobs, journal=journal, **options)]


def by_key(results: Iterable[ka.JobResult]) -> dict[str, ka.JobResult]:
    return {r.key: r for r in results}


def failing_job() -> ka.LipSyncJob:
    return ka.LipSyncJob.from_text(video_url=NO_HUMAN, text="hi", voice_id="v", key="no-human")


async def test_only_the_failed_jobs_get_new_tasks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(3)] + [failing_job()]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=1) as client:
            # The first submit is refused for good: content policy, no task created.
            server.script("submit", status=400, code=1301)
            first = by_key(await run(client, jobs, journal))
            created = dict(server.tasks)
            plain_rerun = await run(client, jobs, journal)  # without the flag: nothing to do
            caplog.set_level(logging.INFO, logger="kling_async")
            batch = client.run_batch(jobs, journal=journal, retry_failed=True)
            with anyio.fail_after(20):
                second = by_key([r async for r in batch])
    assert isinstance(first["k0"].error, ka.ContentPolicyError) and first["k0"].task_id is None
    assert isinstance(first["no-human"].error, ka.TaskFailedError)
    assert first["k1"].ok and first["k2"].ok
    assert len(created) == 3 and plain_rerun == []

    assert set(second) == {"k0", "no-human"}  # the successes were neither run nor reported
    assert second["k0"].ok  # refused before, runs now
    assert isinstance(second["no-human"].error, ka.TaskFailedError)  # a new task, failed again
    new = {tid: task for tid, task in server.tasks.items() if tid not in created}
    assert set(new) == {second["k0"].task_id, second["no-human"].task_id}
    assert second["no-human"].task_id != first["no-human"].task_id
    assert server.tasks_created == 5
    assert batch.progress.retried == 2
    assert "2 jobs that failed in earlier runs were submitted again" in caplog.text


async def test_a_success_is_never_run_again_even_when_not_yet_reported(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(2)]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            taken: list[ka.JobResult] = []

            async def crash_while_holding_a_result() -> None:
                async with client.run_batch(jobs, journal=journal) as results:
                    async for result in results:
                        taken.append(result)
                        if len(taken) == 2:
                            raise RuntimeError("crash")

            with pytest.raises(RuntimeError):
                await crash_while_holding_a_result()
            again = await run(client, jobs, journal, retry_failed=True)
    assert again == [taken[-1]]  # reported from the journal, as it was: no new task
    assert server.tasks_created == 2


async def test_a_job_whose_task_may_still_run_is_tracked_not_resubmitted(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(2)]
    impatient = ka.PollPolicy(first_delay=0.01, max_interval=0.02, timeout=0.05)
    async with FakeKlingServer(task_duration=0.3) as server:
        async with kling_client(server, poll=impatient) as client:
            first = await run(client, jobs, journal)
        async with kling_client(server, poll=FAST_POLL) as client:
            second = await run(client, jobs, journal, retry_failed=True)
    assert all(r.state is ka.TaskState.TIMED_OUT for r in first)  # not a failure: still running
    assert all(r.ok for r in second)
    assert {r.task_id for r in second} == {r.task_id for r in first}
    assert server.tasks_created == 2


# -- the command line --------------------------------------------------------------------------


async def kling_async(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    env["KLING_API_KEY"] = "sk-sandbox"
    return await anyio.run_process(
        [sys.executable, "-m", "kling_async", *args], env=env, check=False
    )


async def test_cli_retry_failed_reruns_the_refused_job_and_exits_with_the_new_outcome(
    tmp_path: Path,
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {
            "key": f"k{n}",
            "video_url": f"https://example.com/clip-{n}.mp4",
            "text": f"line {n}",
            "voice_id": "v",
        }
        for n in range(3)
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    journal, out = tmp_path / "dub.journal", tmp_path / "results.jsonl"
    async with FakeKlingServer(task_duration=0.02) as server:
        common: tuple[str, ...]  # grows below
        common = ("run", str(jobs), "--base-url", server.url, "--journal", str(journal))
        common += ("--first-poll", "0.02", "--max-in-flight", "1")
        server.script("submit", status=400, code=1301)  # the first job is refused for good
        first = await kling_async(*common, "--out", str(out))
        assert first.returncode == 1, first.stderr.decode()
        assert server.tasks_created == 2

        no_journal = await kling_async("run", str(jobs), "--out", "-", "--retry-failed")
        assert no_journal.returncode == 2
        assert "--retry-failed goes with --journal" in no_journal.stderr.decode()

        again = await kling_async(*common, "--out", str(out), "--retry-failed")
        assert again.returncode == 0, again.stderr.decode()  # the refused job succeeded now
    assert server.tasks_created == 3  # one new task: the refused job's
    assert "1 job that failed in earlier runs submitted again" in again.stderr.decode()
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["key"], r["ok"]) for r in written if r["key"] == "k0"] == [
        ("k0", False),
        ("k0", True),
    ]
