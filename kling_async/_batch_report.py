"""What a batch says: its options checked, a task's last snapshot as a result, its closing lines.

Plain functions beside :class:`~._batch.Batch`, which calls them; they keep no state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ._errors import (
    KlingError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimedOutError,
    ValidationError,
)
from ._results import JobResult, TaskSnapshot, TaskState, returned_of
from .journal import PostgresJournal, check_target, is_shared

__all__ = ["check_batch_options", "job_result", "log_batch_end"]

logger = logging.getLogger("kling_async")


def check_batch_options(
    *,
    journal: str | os.PathLike[str] | PostgresJournal | None,
    tracking: bool,
    resubmit_unknown: object,
    retry_failed: object,
    download_to: object,
) -> None:
    """Raise :class:`ValidationError` for options a batch cannot run with (before any request).

    ``tracking``: the batch follows task ids (:meth:`KlingClient.track`) rather than jobs.
    """
    if journal is not None:
        check_target(journal)  # a file path, or a PostgreSQL URL with psycopg installed
    if journal is not None and tracking:
        raise ValidationError("journal", "only run_batch keeps a journal, not track")
    if not isinstance(resubmit_unknown, bool):
        raise ValidationError("resubmit_unknown", "must be True or False")
    if not isinstance(retry_failed, bool):
        raise ValidationError("retry_failed", "must be True or False")
    if retry_failed and journal is None:
        raise ValidationError("retry_failed", "needs a journal: the failures are read there")
    if retry_failed and is_shared(journal):
        raise ValidationError("retry_failed", "is not supported with a PostgreSQL journal yet")
    if download_to is not None and not isinstance(download_to, (str, os.PathLike)):
        raise ValidationError("download_to", "must be a directory path")


def job_result(
    key: str,
    snapshot: TaskSnapshot,
    *,
    submitted_at: float | None,
    finished_at: float,
    polls: int,
    timeout: float,
    adopted: bool,
) -> JobResult:
    """Job ``key``'s result from its task's last ``snapshot``, with the error its state means.

    ``timeout`` is ``PollPolicy.timeout`` (named by a time-out's error); ``adopted``: the task
    was found by a lookup after an unclear submit.
    """
    error: KlingError | None = None
    if snapshot.state is TaskState.FAILED:
        error = TaskFailedError(
            snapshot.message or "the task failed without a reason",
            task_id=snapshot.task_id,
            code=snapshot.error_code,
        )
    elif snapshot.state is TaskState.TIMED_OUT:
        error = TaskTimedOutError(snapshot.task_id, timeout)
    elif snapshot.state is TaskState.CANCELLED:
        error = TaskCancelledError(snapshot.task_id)
    return JobResult(
        key=key,
        task_id=snapshot.task_id,
        state=snapshot.state,
        video_urls=snapshot.video_urls,
        error=error,
        submitted_at=submitted_at,
        finished_at=finished_at,
        polls=polls,
        adopted=adopted,
        **returned_of(snapshot),
    )


def log_batch_end(
    what: str,
    counts: Mapping[str, int],
    *,
    live: Mapping[str, str],
    all_reported: str | None,
    retried: int,
    quiet: bool,
) -> None:
    """Log a batch's closing lines: its counts, and the tasks it leaves running (paid for).

    ``all_reported`` is the journal's "all N jobs already reported" news, if any; ``quiet``:
    an ``on_event`` callback had it already (the CLI says it), so it is logged at INFO only.
    """
    if all_reported is not None:
        logger.log(logging.INFO if quiet else logging.WARNING, "%s", all_reported)
    logger.info(
        "%s ended: %d submitted, %d succeeded, %d failed",
        what,
        counts["submitted"],
        counts["succeeded"],
        counts["failed"],
    )
    if retried:
        logger.info("%d jobs that failed in earlier runs were submitted again", retried)
    if live:
        logger.info(
            "%d tasks unreported (still running on the server, or just ended): %s",
            len(live),
            ", ".join(sorted(live)),
        )
