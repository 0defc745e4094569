"""Three worker processes, one PostgreSQL journal, one account; one worker is SIGKILLed.

The fake server (in this process) holds the account: K tasks at once, then 1303.  Every
worker runs the same 1,000 jobs (official advanced lip-sync, with external task ids) with
max_in_flight K against the same journal.  One worker is killed mid-run with tasks in flight;
the others take its jobs over once its lease expires.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psycopg
import pytest
from test_journal import task_video

from kling_async.journal._export import read_jobs
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).with_name("pg_worker.py")


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def start(
    server: FakeKlingServer, url: str, out: Path, count: int, limit: int, lease: float
) -> anyio.abc.Process:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, str(WORKER), server.url, url, str(out), str(count), str(limit)]
    return await anyio.open_process([*argv, str(lease)], env=env, stdout=None, stderr=None)


async def test_three_workers_one_killed_every_job_once_never_over_the_limit(
    pg_url: str, tmp_path: Path
) -> None:
    count, limit, lease = 1000, 6, 1.0
    outs = [tmp_path / f"worker-{n}.jsonl" for n in range(3)]
    async with FakeKlingServer(task_duration=0.02, task_limit=limit) as server:
        workers = [await start(server, pg_url, out, count, limit, lease) for out in outs]
        victim = workers[1]
        with anyio.fail_after(60):
            # Killed mid-run, with tasks of its own running on the server.
            while len(read_lines(outs[1])) < 60:
                assert victim.returncode is None, "the worker ended before the kill"
                await anyio.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        killed_at = server.tasks_created
        orphans = claimed_by(pg_url, victim.pid)
        assert orphans, "the victim held no jobs when it died"
        with anyio.fail_after(120):
            for process in (workers[0], workers[2]):
                await process.wait()
        assert [p.returncode for p in (workers[0], workers[2])] == [0, 0]
        assert killed_at < count  # it died mid-run

        # The account's limit was shared and never overrun, dead worker included.
        assert server.max_running_seen <= limit
        assert server.requests["limited"] == 0
        # Every job has exactly one task.
        videos = Counter(task_video(task) for task in server.tasks.values())
        assert server.tasks_created == count == len(videos)
        assert set(videos.values()) == {1}

    # The export: every job exactly once, with its own task, all done.
    exported = await read_jobs(pg_url)
    assert sorted(job.key for job in exported) == sorted(f"job-{n}" for n in range(count))
    assert all(job.result is not None and job.result.ok for job in exported), [
        str(job.result.error) for job in exported if job.result and not job.result.ok
    ]
    task_ids = [job.result.task_id for job in exported if job.result]
    assert len(set(task_ids)) == count and set(task_ids) == set(server.tasks)
    for job in exported:
        task = server.tasks[job.result.task_id]  # type: ignore[union-attr,index]
        assert task_video(task) == f"https://example.com/w-{job.key[4:]}.mp4"

    # What the workers reported: the survivors each job at most once, all jobs between them.
    lines = [read_lines(out) for out in outs]
    for survivor in (lines[0], lines[2]):
        keys = [line["key"] for line in survivor]
        assert len(keys) == len(set(keys))
    reported = {line["key"] for worker in lines for line in worker}
    assert reported == {f"job-{n}" for n in range(count)}
    assert lines[0] and lines[2]
    assert not claimed_by(pg_url, victim.pid)  # every job it held was taken over


def claimed_by(url: str, pid: int) -> list[str]:
    """Keys of the jobs the worker process ``pid`` holds (claimed, not done)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT key FROM kling_jobs WHERE state = 'claimed' AND worker LIKE %s",
            (f"%:{pid}:%",),
        ).fetchall()
    return [str(row[0]) for row in rows]
