"""Scale: memory per tracked task and CPU time per status update.

Memory: one Tracker watching 100,000 live tasks (first poll far away, so nothing is sent), as
tracemalloc's count of the bytes allocated for them and as the growth of the process's
resident set; the task ids (the caller's strings) are made beforehand and not counted.  The
baseline is the least a hand-written poller keeps: a dict of task id -> [next poll, polls]
and a heap of (next poll, task id).  An engine without ``Tracker.watch`` (before this
benchmark) can only track a task with a coroutine awaiting ``Tracker.wait``; that is measured
then, and still reported as the ``wait`` row (one waiting coroutine per task: what run_batch
pays per task slot).

CPU: (1) ``Tracker.update`` with a terminal snapshot for each of the 100,000 tasks (the path
of a callback), until every consumer has its result; (2) status refreshes by polling 500
long-running tasks on the fake server in another process, with per-task queries and with list
queries (one page holds all 500), against a bare aiohttp loop fetching and decoding the same
answers.  CPU is this process's CPU time: the server's is not in it.

    python benchmarks/scale.py [--tasks 100000] [--poll-seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import random
import time
import tracemalloc
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
from _common import API_KEY, rss_bytes, server_process, table

import kling_async as ka
from kling_async._results import TaskSnapshot, TaskState
from kling_async._tracker import Tracker

FAR = 10**6  # seconds: no poll falls due while memory is measured
STAGE = "lip-sync"


def make_tracker(client: ka.KlingClient, poll: ka.PollPolicy) -> Tracker:
    def fatal(error: ka.KlingError) -> None:
        raise error

    return Tracker(
        dialect=client.dialect,
        requester=client._requester,
        poll=poll,
        retry=client.retry,
        rng=random.Random(0),
        on_fatal=fatal,
    )


def ids(count: int) -> list[str]:
    return [str(10**17 + n) for n in range(count)]


# -- memory ------------------------------------------------------------------------------------


async def track_all(tracker: Tracker, task_ids: list[str], how: str, group: Any) -> list[Any]:
    """Start tracking every id; returns what keeps the results (watch or waiting tasks)."""
    if how == "watch":
        done: list[Any] = []
        return [tracker.watch(i, STAGE, done.append) for i in task_ids]
    snapshots = [TaskSnapshot(task_id=i, state=TaskState.SUBMITTED) for i in task_ids]
    gc.collect()
    before = _mark()
    for snapshot in snapshots:
        group.start_soon(tracker.wait, snapshot, STAGE)
    await anyio.lowlevel.checkpoint()  # let every waiter reach its wait
    _MARKS.append(before)
    return snapshots


_MARKS: list[tuple[int, int]] = []


def _mark() -> tuple[int, int]:
    traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    return traced, rss_bytes()


def baseline(task_ids: list[str]) -> Any:
    state = {i: [float(FAR), 0] for i in task_ids}
    heap = [(float(FAR), i) for i in task_ids]
    heapq.heapify(heap)
    return state, heap


async def memory_of(how: str, count: int, traced: bool) -> float:
    """Bytes per task for ``how`` in {"baseline", "watch", "wait"}."""
    task_ids = ids(count)
    if traced:
        tracemalloc.start()
    gc.collect()
    start = _mark()
    keep: Any
    far = ka.PollPolicy(first_delay=FAR, max_interval=FAR, timeout=FAR)
    client = ka.KlingClient.kling(api_key=API_KEY, base_url="http://127.0.0.1:9", poll=far)
    tracker = make_tracker(client, far)
    if how == "track":
        # max_in_flight as large as the batch: before this round, track() held a coroutine and a
        # result place per task and followed at most 2 x max_in_flight tasks at once.
        client = ka.KlingClient.kling(
            api_key=API_KEY, base_url="http://127.0.0.1:9", poll=far, max_in_flight=count
        )
        return await track_memory(client, task_ids, traced, start)
    async with anyio.create_task_group() as group:
        if how == "baseline":
            keep = baseline(task_ids)
        else:
            keep = await track_all(tracker, task_ids, how, group)
            if how == "wait":
                start = _MARKS.pop()
        gc.collect()
        end = _mark()
        group.cancel_scope.cancel()
    del keep
    if traced:
        tracemalloc.stop()
    return (end[0] - start[0] if traced else end[1] - start[1]) / count


async def track_memory(
    client: ka.KlingClient, task_ids: list[str], traced: bool, start: tuple[int, int]
) -> float:
    """Bytes per task of the public path, ``client.track(task_ids)``, all ids tracked."""
    async with client:
        results = client.track(task_ids)
        batch = results._batch
        while batch.progress().running < len(task_ids):  # noqa: ASYNC110 (runs in the client)
            await asyncio.sleep(0.01)
        gc.collect()
        end = _mark()
        batch.cancel()
        async for _ in results:
            pass
    if traced:
        tracemalloc.stop()
    return (end[0] - start[0] if traced else end[1] - start[1]) / len(task_ids)


def memory(count: int, hows: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for how in hows:
        # RSS first, in a fresh state of the allocator would be ideal; a subprocess per row
        # would be cleaner still, but RSS deltas after a collected run are close enough.
        rss = asyncio.run(memory_of(how, count, traced=False))
        traced = asyncio.run(memory_of(how, count, traced=True))
        out[how] = {"traced": traced, "rss": rss}
    return out


# -- CPU per status update ---------------------------------------------------------------------


async def cpu_per_update(count: int, how: str) -> float:
    """Seconds of CPU per terminal update applied through ``Tracker.update``."""
    task_ids = ids(count)
    final = [TaskSnapshot(task_id=i, state=TaskState.SUCCEEDED) for i in task_ids]
    client = ka.KlingClient.kling(api_key=API_KEY, base_url="http://127.0.0.1:9")
    tracker = make_tracker(client, ka.PollPolicy(first_delay=FAR, max_interval=FAR, timeout=FAR))
    finished = 0

    async def waiter(snapshot: TaskSnapshot) -> None:
        nonlocal finished
        await tracker.wait(snapshot, STAGE)
        finished += 1

    def on_done(*_: Any) -> None:
        nonlocal finished
        finished += 1

    async with anyio.create_task_group() as group:
        if how == "watch":
            for i in task_ids:
                tracker.watch(i, STAGE, on_done)
        else:
            for i in task_ids:
                group.start_soon(waiter, TaskSnapshot(task_id=i, state=TaskState.SUBMITTED))
            await anyio.lowlevel.checkpoint()
        cpu = time.process_time()
        for snapshot in final:
            tracker.update(snapshot)
        while finished < count:
            await anyio.lowlevel.checkpoint()
        cpu = time.process_time() - cpu
        group.cancel_scope.cancel()
    return cpu / count


async def submit_tasks(url: str, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {
        "input": {
            "mode": "audio2video",
            "video_url": "https://e.com/v.mp4",
            "audio_type": "url",
            "audio_url": "https://e.com/a.mp3",
        }
    }
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(_: int) -> str:
            async with session.post(f"{url}/v1/videos/lip-sync", json=body) as answer:
                return str((await answer.json())["data"]["task_id"])

        return list(await asyncio.gather(*(one(n) for n in range(count))))


async def polling_cpu(url: str, task_ids: list[str], seconds: float, list_queries: bool) -> float:
    """CPU seconds per task status refreshed by the engine's tracker, polling for ``seconds``."""
    poll = ka.PollPolicy(
        first_delay=0.0,
        max_interval=0.001,
        multiplier=1.0,
        jitter=0.0,
        adaptive=False,
        list_queries=list_queries,
        max_concurrent_queries=8,
        timeout=FAR,
    )
    client = ka.KlingClient.kling(api_key=API_KEY, base_url=url, poll=poll)
    async with client:
        tracker = make_tracker(client, poll)
        async with anyio.create_task_group() as group:
            group.start_soon(tracker.run)
            for i in task_ids:
                group.start_soon(
                    tracker.wait, TaskSnapshot(task_id=i, state=TaskState.SUBMITTED), STAGE
                )
            await anyio.sleep(0.5)  # warm up
            cpu, polls = time.process_time(), _polls(tracker)
            await anyio.sleep(seconds)
            cpu, polls = time.process_time() - cpu, _polls(tracker) - polls
            group.cancel_scope.cancel()
    return cpu / max(polls, 1)


