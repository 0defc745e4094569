"""Polling efficiency: status requests per task and detection lag, per polling policy.

Task durations are lognormal (median 180 s, sigma 0.5: p5 79 s, p95 410 s, p99.9 about 840 s),
as Kling lip-sync is "about 3 minutes with long tails" (docs/protocol.md, Timing).  Every
policy runs through the same engine (run_batch against FakeKlingServer, ``max_in_flight`` =
the server's task limit) on the same seeded durations:

* ``default``: ``PollPolicy()`` as shipped;
* ``fixed 5 s``: what most Kling clients do (first_delay = max_interval = 5, multiplier 1,
  jitter 0, not adaptive);
* ``fixed 0.5 s``: Replicate's client default, same shape;
* ``exponential``: plain back-off, 1 s doubling up to 60 s, jitter 0, not adaptive;

each with per-task queries and with list queries.  Lag is measured from the moment the task
ended on the server (``FakeTask.ends_at``, on the loop clock) to the moment the consumer of
``run_batch`` holds the result.

By default the benchmark runs on a virtual clock (benchmarks/_common.py): the server and the
client share one event loop whose clock jumps to the next timer whenever no socket is ready,
so real-time policies run unscaled and hours take seconds.  ``--clock real --time-factor 0.01``
instead runs in real time with every duration and every policy time scaled by the factor (lags
are reported unscaled); fixed 0.5 s polling cannot be run that way (5 ms intervals).

    python benchmarks/polling.py      # 300 tasks on 20 slots, then a large account
    python benchmarks/polling.py --clock real --time-factor 0.01 --policies default "fixed 5 s"
    python benchmarks/polling.py --frontier 20 50 100 200 300 400 500   # list queries by slots

``--frontier`` runs the default policy with list queries on accounts of each size (20 tasks per
slot) and prints, beside requests and lag, the pages read and the least any schedule can do
with one page: see :func:`one_page_bound`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
import attrs
from _common import API_KEY, percentile, run_virtual, table, text_job

import kling_async as ka
from kling_async.testing import FakeKlingServer

MEDIAN = 180.0
SIGMA = 0.5
TIME_FIELDS = ("first_delay", "max_interval", "timeout", "callback_safety_interval")


def peers() -> dict[str, ka.PollPolicy]:
    """The policies compared, as PollPolicy settings so that one engine runs them all."""

    def fixed(seconds: float) -> ka.PollPolicy:
        return ka.PollPolicy(
            first_delay=seconds, max_interval=seconds, multiplier=1.0, jitter=0.0, adaptive=False
        )

    return {
        "default": ka.PollPolicy(),
        "fixed 5 s": fixed(5.0),
        "fixed 0.5 s": fixed(0.5),
        "exponential": ka.PollPolicy(
            first_delay=1.0, max_interval=60.0, multiplier=2.0, jitter=0.0, adaptive=False
        ),
    }


def scaled(policy: ka.PollPolicy, factor: float, list_queries: bool) -> ka.PollPolicy:
    changes = {name: getattr(policy, name) * factor for name in TIME_FIELDS}
    return attrs.evolve(policy, list_queries=list_queries, **changes)


@attrs.frozen
class Scenario:
    name: str
    tasks: int
    slots: int
    policies: tuple[str, ...]
    modes: tuple[bool, ...] = (False, True)


async def run_one(
    scenario: Scenario, policy: ka.PollPolicy, factor: float, seed: int
) -> dict[str, Any]:
    mu = math.log(MEDIAN * factor)

    def duration(rng: random.Random) -> float:
        return rng.lognormvariate(mu, SIGMA)

    lags: list[float] = []
    polls: list[int] = []
    server = FakeKlingServer(task_duration=duration, task_limit=scenario.slots, seed=seed)
    started = time.perf_counter()
    async with server:
        client = ka.KlingClient.kling(
            api_key=API_KEY,
            base_url=server.url,
            max_in_flight=scenario.slots,
            poll=policy,
            rng=random.Random(seed),
        )
        async with client:
            async for result in client.run_batch(text_job(n) for n in range(scenario.tasks)):
                now = anyio.current_time()
                assert result.ok, result
                assert result.task_id, result
                lags.append((now - server.tasks[result.task_id].ends_at) / factor)
                polls.append(result.polls)
        requests = dict(server.requests)
        virtual = anyio.current_time()
    status = requests.get("query", 0) + requests.get("list", 0)
    return {
        "slots": scenario.slots,
        "tasks": scenario.tasks,
        "pages": dict(server.list_pages),
        "requests_per_task": status / scenario.tasks,
        "lists": requests.get("list", 0),
        "queries": requests.get("query", 0),
        "polls_per_task": statistics.fmean(polls),
        "lag_p50": percentile(lags, 0.5),
        "lag_p95": percentile(lags, 0.95),
        "lag_mean": statistics.fmean(lags),
        "limited": requests.get("limited", 0),
        "seconds": time.perf_counter() - started,
        "simulated_hours": virtual / factor / 3600,
    }


def run(
    runner: Callable[[Callable[[], Any]], Any],
    scenario: Scenario,
    factor: float,
    seed: int,
) -> list[dict[str, Any]]:
    rows = []
    policies = peers()
    for name in scenario.policies:
        for list_queries in scenario.modes:
            policy = scaled(policies[name], factor, list_queries)

            async def main(policy: ka.PollPolicy = policy) -> dict[str, Any]:
                return await run_one(scenario, policy, factor, seed)

            figures = runner(main)
            figures.update(policy=name, list_queries=list_queries, scenario=scenario.name)
            rows.append(figures)
            logging.getLogger("benchmarks").info(
                "%s %s list=%s: %.2f req/task, lag p50 %.1f s (%.0f s)",
                scenario.name,
                name,
                list_queries,
                figures["requests_per_task"],
                figures["lag_p50"],
                figures["seconds"],
            )
    return rows


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, checked on the first scenario (per-task) and every list run."""
    out = []
    by = {(r["scenario"], r["policy"], r["list_queries"]): r for r in rows}
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        default = by.get((scenario, "default", False))
        fixed = by.get((scenario, "fixed 5 s", False))
        if default and fixed:
            share = default["requests_per_task"] / fixed["requests_per_task"]
            lag = default["lag_p50"] / MEDIAN
            met = share <= 0.25 and lag <= 0.05
            out.append(
                f"{scenario}, per-task queries: default uses {share:.1%} of fixed 5 s polling's "
                f"requests (goal <= 25%) at a p50 lag of {lag:.1%} of the median (goal <= 5%): "
                + ("met" if met else "MISSED")
            )
        listed = by.get((scenario, "default", True))
        if listed:
            lag = listed["lag_p50"] / MEDIAN
            met = listed["requests_per_task"] <= 0.1 and lag <= 0.03
            out.append(
                f"{scenario}, list queries: default makes {listed['requests_per_task']:.3f} "
                f"status requests per task (goal <= 0.1) at a p50 lag of {lag:.1%} of the "
                "median (goal <= 3%): " + ("met" if met else "MISSED")
            )
    return out


