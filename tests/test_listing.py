"""List queries at depth: tasks that sink below the first page, against the fake server.

The tracker's pages are at least 30 tasks long (4 per live task until tasks have been seen
ending, then about as deep as they end), so a long task overtaken by a few dozen short ones sinks
to page 2, then deeper, and below page 5 out of the pages read.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio
import pytest
from helpers import FAST_RETRY, kling_client, text_job

import kling_async as ka
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio

#: Page 1 polled every 10 ms, deeper pages on their own schedule: every 0.2 s (max_interval;
#: not adaptive, so no finishes are expected anywhere and that cap is the schedule).
DEEP = ka.PollPolicy(
    first_delay=0.01,
    max_interval=0.2,
    multiplier=1.0,
    jitter=0.0,
    adaptive=False,
    list_min_interval=0.01,
    timeout=20.0,
)


def one_long_then_short(
    long: float, short: int
) -> tuple[list[ka.LipSyncJob], Callable[[random.Random], float]]:
    durations = iter([long, *[0.005] * short])
    jobs = [text_job(0, key="long"), *(text_job(n, key=f"short-{n}") for n in range(1, short + 1))]
    return jobs, lambda rng: next(durations)


async def run(server: FakeKlingServer, jobs: list[ka.LipSyncJob]) -> dict[str, ka.JobResult]:
    async with kling_client(server, max_in_flight=5, poll=DEEP, retry=FAST_RETRY) as client:
        with anyio.fail_after(20):
            return {r.key or "": r async for r in client.run_batch(jobs)}


async def test_a_sunk_task_is_found_on_its_page_without_chasing_it() -> None:
    jobs, duration = one_long_then_short(1.2, 50)
    async with FakeKlingServer(task_duration=duration) as server:
        results = await run(server, jobs)
    assert all(r.ok for r in results.values()) and len(results) == 51
    assert results["long"].polls >= 1
    pages = server.list_pages
    assert pages[2] >= 1  # it was found there: no query of its own was needed once it sank
    # While it is the only live task (the batch's first submit, before the others are answered:
    # longer than its 10 ms first look on a loaded machine, a few looks under heavy load) one
    # query of its own costs the same as a page; chasing it once sunk would be a query every
    # 10 ms, about a hundred.
    assert server.requests["query"] <= 12
    # Page 2 waits for its own turn (every 0.2 s over the long task's 1.2 s), instead of being
    # read each time the sunk task would have been due (every 10 ms, like page 1: ~100 reads).
    assert pages[2] <= 1.2 / 0.2 + 2, pages


async def test_a_task_below_the_deepest_page_is_queried_on_its_own() -> None:
    jobs, duration = one_long_then_short(2.0, 180)
    async with FakeKlingServer(task_duration=duration) as server:
        results = await run(server, jobs)
    assert all(r.ok for r in results.values()) and len(results) == 181
    pages = server.list_pages
    assert set(pages) <= {1, 2, 3, 4, 5}, pages  # never deeper than five pages
    assert pages[5] >= 1
    assert server.requests["query"] >= 1  # the long task, once it had sunk past page 5


async def test_failed_deep_reads_are_retried_and_fail_no_task() -> None:
    jobs, duration = one_long_then_short(1.0, 45)
    async with FakeKlingServer(task_duration=duration) as server:
        server.script("list", status=500, code=5000, message="busy", times=40)
        results = await run(server, jobs)
    assert all(r.ok for r in results.values()), [str(r.error) for r in results.values()]
    # The failed reads were retried (until they had failed for max_interval: then the tasks
    # were queried on their own for as long, and lists tried again), so not every one of the
    # 40 scripted failures need be met before the batch ends (26 in one loaded run).
    assert server.requests["faulted"] + server.requests["rejected"] >= 5


async def test_pages_hold_about_as_many_tasks_as_end_on_them() -> None:
    """Tasks that end at once are found near the top: pages shrink from four per live task."""
    live = 20
    poll = ka.PollPolicy(first_delay=0.002, max_interval=0.05, list_min_interval=0.002)
    jobs = [text_job(n, key=f"k{n}") for n in range(300)]
    async with FakeKlingServer(task_duration=0.002) as server:
        async with kling_client(server, max_in_flight=live, poll=poll) as client:
            with anyio.fail_after(30):
                results = [r async for r in client.run_batch(jobs)]
    assert len(results) == 300 and all(r.ok for r in results)
    sizes = server.list_page_sizes
    # The first guess, before enough tasks were seen ending: four per task watched, growing
    # with them (30 rows at least).  How many of the `live` slots were filled by then depends
    # on how fast the submits went: 72 = 4 x 18 was seen on a loaded machine, 80 unloaded.
    largest = max(sizes)
    assert largest % 4 == 0 and 30 < largest <= 4 * live, sizes
    # Then the depth tasks end at (about the live tasks, a quarter more room): most reads ask
    # for far fewer rows than four per live task.
    smaller = sum(n for size, n in sizes.items() if size <= 2 * live)
    assert smaller >= 0.75 * sum(sizes.values()), sizes
