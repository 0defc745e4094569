"""The ``results`` command and ``status --journal``: their arguments (a light module).

Building the parser must not import the journal, anyio or psycopg (start-up time): the commands
themselves are in :mod:`._journal_cmds`, imported when they run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ._connect import CliError

__all__ = ["add_results_command", "add_status_journal_option"]

Handler = Callable[[argparse.Namespace], int]

_JOURNAL_HELP = "the journal: a SQLite file, or a postgresql:// URL shared by workers"


def add_results_command(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    parents: list[argparse.ArgumentParser],
    handler: Handler,
) -> None:
    """Register ``results`` (``handler``: ``_journal_cmds.results_command``, imported late)."""
    results = commands.add_parser(
        "results",
        parents=parents,
        help="export every job's latest result from a journal",
        description="Print every job's latest result recorded in a journal, one line per job "
        "(jobs without a result yet show where they stand: pending, submitting, running).",
    )
    results.add_argument("--journal", metavar="J", required=True, help=_JOURNAL_HELP)
    results.add_argument(
        "--format", choices=("jsonl", "csv"), default="jsonl", help="output format (jsonl)"
    )
    results.add_argument(
        "-o", "--out", metavar="FILE", default="-", help="write here instead of stdout"
    )
    results.set_defaults(handler=handler)


def add_status_journal_option(status: argparse.ArgumentParser, by_journal: Handler) -> None:
    """Give ``status`` a ``--journal`` option (then no task ids): a journal at a glance.

    ``by_journal`` is ``_journal_cmds.journal_status_command`` (imported when it runs).
    """
    status.add_argument("--journal", metavar="J", help=_JOURNAL_HELP + " (instead of task ids)")
    by_task: Handler = status.get_default("handler")

    def dispatch(args: argparse.Namespace) -> int:
        if args.journal is not None:
            if args.task_ids:
                raise CliError("give task ids or --journal, not both")
            return by_journal(args)
        if not args.task_ids:
            raise CliError("give task ids, or --journal J")
        return by_task(args)

    status.set_defaults(handler=dispatch)
