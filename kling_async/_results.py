"""Task states, what the server says of a task, and what a batch yields for each job."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import attrs

from ._errors import KlingError

__all__ = [
    "BalanceDeduction",
    "BatchProgress",
    "Face",
    "JobResult",
    "Returned",
    "TaskSnapshot",
    "TaskState",
    "returned_fields",
    "returned_of",
]


class TaskState(str, enum.Enum):
    """The life of a task.

    ``SUBMITTED``, ``PROCESSING``, ``SUCCEEDED`` and ``FAILED`` are what the server says (each
    dialect maps its own words onto them).  ``TIMED_OUT`` and ``CANCELLED`` are the client's own
    verdicts on a :class:`JobResult`: the task may still run on the server.
    """

    SUBMITTED = "submitted"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        """Whether the task will change no more (as far as this client is concerned)."""
        return self not in (TaskState.SUBMITTED, TaskState.PROCESSING)


@attrs.frozen(kw_only=True)
class Face:
    """A face found by an identify-face step.

    ``start_ms`` / ``end_ms`` say when it is visible (the official API gives them; apimodels does
    not), ``image_url`` points at a thumbnail.
    """

    face_id: str
    image_url: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None


@attrs.frozen(kw_only=True)
class BalanceDeduction:
    """What a task took from the account's cash balance (when it was not paid in units).

    ``quota`` is the amount deducted and ``list_price`` its list price, as the server states
    them (docs/protocol.md, Costs); either may be None when the server leaves it out.
    """

    quota: float | None = None
    list_price: float | None = None


@attrs.frozen(kw_only=True)
class Returned:
    """What the server returned with a task's video, and what the task cost (None: not said).

    ``video_id`` is usable as a later job's ``video_id``; ``video_duration`` is in seconds;
    ``watermark_url`` is the watermarked copy a job asked for with ``watermark=True``; ``units``
    the resource-pack units charged and ``balance_deduction`` what a cash balance paid.
    """

    video_id: str | None = None
    video_duration: float | None = None
    watermark_url: str | None = None
    units: float | None = None
    balance_deduction: BalanceDeduction | None = None


@attrs.frozen(kw_only=True)
class TaskSnapshot:
    """One look at a task, as a dialect parsed it from a submit, query or callback answer.

    Times are Unix seconds (the wire's milliseconds divided by 1000).  ``message`` is the
    server's status message (the failure reason when ``state`` is ``FAILED``) and
    ``error_code`` the failure code where the dialect has one.  Identify-face steps fill
    ``session_id`` and ``faces``.

    ``returned`` holds what the server says of the finished video and its cost, where it says
    it (:class:`Returned`; None for most answers, which say nothing of it); ``video_id``,
    ``video_duration``, ``watermark_url``, ``units`` and ``balance_deduction`` read it.
    """

    task_id: str
    state: TaskState
    message: str | None = None
    error_code: str | int | None = None
    video_urls: tuple[str, ...] = ()
    created_at: float | None = None
    updated_at: float | None = None
    parent_video_url: str | None = None
    external_task_id: str | None = None
    session_id: str | None = None
    faces: tuple[Face, ...] = ()
    # One field, not five: a snapshot is made per task per poll, and every field costs.
    returned: Returned | None = None

    @property
    def video_url(self) -> str | None:
        """The first result video's URL, or ``None`` before success."""
        return self.video_urls[0] if self.video_urls else None

    @property
    def video_id(self) -> str | None:
        """The output video's id (see :class:`Returned`)."""
        return self.returned.video_id if self.returned else None

    @property
    def video_duration(self) -> float | None:
        """The output video's length in seconds."""
        return self.returned.video_duration if self.returned else None

    @property
    def watermark_url(self) -> str | None:
        """The watermarked copy's URL."""
        return self.returned.watermark_url if self.returned else None

    @property
    def units(self) -> float | None:
        """Resource-pack units the task cost."""
        return self.returned.units if self.returned else None

    @property
    def balance_deduction(self) -> BalanceDeduction | None:
        """What the task took from a cash balance."""
        return self.returned.balance_deduction if self.returned else None


@attrs.frozen(kw_only=True)
class JobResult:
    """The outcome of one job of a batch.

    ``key`` is the job's key (its index in the batch, as a string, when it had none).
    ``task_id`` is the task that made, or failed to make, the video: in a two-step flow the
    lip-sync task once it exists, else the identify-face task (the official identify-face makes
    no task: its session id); ``None`` when no task was created.
    A failure is a value: ``ok`` is False and ``error`` holds a :class:`KlingError` whose
    ``str()`` is the server's reason.  Times are Unix seconds; ``polls`` counts status queries
    that looked at this job's tasks.  ``path`` is where the video was saved, when the batch
    downloaded it (``run_batch(..., download_to=DIR)``, see :meth:`KlingClient.download`).
    ``adopted`` is True when the task was found by a lookup after its submit's answer was lost
    (by its external id, or provably by video and time: see the README's "Guarantees"), never
    for a task whose id the submit's own answer gave.

    ``video_id``, ``video_duration`` (seconds), ``watermark_url``, ``units`` and
    ``balance_deduction`` are what the server returned with the deciding task (see
    :class:`Returned`); None where it said nothing.
    """

    key: str
    task_id: str | None
    state: TaskState
    video_urls: tuple[str, ...] = ()
    error: KlingError | None = attrs.field(default=None, eq=False)
    submitted_at: float | None = None
    finished_at: float | None = None
    polls: int = 0
    path: Path | None = None
    adopted: bool = False
    video_id: str | None = None
    video_duration: float | None = None
    watermark_url: str | None = None
    units: float | None = None
    balance_deduction: BalanceDeduction | None = None

    @property
    def ok(self) -> bool:
        """Whether the job produced a video."""
        return self.state is TaskState.SUCCEEDED

    @property
    def video_url(self) -> str | None:
        """The finished video's URL (the first, should the server return several)."""
        return self.video_urls[0] if self.video_urls else None


@attrs.frozen(kw_only=True)
class BatchProgress:
    """Counts of a running batch: tasks submitted, tasks running now, results so far.

    ``units`` totals the units the server says the batch's finished tasks cost.
    """

    submitted: int
    running: int
    succeeded: int
    failed: int
    #: Jobs that failed in an earlier run and were submitted again (``retry_failed``).
    retried: int = 0
    units: float = 0.0

    @property
    def done(self) -> int:
        """Results reported so far."""
        return self.succeeded + self.failed


def returned_fields(result: JobResult) -> dict[str, Any]:
    """What the server returned with ``result``'s video, as plain JSON values.

    The results file of the CLI and the journal spell these fields alike.
    """
    deduction = result.balance_deduction
    return {
        "video_id": result.video_id,
        "video_duration": result.video_duration,
        "watermark_url": result.watermark_url,
        "units": result.units,
        "balance_deduction": attrs.asdict(deduction) if deduction is not None else None,
    }


def returned_of(snapshot: TaskSnapshot) -> dict[str, Any]:
    """The :class:`JobResult` keywords of what ``snapshot`` returned (none when it says nothing)."""
    returned = snapshot.returned
    return {} if returned is None else attrs.asdict(returned, recurse=False)
