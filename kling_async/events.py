"""What a running batch reports as it works: ``run_batch(jobs, on_event=callback)``.

``callback`` receives one of the frozen records below for each thing that happens, in order::

    def show(event: ka.events.Event) -> None:
        if isinstance(event, ka.events.Refused):
            print(f"{event.code}: {event.limit} tasks at once from now on")

    async for result in client.run_batch(jobs, on_event=show):
        ...

It may be a plain function (called at once, from the batch's own tasks: keep it quick) or an
``async`` one (its calls are awaited one after another by a task of the batch, so a slow one
delays its own events, never the batch; what is still queued when the batch ends gets a few
seconds).  An exception raised by the callback is logged once (``kling_async`` logger, with its
traceback) and otherwise ignored: a metrics hook never stops a paid batch.  Without a callback
the batch builds no event at all.

Events, with the job's ``key`` where there is one:

* :class:`Submitted`: a submit created a task (each step of a two-step flow has its own);
* :class:`Refused`: the server refused a submit for now (1303: too many tasks; 1302: too many
  requests); ``limit`` is the number of tasks the batch keeps at once from now on;
* :class:`Retried`: a request is sent again after a transient failure;
* :class:`Polled`: a status read (one task's query, or a list query) refreshed ``tasks`` tasks
  with ``requests`` requests;
* :class:`Adopted`: a submit whose answer was lost turned out to have created a task, found by a
  lookup, and that task is used (with a journal, see the README's "Resuming");
* :class:`Downloaded`: a video was saved (``run_batch(..., download_to=DIR)``);
* :class:`Finished`: a job's result is handed to the consumer;
* :class:`Resumed`: the journal opened and holds these results, reported in earlier runs, which
  this run does not report again;
* :class:`BudgetExceeded`: a job is not submitted because it would pass the batch's budget.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from ._results import JobResult

__all__ = [
    "Adopted",
    "BudgetExceeded",
    "Downloaded",
    "Event",
    "Finished",
    "Polled",
    "Refused",
    "Resumed",
    "Retried",
    "Submitted",
]


@attrs.frozen(kw_only=True)
class Submitted:
    """A submit of ``key``'s ``stage`` step created task ``task_id``."""

    key: str
    stage: str
    task_id: str


@attrs.frozen(kw_only=True)
class Refused:
    """A submit of ``key`` was refused for now and is sent again after ``delay`` seconds.

    ``code`` is the server's business code (1303: too many running tasks; 1302: too many
    requests); ``limit`` is how many tasks the batch keeps running at once from now on.
    """

    key: str
    stage: str
    code: int
    limit: int
    delay: float


@attrs.frozen(kw_only=True)
class Retried:
    """Request ``method path`` failed with ``error`` and is sent again (its try ``attempt``).

    ``delay`` is the wait before it.  Only requests that are safe to repeat are retried: a
    submit only when the server certainly created nothing.
    """

    method: str
    path: str
    attempt: int
    delay: float
    error: str


@attrs.frozen(kw_only=True)
class Polled:
    """A status read of ``stage`` tasks: ``requests`` requests refreshed ``tasks`` tasks.

    A single task's query refreshes one (none when it failed); a list query may refresh many.
    """

    stage: str
    tasks: int
    requests: int


@attrs.frozen(kw_only=True)
class Adopted:
    """``key``'s ``stage`` submit had an unclear outcome; its task ``task_id`` was found."""

    key: str
    stage: str
    task_id: str


@attrs.frozen(kw_only=True)
class Downloaded:
    """``key``'s video was saved as ``path``."""

    key: str
    path: Path


@attrs.frozen(kw_only=True)
class Finished:
    """``result`` is handed to the consumer (its job's outcome: ``result.ok``, ``result.error``)."""

    result: JobResult


@attrs.frozen(kw_only=True)
class Resumed:
    """The batch's journal holds ``results`` of jobs reported in earlier runs.

    Those jobs are not reported again.  (The journal may hold jobs that are no longer among the
    batch's jobs: match them by ``result.key``.)
    """

    results: tuple[JobResult, ...]


@attrs.frozen(kw_only=True)
class BudgetExceeded:
    """``key`` is not submitted: its ``units`` would take the ``spent`` units past ``limit``."""

    key: str
    units: float
    spent: float
    limit: float


#: Any of the events a batch reports.
Event = (
    Submitted
    | Refused
    | Retried
    | Polled
    | Adopted
    | Downloaded
    | Finished
    | Resumed
    | BudgetExceeded
)
