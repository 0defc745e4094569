"""Journal: its end-to-end cost as the event loop's load varies with the tasks' duration.

``overhead.py``'s journal figure runs tasks that end at once: the client's event loop is then
busy about nine tenths of the time (aiohttp's own work for two requests a job), so every
microsecond the journal adds to a job lengthens the batch by as much.  This script runs the
same list-query ``run_batch`` (the defaults, ``overhead.list_policy``) with and without a
SQLite journal, in alternating rounds, against fake servers whose tasks take ``--durations``
seconds, and reports for each duration the median of the rounds' throughput ratios (journal /
none) with their range, and how busy the client's loop was (its thread's CPU time over the
wall time, median of the rounds).

    python benchmarks/journal_load.py [--durations 0 0.02 0.2] [--jobs 1500] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp
import overhead
from _common import server_process, table, text_job


async def one_duration(duration: str, jobs: int, rounds: int, workers: int) -> dict[str, Any]:
    walls: dict[str, list[float]] = {"none": [], "journal": []}
    busy: dict[str, list[float]] = {"none": [], "journal": []}
    runs = {"none": overhead.kling_async_listed, "journal": overhead.kling_async_listed_journaled}
    with server_process("--duration", duration) as server:
        connector = aiohttp.TCPConnector(limit=workers + 8)
        async with aiohttp.ClientSession(connector=connector) as session:
            for run in runs.values():  # warm-up
                await run(session, server.url, 100, workers)
            for number in range(rounds):
                order = list(runs) if number % 2 == 0 else list(runs)[::-1]
                for name in order:
                    wall, cpu = time.perf_counter(), time.thread_time()
                    done = await runs[name](session, server.url, jobs, workers)
                    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                    assert done == jobs
                    walls[name].append(wall)
                    busy[name].append(cpu / wall)
    pairs = zip(walls["none"], walls["journal"], strict=True)
    ratios = [plain / journaled for plain, journaled in pairs]
    return {
        "duration": duration,
        "ratio": statistics.median(ratios),
        "range": (min(ratios), max(ratios)),
        "wall": {name: statistics.median(values) for name, values in walls.items()},
        "busy": {name: statistics.median(values) for name, values in busy.items()},
    }


def report(figures: list[dict[str, Any]], jobs: int, workers: int) -> str:
    header = [
        "task duration (s)",
        "journal / none (median of rounds)",
        "range",
        "batch s, none",
        "batch s, journal",
        "loop busy, none",
        "loop busy, journal",
    ]
    rows = [
        [
            f["duration"],
            f["ratio"],
            f"{f['range'][0]:.3f}-{f['range'][1]:.3f}",
            f["wall"]["none"],
            f["wall"]["journal"],
            f"{f['busy']['none']:.0%}",
            f"{f['busy']['journal']:.0%}",
        ]
        for f in figures
    ]
    return f"{jobs} jobs, concurrency {workers}, list queries (defaults)\n" + table(rows, header)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="the journal's cost by task duration")
    parser.add_argument("--durations", nargs="+", default=["0", "0.02", "0.2"])
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args(argv)
    overhead.JOBS.extend(text_job(n) for n in range(len(overhead.JOBS), args.jobs))
    figures = [
        asyncio.run(one_duration(duration, args.jobs, args.rounds, args.concurrency))
        for duration in args.durations
    ]
    print(report(figures, args.jobs, args.concurrency))
    return figures


if __name__ == "__main__":
    main()
