"""uvloop against asyncio's own loop: the same run_batch, rounds alternating between the loops.

Each round opens a fresh event loop of one kind (asyncio's, then uvloop's, then asyncio's...),
its own aiohttp session, and runs ``--jobs`` jobs through run_batch (per-task queries, as in
overhead.py, and list queries with the default policy) against the fake server in its own
process.  The figure is the median over round pairs of uvloop's jobs/s over asyncio's, with
its range.  The CLI runs on uvloop where it is installed (``pip install 'kling-async[speed]'``).

    python benchmarks/loops.py [--jobs 3000] [--concurrency 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp
import uvloop
from _common import server_process, table, text_job
from overhead import JOBS, kling_async_batch


async def one_round(url: str, jobs: int, concurrency: int, listed: bool) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector) as session:
        await kling_async_batch(session, url, 200, concurrency, listed=listed)  # warm-up
        start = time.perf_counter()
        await kling_async_batch(session, url, jobs, concurrency, listed=listed)
        return jobs / (time.perf_counter() - start)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    with server_process("--duration", "0") as server:
        for listed in (False, True):
            speeds: dict[str, list[float]] = {"asyncio": [], "uvloop": []}
            for _ in range(args.rounds):
                main = one_round(server.url, args.jobs, args.concurrency, listed)
                speeds["asyncio"].append(asyncio.run(main))
                main = one_round(server.url, args.jobs, args.concurrency, listed)
                speeds["uvloop"].append(uvloop.run(main))
            ratios = [u / a for a, u in zip(speeds["asyncio"], speeds["uvloop"], strict=True)]
            rows["list queries (defaults)" if listed else "per-task queries"] = {
                "asyncio": statistics.median(speeds["asyncio"]),
                "uvloop": statistics.median(speeds["uvloop"]),
                "ratio": statistics.median(ratios),
                "range": (min(ratios), max(ratios)),
            }
    return {"jobs": args.jobs, "concurrency": args.concurrency, "rows": rows}


def report(figures: dict[str, Any]) -> str:
    rows = [
        [name, r["asyncio"], r["uvloop"], r["ratio"], "{:.2f}-{:.2f}".format(*r["range"])]
        for name, r in figures["rows"].items()
    ]
    header = ["run_batch", "asyncio jobs/s", "uvloop jobs/s", "uvloop / asyncio", "range"]
    return (
        f"{figures['jobs']} jobs, concurrency {figures['concurrency']}, medians of the rounds\n"
        + table(rows, header)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="uvloop against asyncio's loop")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    JOBS.extend(text_job(n) for n in range(len(JOBS), args.jobs))
    figures = measure(args)
    print(report(figures))
    return figures


if __name__ == "__main__":
    main()
