"""Three worker processes, one PostgreSQL journal, one account; one worker is SIGKILLed.

The fake server (in this process) holds the account: K tasks at once, then 1303.  Every
worker runs the same 1,000 jobs (official advanced lip-sync, with external task ids) with
max_in_flight K against the same journal.  The worker that polls the server for all of them
(it holds the journal's poll seat) is killed mid-run with tasks in flight; another takes the
seat over at once, and the others take its jobs over once its lease expires.
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
        with anyio.fail_after(60):
            # Killed mid-run, with tasks of its own running on the server: the poller.
            while not (pids := poller_pids(pg_url)):  # noqa: ASYNC110
                await anyio.sleep(0.01)
            index = [p.pid for p in workers].index(pids[0])
            victim = workers[index]
            # ... at a moment it holds claimed jobs (between two claims it may hold none: CI's
            # 3.13 run once killed it there, and then nothing was left to take over).
            while len(read_lines(outs[index])) < 30 or not claimed_by(pg_url, victim.pid):
                assert victim.returncode is None, "the worker ended before the kill"
                await anyio.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        orphans = claimed_by(pg_url, victim.pid)
        with anyio.fail_after(10):
            # Another worker polls for all now (the dead one's seat went with its connection).
            while not (pids := poller_pids(pg_url)) or pids == [victim.pid]:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert pids[0] != victim.pid
        killed_at = server.tasks_created
        survivors = [p for p in workers if p is not victim]
        assert orphans, "the victim held no jobs when it died"
        with anyio.fail_after(120):
            for process in survivors:
                await process.wait()
        assert [p.returncode for p in survivors] == [0, 0]
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
        assert job.result is not None and job.result.task_id is not None  # (all ok, above)
        task = server.tasks[job.result.task_id]
        assert task_video(task) == f"https://example.com/w-{job.key[4:]}.mp4"

    # What the workers reported: the survivors each job at most once, all jobs between them.
    lines = [read_lines(out) for out in outs]
    alive = [lines[n] for n in range(3) if n != index]
    for survivor in alive:
        keys = [line["key"] for line in survivor]
        assert len(keys) == len(set(keys))
    reported = {line["key"] for worker in lines for line in worker}
    assert reported == {f"job-{n}" for n in range(count)}
    assert all(alive)
    assert not claimed_by(pg_url, victim.pid)  # every job it held was taken over


def claimed_by(url: str, pid: int) -> list[str]:
    """Keys of the jobs the worker process ``pid`` holds (claimed, not done)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT key FROM kling_jobs WHERE state = 'claimed' AND worker LIKE %s",
            (f"%:{pid}:%",),
        ).fetchall()
    return [str(row[0]) for row in rows]


def poller_pids(url: str) -> list[int]:
    """Process ids of the workers holding the journal's poll seat (one at most, or none)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted"
            " AND a.application_name LIKE 'kling_async poller %'"
        ).fetchall()
    return [int(str(row[0]).rsplit(" ", 1)[1]) for row in rows]
