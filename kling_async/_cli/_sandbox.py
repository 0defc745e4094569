"""The sandbox: a :class:`FakeKlingServer` tuned to look like a small real account.

Tasks take about two seconds, with a long-ish tail (a lognormal, like real lip-sync times;
docs/protocol.md, Timing), and at most :data:`TASK_LIMIT` run at once, so that a run shows a
moving progress display and meets the 1303 concurrency refusal a real account gives.  Setting
``KLING_ASYNC_SANDBOX_DURATION`` (seconds) makes every task take that long instead, for tests.

The client reaches the sandbox as :data:`SANDBOX_URL`, whatever free port the server got
(:func:`~._resolver.sandbox_session` resolves that name to it): a journal records its batch's
server, and a rerun of a sandbox run with the same journal must find the same name to resume.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ._connect import CliError

if TYPE_CHECKING:  # the policies are imported where made: `--help` needs no attrs (start-up)
    from .._config import PollPolicy, RetryPolicy
    from ..testing import FakeKlingServer, FaultPlan

__all__ = [
    "DURATION_ENV",
    "SANDBOX_URL",
    "TASK_LIMIT",
    "fixed_duration",
    "sandbox_credentials",
    "sandbox_policies",
    "sandbox_server",
]

#: Environment variable that fixes the sandbox's task duration (seconds), for fast tests.
DURATION_ENV = "KLING_ASYNC_SANDBOX_DURATION"
#: The sandbox's address as the client (and so a journal) knows it.
SANDBOX_URL = "http://sandbox.kling-async.localhost"
#: Tasks the sandbox account runs at once before refusing with 1303.
TASK_LIMIT = 5
#: The sandbox's typical task duration in seconds (the median of the lognormal).
TYPICAL_SECONDS = 2.0


def typical_duration(rng: random.Random) -> float:
    """A task duration: lognormal around two seconds, capped at ten."""
    return min(rng.lognormvariate(math.log(TYPICAL_SECONDS), 0.5), 10.0)


def fixed_duration(environ: Mapping[str, str]) -> float | None:
    """The duration ``KLING_ASYNC_SANDBOX_DURATION`` asks for, if it is set."""
    raw = environ.get(DURATION_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise CliError(f"{DURATION_ENV} must be a number of seconds, not {raw!r}")
    return seconds


def sandbox_server(
    *,
    duration: float | Callable[[random.Random], float] | None = None,
    task_limit: int | None = TASK_LIMIT,
    host: str = "127.0.0.1",
    port: int = 0,
    seed: int | None = None,
    faults: FaultPlan | None = None,
    webhook_secret: str | None = None,
) -> FakeKlingServer:
    """A fake server with sandbox timings (``duration`` None: the two-second lognormal)."""
    from ..testing import NO_FAULTS, FakeKlingServer  # only sandbox runs need the server

    return FakeKlingServer(
        faults=faults or NO_FAULTS,
        webhook_secret=webhook_secret,
        task_duration=typical_duration if duration is None else duration,
        task_limit=task_limit,
        host=host,
        port=port,
        seed=random.randrange(2**32) if seed is None else seed,
    )


def sandbox_credentials() -> dict[str, str]:
    """The sandbox's public test key, sent as a Bearer token in every dialect."""
    from ..testing import SANDBOX_API_KEY

    return {"api_key": SANDBOX_API_KEY}


def sandbox_policies(duration: float | None) -> tuple[PollPolicy, RetryPolicy]:
    """Polling and retries suited to seconds-long tasks (or to ``duration``-long ones)."""
    from .._config import PollPolicy, RetryPolicy

    if duration is None:
        poll = PollPolicy(first_delay=0.5, max_interval=1.0)
        return poll, RetryPolicy(base_delay=0.1, max_delay=2.0, concurrency_delay=0.5)
    step = max(duration / 2, 0.01)
    poll = PollPolicy(first_delay=step, max_interval=max(2 * step, 0.02), timeout=60.0)
    return poll, RetryPolicy(base_delay=0.01, max_delay=0.1, concurrency_delay=0.01)
