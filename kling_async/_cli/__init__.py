"""The ``kling-async`` command line (also ``python -m kling_async``).

``run`` validates a job file and runs it as one batch, appending a JSON line per finished job;
``status`` looks tasks up; ``estimate`` says what a job file will cost; ``fake-server`` serves
the sandbox.  Exit status: 0 when every job
succeeded, 1 when some failed, 2 for usage errors and fatal account errors (bad key, no
balance), 130 when interrupted (143 when terminated).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO, TypeVar, cast

from .._errors import AuthenticationError, KlingError
from ._connect import CliError, add_connection_options
from ._estimate import add_estimate_options
from ._journal_args import add_results_command, add_status_journal_option
from ._logs import LOG_FORMATS, TolerantStream, configure_logging
from ._sandbox import TASK_LIMIT

# Start-up: building the parser imports only argparse and the light modules above, so that
# `--help`, `--version` and usage errors answer without importing aiohttp, anyio or tqdm (about
# 0.3 s).  A command's module is imported when the command runs (`_command`).

__all__ = ["main"]

PROG = "kling-async"

EPILOG = """\
Keys come from --api-key or the environment: KLING_API_KEY (a Bearer key, every dialect), or
KLING_ACCESS_KEY + KLING_SECRET_KEY (the official API's JWT). Exit status: 0 when every job
succeeded (with --journal: every job of the journal, earlier runs' included), 1 when some
failed, 2 on usage, local file or fatal account errors, 130 when interrupted (Ctrl-C), 143 when
stopped by SIGTERM (both clean stops).
First run: kling-async run examples/jobs.jsonl --out results.jsonl --sandbox"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # "unrecognized arguments: --api-kye sk-..." would echo a mistyped key: show options only.
        if message.startswith("unrecognized arguments:"):
            words = message.split(":", 1)[1].split()
            shown = [word for word in words if word.startswith("-")] or ["(values hidden)"]
            message = "unrecognized arguments: " + " ".join(shown)
        super().error(message)


class _VersionAction(argparse.Action):
    """``--version``: reads the installed version (importlib.metadata) only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show program's version number and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> NoReturn:
        from .. import __version__

        print(f"{parser.prog} {__version__}")  # to stdout, as argparse's own version action
        parser.exit()


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The handler ``name`` of ``module`` (relative to this package), imported when called."""

    def handler(args: argparse.Namespace) -> int:
        run: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(module, __name__), name
        )
        return run(args)

    return handler


N = TypeVar("N", int, float)


def _bounded(
    convert: Callable[[str], N], what: str, *, least: N, strict: bool = False
) -> Callable[[str], N]:
    """An argparse ``type`` reading ``what`` (a finite number) of at least (or above) ``least``."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not math.isfinite(value) or value < least or (strict and value == least):
            bound = "above" if strict else "at least"
            raise argparse.ArgumentTypeError(f"must be {what} {bound} {least}, not {text!r}")
        return value

    return parse


_positive_int = _bounded(int, "a whole number", least=1)
_count = _bounded(int, "a whole number", least=0)
_positive_float = _bounded(float, "a number", least=0.0, strict=True)
_seconds = _bounded(float, "a number of seconds", least=0.0)
_units = _bounded(float, "a number of units", least=0.0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    output = _Parser(add_help=False)
    loudness = output.add_argument_group("output").add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    loudness.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging of kling_async to stderr, and tracebacks with errors",
    )
    output.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log records on stderr as text lines (default) or as JSON objects, one a line",
    )

    parser = _Parser(
        prog=PROG,
        description="Bulk lip-sync video generation through the Kling API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser(
        "run",
        parents=[output],
        help="run a job file as one batch",
        description="Validate every line of JOBS, then run them all, appending one JSON line "
        "per finished job to --out as it finishes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("jobs", metavar="JOBS", help="job file: JSONL, or CSV with a header (*.csv)")
    run.add_argument(
        "-o",
        "--out",
        metavar="RESULTS",
        required=True,
        help="results file, appended to as jobs finish (JSON lines; - for stdout)",
    )
    add_connection_options(run)
    run.add_argument(
        "--max-in-flight",
        metavar="N",
        type=_positive_int,
        default=20,
        help="tasks kept running on the server at once (default 20; fewer are used when the "
        "account refuses with 1303)",
    )
    run.add_argument(
        "--sandbox",
        action="store_true",
        help="run against a fake server started in-process: no account, no network",
    )
    run.add_argument(
        "--skip-invalid",
        action="store_true",
        help="run the valid lines of a job file with bad lines, instead of stopping",
    )
    run.add_argument(
        "--first-poll",
        metavar="S",
        type=_positive_float,
        help="seconds from a submit to a task's first status query, a first guess: once the "
        "batch has learnt how long its tasks take, it polls by that, sooner if they are quick "
        "(default 10)",
    )
    run.add_argument(
        "--max-poll-interval",
        metavar="S",
        type=_positive_float,
        help="longest wait between two status queries of a task (default 90)",
    )
    run.add_argument(
        "--journal",
        metavar="FILE",
        help="keep progress in this file (SQLite); run the same command again after a crash "
        "to resume: finished jobs are not redone and no job gets a second task. A "
        "postgresql:// URL instead: several workers share the batch and the account's "
        "--max-in-flight (extra kling-async[postgres])",
    )
    run.add_argument(
        "--resubmit-unknown",
        action="store_true",
        help="with --journal: submit again a job whose earlier submit may or may not have "
        "created a task (it may then be paid twice)",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --journal: submit again the jobs whose last result was a failure (a task "
        "that failed, or a request refused for good); never a success",
    )
    run.add_argument(
        "--download",
        metavar="DIR",
        help="save each finished video in DIR (named after the job key) before reporting it",
    )
    run.add_argument(
        "--summary-json",
        metavar="FILE",
        help="write the run's counts here at the end (jobs by state, failures, tasks submitted, "
        "requests, wall time, exit status), also after Ctrl-C or an error",
    )
    run.add_argument(
        "--max-units",
        metavar="N",
        type=_units,
        help="budget in units: each job reserves its estimate (see `estimate`) before it is "
        "submitted; once the next one would pass N, the remaining jobs end unsubmitted with "
        "BudgetExceededError (with --journal, what was spent counts across reruns)",
    )
    run.set_defaults(handler=_command("._run", "run_command"))

    cost = commands.add_parser(
        "estimate",
        parents=[output],
        help="estimate what a job file will cost",
        description="Estimate each job's cost in units from its trim (sound_end_time - "
        "sound_start_time) or its local audio file's length; prints one JSON line per job "
        "and a total. Prices are overridable defaults (see the README's Cost section).",
    )
    cost.add_argument("jobs", metavar="JOBS", help="job file: JSONL, or CSV with a header (*.csv)")
    add_estimate_options(cost, _units)
    cost.set_defaults(handler=_command("._estimate", "estimate_command"))

    status = commands.add_parser(
        "status",
        parents=[output],
        help="look tasks up, or a journal at a glance",
        description="Look tasks up by id (one JSON line per task), or show a journal's jobs "
        "by state, tasks running and workers (--journal).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument("task_ids", metavar="TASK_ID", nargs="*", help="task ids")
    add_connection_options(status)
    status.set_defaults(handler=_command("._status", "status_command"))
    add_status_journal_option(status, _command("._journal_cmds", "journal_status_command"))
    add_results_command(commands, [output], _command("._journal_cmds", "results_command"))

    serve_output = _Parser(add_help=False)
    serve_output.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the first line (the server's URL), no keys or usage hints",
    )
    serve_output.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    serve_output.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text or json"
    )
    serve = commands.add_parser(
        "fake-server",
        parents=[serve_output],
        help="run the sandbox server standalone",
        description="Serve the sandbox (every dialect, the public test keys) until Ctrl-C.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=_count, default=8765, help="TCP port (default 8765; 0: any free port)"
    )
    serve.add_argument(
        "--task-duration",
        metavar="S",
        type=_seconds,
        help="seconds every task takes (default: about 2, varying)",
    )
    serve.add_argument(
        "--task-limit",
        metavar="N",
        type=_count,
        default=TASK_LIMIT,
        help=f"tasks running at once before 1303 refusals (default {TASK_LIMIT}; 0: no limit)",
    )
    serve.add_argument("--seed", type=int, help="random seed (default: a new one each start)")
    serve.add_argument(
        "--data-as-list",
        action="store_true",
        help="answer a single-task query with a one-element list in data (DMXAPI's quirk)",
    )
    serve.add_argument(
        "--errors-as-200",
        action="store_true",
        help="send business errors with HTTP 200 and only the body code (a gateway quirk)",
    )
    serve.add_argument(
        "--webhook-secret",
        metavar="WHSEC",
        help="sign callbacks with this Webhook Secret (whsec_...), as Kling does",
    )
    serve.set_defaults(handler=_command("._status", "fake_server_command"))
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    stderr = sys.stderr
    # What goes to stderr is for a human: a stderr that fails (a closed pipe, a full disk
    # under the log) must not stop a run in the middle.
    sys.stderr = cast(TextIO, TolerantStream(stderr))
    try:
        return _main(args)
    finally:
        sys.stderr = stderr


def _main(args: argparse.Namespace) -> int:
    configure_logging(PROG, verbose=args.verbose, log_format=args.log_format)
    try:
        status: int = args.handler(args)
    except CliError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt as exc:
        from ._interrupt import exit_status, stop_word  # (anyio: imported by the command)

        print(f"{PROG}: {stop_word(exc)}", file=sys.stderr)
        return exit_status(exc)
    except KlingError as exc:
        if args.verbose:
            traceback.print_exc()
        message = str(exc)
        if isinstance(exc, AuthenticationError):
            message += "; check the key (--api-key or KLING_API_KEY), --dialect and --base-url"
        if exc.submitted_task_ids:
            ids = " ".join(exc.submitted_task_ids)
            message += f" (tasks already created, see `{PROG} status`: {ids})"
        return _fail(message)
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
            return _fail(f"{type(exc).__name__}: {exc}")
        return _fail(f"{type(exc).__name__}: {exc} (run with --verbose for the traceback)")
    return status
