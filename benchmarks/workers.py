"""Many workers on one PostgreSQL journal: jobs/s and the time to claim a job.

One run measures, on the same fake server (its own process, zero-duration tasks, no task
limit) and the same jobs:

* one process with no journal, one process with a SQLite journal, and 1, 2 and 3 worker
  processes on a PostgreSQL journal (a fresh database each), all with ``--max-in-flight``
  (for the workers: the account's limit, shared);
* status requests per job in each (polling is per worker: does sharing multiply it?);
* the time one claim takes (claim + record the result, as a worker does, with 1 and 3
  claimants at once), straight on the journal.

PostgreSQL: ``--pg-url`` (an empty database the script may fill; one database per measurement
is created next to it), else a throw-away server is started as tests/pg.py starts it for the
tests (the Debian package ``postgresql``).

    python benchmarks/workers.py                     # --jobs 2000 --in-flight 20   (~1 min)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from _common import API_KEY, HERE, percentile, server_process, table, text_job

import kling_async as ka
from kling_async.journal import PostgresJournal, SharedBackend, open_journal

sys.path.insert(0, str(HERE.parent / "tests"))
from pg import PgServer

POLL = ka.PollPolicy(first_delay=0.01, max_interval=0.05, multiplier=1.5, timeout=600.0)
RETRY = ka.RetryPolicy(base_delay=0.005, max_delay=0.05, concurrency_delay=0.01)


# -- one worker (run as a subprocess: python workers.py --worker ...) ------------------------


async def worker(
    url: str, journal: str | None, jobs: int, in_flight: int, poll: str = "fast"
) -> dict[str, Any]:
    target: Any = journal
    if journal is not None and journal.startswith("postgresql://"):
        target = PostgresJournal(url=journal, claim_poll=0.01)
    client = ka.KlingClient.kling(
        api_key=API_KEY,
        base_url=url,
        max_in_flight=in_flight,
        poll=POLL if poll == "fast" else ka.PollPolicy(),
        retry=RETRY,
    )
    done = 0
    async with client:
        start, cpu = time.time(), time.process_time()
        options = {"journal": target} if target is not None else {}
        async for result in client.run_batch([text_job(n) for n in range(jobs)], **options):
            assert result.ok, result.error
            done += 1
        end, cpu = time.time(), time.process_time() - cpu
    return {"start": start, "end": end, "done": done, "cpu": cpu}


def run_workers(
    url: str, journal: str | None, count: int, jobs: int, in_flight: int, poll: str = "fast"
) -> dict[str, float]:
    """``count`` worker processes at once; jobs/s from the first start to the last end."""
    argv = [sys.executable, __file__, "--worker", url, journal or "-", str(jobs), str(in_flight)]
    argv.append(poll)
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"a worker failed ({proc.returncode})")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    done = sum(r["done"] for r in reports)
    assert done == jobs, f"{done} results for {jobs} jobs"
    seconds = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    cpu = sum(r["cpu"] for r in reports)
    return {"jobs_per_s": jobs / seconds, "seconds": seconds, "cpu_ms": cpu / jobs * 1000}


# -- the time to claim a job ------------------------------------------------------------------


async def claim_times(url: str, jobs: int, claimants: int) -> list[float]:
    journals: list[SharedBackend] = []
    for _ in range(claimants):
        journal = await open_journal(
            PostgresJournal(url=url),
            dialect="kling",
            stage="lip-sync",
            base_url="http://bench",
            max_in_flight=1000,
        )
        assert isinstance(journal, SharedBackend)
        await journal.load([(f"job-{n}", "h", None) for n in range(jobs)])
        journals.append(journal)
    times: list[float] = []

    async def drain(journal: SharedBackend) -> None:
        while True:
            begun = time.perf_counter()
            got = await journal.claim()
            if got is False:
                return
            times.append(time.perf_counter() - begun)
            if isinstance(got, str):
                result = ka.JobResult(key=got, task_id="t", state=ka.TaskState.SUCCEEDED)
                await journal.finished(result, final=True)

    await asyncio.gather(*(drain(journal) for journal in journals))
    for journal in journals:
        await journal.close()
    return times


# -- the whole run ----------------------------------------------------------------------------


def new_database(base: str, name: str) -> str:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urllib.parse.urlsplit(base)._replace(path=f"/{name}").geturl()


def measure(args: argparse.Namespace, pg_base: str) -> None:
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs: list[tuple[str, str | None, int]] = [
            ("no journal, 1 process", None, 1),
            ("SQLite journal, 1 process", str(Path(tmp) / "bench.journal"), 1),
        ]
        runs += [
            (f"PostgreSQL journal, {n} worker{'s' if n > 1 else ''}", f"pg{n}", n)
            for n in (1, 2, 3)
        ]
        for label, journal, count in runs:
            if journal is not None and journal.startswith("pg"):
                journal = new_database(pg_base, f"bench_{journal}")
            with server_process("--duration", "0") as server:
                figures = run_workers(server.url, journal, count, args.jobs, args.in_flight)
                requests = server.stop()
            status = sum(v for k, v in requests.items() if k in ("query", "list"))
            rows.append(
                [
                    label,
                    figures["jobs_per_s"],
                    figures["seconds"],
                    figures["cpu_ms"],
                    status / args.jobs,
                ]
            )
            print(f"  {label}: {figures['jobs_per_s']:.0f} jobs/s", file=sys.stderr)
    header = ["run", "jobs/s", "seconds", "worker CPU ms per job", "status requests per job"]
    print(table(rows, header))
    print()
    claims = []
    for claimants in (1, 3):
        url = new_database(pg_base, f"bench_claims_{claimants}")
        times = asyncio.run(claim_times(url, args.claim_jobs, claimants))
        claims.append(
            [
                f"{claimants} claimant{'s' if claimants > 1 else ''}",
                percentile(times, 0.5) * 1000,
                percentile(times, 0.9) * 1000,
                percentile(times, 0.99) * 1000,
            ]
        )
    print(table(claims, ["claim (then record the result)", "p50 ms", "p90 ms", "p99 ms"]))


def measure_polling(args: argparse.Namespace, pg_base: str) -> None:
    """Does sharing a batch multiply status polling?  (Each worker polls its own tasks.)"""
    rows: list[list[object]] = []
    jobs, in_flight = 600, 30
    for label, journal, count in [
        ("no journal, 1 process", None, 1),
        ("PostgreSQL journal, 1 worker", "pg1", 1),
        ("PostgreSQL journal, 3 workers", "pg3", 3),
    ]:
        if journal is not None:
            journal = new_database(pg_base, f"bench_poll_{journal}")
        with server_process("--duration", "lognormal:1:0.5", "--seed", "1") as server:
            figures = run_workers(server.url, journal, count, jobs, in_flight, poll="default")
            requests = server.stop()
        rows.append(
            [
                label,
                figures["seconds"],
                requests.get("query", 0) / jobs,
                requests.get("list", 0) / jobs,
            ]
        )
        print(f"  {label}: {figures['seconds']:.1f} s", file=sys.stderr)
    header = ["run (600 jobs, 30 slots)", "seconds", "task queries per job", "list pages per job"]
    print(table(rows, header))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=20)
    parser.add_argument("--claim-jobs", type=int, default=2000)
    parser.add_argument("--pg-url", help="an existing server's postgresql:// URL (a database)")
    parser.add_argument(
        "--polling",
        action="store_true",
        help="instead: status requests per job with tasks of about a second (lognormal, median "
        "1 s) and the default PollPolicy, no journal vs 1 and 3 PostgreSQL workers",
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        url, journal, jobs, in_flight, poll = args.worker
        report = asyncio.run(
            worker(url, None if journal == "-" else journal, int(jobs), int(in_flight), poll)
        )
        print(json.dumps(report), flush=True)
        return
    run = measure_polling if args.polling else measure
    if args.pg_url:
        run(args, args.pg_url)
        return
    pg = PgServer(durable=True)  # fsync on, as the SQLite journal's intents are
    try:
        pg.start()
        run(args, pg.url())
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
