"""Pure schedule functions: how long to wait before a retry or the next poll.

No I/O and no clocks of their own: callers pass the attempt number, what they know of the task and
a ``random.Random`` (seeded in tests), and get back a number of seconds.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable

from ._config import PollPolicy, RetryPolicy

__all__ = ["MAX_RETRY_AFTER", "DurationModel", "fit_durations", "poll_delay", "retry_delay"]

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


# -- learning when tasks finish ----------------------------------------------------------------

#: The learnt schedule's grid, in standard deviations of log-duration around the median.
_Z_LOW, _Z_HIGH, _Z_STEPS = -4.0, 6.0, 200
#: Spread assumed when the sample cannot tell (a tenth of the median either way is unknowable).
_SIGMA_MIN, _SIGMA_MAX = 0.05, 3.0


class DurationModel:
    """How long tasks take: a lognormal fitted to finished (and still running) tasks.

    Durations are positive and right-skewed, and a lognormal fits Kling's "about 3 minutes with
    long tails" (docs/protocol.md, Timing) with two numbers that a few dozen tasks pin down.
    From it comes the schedule: poll a task at a rate proportional to the square root of its
    *hazard* (the chance per second that a task of its age finishes now).  Minimising expected
    polls plus ``lambda`` times expected lag, point by point, gives exactly that interval,
    ``sqrt(2 / (lambda * hazard))``: dense where finishes are likely, sparse where they are not
    (early on, and in the long tail).  ``lag_share`` fixes ``lambda``: the mean lag aims at that
    share of the median duration, whatever the time scale.
    """

    __slots__ = ("_density", "_g", "_x", "median", "sigma")

    def __init__(self, median: float, sigma: float, lag_share: float) -> None:
        self.median = median
        # Rounded, so that refits of a steady batch find their schedule table made already.
        self.sigma = round(min(max(sigma, _SIGMA_MIN), _SIGMA_MAX), 3)
        self._x, self._g, self._density = _schedule_table(self.sigma, lag_share)

    def __repr__(self) -> str:
        return f"DurationModel(median={self.median:.4g}, sigma={self.sigma:.3g})"

    def survival(self, age: float) -> float:
        """The share of tasks still running at ``age`` seconds."""
        if age <= 0:
            return 1.0
        z = math.log(age / self.median) / self.sigma
        return 0.5 * math.erfc(z / math.sqrt(2.0))

    def hazard(self, age: float) -> float:
        """Finishes per second expected of one task still running at ``age``."""
        if age <= 0:
            return 0.0
        z = math.log(age / self.median) / self.sigma
        survival = 0.5 * math.erfc(z / math.sqrt(2.0))
        if survival <= 0.0:
            return 0.0  # beyond any sample: nothing to say
        density = math.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * self.sigma * age)
        return density / survival

    def next_poll(self, age: float) -> float | None:
        """The age at which a task polled at ``age`` should be polled next (None: far tail)."""
        x = age / self.median
        xs, gs = self._x, self._g
        if x <= xs[0]:
            done = 0.0
        elif x >= xs[-1]:
            return None
        else:
            i = bisect.bisect_right(xs, x)
            share = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            done = gs[i - 1] + share * (gs[i] - gs[i - 1])
        target = done + 1.0 / self._density
        if target >= gs[-1]:
            return None
        j = bisect.bisect_left(gs, target)
        if j == 0:
            return xs[0] * self.median
        share = (target - gs[j - 1]) / (gs[j] - gs[j - 1])
        return (xs[j - 1] + share * (xs[j] - xs[j - 1])) * self.median


def _schedule_table(sigma: float, lag_share: float) -> tuple[list[float], list[float], float]:
    """The schedule of a lognormal of spread ``sigma``, in medians (cached: see below).

    A table costs about 150 us to build, and a batch of tasks that end within milliseconds
    refits many times a second; the table depends on the spread alone (times are in medians),
    so refits that move the median only reuse it.
    """
    key = (sigma, lag_share)
    table = _TABLES.get(key)
    if table is not None:
        return table
    step = (_Z_HIGH - _Z_LOW) / _Z_STEPS
    xs: list[float] = []
    gs: list[float] = []
    lag_integral = 0.0
    total = 0.0
    previous_x = previous_root = previous_lag = 0.0
    for index in range(_Z_STEPS + 1):
        z = _Z_LOW + index * step
        x = math.exp(sigma * z)  # duration / median
        survival = 0.5 * math.erfc(z / math.sqrt(2.0))
        density = math.exp(-0.5 * z * z) / (math.sqrt(2.0 * math.pi) * sigma * x)
        root = math.sqrt(density / survival)  # sqrt(hazard), time in medians
        lag = math.sqrt(density * survival)  # density / sqrt(hazard)
        if index:
            total += 0.5 * (root + previous_root) * (x - previous_x)
            lag_integral += 0.5 * (lag + previous_lag) * (x - previous_x)
        xs.append(x)
        gs.append(total)
        previous_x, previous_root, previous_lag = x, root, lag
    # Polls per median of age = density * sqrt(hazard); the expected lag is then
    # integral(f / sqrt(h)) / (2 * density) medians: solve for the target.
    table = (xs, gs, lag_integral / (2.0 * lag_share))
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.clear()  # spreads seen long ago are unlikely to come back
    _TABLES[key] = table
    return table


#: Schedule tables by (spread, lag share); a batch's spreads stay within a few hundred values.
_TABLES: dict[tuple[float, float], tuple[list[float], list[float], float]] = {}
_TABLES_MAX = 512


def fit_durations(
    observations: Iterable[tuple[float, bool]],
    lag_share: float,
    *,
    min_finished: int = 8,
    keep: DurationModel | None = None,
) -> DurationModel | None:
    """Fit a :class:`DurationModel` to ``(seconds, finished)`` pairs, or None if too few.

    ``keep`` is returned itself when the fit's median and spread are within
    :data:`_SAME_FIT` of its own: building a model's schedule table costs more than the fit.

    Tasks still running count as "at least this long" (Kaplan-Meier): at the start of a batch
    the first tasks to finish are the fastest, and fitting them alone would poll far too early.
    The estimate's median is the lognormal's; its deciles and quartiles, as far as the sample
    reaches, set the spread (quantiles are robust to a few odd tasks).
    """
    points = sorted(observations)
    finished = sum(1 for _, done in points if done)
    if finished < min_finished:
        return None
    at_risk = len(points)
    survival = 1.0
    quantiles: dict[float, float] = {}
    index = 0
    while index < len(points) and len(quantiles) < len(_LEVELS):
        seconds = points[index][0]
        ended = leaving = 0
        while index < len(points) and points[index][0] == seconds:
            ended += points[index][1]
            leaving += 1
            index += 1
        if ended:
            survival *= 1.0 - ended / at_risk
            for level in _LEVELS:
                if level not in quantiles and survival <= level:
                    quantiles[level] = max(seconds, 1e-9)
        at_risk -= leaving
    if 0.5 in quantiles and 0.75 in quantiles:
        median = quantiles[0.5]
        # Each quantile found says how wide the spread is; their mean is steadier than one.
        spreads = [
            abs(math.log(quantiles[level] / median)) / z
            for level, z in _LEVELS.items()
            if z and level in quantiles
        ]
        sigma = sum(spreads) / len(spreads)
    elif 0.75 in quantiles and 0.9 in quantiles:
        # Early in a batch only the fastest quarter has finished: the first decile and quartile
        # give a spread, pulled towards a typical one since two points say little, and the
        # median follows from it.  Refits soon correct it.
        low, high = _LEVELS[0.9], _LEVELS[0.75]
        seen = math.log(quantiles[0.75] / quantiles[0.9]) / (low - high)
        sigma = (seen + _SIGMA_PRIOR) / 2
        median = quantiles[0.75] * math.exp(high * sigma)
    else:
        return None
    if (
        keep is not None
        and abs(median / keep.median - 1.0) <= _SAME_FIT
        and abs(min(max(sigma, _SIGMA_MIN), _SIGMA_MAX) / keep.sigma - 1.0) <= _SAME_FIT
    ):
        return keep
    return DurationModel(median, sigma, lag_share)


#: Relative change of median and spread below which a refit keeps the model it had.
_SAME_FIT = 0.01


#: The spread assumed, half-weight, before the sample shows a median (lip-sync: about 0.5).
_SIGMA_PRIOR = 0.5
#: Survival levels read off the estimate -> how many standard deviations from the median.
_LEVELS = {
    0.9: 1.2815515655446004,
    0.75: 0.6744897501960817,
    0.5: 0.0,
    0.25: 0.6744897501960817,
    0.1: 1.2815515655446004,
}
