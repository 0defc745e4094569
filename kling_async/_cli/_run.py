"""``kling-async run``: validate a job file, run it as one batch, append results as they come."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import attrs

from .._budget import Budget
from .._config import PollPolicy
from .._errors import KlingError, ValidationError, shorten
from .._iterator import BatchIterator
from .._jobs import LipSyncJob
from .._results import JobResult, TaskState
from . import _interrupt
from ._connect import CliError, credentials, make_client
from ._jobfile import JobFile, Record, Survey, survey
from ._output import ResultWriter, check_paths, count_note, open_out, result_line
from ._progress import Progress
from ._sandbox import (
    SANDBOX_URL,
    TASK_LIMIT,
    fixed_duration,
    sandbox_credentials,
    sandbox_policies,
    sandbox_server,
)
from ._tally import Tally, plural

__all__ = ["result_line", "run_command"]

# Bad lines shown before the run stops (the rest are counted): a wholly wrong file (say, the
# wrong columns) should not bury the terminal.
MAX_PROBLEMS_SHOWN = 20


def _report_problems(jobs: JobFile, found: Survey, skip: bool) -> None:
    for line, problem in found.problems[:MAX_PROBLEMS_SHOWN]:
        print(f"{jobs.shown}:{line}: {shorten(problem, 400)}", file=sys.stderr)
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
    if args.resubmit_unknown and not args.journal:
        raise CliError("--resubmit-unknown goes with --journal")
    if args.retry_failed and not args.journal:
        raise CliError("--retry-failed goes with --journal (the failures are read there)")
    # Keys first: a missing key should not wait for a long file to be checked; then every path
    # the run writes, before anything is sent or started.
    creds = sandbox_credentials() if args.sandbox else credentials(args, os.environ)
    lines = check_paths(args.out, args.download, args.journal, args.summary_json, args.jobs)
    found = survey(jobs)
    if found.problems:
        _report_problems(jobs, found, args.skip_invalid)
    if found.valid == 0:
        _warn(f"{jobs.shown} holds no jobs: nothing to do")
    if lines and not args.journal:
        _warn(count_note(lines, args.out))
    tally = Tally(found.lines, total=found.valid)
    progress = Progress.choose(tally, quiet=args.quiet)
    with open_out(args.out) as out:
        run = _Run(args, jobs, found, ResultWriter(out, found.lines, args.out), progress, creds)
        try:
            if found.valid:
                _interrupt.run(run.main)
        except BaseException as exc:
            progress.close(summary=False)  # the error says what happened, not the counts
            _stopped(run, exc)
            stopped = _interrupt.exit_status(exc) if isinstance(exc, KeyboardInterrupt) else 2
            _summary_json(args, tally, stopped, run)
            raise
        progress.close()
    failed = tally.failed + len(found.problems)
    retried = run.results.progress.retried if run.results is not None else 0
    if retried and not args.quiet:
        print(
            f"kling-async: {plural(retried, 'job')} that failed in earlier runs submitted again",
            file=sys.stderr,
        )
    if not args.quiet:
        ok = tally.done - tally.failed
        where = "" if args.out == "-" else f"; results in {args.out}"
        earlier = f" ({len(tally.resumed)} reported by earlier runs)" if tally.resumed else ""
        units = f", {tally.units:g} units charged" if tally.units else ""
        print(
            f"kling-async: {plural(tally.done, 'job')}{earlier} in {tally.elapsed:.1f} s: "
            f"{ok} succeeded, {tally.failed} failed{units}{where}",
            file=sys.stderr,
        )
    status = 1 if failed else 0
    _summary_json(args, tally, status, run)
    return status


def _warn(text: str) -> None:
    print(f"kling-async: warning: {text}", file=sys.stderr)


def _stopped(run: _Run, error: BaseException) -> None:
    """Say which paid tasks a stopped run leaves running (a fatal error's message says it)."""
    ids = run.running_task_ids()
    if not ids or isinstance(error, KlingError):
        return
    tasks = plural(len(ids), "task")
    if run.args.journal:
        verb = "is" if len(ids) == 1 else "are"
        print(
            f"kling-async: {tasks} still running on the server or just ended {verb} in the "
            "journal: run the same command again to pick them up",
            file=sys.stderr,
        )
        return
    print(
        f"kling-async: {tasks} still running on the server or just ended (paid for) will not be "
        f"reported: {' '.join(ids)}; look them up with `kling-async status ID...` (with "
        "--journal FILE a rerun picks up such tasks by itself)",
        file=sys.stderr,
    )


def _summary_json(args: argparse.Namespace, tally: Tally, status: int, run: _Run) -> None:
    if args.summary_json is None:
        return
    summary = tally.summary(exit_status=status, running_task_ids=list(run.running_task_ids()))
    try:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        _warn(f"cannot write --summary-json {args.summary_json}: {exc.strerror or exc}")


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
        self.results: BatchIterator | None = None

    def running_task_ids(self) -> tuple[str, ...]:
        """The batch's tasks submitted and not reported (running still, after a stop)."""
        return self.results.running_task_ids if self.results is not None else ()

    async def main(self) -> None:
        """Run the batch; a fatal error is raised only once everything is closed."""
        stopped: Exception | None = None
        async with contextlib.AsyncExitStack() as stack:
            results = await self._open(stack)
            async with anyio.create_task_group() as group:
                group.start_soon(self.progress.tick)
                try:
                    async for result in results:
                        self._write(result)
                except Exception as exc:
                    # Raised once the progress task group is closed: raised through it, the
                    # error would come out wrapped in an ExceptionGroup.
                    stopped = exc
                group.cancel_scope.cancel()
            if stopped is not None:
                # Raised inside the stack: the batch sees it, and a result this run could not
                # write (a full disk) stays unreported in the journal for the next run.
                raise stopped

    async def _open(self, stack: contextlib.AsyncExitStack) -> BatchIterator:
        args = self.args
        options: dict[str, Any] = {"max_in_flight": args.max_in_flight, "creds": self.creds}
        if args.sandbox:
            duration = fixed_duration(os.environ)
            server = await stack.enter_async_context(sandbox_server(duration=duration))
            options["poll"], options["retry"] = sandbox_policies(duration)
            # The client knows the sandbox by a fixed name, so that a journal fits every run.
            from ._resolver import sandbox_session  # (aiohttp: not for --help)

            port = urlsplit(server.url).port or 80
            options["session"] = await stack.enter_async_context(sandbox_session(port))
            options["base_url"] = SANDBOX_URL
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
                if args.journal:
                    print(
                        "kling-async: (the sandbox server starts empty each run: tasks an earlier "
                        "run left running end as 'task not found' here, never on a real server)",
                        file=sys.stderr,
                    )
        if args.first_poll is not None or args.max_poll_interval is not None:
            poll = options.get("poll", PollPolicy())
            first = args.first_poll if args.first_poll is not None else poll.first_delay
            longest = args.max_poll_interval or max(poll.max_interval, first)
            options["poll"] = attrs.evolve(poll, first_delay=first, max_interval=longest)
        client = await stack.enter_async_context(make_client(args, **options))
        batch_options: dict[str, Any] = {"on_event": self.progress.on_event}
        if args.journal:
            batch_options["journal"] = args.journal
            batch_options["resubmit_unknown"] = args.resubmit_unknown
            batch_options["retry_failed"] = args.retry_failed
        if args.download:
            batch_options["download_to"] = args.download
        if args.max_units is not None:
            batch_options["budget"] = Budget(units=args.max_units)
        self.progress.start()
        self.results = client.run_batch(self._feed(), **batch_options)
        return await stack.enter_async_context(self.results)

    def _write(self, result: JobResult, line: int | None = None) -> None:
        self.writer.write(result, line)

    async def _feed(self) -> AsyncIterator[LipSyncJob]:
        """The jobs, built one at a time as the batch asks (audio files read off the loop)."""
        records = self.jobs.records()
        try:
            for record in records:
                if record.line in self.skip:
                    continue
                job = await self._build(record)
                if isinstance(job, str):
                    refused = self._refused(record, job)
                    self.progress.job_finished(refused)
                    self._write(refused, record.line)
                    # A yield each: a file gone bad in mid-run must not keep Ctrl-C waiting.
                    await anyio.lowlevel.checkpoint()
                    continue
                yield job
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