def _polls(tracker: Tracker) -> int:
    return sum(w.polls for w in tracker._watches.values())


async def bare_cpu(url: str, task_ids: list[str], seconds: float, list_queries: bool) -> float:
    """The same refreshes by hand: GET, decode JSON, read each task's status."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    refreshed = 0
    stop = False
    async with aiohttp.ClientSession(headers=headers) as session:

        async def worker(mine: list[str]) -> None:
            nonlocal refreshed
            while not stop:
                if list_queries:
                    path = f"{url}/v1/videos/lip-sync?pageNum=1&pageSize={len(task_ids)}"
                    async with session.get(path) as answer:
                        data = (await answer.json())["data"]
                    refreshed += sum(1 for t in data if t["task_status"])
                    continue
                for task_id in mine:
                    async with session.get(f"{url}/v1/videos/lip-sync/{task_id}") as answer:
                        refreshed += bool((await answer.json())["data"]["task_status"])
                    if stop:
                        return

        workers = 1 if list_queries else 8
        tasks = [asyncio.ensure_future(worker(task_ids[n::workers])) for n in range(workers)]
        await asyncio.sleep(0.5)
        cpu, start = time.process_time(), refreshed
        await asyncio.sleep(seconds)
        cpu, done = time.process_time() - cpu, refreshed - start
        stop = True
        await asyncio.gather(*tasks)
    return cpu / max(done, 1)


async def polling(seconds: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with server_process("--duration", str(FAR)) as server:
        task_ids = await submit_tasks(server.url, 500)
        for list_queries in (False, True):
            mode = "list" if list_queries else "per task"
            out[mode] = {
                "bare": await bare_cpu(server.url, task_ids, seconds, list_queries),
                "kling_async": await polling_cpu(server.url, task_ids, seconds, list_queries),
            }
    return out


# -- report ------------------------------------------------------------------------------------


def report(figures: dict[str, Any]) -> str:
    mem = figures["memory"]
    base = mem["baseline"]["traced"]
    rows = [[how, m["traced"], m["rss"], m["traced"] / base] for how, m in mem.items()]
    out = [
        f"memory per tracked task, {figures['tasks']:,} live tasks (bytes)",
        table(rows, ["tracking", "tracemalloc B/task", "RSS B/task", "vs hand-written"]),
        "",
        "CPU per status update (microseconds)",
    ]
    cpu_rows = [[f"Tracker.update ({how})", us * 1e6, ""] for how, us in figures["update"].items()]
    for mode, values in figures["polling"].items():
        cpu_rows.append(
            [
                f"polling, {mode}",
                values["kling_async"] * 1e6,
                values["kling_async"] / values["bare"],
            ]
        )
        cpu_rows.append([f"bare aiohttp, {mode}", values["bare"] * 1e6, 1.0])
    out.append(table(cpu_rows, ["path", "CPU us/update", "vs bare"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="memory per tracked task, CPU per update")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--poll-seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    has_watch = hasattr(Tracker, "watch")
    hows = ["baseline", *(["watch"] if has_watch else []), "wait", "track"]
    figures: dict[str, Any] = {"tasks": args.tasks, "memory": memory(args.tasks, hows)}
    figures["update"] = {
        how: asyncio.run(cpu_per_update(args.tasks, how))
        for how in hows
        if how not in ("baseline", "track")
    }
    figures["polling"] = asyncio.run(polling(args.poll_seconds))
    print(report(figures))
    return figures


if __name__ == "__main__":
    main()
