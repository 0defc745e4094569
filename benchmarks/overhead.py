"""Overhead: run_batch against a bare aiohttp loop making the same requests.

The fake server runs in its own process (benchmarks/fake_server.py) with tasks that end at once
and no task limit.  The baseline is the loop anyone would write by hand: ``concurrency``
workers, each POSTing a submit, GETting the task, checking both answers' ``code``.  kling_async
runs the same jobs with ``max_in_flight = concurrency`` on the *same* aiohttp session, twice:

* ``per task``: a policy that polls at once (first_delay 0, no list queries, not adaptive), so
  that it makes exactly the bare loop's requests (one submit and one query a job);
* ``list``: the default policy (list queries, adaptive) with short tasks' times
  (``first_delay=0.001, max_interval=0.05``): what a user gets, one list page refreshing many
  tasks.

``--clients journal`` and ``list-journal`` run the per-task and the list batch with a SQLite
journal (a new file each round); their throughput is also reported against the same batch
without one, round by round.

Rounds alternate (bare, transport, per task, list, bare, ...).  Two ratios are reported: best
round against best round, and the median over rounds of each round's ratio with its range (this
machine switches between speed states; neighbouring runs mostly share one, so the median of
pairs is the steadier figure).

    python benchmarks/overhead.py [--jobs 5000] [--concurrency 20 50 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

import aiohttp
from _common import API_KEY, server_process, table, text_job

import kling_async as ka

JOBS = [text_job(n) for n in range(5000)]


def policy(concurrency: int) -> ka.PollPolicy:
    # Poll at once, one query per task, as many queries in flight as the bare loop allows.
    return ka.PollPolicy(
        first_delay=0.0,
        adaptive=False,
        list_queries=False,
        jitter=0.0,
        max_concurrent_queries=concurrency,
    )


def list_policy(concurrency: int) -> ka.PollPolicy:
    # The defaults (list queries, adaptive), with times for tasks that end at once.
    return ka.PollPolicy(first_delay=0.001, max_interval=0.05)


async def bare_loop(session: aiohttp.ClientSession, url: str, jobs: int, workers: int) -> int:
    headers = {"Authorization": f"Bearer {API_KEY}", "Accept": "application/json"}
    bodies = iter(
        [
            {
                "input": {
                    "mode": "text2video",
                    "video_url": f"https://example.com/clip-{n}.mp4",
                    "text": f"line {n}",
                    "voice_id": "girlfriend_1_speech02",
                    "voice_language": "en",
                    "voice_speed": 1.0,
                }
            }
            for n in range(jobs)
        ]
    )
    done = 0

    async def worker() -> None:
        nonlocal done
        for body in bodies:
            async with session.post(
                f"{url}/v1/videos/lip-sync", json=body, headers=headers
            ) as answer:
                submitted = await answer.json()
            assert submitted["code"] == 0, submitted
            task_id = submitted["data"]["task_id"]
            async with session.get(f"{url}/v1/videos/lip-sync/{task_id}", headers=headers) as a:
                task = await a.json()
            assert task["code"] == 0, task
            assert task["data"]["task_status"] == "succeed", task
            done += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done


async def kling_async_batch(
    session: aiohttp.ClientSession,
    url: str,
    jobs: int,
    workers: int,
    listed: bool = False,
    journal: str | None = None,
) -> int:
    batch = JOBS[:jobs]  # built beforehand, as the bare loop's bodies are
    poll = list_policy(workers) if listed else policy(workers)
    client = ka.KlingClient.kling(
        api_key=API_KEY, base_url=url, max_in_flight=workers, poll=poll, session=session
    )
    done = 0
    async with client:
        async for result in client.run_batch(batch, journal=journal):
            assert result.ok, result
            assert listed or result.polls == 1, result
            done += 1
    return done


async def kling_async_journaled(
    session: aiohttp.ClientSession, url: str, jobs: int, workers: int, listed: bool = False
) -> int:
    """run_batch (per-task, or ``listed``) with a SQLite journal (a new file each run)."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "journal.sqlite")
        return await kling_async_batch(session, url, jobs, workers, listed=listed, journal=path)


async def kling_async_listed_journaled(
    session: aiohttp.ClientSession, url: str, jobs: int, workers: int
) -> int:
    return await kling_async_journaled(session, url, jobs, workers, listed=True)


async def kling_async_listed(
    session: aiohttp.ClientSession, url: str, jobs: int, workers: int
) -> int:
    return await kling_async_batch(session, url, jobs, workers, listed=True)


async def transport_loop(session: aiohttp.ClientSession, url: str, jobs: int, workers: int) -> int:
    """The bare loop's shape over kling_async's Transport and dialect (no batch engine)."""
    client = ka.KlingClient.kling(api_key=API_KEY, base_url=url, session=session)
    dialect, transport = client.dialect, client._requester.transport
    batch = iter(JOBS[:jobs])
    done = 0

    async def worker() -> None:
        nonlocal done
        for job in batch:
            step = next(dialect.flow(job))
            task = dialect.parse_submit(step.stage, await transport.send(step.request))
            query = dialect.query_request(step.stage, task.task_id)
            answer = dialect.parse_query(step.stage, task.task_id, await transport.send(query))
            assert answer.state is ka.TaskState.SUCCEEDED, answer
            done += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done


