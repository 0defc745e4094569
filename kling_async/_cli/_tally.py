"""The counts of one ``kling-async run``, kept from the batch's events (:mod:`kling_async.events`).

The progress display shows them, the closing line and ``--summary-json`` report them.  With a
journal they cover the whole journal: jobs reported by earlier runs count (a job that failed
then still makes the run's exit status 1).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection
from typing import Any

from .._results import JobResult
from ..events import Event, Finished, Polled, Refused, Resumed, Retried, Submitted

__all__ = ["Tally", "plural", "resume_note"]


def plural(count: int, word: str) -> str:
    """``"1 job"``, ``"2 jobs"``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def resume_note(reported: int, total: int, failed: int) -> str:
    """What a rerun with a journal says first (the one place that words it)."""
    if reported == total:
        return f"resumed: all {plural(total, 'job')} already reported ({failed} failed)"
    return f"resumed: {reported} of {plural(total, 'job')} already reported ({failed} failed)"


def failed(result: JobResult) -> bool:
    """Whether ``result`` counts as a failure of the run (a video made but not saved does)."""
    return not result.ok or result.error is not None


class Tally:
    """Results by job key and request counts of one run; fed by :meth:`on_event`.

    ``requests`` counts the submits answered (a task, or a 1303/1302 refusal), the retries and
    the status queries: what the batch's events show.

    ``keys`` are the job file's keys (results the journal holds for other keys are not
    counted) and ``total`` the number of jobs it runs.
    """

    def __init__(self, keys: Collection[str], *, total: int) -> None:
        self.keys = keys
        self.total = total
        self.started = time.monotonic()
        self.results: dict[str, JobResult] = {}
        self.resumed: dict[str, JobResult] = {}
        self.running: set[str] = set()
        self.submitted = 0
        self.refused = 0
        self.retried = 0
        self.requests = 0

    def on_event(self, event: Event) -> None:
        """Count what ``event`` says."""
        if isinstance(event, Polled):
            self.requests += event.requests
        elif isinstance(event, Submitted):
            self.submitted += 1
            self.requests += 1
            self.running.add(event.key)
        elif isinstance(event, Finished):
            self.finished(event.result)
        elif isinstance(event, Refused):
            self.refused += 1
            self.requests += 1
        elif isinstance(event, Retried):
            self.retried += 1
            self.requests += 1
        elif isinstance(event, Resumed):
            for result in event.results:
                if result.key in self.keys:
                    self.resumed[result.key] = result

    def finished(self, result: JobResult) -> None:
        """A job's result was reported by this run."""
        self.running.discard(result.key)
        self.resumed.pop(result.key, None)  # (a changed job ran again: its new result counts)
        self.results[result.key] = result

    @property
    def done(self) -> int:
        """Jobs with a result, this run's and earlier runs'."""
        return len(self.results) + len(self.resumed)

    @property
    def failed(self) -> int:
        """Jobs that failed, in this run or an earlier one."""
        return sum(map(failed, self.results.values())) + self.resumed_failed

    @property
    def resumed_failed(self) -> int:
        """Jobs an earlier run reported as failed."""
        return sum(map(failed, self.resumed.values()))

    @property
    def units(self) -> float:
        """Units the server says the jobs' tasks cost (earlier runs' included)."""
        everything = (*self.results.values(), *self.resumed.values())
        return sum(result.units or 0.0 for result in everything)

    @property
    def elapsed(self) -> float:
        """Seconds since the tally began."""
        return time.monotonic() - self.started

    def summary(self, **extra: Any) -> dict[str, Any]:
        """The ``--summary-json`` object (``extra`` added as is)."""
        states = Counter(r.state.value for r in (*self.results.values(), *self.resumed.values()))
        return {
            "jobs": self.total,
            "done": self.done,
            "succeeded": self.done - self.failed,
            "failed": self.failed,
            "states": dict(sorted(states.items())),
            "resumed": len(self.resumed),
            "resumed_failed": self.resumed_failed,
            "reported_now": len(self.results),
            "units": self.units,
            "tasks_submitted": self.submitted,
            "refusals": self.refused,
            "retries": self.retried,
            "requests": self.requests,
            "wall_seconds": round(self.elapsed, 3),
            **extra,
        }
