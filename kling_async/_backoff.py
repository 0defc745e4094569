"""Pure schedule functions: how long to wait before a retry or the next poll.

No I/O and no clocks of their own: callers pass the attempt number, what they know of the task and
a ``random.Random`` (seeded in tests), and get back a number of seconds.
"""

from __future__ import annotations

import random

from ._config import PollPolicy, RetryPolicy

__all__ = ["MAX_RETRY_AFTER", "poll_delay", "retry_delay"]

#: Longest Retry-After the client honours (seconds); a broken gateway must not park a batch.
MAX_RETRY_AFTER = 300.0


def retry_delay(
    policy: RetryPolicy,
    retry: int,
    rng: random.Random,
    *,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first retry).

    Exponential from ``base_delay`` by ``multiplier``, capped at ``max_delay``, then shortened at
    random by up to ``jitter`` of itself so that clients that failed together do not retry in step.
    A server's ``retry_after`` wins when it asks for longer (up to :data:`MAX_RETRY_AFTER`).
    """
    exponent = max(retry - 1, 0)
    # Cap the exponent too: multiplier ** 1000 overflows a float long before max_delay matters.
    raw = policy.base_delay * policy.multiplier ** min(exponent, 64)
    delay = min(raw, policy.max_delay)
    delay *= 1.0 - policy.jitter * rng.random()
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


def poll_delay(
    policy: PollPolicy, polls: int, rng: random.Random, *, first: float | None = None
) -> float:
    """Seconds from one status query of a task to the next.

    ``polls`` is how many queries the task has had so far: 0 gives the wait from the submit to the
    first query, which is ``first`` when the tracker has learnt a better one than
    ``policy.first_delay``.  Later intervals grow by ``policy.multiplier`` up to
    ``policy.max_interval``, each jittered by up to ``policy.jitter`` of itself (either way), so
    tasks submitted together spread their queries out.
    """
    if polls <= 0:
        base = policy.first_delay if first is None else first
    else:
        # The first interval after a query equals first_delay (or 1 s if that is 0).
        start = min(policy.first_delay or 1.0, policy.max_interval)
        base = min(start * policy.multiplier ** min(polls - 1, 64), policy.max_interval)
    spread = policy.jitter * (2.0 * rng.random() - 1.0)
    return max(base * (1.0 + spread), 0.0)
