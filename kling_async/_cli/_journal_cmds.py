"""``kling-async results --journal J`` and ``kling-async status --journal J``.

Both read a journal from outside its batch, SQLite file or PostgreSQL URL alike
(:mod:`kling_async.journal._export`): ``results`` prints every job's latest result, one line per
job (JSON lines, or CSV with a header); ``status`` prints counts by state, the tasks running,
and for a shared journal the account's slots and the workers with their leases.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import anyio

from .._results import JobResult, TaskState
from ..journal import check_target
from ..journal._export import JournalStatus, job_state, read_jobs, read_status
from ._connect import CliError
from ._output import same_file
from ._run import result_line

__all__ = ["journal_status_command", "results_command"]


def _target(text: str) -> str:
    try:
        check_target(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return text


def results_command(args: argparse.Namespace) -> int:
    """Print one line per job of the journal; 0 (the export itself worked)."""
    journal = _target(args.journal)
    if args.out != "-" and "://" not in journal and same_file(Path(args.out), Path(journal)):
        # Opened for writing, the journal would be emptied: its tasks paid for again.
        raise CliError(f"--out {args.out} is the journal itself: give the export its own file")
    jobs = anyio.run(read_jobs, journal)
    lines = [_line(job.key, job.result, job_state(job), job) for job in jobs]
    if args.out == "-":
        _write(sys.stdout, lines, args.format)
        return 0
    try:
        with open(args.out, "w", encoding="utf-8", newline="") as out:
            _write(out, lines, args.format)
    except OSError as exc:
        # (A full disk): no file cut short that looks like the whole export.
        with contextlib.suppress(OSError):
            if Path(args.out).is_file():
                Path(args.out).unlink()
        raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    return 0


def _line(key: str, result: JobResult | None, state: str, job: Any) -> dict[str, Any]:
    if result is not None:
        return result_line(result)
    task_ids = [stage.task_id for stage in job.stages.values() if stage.task_id]
    empty = JobResult(key=key, task_id=task_ids[-1] if task_ids else None, state=TaskState.FAILED)
    return {**result_line(empty), "state": state, "ok": False}


def _write(out: TextIO, lines: list[dict[str, Any]], form: str) -> None:
    if form == "jsonl":
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
        return
    fields = list(lines[0]) if lines else list(result_line(_NO_RESULT))
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for line in lines:
        writer.writerow({name: "" if value is None else value for name, value in line.items()})


_NO_RESULT = JobResult(key="", task_id=None, state=TaskState.FAILED)


def journal_status_command(args: argparse.Namespace) -> int:
    """Print the journal's counts, slots and workers."""
    status = anyio.run(read_status, _target(args.journal))
    print(format_status(args.journal, status))
    return 0


def format_status(name: str, status: JournalStatus) -> str:
    """The text ``status --journal`` prints."""
    from ..journal._config import redact

    states = ", ".join(f"{state} {count}" for state, count in sorted(status.states.items()))
    lines = [f"journal {redact(name)}: {status.jobs} jobs" + (f" ({states})" if states else "")]
    lines.append(f"tasks running: {status.running}")
    if status.units_spent is not None:
        lines.append(
            f"budget: {status.units_spent:g} units spent, {status.units_reserved:g} reserved"
            " for tasks that may still run"
        )
    if status.capacity is not None:
        lines.append(
            f"account: {status.slots_held} task slots held, limit {status.limit}"
            f" (max_in_flight {status.capacity})"
        )
        lines.append(f"workers: {len(status.workers)}")
        for lease in status.workers:
            left = (
                f"lease {lease.expires_in:.1f} s left"
                if lease.expires_in > 0
                else f"lease expired {-lease.expires_in:.1f} s ago"
            )
            lines.append(f"  {lease.worker}  {left}, {lease.jobs} jobs in hand")
    return "\n".join(lines)