def report(rows: list[dict[str, Any]]) -> str:
    fixed = {
        r["scenario"]: r["requests_per_task"]
        for r in rows
        if r["policy"] == "fixed 5 s" and not r["list_queries"]
    }
    lines = []
    for r in rows:
        base = fixed.get(r["scenario"])
        lines.append(
            [
                r["scenario"],
                r["policy"],
                "list" if r["list_queries"] else "per task",
                r["requests_per_task"],
                r["requests_per_task"] / base if base else math.nan,
                r["lag_p50"],
                r["lag_p50"] / MEDIAN * 100,
                r["lag_p95"],
                r["lag_mean"],
            ]
        )
    header = [
        "scenario",
        "policy",
        "queries",
        "status req/task",
        "vs fixed 5 s",
        "lag p50 s",
        "p50 % median",
        "lag p95 s",
        "lag mean s",
    ]
    return "\n".join([table(lines, header), *goals(rows)])


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    chosen = tuple(args.policies)
    found = [
        Scenario(f"{args.tasks} tasks, {args.slots} slots", args.tasks, args.slots, chosen),
    ]
    if args.big_slots:
        # The list-query goal needs many live tasks (see benchmarks/README.md and --frontier):
        # a large account, list queries only, against fixed 5 s polling.
        big = tuple(p for p in chosen if p in ("default", "fixed 5 s"))
        found.append(
            Scenario(
                f"{args.big_tasks} tasks, {args.big_slots} slots",
                args.big_tasks,
                args.big_slots,
                big,
                modes=(True,),
            )
        )
    return found


