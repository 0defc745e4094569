"""Journal: the cost of keeping a batch's progress in SQLite, end to end and alone.

End to end, ``overhead.py --clients per-task journal`` runs the same batch with and without a
journal in alternating rounds (the ratio of their throughputs is the figure).  This script
measures the write path alone, without a server: ``--writers`` tasks each record ``--jobs`` /
``--writers`` jobs as a batch does (the submit intent, durable; the task id; the result; the
"reported" mark), against a fresh journal file per round.  Figures: wall and CPU time per job
(median of the rounds, with their range) and transactions per job (group commit shares one
between the writers that wait together).

    python benchmarks/journal.py [--jobs 2000] [--writers 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

import anyio
from _common import table, text_job

from kling_async._results import JobResult, TaskState
from kling_async.journal._sqlite import Journal


async def one_round(jobs: int, writers: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as directory:
        journal = await Journal.open(
            os.path.join(directory, "journal.sqlite"),
            dialect="kling",
            stage="lip-sync",
            base_url="http://127.0.0.1:9",
        )
        keys = iter(range(jobs))

        async def writer() -> None:
            for n in keys:
                key, task_id = f"job-{n}", f"task-{n}"
                journal.begin(key, text_job(n))
                await journal.submitting(key, "lip-sync", 1.0)
                await journal.created(key, "lip-sync", task_id)
                result = JobResult(
                    key=key,
                    task_id=task_id,
                    state=TaskState.SUCCEEDED,
                    video_urls=(f"https://example.com/out-{n}.mp4",),
                    polls=1,
                )
                await journal.finished(result, final=True)
                journal.reported(key)

        wall, cpu = time.perf_counter(), time.process_time()
        async with anyio.create_task_group() as marks:
            marks.start_soon(journal.commit_marks)
            async with anyio.create_task_group() as group:
                for _ in range(writers):
                    group.start_soon(writer)
            marks.cancel_scope.cancel()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        transactions = journal.transactions
        await journal.close()
    return wall, cpu, transactions


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    await one_round(200, args.writers)  # warm-up
    rounds = [await one_round(args.jobs, args.writers) for _ in range(args.rounds)]
    walls = [wall / args.jobs * 1e6 for wall, _, _ in rounds]
    cpus = [cpu / args.jobs * 1e6 for _, cpu, _ in rounds]
    return {
        "jobs": args.jobs,
        "writers": args.writers,
        "wall_us": statistics.median(walls),
        "wall_range": (min(walls), max(walls)),
        "cpu_us": statistics.median(cpus),
        "cpu_range": (min(cpus), max(cpus)),
        "transactions_per_job": statistics.median(t for _, _, t in rounds) / args.jobs,
    }


def report(figures: dict[str, Any]) -> str:
    row = [
        f"{figures['jobs']} jobs, {figures['writers']} writers",
        figures["wall_us"],
        "{:.0f}-{:.0f}".format(*figures["wall_range"]),
        figures["cpu_us"],
        "{:.0f}-{:.0f}".format(*figures["cpu_range"]),
        figures["transactions_per_job"],
    ]
    header = ["write path", "wall us/job", "range", "CPU us/job", "range", "transactions/job"]
    return table([row], header)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="the journal's write path alone")
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args))
    print(report(figures))
    return figures


if __name__ == "__main__":
    main()
