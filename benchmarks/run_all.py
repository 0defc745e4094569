"""Run every benchmark with its defaults and print one table of the headline figures.

    python benchmarks/run_all.py            # about 8 minutes on 2 quiet cores

Each benchmark prints its own detailed table first (see benchmarks/README.md).
"""

from __future__ import annotations

import math
from typing import Any

import journal
import loops
import overhead
import polling
import scale
import startup
from _common import table


def headline(
    over: dict[str, Any],
    poll: list[dict[str, Any]],
    big: dict[str, Any],
    start: dict[str, Any],
    uv: dict[str, Any],
) -> str:
    rows: list[list[object]] = []
    # The median of each round's ratio: steadier than best against best on a machine that
    # switches speed states (benchmarks/overhead.py).
    goals = {
        (overhead.PER_TASK, 20): 0.8,
        (overhead.LISTED, 50): 0.9,
        (overhead.LISTED, 200): 0.85,
    }
    for (name, concurrency), goal in goals.items():
        at = over["by_concurrency"].get(concurrency)
        if at is None or name not in at["rows"]:
            continue
        ka, bare = at["rows"][name], at["rows"][overhead.BARE]
        ratio = ka["paired_ratio"]
        what = "per task" if name == overhead.PER_TASK else "list queries"
        rows.append(
            [
                f"overhead: jobs/s vs bare, {what}, concurrency {concurrency} "
                f"(median of rounds, range {ka['paired_min']:.2f}-{ka['paired_max']:.2f})",
                ka["jobs_per_s"],
                bare["jobs_per_s"],
                ratio,
                f">= {goal}x",
                _met(ratio >= goal),
            ]
        )
    journals = (
        (overhead.JOURNALED, overhead.PER_TASK),
        (overhead.LISTED_JOURNALED, overhead.LISTED),
    )
    for concurrency, at in over["by_concurrency"].items():
        for name, plain in journals:
            journaled = at["rows"].get(name, {})
            if "vs_unjournaled" not in journaled:
                continue
            low, high = journaled["vs_unjournaled_range"]
            ratio = journaled["vs_unjournaled"]
            what = "per task" if plain == overhead.PER_TASK else "list queries"
            rows.append(
                [
                    f"journal: jobs/s with / without, {what}, concurrency {concurrency} "
                    f"(median of rounds, range {low:.2f}-{high:.2f})",
                    journaled["jobs_per_s"],
                    at["rows"][plain]["jobs_per_s"],
                    ratio,
                    ">= 0.9x",
                    _met(ratio >= 0.9),
                ]
            )
    by = {(r["scenario"], r["policy"], r["list_queries"]): r for r in poll}
    scenarios = list(dict.fromkeys(r["scenario"] for r in poll))
    small = scenarios[0]
    default, fixed = by[small, "default", False], by[small, "fixed 5 s", False]
    share = default["requests_per_task"] / fixed["requests_per_task"]
    lag = default["lag_p50"] / polling.MEDIAN
    rows.append(
        [
            f"polling ({small}), per task: status req/task",
            default["requests_per_task"],
            fixed["requests_per_task"],
            share,
            "<= 0.25x",
            _met(share <= 0.25),
        ]
    )
    rows.append(
        [
            f"polling ({small}), per task: p50 lag, % of median",
            lag * 100,
            fixed["lag_p50"] / polling.MEDIAN * 100,
            "",
            "<= 5%",
            _met(lag <= 0.05),
        ]
    )
    rows.append(_p95(f"polling ({small}), per task", default, fixed))
    for scenario in scenarios:
        listed = by.get((scenario, "default", True))
        fixed_list = by.get((scenario, "fixed 5 s", True))
        if not listed or not fixed_list:
            continue
        lag = listed["lag_p50"] / polling.MEDIAN
        rows.append(
            [
                f"polling ({scenario}), list: status req/task",
                listed["requests_per_task"],
                fixed_list["requests_per_task"],
                listed["requests_per_task"] / fixed_list["requests_per_task"],
                "<= 0.1/task",
                _met(listed["requests_per_task"] <= 0.1),
            ]
        )
        rows.append(
            [
                f"polling ({scenario}), list: p50 lag, % of median",
                lag * 100,
                fixed_list["lag_p50"] / polling.MEDIAN * 100,
                "",
                "<= 3%",
                _met(lag <= 0.03),
            ]
        )
        rows.append(_p95(f"polling ({scenario}), list", listed, fixed_list))
    memory = big["memory"]
    watch = memory.get("watch", memory["wait"])
    rows.append(
        [
            f"scale: bytes per tracked task ({big['tasks']:,}), tracemalloc",
            watch["traced"],
            memory["baseline"]["traced"],
            watch["traced"] / memory["baseline"]["traced"],
            "<= 1024 B",
            _met(watch["traced"] <= 1024),
        ]
    )
    rows.append(
        [
            "scale: bytes per tracked task, RSS",
            watch["rss"],
            memory["baseline"]["rss"],
            watch["rss"] / memory["baseline"]["rss"] if memory["baseline"]["rss"] else math.nan,
            "<= 1024 B",
            _met(watch["rss"] <= 1024),
        ]
    )
    if "track" in memory:
        extra = memory["track"]["traced"] - memory["baseline"]["traced"]
        rows.append(
            [
                f"scale: client.track() of {big['tasks']:,} ids, B/task over baseline",
                extra,
                memory["baseline"]["traced"],
                memory["track"]["traced"] / memory["baseline"]["traced"],
                "<= 1024 B",
                _met(extra <= 1024),
            ]
        )
    for mode, values in big["polling"].items():
        rows.append(
            [
                f"scale: CPU us per status update, polling {mode}",
                values["kling_async"] * 1e6,
                values["bare"] * 1e6,
                values["kling_async"] / values["bare"],
                "",
                "",
            ]
        )
    timed = start["rows"]
    for name, goal in (("import kling_async", 1.15), ("from kling_async import KlingClient", 0)):
        r = timed[name]
        rows.append(
            [
                f"start-up: {name} vs import aiohttp, ms (median of round ratios)",
                r["ms"],
                timed["import aiohttp"]["ms"],
                r["ratio"],
                f"<= {goal}x" if goal else "",
                _met(r["ratio"] <= goal) if goal else "",
            ]
        )
    helped = timed["kling-async --help"]
    rows.append(
        [
            "start-up: kling-async --help, ms (median)",
            helped["ms"],
            timed["python -c pass"]["ms"],
            "",
            "<= 150 ms",
            _met(helped["ms"] <= 150),
        ]
    )
    for name, r in uv["rows"].items():
        rows.append(
            [
                f"uvloop: run_batch jobs/s, {name}, concurrency {uv['concurrency']}",
                r["uvloop"],
                r["asyncio"],
                r["ratio"],
                "",
                "",
            ]
        )
    header = ["figure", "kling_async", "baseline", "ratio", "goal", "met"]
    return table(rows, header)


def _p95(what: str, ours: dict[str, Any], fixed: dict[str, Any]) -> list[object]:
    return [
        f"{what}: p95 lag, % of median (baseline: fixed 5 s)",
        ours["lag_p95"] / polling.MEDIAN * 100,
        fixed["lag_p95"] / polling.MEDIAN * 100,
        "",
        "",
        "",
    ]


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def main() -> None:
    print("== start-up")
    start = startup.main([])
    print("\n== overhead")
    over = overhead.main([])
    print("\n== journal (write path alone)")
    journal.main([])
    print("\n== uvloop")
    uv = loops.main([])
    print("\n== polling")
    poll = polling.main([])
    print("\n== scale")
    big = scale.main([])
    print(
        "\n== all figures (baselines: bare aiohttp loop; fixed 5 s polling; hand-written dict+heap;"
        " import aiohttp)"
    )
    print(headline(over, poll, big, start, uv))


if __name__ == "__main__":
    main()