def one_page_bound(slots: int, lag_share: float = 0.03) -> float:
    """Fewest status requests per task at a p50 lag of ``lag_share`` of the median, any schedule.

    With ``slots`` live tasks, finishes arrive about as a Poisson stream at ``slots / mean``
    per second; for half of them to be seen within ``lag_share * median`` a refresh must follow
    every stretch of at most twice that, so at least one request per ``2 * lag_share * median``
    seconds: ``mean / (slots * 2 * lag_share * median)`` per task.  It assumes one page shows
    every live task, which is optimistic beyond about 150 slots (newer finished tasks push the
    oldest live ones to deeper pages).
    """
    mean = MEDIAN * math.exp(SIGMA**2 / 2)
    return mean / (slots * 2 * lag_share * MEDIAN)


def frontier(
    runner: Callable[[Callable[[], Any]], Any], slots: list[int], seed: int
) -> list[dict[str, Any]]:
    """The default policy with list queries, one account size after another."""
    rows = []
    for count in slots:
        name = f"{20 * count} tasks, {count} slots"
        scenario = Scenario(name, 20 * count, count, ("default",), modes=(True,))
        rows.extend(run(runner, scenario, 1.0, seed))
    return rows


def frontier_report(rows: list[dict[str, Any]]) -> str:
    lines = [
        [
            r["slots"],
            r["tasks"],
            r["requests_per_task"],
            one_page_bound(r["slots"]),
            r["lag_p50"] / MEDIAN * 100,
            r["lag_p95"],
            " / ".join(
                str(n)
                for n in (
                    r["pages"].get(1, 0),
                    r["pages"].get(2, 0),
                    sum(n for p, n in r["pages"].items() if p > 2),
                )
            ),
            r["queries"],
            _met(r["requests_per_task"] <= 0.1 and r["lag_p50"] / MEDIAN <= 0.03),
        ]
        for r in rows
    ]
    header = [
        "slots",
        "tasks",
        "status req/task",
        "bound at 3%",
        "p50 % median",
        "lag p95 s",
        "pages 1 / 2 / deeper read",
        "single queries",
        "goal met",
    ]
    return table(lines, header)


def _met(flag: bool) -> str:
    return "yes" if flag else "NO"


def _run_real(main: Callable[[], Any]) -> Any:
    return asyncio.run(main())


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="polls per task and detection lag by policy")
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument("--big-tasks", type=int, default=6000)
    parser.add_argument("--big-slots", type=int, default=300, help="0 to skip")
    parser.add_argument(
        "--frontier", type=int, nargs="+", metavar="SLOTS", help="list queries by account size"
    )
    parser.add_argument("--clock", choices=("virtual", "real"), default="virtual")
    parser.add_argument("--time-factor", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policies", nargs="+", default=list(peers()), choices=list(peers()))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    virtual = args.clock == "virtual"
    factor = args.time_factor or (1.0 if virtual else 0.01)
    runner = run_virtual if virtual else _run_real
    if args.frontier:
        if not virtual:
            parser.error("--frontier runs on the virtual clock only")
        rows = frontier(runner, args.frontier, args.seed)
        print(f"default policy, list queries, 20 tasks per slot, seed {args.seed}, virtual clock")
        print(frontier_report(rows))
        return rows
    rows = [row for s in scenarios(args) for row in run(runner, s, factor, args.seed)]
    print(
        f"lognormal durations, median {MEDIAN:.0f} s, sigma {SIGMA}; {args.clock} clock, "
        f"time factor {factor:g}; lags in unscaled seconds"
    )
    print(report(rows))
    return rows


if __name__ == "__main__":
    main()