BARE = "bare aiohttp loop"
PER_TASK = "kling_async run_batch, per-task queries"
LISTED = "kling_async run_batch, list queries (defaults)"
JOURNALED = "kling_async run_batch, per-task queries, SQLite journal"
LISTED_JOURNALED = "kling_async run_batch, list queries (defaults), SQLite journal"
RUNS = {
    BARE: bare_loop,
    "same loop over kling_async's Transport + dialect": transport_loop,
    PER_TASK: kling_async_batch,
    LISTED: kling_async_listed,
    JOURNALED: kling_async_journaled,
    LISTED_JOURNALED: kling_async_listed_journaled,
}
#: --clients names
SHORT = {
    "transport": "same loop over kling_async's Transport + dialect",
    "per-task": PER_TASK,
    "list": LISTED,
    "journal": JOURNALED,
    "list-journal": LISTED_JOURNALED,
}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs = {name: RUNS[name] for name in [BARE, *(SHORT[c] for c in args.clients)]}
    out: dict[int, Any] = {}
    with server_process("--duration", "0") as server:
        for concurrency in args.concurrency:
            out[concurrency] = await measure_at(server.url, runs, concurrency, args)
        requests = server.stop()
    # Every client submits each job once (the list client makes fewer single queries).
    submits = len(args.concurrency) * len(runs) * (args.rounds * args.jobs + 200)
    assert requests.get("submit") == submits, requests
    return {"jobs": args.jobs, "by_concurrency": out}


async def measure_at(
    url: str, runs: dict[str, Any], concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector) as session:
        for run in runs.values():  # warm-up
            await run(session, url, 200, concurrency)
        for _ in range(args.rounds):
            for name, run in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                done = await run(session, url, args.jobs, concurrency)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                assert done == args.jobs
                times[name].append((wall, cpu))
    best = {name: min(r, key=lambda x: x[0]) for name, r in times.items()}
    bare_walls = [wall for wall, _ in times[BARE]]
    base_wall, base_cpu = best[BARE]
    rows = {}
    for name, r in times.items():
        ratios = [b / wall for b, (wall, _) in zip(bare_walls, r, strict=True)]
        wall, cpu = best[name]
        rows[name] = {
            "jobs_per_s": args.jobs / wall,
            "cpu_us_per_job": cpu / args.jobs * 1e6,
            "throughput_ratio": base_wall / wall,
            "paired_ratio": statistics.median(ratios),
            "paired_min": min(ratios),
            "paired_max": max(ratios),
            "cpu_ratio": cpu / base_cpu,
        }
    for plain_name, journaled_name in ((PER_TASK, JOURNALED), (LISTED, LISTED_JOURNALED)):
        if plain_name in times and journaled_name in times:
            journal_ratios = [
                plain / journaled
                for (plain, _), (journaled, _) in zip(
                    times[plain_name], times[journaled_name], strict=True
                )
            ]
            rows[journaled_name]["vs_unjournaled"] = statistics.median(journal_ratios)
            rows[journaled_name]["vs_unjournaled_range"] = (
                min(journal_ratios),
                max(journal_ratios),
            )
    return {"concurrency": concurrency, "rows": rows}


def report(figures: dict[str, Any]) -> str:
    header = [
        "client",
        "jobs/s",
        "client CPU us/job",
        "throughput vs bare (best)",
        "median of round ratios",
        "range",
        "CPU vs bare",
    ]
    out = []
    for concurrency, at in figures["by_concurrency"].items():
        rows = [
            [
                name,
                r["jobs_per_s"],
                r["cpu_us_per_job"],
                r["throughput_ratio"],
                r["paired_ratio"],
                f"{r['paired_min']:.2f}-{r['paired_max']:.2f}",
                r["cpu_ratio"],
            ]
            for name, r in at["rows"].items()
        ]
        out.append(
            f"{figures['jobs']} jobs, concurrency {concurrency}, fake server in another process; "
            "jobs/s and CPU: best round\n" + table(rows, header)
        )
        for name, kind in ((JOURNALED, "per-task"), (LISTED_JOURNALED, "list-query")):
            journaled = at["rows"].get(name, {})
            if "vs_unjournaled" in journaled:
                low, high = journaled["vs_unjournaled_range"]
                out.append(
                    f"journal: throughput with a SQLite journal / without ({kind} run_batch), "
                    f"median of round ratios {journaled['vs_unjournaled']:.3f} "
                    f"({low:.2f}-{high:.2f})"
                )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="run_batch overhead against a bare aiohttp loop")
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[20, 50, 200])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--clients",
        nargs="+",
        choices=list(SHORT),
        default=list(SHORT),
        help="clients measured against the bare loop (default: all)",
    )
    args = parser.parse_args(argv)
    JOBS.extend(text_job(n) for n in range(len(JOBS), args.jobs))
    figures = asyncio.run(measure(args))
    print(report(figures))
    return figures


if __name__ == "__main__":
    main()
