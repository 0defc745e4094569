"""Run every benchmark with its defaults and print one table of the headline figures.

    python benchmarks/run_all.py            # about 3 minutes on 2 cores

Each benchmark prints its own detailed table first (see benchmarks/README.md).
"""

from __future__ import annotations

from typing import Any

import overhead
import polling
import scale
from _common import table


def headline(over: dict[str, Any], poll: list[dict[str, Any]], big: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    ka = over["rows"]["kling_async run_batch"]
    bare = over["rows"]["bare aiohttp loop"]
    # The median of each round's ratio: steadier than best against best on a machine that
    # switches speed states (benchmarks/overhead.py).
    ratio = ka["paired_ratio"]
    rows.append(
        [
            "overhead: jobs/s, run_batch vs bare (median of rounds)",
            ka["jobs_per_s"],
            bare["jobs_per_s"],
            ratio,
            ">= 0.8x",
            _met(ratio >= 0.8),
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
            watch["rss"] / memory["baseline"]["rss"],
            "<= 1024 B",
            _met(watch["rss"] <= 1024),
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
    header = ["figure", "kling_async", "baseline", "ratio", "goal", "met"]
    return table(rows, header)


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def main() -> None:
    print("== overhead")
    over = overhead.main([])
    print("\n== polling")
    poll = polling.main([])
    print("\n== scale")
    big = scale.main([])
    print(
        "\n== all figures (baselines: bare aiohttp loop; fixed 5 s polling; hand-written dict+heap)"
    )
    print(headline(over, poll, big))


if __name__ == "__main__":
    main()
