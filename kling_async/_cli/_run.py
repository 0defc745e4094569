"""``kling-async run``: validate a job file, run it as one batch, append results as they come."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

import anyio
import attrs

from .._batch import BatchIterator
from .._config import PollPolicy
from .._errors import KlingError, ValidationError
from .._jobs import LipSyncJob
from .._results import JobResult, TaskState
from . import _interrupt
from ._connect import CliError, credentials, make_client
from ._jobfile import JobFile, Record, Survey, survey
from ._progress import Progress
from ._sandbox import (
    TASK_LIMIT,
    fixed_duration,
    sandbox_credentials,
    sandbox_policies,
    sandbox_server,
)

__all__ = ["result_line", "run_command"]

# Bad lines shown before the run stops (the rest are counted): a wholly wrong file (say, the
# wrong columns) should not bury the terminal.
MAX_PROBLEMS_SHOWN = 20


def result_line(result: JobResult, line: int | None = None) -> dict[str, Any]:
    """The JSON object written to the results file for one job."""
    error = result.error
    return {
        "key": result.key,
        "line": line,
        "task_id": result.task_id,
        "state": result.state.value,
        "ok": result.ok,
        "video_url": result.video_url,
        "error": str(error) if error is not None else None,
        "error_type": type(error).__name__ if error is not None else None,
        "error_code": getattr(error, "code", None),
        "submitted_at": result.submitted_at,
        "finished_at": result.finished_at,
        "polls": result.polls,
        "path": str(result.path) if result.path is not None else None,
    }


class ResultWriter:
    """Appends one JSON line per result and flushes it, so a crash keeps what was done."""

    def __init__(self, stream: TextIO, lines: dict[str, int]) -> None:
        self.stream = stream
        self.lines = lines
        self.written = 0

    def write(self, result: JobResult, line: int | None = None) -> None:
        """Write ``result`` (``line``: its line in the job file, found by key when None)."""
        record = result_line(result, line if line is not None else self.lines.get(result.key))
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()
        self.written += 1


@contextlib.contextmanager
def _open_out(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
        return
    try:
        # Not a `with` here: an OSError while writing is no "cannot open".
        stream = Path(path).open("a", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise CliError(f"cannot open {path} for results: {exc.strerror or exc}") from None
    with stream:
        yield stream


def _report_problems(jobs: JobFile, found: Survey, skip: bool) -> None:
    for line, problem in found.problems[:MAX_PROBLEMS_SHOWN]:
        print(f"{jobs.shown}:{line}: {problem}", file=sys.stderr)
    hidden = len(found.problems) - MAX_PROBLEMS_SHOWN
    if hidden > 0:
        print(f"{jobs.shown}: ... and {hidden} more bad lines", file=sys.stderr)
    count = len(found.problems)
    lines = "line" if count == 1 else "lines"
    if not skip:
        raise CliError(
            f"{count} bad job {lines} in {jobs.shown}; nothing was submitted "
            "(fix them, or pass --skip-invalid to run the rest)"
        )
    print(f"kling-async: skipping {count} bad job {lines}", file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """Validate, then run; returns the exit status (0 all succeeded, 1 some failed)."""
    jobs = JobFile(Path(args.jobs), args.jobs)
    if not jobs.path.is_file():
        raise CliError(f"no such job file: {args.jobs}")
    if args.sandbox and (args.base_url or args.api_key):
        raise CliError("--sandbox runs its own server: drop --base-url and --api-key")
    # Keys first: a missing key should not wait for a long file to be checked.
    creds = sandbox_credentials() if args.sandbox else credentials(args, os.environ)
    found = survey(jobs)
    if found.problems:
        _report_problems(jobs, found, args.skip_invalid)
    with _open_out(args.out) as out:
        writer = ResultWriter(out, found.lines)
        progress = Progress.choose(found.valid, quiet=args.quiet)
        run = _Run(args, jobs, found, writer, progress, creds)
        try:
            _interrupt.run(run.main)
        except BaseException:
            progress.close(summary=False)  # the error says what happened, not the counts
            raise
        progress.close()
    failed = progress.failed + len(found.problems)
    if not args.quiet:
        ok = progress.done - progress.failed
        where = "" if args.out == "-" else f"; results in {args.out}"
        print(
            f"kling-async: {progress.done} jobs in {progress.elapsed:.1f} s: {ok} succeeded, "
            f"{progress.failed} failed{where}",
            file=sys.stderr,
        )
    return 1 if failed else 0


class _Run:
    """One run's moving parts: the server (sandbox), the client, the batch and the display."""

    def __init__(
        self,
        args: argparse.Namespace,
        jobs: JobFile,
        found: Survey,
        writer: ResultWriter,
        progress: Progress,
        creds: dict[str, str],
    ) -> None:
        self.args = args
        self.creds = creds
        self.jobs = jobs
        self.skip = found.invalid_lines
        self.writer = writer
        self.progress = progress

    async def main(self) -> None:
        """Run the batch; a fatal error is raised only once everything is closed."""
        stopped: Exception | None = None
        async with contextlib.AsyncExitStack() as stack:
            results = await self._open(stack)
            async with anyio.create_task_group() as group:
                group.start_soon(self.progress.tick)
                try:
                    async for result in results:
                        self._record(result)
                except Exception as exc:
                    # Raised once the progress task group is closed: raised through it, the
                    # error would come out wrapped in an ExceptionGroup.
                    stopped = exc
                group.cancel_scope.cancel()
        if stopped is not None:
            raise stopped

    async def _open(self, stack: contextlib.AsyncExitStack) -> BatchIterator:
        args = self.args
        options: dict[str, Any] = {"max_in_flight": args.max_in_flight, "creds": self.creds}
        if args.sandbox:
            duration = fixed_duration(os.environ)
            server = await stack.enter_async_context(sandbox_server(duration=duration))
            options["poll"], options["retry"] = sandbox_policies(duration)
            options["base_url"] = server.url
            if args.dialect == "apimodels":
                # apimodels documents no concurrency refusal like 1303: its HTTP 429 is a plain
                # rate limit, which waits but cannot shrink the task slots.  Stay within the
                # sandbox account's limit so the demo does not spin on refusals.
                options["max_in_flight"] = min(args.max_in_flight, TASK_LIMIT)
            if not args.quiet:
                print(
                    f"kling-async: sandbox server at {server.url} (dialect {args.dialect}, "
                    "no account, no network)",
                    file=sys.stderr,
                )
        if args.first_poll is not None or args.max_poll_interval is not None:
            poll = options.get("poll", PollPolicy())
            first = args.first_poll if args.first_poll is not None else poll.first_delay
            longest = args.max_poll_interval or max(poll.max_interval, first)
            options["poll"] = attrs.evolve(poll, first_delay=first, max_interval=longest)
        client = await stack.enter_async_context(make_client(args, **options))
        if args.resubmit_unknown and not args.journal:
            raise CliError("--resubmit-unknown goes with --journal")
        batch_options: dict[str, Any] = {}
        if args.journal:
            batch_options["journal"] = args.journal
            batch_options["resubmit_unknown"] = args.resubmit_unknown
        if args.download:
            batch_options["download_to"] = args.download
        self.progress.start()
        results = client.run_batch(self._feed(), **batch_options)
        self.progress.watch(results)
        return await stack.enter_async_context(results)

    def _record(self, result: JobResult, line: int | None = None) -> None:
        self.writer.write(result, line)
        # A video made but not saved (--download failed) counts as a failure of the run.
        self.progress.job_finished(result.ok and result.error is None)

    async def _feed(self) -> AsyncIterator[LipSyncJob]:
        """The jobs, built one at a time as the batch asks (audio files read off the loop)."""
        records = self.jobs.records()
        try:
            for record in records:
                if record.line in self.skip:
                    continue
                job = await self._build(record)
                if isinstance(job, str):
                    self.progress.job_submitted()
                    self._record(self._refused(record, job), record.line)
                    continue
                yield job
                # The batch asks for the next job only once it has taken this one up.
                self.progress.job_submitted()
        finally:
            records.close()

    async def _build(self, record: Record) -> LipSyncJob | str:
        if "audio_file" in record.fields:
            return await anyio.to_thread.run_sync(self.jobs.build, record)
        return self.jobs.build(record)

    def _refused(self, record: Record, problem: str) -> JobResult:
        # The file changed since the validation pass (an audio file went missing, say).
        field, _, rule = problem.partition(": ")
        key = str(record.fields.get("key") or f"line-{record.line}")
        error: KlingError = ValidationError(field, rule or problem)
        return JobResult(
            key=key, task_id=None, state=TaskState.FAILED, error=error, finished_at=time.time()
        )
