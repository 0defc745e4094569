"""Start-up: import times and the CLI's ``--help``, in fresh interpreters.

Each round runs every command once in a fresh subprocess, in turn (so that a slow spell of this
shared machine hits neighbours alike), and times it from spawn to exit.  Figures: each command's
median and range over rounds, and for the imports the median (and range) over rounds of each
round's ratio to ``import aiohttp`` in that round.  The interpreter alone (``python -c pass``)
is listed too: every figure includes it.

    python benchmarks/startup.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import table


def commands() -> dict[str, list[str]]:
    script = shutil.which("kling-async", path=os.path.dirname(sys.executable))
    cli = [script] if script else [sys.executable, "-m", "kling_async"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import aiohttp": [sys.executable, "-c", "import aiohttp"],
        "import kling_async": [sys.executable, "-c", "import kling_async"],
        "from kling_async import KlingClient": [
            sys.executable,
            "-c",
            "from kling_async import KlingClient",
        ],
        "kling-async --help": [*cli, "--help"],
    }


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(rounds: int) -> dict[str, Any]:
    runs = commands()
    for argv in runs.values():  # warm the file cache and the .pyc files
        timed(argv)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, argv in runs.items():
            times[name].append(timed(argv))
    base = times["import aiohttp"]
    rows = {}
    for name, values in times.items():
        ratios = [t / b for t, b in zip(values, base, strict=True)]
        rows[name] = {
            "ms": statistics.median(values) * 1e3,
            "ms_min": min(values) * 1e3,
            "ms_max": max(values) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return {"rounds": rounds, "rows": rows}


def report(figures: dict[str, Any]) -> str:
    rows = [
        [
            name,
            r["ms"],
            f"{r['ms_min']:.0f}-{r['ms_max']:.0f}",
            r["ratio"],
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}",
        ]
        for name, r in figures["rows"].items()
    ]
    header = ["command", "ms (median)", "ms range", "vs import aiohttp", "ratio range"]
    return f"{figures['rounds']} rounds of fresh subprocesses, commands alternating\n" + table(
        rows, header
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="import and --help times")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    figures = measure(args.rounds)
    print(report(figures))
    return figures


if __name__ == "__main__":
    main()
