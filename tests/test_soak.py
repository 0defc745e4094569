"""The fault soak (tests/soak.py) in CI: two short fixed-seed rounds, and its checks at work.

Each round runs the fake server and the workers in their own processes, kills workers and
reruns them, then checks the library's four promises against the server's record of every task
it created.  The long soak runs by hand: ``python tests/soak.py --seed N --rounds R --jobs J``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import soak
from pg import PgServer

JOBS = 30


def run_round(plan: soak.Plan, tmp_path: Path, pg: Any = None) -> soak.Tally:
    tally = soak.Tally()
    passed, evidence = soak.soak_round(plan, tally, 60.0, tmp_path, False, pg)
    assert passed, f"{plan.describe()}: {evidence}"
    assert tally.jobs == JOBS and tally.reports >= JOBS
    assert tally.tasks >= JOBS // 2  # tasks ran, with faults and kills among them
    assert sum(tally.faults.values()) > 0
    return tally


def test_a_sqlite_round_with_kills_reruns_and_retry_failed(tmp_path: Path) -> None:
    # Seed 21, round 0: advanced lip-sync, three kills drawn, every fault kind but 502s on,
    # then a retry_failed rerun, itself killed and run again.
    plan = soak.draw(21, 0, JOBS, "sqlite")
    assert len(plan.kills) == 3 and plan.retry_failed and plan.retry_kill and plan.advanced
    plan.rival = False  # CI's time is short
    tally = run_round(plan, tmp_path)
    assert tally.runs >= 3  # the retry_failed run and its rerun, after the kills that landed


def test_a_postgres_round_with_a_worker_killed(tmp_path: Path, pg_server: PgServer) -> None:
    # Seed 24, round 1: two workers on one PostgreSQL journal, one killed early on, lost
    # submit answers and task failures.
    plan = soak.draw(24, 1, JOBS, "pg")
    assert plan.workers == 2 and plan.faults["lost_answer_rate"] > 0
    plan.pause_at = 0.0  # CI's time is short: no lapsed worker to wait for
    tally = run_round(plan, tmp_path, pg_server)
    assert tally.kills == 1


def record(*tasks: tuple[str, int, str]) -> dict[str, Any]:
    """A server record with advanced lip-sync tasks (id, job number, state)."""
    return {
        "tasks": [
            {
                "task_id": task_id,
                "stage": "advanced-lip-sync",
                "state": state,
                "reason": None,
                "input": {"face_choose": [{"audio_url": f"https://x/soak-line-{n}.mp3"}]},
                "created_at": 0.0,
            }
            for task_id, n, state in tasks
        ],
        "requests": {},
        "faults_hit": {},
        "max_running_seen": 1,
    }


def results(tmp_path: Path, *lines: tuple[str, str | None, str]) -> list[soak.Run]:
    out = tmp_path / "run-0.jsonl"
    with out.open("w") as file:
        for key, task_id, state in lines:
            line = {"key": key, "task_id": task_id, "state": state, "error_type": None}
            file.write(json.dumps({**line, "error": None}) + "\n")
    return [soak.Run(argv=[], out=out, flags=set())]


@pytest.mark.parametrize(
    ("tasks", "lines", "broken"),
    [
        # Job 1 never reported.
        ([("t0", 0, "succeed")], [("job-0", "t0", "succeeded")], "nothing lost"),
        # Two tasks for job 0, no retry_failed, no resubmit.
        (
            [("t0", 0, "succeed"), ("t9", 0, "succeed"), ("t1", 1, "succeed")],
            [("job-0", "t0", "succeeded"), ("job-1", "t1", "succeeded")],
            "paid twice",
        ),
        # Job 1 reported with job 0's task.
        (
            [("t0", 0, "succeed"), ("t1", 1, "succeed")],
            [("job-0", "t0", "succeeded"), ("job-1", "t0", "succeeded")],
            "not the job's own",
        ),
        # A success the server says failed.
        (
            [("t0", 0, "succeed"), ("t1", 1, "failed")],
            [("job-0", "t0", "succeeded"), ("job-1", "t1", "succeeded")],
            "the server says failed",
        ),
        # Job 1's task exists, its result has none.
        (
            [("t0", 0, "succeed"), ("t1", 1, "succeed")],
            [("job-0", "t0", "succeeded"), ("job-1", None, "failed")],
            "ended without its task",
        ),
    ],
)
def test_the_checks_catch_each_broken_promise(
    tmp_path: Path,
    tasks: list[tuple[str, int, str]],
    lines: list[tuple[str, str | None, str]],
    broken: str,
) -> None:
    plan = soak.draw(1, 0, 2, "sqlite")
    plan.advanced, plan.retry_failed, plan.rival = True, False, False
    plan.dialect = "kling"
    with pytest.raises(soak.Violation, match=broken):
        soak.check(plan, results(tmp_path, *lines), record(*tasks), soak.Tally())
    # The same round told the truth passes.
    good = record(("t0", 0, "succeed"), ("t1", 1, "succeed"))
    runs = results(tmp_path, ("job-0", "t0", "succeeded"), ("job-1", "t1", "succeeded"))
    soak.check(plan, runs, good, soak.Tally())


@pytest.mark.parametrize(
    ("advanced", "flags", "allowed"),
    [
        (False, {"--resubmit-unknown"}, True),  # basic: a resend after the kill may pay again
        (False, set(), False),  # without resubmit_unknown it may not
        (True, {"--resubmit-unknown"}, False),  # advanced: the resend carries the external id
    ],
)
def test_a_second_task_is_allowed_only_where_documented(
    tmp_path: Path, advanced: bool, flags: set[str], allowed: bool
) -> None:
    plan = soak.draw(1, 0, 1, "sqlite")
    plan.advanced, plan.retry_failed, plan.rival = advanced, False, False
    plan.dialect = "kling"
    killed, rerun = tmp_path / "run-0.jsonl", tmp_path / "run-1.jsonl"
    killed.write_text("")
    rerun.write_text(
        json.dumps({"key": "job-0", "task_id": "t1", "state": "succeeded", "error_type": None})
        + "\n"
    )
    runs = [
        soak.Run(argv=[], out=killed, flags=set(), killed=True),
        soak.Run(argv=[], out=rerun, flags=flags),
    ]
    server = record(("t0", 0, "succeed"), ("t1", 0, "succeed"))
    if not advanced:
        for task in server["tasks"]:
            task["stage"] = "lip-sync"
    if allowed:
        soak.check(plan, runs, server, soak.Tally())
    else:
        with pytest.raises(soak.Violation, match="paid twice"):
            soak.check(plan, runs, server, soak.Tally())


@pytest.mark.parametrize(
    ("killed", "before_kill", "allowed"), [(False, 0, False), (True, 0.1, True), (True, 5.0, False)]
)
def test_a_kept_result_is_reported_again_only_if_held_at_a_kill(
    tmp_path: Path, killed: bool, before_kill: float, allowed: bool
) -> None:
    plan = soak.draw(1, 0, 1, "sqlite")
    plan.advanced, plan.retry_failed, plan.rival = True, False, False
    plan.dialect = "kling"
    line = {"key": "job-0", "task_id": "t0", "state": "succeeded", "error_type": None}
    first, second = tmp_path / "run-0.jsonl", tmp_path / "run-1.jsonl"
    first.write_text(json.dumps({**line, "at": 1000.0}) + "\n")
    second.write_text(json.dumps(line) + "\n")
    runs = [
        soak.Run(argv=[], out=first, flags=set(), killed=killed, killed_at=1000.0 + before_kill),
        soak.Run(argv=[], out=second, flags=set()),
    ]
    server = record(("t0", 0, "succeed"))
    if allowed:
        soak.check(plan, runs, server, soak.Tally())
    else:
        with pytest.raises(soak.Violation, match="reported it again"):
            soak.check(plan, runs, server, soak.Tally())
