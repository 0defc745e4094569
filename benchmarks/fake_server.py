"""Run a FakeKlingServer in its own process, for the benchmarks.

Prints ``URL <url>`` on its first line once it listens, then serves until its standard input
closes (the parent exits) or it gets SIGTERM; on the way out it prints ``REQUESTS <json>``, the
server's request counter.  Durations: ``--duration 0`` (instant), ``--duration 3600`` (fixed), or
``--duration lognormal:MEDIAN:SIGMA``.

    python benchmarks/fake_server.py --duration 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
from collections.abc import Callable

from kling_async.testing import FakeKlingServer


def duration(spec: str) -> float | Callable[[random.Random], float]:
    """``"0"``, ``"3600"`` or ``"lognormal:MEDIAN:SIGMA"``."""
    if spec.startswith("lognormal:"):
        _, median, sigma = spec.split(":")
        mu, sd = math.log(float(median)), float(sigma)
        return lambda rng: rng.lognormvariate(mu, sd)
    return float(spec)


async def serve(args: argparse.Namespace) -> None:
    server = FakeKlingServer(
        task_duration=duration(args.duration),
        task_limit=args.task_limit,
        seed=args.seed,
        port=args.port,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # The parent closing our stdin (or dying) also stops us: no orphaned servers.
    stdin = sys.stdin.fileno()

    def stdin_readable() -> None:
        if not os.read(stdin, 1 << 16):  # end of file: the parent closed the pipe, or died
            stop.set()

    loop.add_reader(stdin, stdin_readable)
    async with server:
        print(f"URL {server.url}", flush=True)
        await stop.wait()
        print(f"REQUESTS {json.dumps(dict(server.requests))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", default="0")
    parser.add_argument("--task-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
