"""Task states, what the server says of a task, and what a batch yields for each job."""

from __future__ import annotations

import enum
from pathlib import Path

import attrs

from ._errors import KlingError

__all__ = ["BatchProgress", "Face", "JobResult", "TaskSnapshot", "TaskState"]


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
class TaskSnapshot:
    """One look at a task, as a dialect parsed it from a submit, query or callback answer.

    Times are Unix seconds (the wire's milliseconds divided by 1000).  ``message`` is the
    server's status message (the failure reason when ``state`` is ``FAILED``) and
    ``error_code`` the failure code where the dialect has one.  Identify-face steps fill
    ``session_id`` and ``faces``.
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

    @property
    def video_url(self) -> str | None:
        """The first result video's URL, or ``None`` before success."""
        return self.video_urls[0] if self.video_urls else None


@attrs.frozen(kw_only=True)
class JobResult:
    """The outcome of one job of a batch.

    ``key`` is the job's key (its index in the batch, as a string, when it had none).
    ``task_id`` is the task that made, or failed to make, the video: in a two-step flow the
    lip-sync task once it exists, else the identify-face task; ``None`` when no task was created.
    A failure is a value: ``ok`` is False and ``error`` holds a :class:`KlingError` whose
    ``str()`` is the server's reason.  Times are Unix seconds; ``polls`` counts status queries
    that looked at this job's tasks.  ``path`` is where the video was saved, when the batch
    downloaded it (``run_batch(..., download_to=DIR)``, see :meth:`KlingClient.download`).
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
    """Counts of a running batch: tasks submitted, tasks running now, results so far."""

    submitted: int
    running: int
    succeeded: int
    failed: int
    #: Jobs that failed in an earlier run and were submitted again (``retry_failed``).
    retried: int = 0

    @property
    def done(self) -> int:
        """Results reported so far."""
        return self.succeeded + self.failed
