"""Shared pieces of the benchmarks: the fake server in a subprocess, a virtual-clock event loop,
percentiles and a table printer.  Benchmarks are not tests: nothing here asserts a speed."""

from __future__ import annotations

import asyncio
import json
import math
import os
import selectors
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import kling_async as ka

HERE = Path(__file__).resolve().parent
API_KEY = "sk-sandbox"
T = TypeVar("T")


# -- the fake server in its own process ------------------------------------------------------


class ServerProcess:
    """A FakeKlingServer running in ``benchmarks/fake_server.py`` (see its docstring)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "fake_server.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("URL "):
            self.proc.kill()
            raise RuntimeError(f"fake server did not start: {line!r}")
        self.url = line.split()[1]
        self.requests: dict[str, int] = {}

    def stop(self) -> dict[str, int]:
        """Stop the server; return its request counter."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(timeout=30)
        for line in out.splitlines():
            if line.startswith("REQUESTS "):
                self.requests = json.loads(line.split(" ", 1)[1])
        return self.requests


@contextmanager
def server_process(*args: str) -> Iterator[ServerProcess]:
    server = ServerProcess(*args)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


# -- a virtual clock ---------------------------------------------------------------------------


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.jumps = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        # Loopback sockets deliver at once, so a socket with nothing to read now has nothing
        # coming until some timer fires: jump the clock to that timer instead of sleeping.
        ready: list[Any] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            return list(super().select(None))
        self.now += timeout
        self.jumps += 1
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock stands still while work is ready and jumps when idle.

    Hours of polling then run in seconds with every timer, and every socket, real: the fake
    server and the client share the loop (and its clock), so task durations and poll
    intervals are exact, and CPU time spent on requests costs no virtual time.
    """

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


def run_virtual(main: Callable[[], Any]) -> Any:
    """Run the coroutine function ``main`` on a fresh :class:`VirtualClockLoop`."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# -- jobs, figures, tables ---------------------------------------------------------------------


def text_job(n: int) -> ka.LipSyncJob:
    return ka.LipSyncJob.from_text(
        video_url=f"https://example.com/clip-{n}.mp4",
        text=f"line {n}",
        voice_id="girlfriend_1_speech02",
        voice_language="en",
        key=f"job-{n}",
    )


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table (readable as plain text too)."""
    cells = [[str(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
