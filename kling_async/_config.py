"""The two tuning knobs of a client: how tasks are polled, and how failed requests are retried."""

from __future__ import annotations

import math
from typing import Any

import attrs

from ._errors import ValidationError

__all__ = ["PollPolicy", "RetryPolicy"]


def _number(value: object) -> bool:
    # bool is an int subclass, but ``timeout=True`` is a mistake, not one second.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (_number(value) and math.isfinite(value) and value > 0):
        raise ValidationError(attribute.name, "must be a finite number greater than 0")


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (_number(value) and math.isfinite(value) and value >= 0):
        raise ValidationError(attribute.name, "must be a finite number of at least 0")


def _fraction(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (_number(value) and 0 <= value <= 1):
        raise ValidationError(attribute.name, "must be between 0 and 1")


def _growth(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (_number(value) and math.isfinite(value) and value >= 1):
        raise ValidationError(attribute.name, "must be a finite number of at least 1")


def _count(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValidationError(attribute.name, "must be a whole number of at least 1")


def _flag(instance: Any, attribute: attrs.Attribute[Any], value: bool) -> None:
    if not isinstance(value, bool):
        raise ValidationError(attribute.name, "must be True or False")


@attrs.frozen(kw_only=True)
class PollPolicy:
    """When to ask the server about a task (all times in seconds).

    Until it has learnt anything, the tracker sends the first query ``first_delay`` after the
    submit; each later interval is ``multiplier`` times the one before, jittered by up to
    ``jitter`` of itself, and never longer than ``max_interval``.  A task still unfinished
    ``timeout`` after its submit ends as ``TIMED_OUT`` with its task id kept: Kling lip-sync takes
    about 3 minutes with long tails (docs/protocol.md, Timing), so the default waits two hours.

    With ``adaptive`` the tracker learns from the batch's tasks how long they take (a lognormal
    fitted to finished and still-running tasks) and, once about a dozen have finished, polls
    each task at the rate its chance of finishing *now* deserves: rarely while it is young,
    densely around the typical duration, less in the long tail.  ``lag_share`` is the price of
    that trade: the mean delay between a task ending and the result arriving aims at this
    share of the median duration (0.05: about 9 s for 3-minute tasks, with about a quarter of
    the queries of polling every 5 s).  Learnt intervals stay between a tenth of
    ``first_delay`` (a first guess: quick tasks are then polled sooner) and ``max_interval``.

    With ``list_queries`` one paged list request refreshes every live task on a page where the
    dialect has one (docs/protocol.md, Query many: newest first, 500 tasks a page).  A page
    is read once about ``list_yield`` of its tasks are expected to have finished since its last
    read, but never twice within ``list_min_interval`` and at least every ``max_interval``; the
    first page also when one of its tasks is due by its own schedule.  With many live tasks that
    is about ``1 / list_yield`` requests per task at a lag of a few seconds; long-running tasks
    sink to deeper pages, which are read less often.  ``max_concurrent_queries`` bounds status
    requests in flight at once.  When the server sends callbacks (a batch with a
    ``callback_url``), polling goes on only as a safety net, at most every
    ``callback_safety_interval`` seconds: callbacks are unsigned hints and may be lost
    (docs/protocol.md, Callbacks).
    """

    first_delay: float = attrs.field(default=10.0, validator=_non_negative)
    max_interval: float = attrs.field(default=90.0, validator=_positive)
    multiplier: float = attrs.field(default=1.5, validator=_growth)
    jitter: float = attrs.field(default=0.1, validator=_fraction)
    timeout: float = attrs.field(default=7200.0, validator=_positive)
    adaptive: bool = attrs.field(default=True, validator=_flag)
    list_queries: bool = attrs.field(default=True, validator=_flag)
    max_concurrent_queries: int = attrs.field(default=8, validator=_count)
    callback_safety_interval: float = attrs.field(default=300.0, validator=_positive)
    lag_share: float = attrs.field(default=0.0475, validator=_positive)
    list_yield: float = attrs.field(default=12.5, validator=_positive)
    list_min_interval: float = attrs.field(default=8.0, validator=_positive)


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How failed requests are retried (times in seconds).

    A request is tried at most ``max_attempts`` times in all.  The n-th retry waits
    ``base_delay * multiplier ** (n - 1)``, capped at ``max_delay`` and shortened at random by up
    to ``jitter`` of itself so that many clients do not retry in step; a server's Retry-After is
    honoured when it asks for longer.  Submits are retried only when the server certainly
    created nothing (see :func:`kling_async.created_nothing`).

    A submit refused for concurrency (1303) is not a failure: the job waits for one of its own
    tasks to end, and at least ``concurrency_delay`` (doubling on each refusal, up to
    ``max_delay``), since other clients may share the account (docs/protocol.md, Business codes).

    ``max_slot_wait`` bounds that waiting: when no task slot frees for that long (the account's
    limit held by tasks that outlived ``PollPolicy.timeout``, or by other clients), the jobs
    still waiting end as results with a :class:`~kling_async.ConcurrencyLimitError` naming the
    blocking task ids where known, and the batch completes.
    """

    max_attempts: int = attrs.field(default=5, validator=_count)
    base_delay: float = attrs.field(default=0.5, validator=_non_negative)
    max_delay: float = attrs.field(default=30.0, validator=_non_negative)
    multiplier: float = attrs.field(default=2.0, validator=_growth)
    jitter: float = attrs.field(default=0.5, validator=_fraction)
    concurrency_delay: float = attrs.field(default=1.0, validator=_non_negative)
    max_slot_wait: float = attrs.field(default=1800.0, validator=_positive)
