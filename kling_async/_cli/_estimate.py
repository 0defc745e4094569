"""``kling-async estimate``: what a job file will cost, in units, before anything is sent.

One JSON line per job on stdout (``key``, ``line``, ``seconds``, ``units``, ``source``) and a
total on stderr; no key, no server, no network.  Exit status 0, or 1 when some lines are bad
(they are reported and left out).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from .._prices import PRICE_DEFAULTS
from ._connect import DIALECTS, CliError

__all__ = ["add_estimate_options", "estimate_command"]


def add_estimate_options(parser: argparse.ArgumentParser, units: Callable[[str], float]) -> None:
    """The price options (each defaults to :data:`~kling_async.DEFAULT_PRICES`)."""
    group = parser.add_argument_group("prices")
    group.add_argument(
        "--dialect",
        choices=DIALECTS,
        default="kling",
        help="the API the jobs will run on: apimodels (and --advanced) add an identify-face "
        "call per job",
    )
    group.add_argument(
        "--advanced", action="store_true", help="the jobs run as official advanced lip-sync"
    )
    for option, name, what in (
        ("--units-per-5s", "units_per_5s", "units per started 5 s of video"),
        ("--identify-face-units", "identify_face_units", "units per identify-face call"),
        ("--usd-per-unit", "usd_per_unit", "dollars per unit, for the total"),
    ):
        default = PRICE_DEFAULTS[name]  # (not the records: `--help` stays light)
        group.add_argument(
            option, metavar="N", type=units, default=default, help=f"{what} (default {default:g})"
        )


def estimate_command(args: argparse.Namespace) -> int:
    """Print each job's estimate and the total; returns the exit status."""
    from .._cost import Prices, estimate_job
    from ._jobfile import JobFile

    jobs = JobFile(Path(args.jobs), args.jobs)
    if not jobs.path.is_file():
        raise CliError(f"no such job file: {args.jobs}")
    prices = Prices(
        units_per_5s=args.units_per_5s,
        identify_face_units=args.identify_face_units,
        usd_per_unit=args.usd_per_unit,
    )
    two_step = args.dialect == "apimodels" or args.advanced
    total, count, unknown, bad = 0.0, 0, 0, 0
    for record in jobs.records():
        job = jobs.build(record)
        if isinstance(job, str):
            print(f"{jobs.shown}:{record.line}: {job}", file=sys.stderr)
            bad += 1
            continue
        one = estimate_job(job, prices, identify_face=two_step)
        count += 1
        if one.units is None:
            unknown += 1
        else:
            total += one.units
        line = {"key": one.key, "line": record.line, "seconds": one.seconds}
        line |= {"units": one.units, "source": one.source}
        print(json.dumps(line, ensure_ascii=False))
    if not args.quiet:
        reserve = prices.units_for(prices.unknown_seconds, identify_face=two_step)
        unknowns = (
            f"; {unknown} of unknown length (not in the total; --max-units reserves "
            f"{reserve:g} units for each)"
            if unknown
            else ""
        )
        print(
            f"kling-async: {count} jobs: {total:g} units estimated "
            f"(about ${total * prices.usd_per_unit:.2f}){unknowns}",
            file=sys.stderr,
        )
    return 1 if bad else 0
