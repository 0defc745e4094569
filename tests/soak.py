"""A seeded fault soak: batches under random faults and kills, checked against the server's record.

    python tests/soak.py --seed 1 --rounds 30 --jobs 300            # SQLite journal
    python tests/soak.py --seed 1 --rounds 10 --jobs 300 --backend pg
    python tests/soak.py --seed 1 --first-round 7 --rounds 1 --keep-all   # one round again
    python tests/soak.py --recheck /tmp/soak-1-7-xxxx                # its files, checked again

Each round draws, from ``--seed`` and the round number alone (the draws repeat; the timing of
a run does not), a fault plan for a :class:`~kling_async.testing.FakeKlingServer` (HTML 500s,
proxy 502s, answers lost after acting, malformed JSON, 5000s on queries, task failures, slow
answers, slow creates), task durations, the dialect (official advanced lip-sync, whose submits
carry external task ids, or basic lip-sync, whose lost submits can only be adopted provably),
whether jobs share videos, the batch's ``max_in_flight``, the account's limit, and sometimes a
rival batch on the same account and videos (the same clips dubbed into another language).

The server runs in its own process.  ``sqlite``: one worker process (the ``kling-async run``
command or a small script, drawn per round) runs the batch on a SQLite journal, is SIGKILLed
0-3 times at random moments and rerun on the same journal until a run completes (sometimes
with ``--resubmit-unknown``; sometimes with a short poll timeout, and then again until no
result is ``TIMED_OUT``; then sometimes once more with ``--retry-failed``, itself perhaps
killed and run again).  ``pg``: 2-3 workers share a PostgreSQL journal (a throw-away server,
tests/pg.py); one is SIGKILLed at a random moment, sometimes replaced, and sometimes another is
SIGSTOPped past its lease and resumed (it must stop with ``JournalError``).

Then the promises are checked against every task the server created (it writes them out when
it stops) and against each journal's export (``kling-async results``):

* nothing lost: every job was reported by some run, and its journal holds it finished;
* nothing paid twice: at most one task per job, unless ``retry_failed`` ran a failed job again
  or ``resubmit_unknown`` sent an unclear submit of basic lip-sync again after a kill or an
  unknown outcome; a completed run reports each job once, and a later run reports a kept
  result again only if it was handed over just before a kill;
* no result that is not the job's own: each reported task was created from that job's request
  and says what the server says of it; a job whose task exists ends with it (or, on basic
  lip-sync, as ``SubmitOutcomeUnknownError``); the account never ran more tasks at once than
  ``max_in_flight`` (rounds without unclear submits);
* no endless wait: each run ends within ``--bound`` seconds.

A violation prints the seed, the round and the evidence, keeps the round's files and exits with
status 1 (``--go-on`` runs the other rounds first).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve()
#: A job's own mark in its request (the text of a basic job, the audio URL of an advanced one).
MARK = re.compile(r"soak-(line|rival)-(\d+)\b")
#: A job's video (apimodels' identify-face tasks carry nothing else of the job).
VIDEO = re.compile(r"soak-\d+-\d+-(\d+)\.mp4")
#: The PostgreSQL workers' lease, in seconds (a dead worker's jobs are taken over after it).
LEASE = 1.0
#: Keys of the FakeKlingServer's fault counter, and the task failures counted from its tasks.
FAULT_KINDS = ("http_500", "bad_gateway", "lost_answer", "malformed_json", "query_error")


# -- the round's random draws -------------------------------------------------------------------


@dataclass
class Plan:
    """Everything a round does, drawn from (seed, round)."""

    seed: int
    round: int
    jobs: int
    backend: str
    advanced: bool
    shared_videos: bool
    faults: dict[str, float]
    median: float
    task_limit: int | None
    in_flight: int
    runner: str  # "cli" or "script" (sqlite); always "script" for pg
    kills: list[float]  # sqlite: SIGKILL moments of the runs, seconds after each start
    resubmit_unknown: list[bool]  # sqlite: per run (the first run never)
    retry_failed: bool  # sqlite: one more run with retry_failed once done
    workers: int  # pg
    victim_at: float  # pg: when one worker is killed
    replace: bool  # pg: start a new worker after the kill
    #: Another batch on the same account and videos (the same clips dubbed into another
    #: language), run by a script worker on its own journal, never killed.
    rival: bool = False
    pg_resubmit: bool = True  # pg: the workers run with resubmit_unknown
    pause_at: float = 0.0  # pg: another worker is SIGSTOPped past its lease then (0: none)
    #: PollPolicy.timeout of the script workers (0: 30 s): a short one makes TIMED_OUT results,
    #: which a rerun (with the long one) must track, never submit again.
    poll_timeout: float = 0.0
    retry_kill: float = 0.0  # sqlite: the retry_failed run is SIGKILLed then (0: never)
    #: The API: the official format ("kling"), DMXAPI's gateway under /kling ("dmxapi", with
    #: its quirks drawn), or apimodels.app (identify-face and lip-sync tasks, no list query).
    dialect: str = "kling"

    def describe(self) -> str:
        faults = ", ".join(f"{k}={v:g}" for k, v in self.faults.items() if v) or "none"
        faults = faults.replace("=1,", ",").removesuffix("=1")  # the quirks are on or off
        shape = "advanced" if self.advanced else "basic"
        if self.dialect != "kling":
            shape = f"{self.dialect} {shape}"
        text = (
            f"{self.backend} {shape}{' shared-videos' if self.shared_videos else ''}"
            f"{' +rival batch' if self.rival else ''} "
            f"jobs={self.jobs} in_flight={self.in_flight} limit={self.task_limit} "
            f"median={self.median:.3f}s faults: {faults}"
        )
        if self.backend == "sqlite":
            text += (
                f"; runner={self.runner} kills at {[round(k, 2) for k in self.kills]}"
                f" resubmit_unknown={self.resubmit_unknown} retry_failed={self.retry_failed}"
            )
            if self.retry_kill:
                text += f" (killed at {self.retry_kill:.2f})"
        else:
            text += (
                f"; workers={self.workers} kill at {self.victim_at:.2f} replace={self.replace}"
                f" resubmit_unknown={self.pg_resubmit}"
            )
            if self.pause_at:
                text += f" pause at {self.pause_at:.2f}"
        if self.poll_timeout:
            text += f"; poll timeout {self.poll_timeout:g}s"
        return text


def draw(seed: int, number: int, jobs: int, backend: str) -> Plan:
    """The round's plan: the same (seed, number, jobs, backend) always gives the same plan."""
    rng = random.Random(f"soak-{seed}-{number}")

    def rate(top: float) -> float:
        return round(rng.uniform(0.0, top), 3) if rng.random() < 0.6 else 0.0

    faults = {
        "http_500_rate": rate(0.08),
        "bad_gateway_rate": rate(0.08),
        "lost_answer_rate": rate(0.1),
        "malformed_json_rate": rate(0.06),
        "query_error_rate": rate(0.1),
        "task_failure_rate": rate(0.15),
        "answer_delay": round(rng.uniform(0.0, 0.4), 3) if rng.random() < 0.3 else 0.0,
    }
    in_flight = rng.choice([4, 8, 16, 32])
    limit = rng.choice([None, None, in_flight, max(2, in_flight // 2)])
    median = rng.uniform(0.03, 0.4)
    # Kills anywhere in a run: its length is about the waves of tasks times their duration.
    length = max(1.0, jobs / min(in_flight, limit or in_flight) * (median * 1.2 + 0.05))
    kills = [rng.uniform(0.05, 1.0) * length for _ in range(rng.randint(0, 3))]
    plan = Plan(
        seed=seed,
        round=number,
        jobs=jobs,
        backend=backend,
        advanced=rng.random() < 0.6,
        shared_videos=rng.random() < 0.3,
        faults=faults,
        median=median,
        task_limit=limit,
        in_flight=in_flight,
        runner="script" if backend == "pg" else rng.choice(["cli", "script"]),
        kills=kills,
        resubmit_unknown=[False] + [rng.random() < 0.3 for _ in kills],
        retry_failed=backend == "sqlite" and rng.random() < 0.3,
        workers=rng.choice([2, 3]),
        victim_at=rng.uniform(0.1, 0.8) * length if backend == "pg" else 0.0,
        replace=rng.random() < 0.5,
    )
    # Drawn last, so that the draws above stay those of earlier versions of this file.
    plan.rival = rng.random() < 0.3
    plan.faults["create_delay"] = round(rng.uniform(0.0, 0.3), 3) if rng.random() < 0.3 else 0.0
    plan.pg_resubmit = rng.random() < 0.5
    plan.pause_at = rng.uniform(0.1, 0.7) * length if backend == "pg" and rng.random() < 0.3 else 0
    if plan.runner == "script" and rng.random() < 0.3:
        plan.poll_timeout = round(max(0.2, rng.uniform(0.5, 2.5) * median), 3)
    if plan.retry_failed and rng.random() < 0.5:
        plan.retry_kill = rng.uniform(0.02, 0.3) * length
    plan.dialect = rng.choice(["kling", "kling", "kling", "dmxapi", "apimodels"])
    if plan.dialect == "dmxapi":
        plan.faults["data_as_list"] = rng.random() < 0.5
        plan.faults["errors_as_http_200"] = rng.random() < 0.5
    elif plan.dialect == "apimodels":
        # Audio jobs only; identify-face tasks are known by their video: one per job.
        plan.advanced, plan.shared_videos, plan.rival = True, False, False
    return plan


def job_lines(plan: Plan, rival: bool = False) -> list[dict[str, Any]]:
    """The batch's jobs as job-file lines (``kling-async run``'s format, the script's too).

    ``rival``: the other batch's, half as many, on the first jobs' videos.
    """
    lines = []
    name = "rival" if rival else "line"
    for n in range(plan.jobs // 2 if rival else plan.jobs):
        clip = n // 2 if plan.shared_videos else n
        line: dict[str, Any] = {
            "key": f"{'rival' if rival else 'job'}-{n}",
            "video_url": f"https://example.com/soak-{plan.seed}-{plan.round}-{clip}.mp4",
        }
        if plan.advanced:
            line["audio_url"] = f"https://example.com/soak-{name}-{n}.mp3"
            line["sound_end_time"] = 3000
        else:
            line.update(text=f"soak-{name}-{n} said", voice_id="girlfriend_1_speech02")
            line["voice_language"] = "en"
        lines.append(line)
    return lines


# -- child processes: the server, and the script worker ------------------------------------------


def serve(argv: list[str]) -> None:
    """``soak.py _server SEED PLAN_JSON MEDIAN LIMIT DUMP``: serve until SIGTERM or stdin closes,
    then write every task the server created, its request counts and the faults hit, to DUMP."""
    from kling_async.testing import FakeKlingServer, FaultPlan

    seed, plan, median, limit, dump = argv
    mu = math.log(float(median))

    async def main() -> dict[str, Any]:
        server = FakeKlingServer(
            task_duration=lambda rng: min(rng.lognormvariate(mu, 0.6), 5.0),
            task_limit=int(limit) or None,
            faults=FaultPlan(**json.loads(plan)),
            seed=int(seed),
        )
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        stdin = sys.stdin.fileno()

        def stdin_readable() -> None:
            if not os.read(stdin, 1 << 16):  # the parent closed the pipe (or died): stop
                stop.set()

        loop.add_reader(stdin, stdin_readable)
        async with server:
            print(f"URL {server.url}", flush=True)
            await stop.wait()
            record = {
                "tasks": [
                    {
                        "task_id": task.task_id,
                        "stage": task.stage,
                        "dialect": task.dialect,
                        "state": task.state,
                        "reason": task.reason,
                        "input": dict(task.input),
                        "created_at": task.created_at,
                    }
                    for task in server.tasks.values()
                ],
                "requests": dict(server.requests),
                "faults_hit": dict(server.faults_hit),
                "max_running_seen": server.max_running_seen,
                # Official identify-face calls make sessions, not tasks: a job whose lip-sync
                # task never came to exist names its session (see check).
                "sessions": {
                    session.session_id: session.video_url
                    for session in server.sessions.values()
                    if session.identify_task_id is None
                },
            }
        return record

    Path(dump).write_text(json.dumps(asyncio.run(main())))


def work(argv: list[str]) -> None:
    """``soak.py _worker URL JOURNAL JOBS OUT IN_FLIGHT [--advanced] [--resubmit-unknown]
    [--retry-failed]``: run the job file as one journaled batch, one JSON line per result."""
    import anyio

    import kling_async as ka
    from kling_async.journal import PostgresJournal

    url, journal_arg, jobs_file, out_file, in_flight, *flags = argv
    timeout = [float(f.split("=")[1]) for f in flags if f.startswith("--poll-timeout=")]
    poll = ka.PollPolicy(
        first_delay=0.02, max_interval=0.1, multiplier=1.5, timeout=(timeout or [30.0])[0]
    )
    retry = ka.RetryPolicy(max_attempts=6, base_delay=0.01, max_delay=0.1, concurrency_delay=0.02)
    journal: str | PostgresJournal = journal_arg
    if journal_arg.startswith("postgresql://"):
        journal = PostgresJournal(url=journal_arg, lease=LEASE, renew=LEASE / 5, claim_poll=0.02)
    jobs = []
    for text in Path(jobs_file).read_text().splitlines():
        fields = json.loads(text)
        make = ka.LipSyncJob.from_text if "text" in fields else ka.LipSyncJob.from_audio
        jobs.append(make(**fields))

    async def main(out: IO[str]) -> None:
        options: dict[str, Any] = {"max_in_flight": int(in_flight), "poll": poll, "retry": retry}
        if "--dialect=apimodels" in flags:
            client = ka.KlingClient.apimodels(api_key="sk-sandbox", base_url=url, **options)
        else:
            make = ka.KlingClient.dmxapi if "--dialect=dmxapi" in flags else ka.KlingClient.kling
            advanced = "--advanced" in flags
            client = make(api_key="sk-sandbox", base_url=url, advanced=advanced, **options)
        async with client:
            batch = client.run_batch(
                jobs,
                journal=journal,
                resubmit_unknown="--resubmit-unknown" in flags,
                retry_failed="--retry-failed" in flags,
            )
            async with batch:
                async for result in batch:
                    line = {
                        "key": result.key,
                        "task_id": result.task_id,
                        "state": result.state.value,
                        "error_type": type(result.error).__name__ if result.error else None,
                        "error": None if result.error is None else str(result.error),
                        "adopted": result.adopted,
                        "at": time.time(),  # when it was handed over (a kill's evidence)
                    }
                    out.write(json.dumps(line) + "\n")
                    out.flush()

    with open(out_file, "a", encoding="utf-8") as out:
        anyio.run(main, out)


# -- the driver -----------------------------------------------------------------------------------


class Violation(Exception):
    """A promise broken: the message is the evidence."""


@dataclass
class Run:
    """One worker process of a round."""

    argv: list[str]
    out: Path
    flags: set[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    killed: bool = False
    seconds: float = 0.0
    exit: int | None = None
    stderr: Path | None = None
    #: SIGSTOPped past its lease, then stopped by the journal (JournalError): gone, as if killed.
    paused: bool = False
    lapsed: bool = False
    killed_at: float = 0.0  # Unix time of the SIGKILL
    #: The CLI's runs append to one results file, as a user's reruns do: the bytes this run
    #: appended (from, to); None when the run has a file of its own.
    span: list[int] | None = None
    name: str = ""

    @property
    def gone(self) -> bool:
        """Whether the run died or was stopped before it completed."""
        return self.killed or self.lapsed


@dataclass
class Tally:
    """The soak's figures."""

    rounds: int = 0
    jobs: int = 0
    runs: int = 0
    kills: int = 0
    lapses: int = 0
    tasks: int = 0
    reports: int = 0
    adopted: int = 0
    unknown: int = 0
    failed: int = 0
    timed_out: int = 0
    duplicates_allowed: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    wall: float = 0.0

    def line(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        return (
            f"{self.rounds} rounds, {self.jobs} jobs, {self.runs} runs, {self.kills} kills, "
            f"{self.lapses} lapsed leases, "
            f"{self.tasks} tasks, {self.reports} results reported ({self.adopted} adopted, "
            f"{self.unknown} unknown, {self.failed} failed, {self.timed_out} timed out), "
            f"{self.duplicates_allowed} documented second tasks; faults hit: {faults}; "
            f"{self.wall:.0f} s"
        )


def env() -> dict[str, str]:
    """The children's environment: this interpreter's path (the repo, tests/) included."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), *sys.path])}


class Server:
    """The fake server's process for one round."""

    def __init__(self, plan: Plan, where: Path) -> None:
        self.dump = where / "server.json"
        argv = [
            sys.executable,
            str(HERE),
            "_server",
            str(plan.seed * 1000 + plan.round),
            json.dumps(plan.faults),
            str(plan.median),
            str(plan.task_limit or 0),
            str(self.dump),
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env(), cwd=where
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().decode()
        if not first.startswith("URL "):
            self.proc.kill()
            raise RuntimeError(f"the fake server did not start: {first!r}")
        self.url = first.split()[1]

    def stop(self) -> dict[str, Any]:
        """Stop the server; return its record of the round."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
        record: dict[str, Any] = json.loads(self.dump.read_text())
        return record


def startup_seconds() -> float:
    """How long a worker process takes to import the library: kill moments count from there."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", "import aiohttp, kling_async"], env=env(), check=True)
    return time.monotonic() - began


#: Set by :func:`soak_round` on first use (a kill before the imports end would test nothing).
STARTUP: list[float] = []


def start(run: Run, where: Path) -> None:
    """Start ``run``'s process, its stderr kept in a file of the round's folder."""
    run.stderr = where / f"{run.name or run.out.stem}.stderr"
    if run.span is not None:
        run.span = [run.out.stat().st_size if run.out.exists() else 0, -1]
    with open(run.stderr, "ab") as err:
        run.proc = subprocess.Popen(
            run.argv, stdout=subprocess.DEVNULL, stderr=err, env=env(), cwd=where
        )
    run.started = time.monotonic()


def finish(run: Run, kill_at: float | None, bound: float) -> None:
    """Wait for ``run``: SIGKILL it ``kill_at`` seconds after its start if still running."""
    assert run.proc is not None
    if kill_at is not None:
        kill_at += STARTUP[0] if STARTUP else 0.0
        try:
            run.proc.wait(timeout=max(0.0, run.started + kill_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            run.proc.send_signal(signal.SIGKILL)
            run.killed = True
            run.killed_at = time.time()
    try:
        run.proc.wait(timeout=max(0.0, run.started + bound - time.monotonic()))
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.wait()
        run.seconds = time.monotonic() - run.started
        raise Violation(
            f"no endless wait: {' '.join(run.argv[2:])} still ran after {bound:g} s "
            f"(stderr: {tail(run.stderr)})"
        ) from None
    run.seconds = time.monotonic() - run.started
    run.exit = run.proc.returncode
    if run.span is not None:
        run.span[1] = run.out.stat().st_size if run.out.exists() else 0


def tail(path: Path | None, lines: int = 8) -> str:
    """The last lines of a file, for evidence."""
    if path is None or not path.exists():
        return ""
    return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])


def read_lines(run: Run) -> list[dict[str, Any]]:
    """The result lines a run wrote (a killed run may leave half a line: skipped)."""
    if not run.out.exists():
        return []
    data = run.out.read_bytes()
    if run.span is not None:
        data = data[run.span[0] : run.span[1] if run.span[1] >= 0 else len(data)]
    lines = []
    for text in data.decode(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(text))
    return lines


def worker_argv(
    plan: Plan, url: str, journal: str, out: Path, flags: set[str], rival: bool = False
) -> list[str]:
    """The command of one run: the CLI, or this file's script worker (always for the rival)."""
    jobs = str(out.parent / ("rival.jsonl" if rival else "jobs.jsonl"))
    if plan.runner == "cli" and not rival:
        argv = [sys.executable, "-m", "kling_async", "run", jobs, "--out", str(out)]
        argv += ["--journal", journal, "--base-url", url, "--api-key", "sk-sandbox"]
        argv += ["--max-in-flight", str(plan.in_flight), "-q"]
        argv += ["--first-poll", "0.02", "--max-poll-interval", "0.1"]
        if plan.dialect != "kling":
            argv += ["--dialect", plan.dialect]
    else:
        argv = [sys.executable, str(HERE), "_worker", url, journal, jobs, str(out)]
        argv.append(str(plan.in_flight))
        if plan.dialect != "kling":
            argv.append(f"--dialect={plan.dialect}")
    if plan.advanced and plan.dialect != "apimodels":
        argv.append("--advanced")
    return argv + sorted(flags)


def ok_exit(plan: Plan, run: Run) -> bool:
    """Whether a run that was not killed completed its batch."""
    # The command says 1 when some job failed (here: faults); the script 0 when it ran through.
    return run.exit in ((0, 1) if plan.runner == "cli" else (0,))


def run_sqlite(plan: Plan, url: str, where: Path, bound: float) -> list[Run]:
    """Run the batch on a SQLite journal: killed at the plan's moments, rerun until complete."""
    journal = str(where / "batch.journal")
    runs: list[Run] = []
    attempt = 0
    while True:
        flags = {"--resubmit-unknown"} if plan.resubmit_unknown[min(attempt, 3)] else set()
        flags |= short_timeout(plan)
        kill_at = plan.kills[attempt] if attempt < len(plan.kills) else None
        run = next_run(plan, url, journal, where, runs, flags, kill_at, bound)
        attempt += 1
        if run.killed:
            continue
        if not ok_exit(plan, run):
            raise Violation(f"run {len(runs) - 1} ended with status {run.exit}: {tail(run.stderr)}")
        break
    settle(plan, runs, lambda out: worker_argv(plan, url, journal, out, set()), where, bound)
    if plan.retry_failed:
        flags = {"--retry-failed"}
        run = next_run(plan, url, journal, where, runs, flags, plan.retry_kill or None, bound)
        if not run.killed and not ok_exit(plan, run):
            raise Violation(f"the retry_failed run ended with {run.exit}: {tail(run.stderr)}")
        if run.killed:  # run again, without retry_failed: what it began must be finished
            run = next_run(plan, url, journal, where, runs, set(), None, bound)
            if not ok_exit(plan, run):
                raise Violation(f"the rerun ended with {run.exit}: {tail(run.stderr)}")
    return runs


def next_run(
    plan: Plan,
    url: str,
    journal: str,
    where: Path,
    runs: list[Run],
    flags: set[str],
    kill_at: float | None,
    bound: float,
) -> Run:
    """The next worker of a SQLite round, with ``flags``: started, joined to ``runs`` and waited
    for (SIGKILLed ``kill_at`` seconds after its start, if given)."""
    out = output(plan, where, runs)
    run = Run(worker_argv(plan, url, journal, out, flags), out, flags)
    shared(plan, run, runs)
    runs.append(run)
    start(run, where)
    finish(run, kill_at, bound)
    return run


def output(plan: Plan, where: Path, runs: list[Run]) -> Path:
    """The next run's results file: the CLI's reruns append to one, as a user's would."""
    return where / ("results.jsonl" if plan.runner == "cli" else f"run-{len(runs)}.jsonl")


def shared(plan: Plan, run: Run, runs: list[Run]) -> None:
    """Mark a CLI run (about to join ``runs``) as one of several appending to one file."""
    if plan.runner == "cli":
        run.span, run.name = [0, -1], f"run-{len(runs)}"


def run_pg(plan: Plan, url: str, where: Path, bound: float, database: str) -> list[Run]:
    """Run the batch with 2-3 workers on one PostgreSQL journal; one is SIGKILLed."""
    # resubmit_unknown: a dead worker's unclear submits (and identify-face calls) go again.
    flags = {"--resubmit-unknown"} if plan.pg_resubmit else set()
    runs = []
    for n in range(plan.workers):
        out = where / f"worker-{n}.jsonl"
        argv = worker_argv(plan, url, database, out, flags | short_timeout(plan))
        runs.append(Run(argv, out, flags))
    for run in runs:
        start(run, where)
    victim = runs[plan.round % plan.workers]
    timers = []
    if plan.pause_at:
        timers = pause(runs[(plan.round + 1) % plan.workers], plan.pause_at, LEASE * 3)
    finish(victim, plan.victim_at, bound)
    if victim.killed and plan.replace:
        out = where / f"worker-{plan.workers}.jsonl"
        runs.append(Run(worker_argv(plan, url, database, out, flags), out, flags))
        start(runs[-1], where)
    try:
        for run in runs:
            if run is not victim:
                finish(run, None, bound)
    finally:
        for timer in timers:
            timer.cancel()
        for run in runs:  # a stopped worker must not stay stopped
            if run.paused and run.proc is not None and run.proc.poll() is None:
                run.proc.send_signal(signal.SIGCONT)
    for run in runs:
        # A worker paused past its lease stops at its next write: its jobs may be others' now.
        run.lapsed = run.paused and run.exit != 0 and "JournalError" in tail(run.stderr, 30)
    if all(run.gone for run in runs):
        # Every worker died or lapsed: the batch is run again, as its owner would.
        out = where / f"worker-{len(runs)}.jsonl"
        runs.append(Run(worker_argv(plan, url, database, out, flags), out, flags))
        start(runs[-1], where)
        finish(runs[-1], None, bound)
    for n, run in enumerate(runs):
        if not run.gone and run.exit != 0:
            raise Violation(f"worker {n} ended with status {run.exit}: {tail(run.stderr)}")
    settle(plan, runs, lambda out: worker_argv(plan, url, database, out, flags), where, bound)
    return runs


def short_timeout(plan: Plan) -> set[str]:
    """The script worker's flag for the plan's short poll timeout, if it has one."""
    return {f"--poll-timeout={plan.poll_timeout}"} if plan.poll_timeout else set()


def settle(
    plan: Plan, runs: list[Run], argv: Callable[[Path], list[str]], where: Path, bound: float
) -> None:
    """Rerun (with the long poll timeout) while the latest results hold TIMED_OUT ones."""
    for _ in range(3):
        latest: dict[str, str] = {}
        for run in runs:
            for line in read_lines(run):
                latest[line["key"]] = line["state"]
        if "timed_out" not in latest.values():
            return
        out = where / f"{runs[-1].out.stem.rstrip('0123456789')}{len(runs)}.jsonl"
        if plan.backend == "sqlite":
            out = output(plan, where, runs)
        run = Run(argv(out), out, set())
        if plan.backend == "sqlite":
            shared(plan, run, runs)
        runs.append(run)
        start(run, where)
        finish(run, None, bound)
        if not ok_exit(plan, run):
            raise Violation(f"run {len(runs) - 1} ended with status {run.exit}: {tail(run.stderr)}")


def pause(run: Run, at: float, seconds: float) -> list[threading.Timer]:
    """SIGSTOP ``run`` ``at`` seconds after its imports, SIGCONT it ``seconds`` later."""
    assert run.proc is not None
    proc = run.proc

    def resume() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            run.paused = True
            timers[1].start()

    delay = max(0.0, run.started + (STARTUP[0] if STARTUP else 0.0) + at - time.monotonic())
    timers = [threading.Timer(delay, stop), threading.Timer(seconds, resume)]
    timers[0].start()
    return timers


def export(journal: str) -> list[dict[str, Any]]:
    """Every job of a journal with its latest result (``kling-async results``)."""
    done = subprocess.run(
        [sys.executable, "-m", "kling_async", "results", "--journal", journal],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise Violation(f"kling-async results --journal {journal}: {done.stderr.strip()}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def check(
    plan: Plan,
    runs: list[Run],
    record: dict[str, Any],
    tally: Tally,
    journals: dict[str, list[dict[str, Any]]] | None = None,
) -> None:
    """Check the four promises against the server's record; raise :class:`Violation`.

    ``journals``: each journal's export, whose jobs must all be done, once, with their own task.
    """
    stage = "advanced-lip-sync" if plan.advanced else "lip-sync"
    # apimodels: identify-face is a task too (paid), found by its video (no job shares one).
    stages = {stage, "identify-face"} if plan.dialect == "apimodels" else {stage}
    # Exact: official advanced lip-sync finds a lost submit by its external id.
    exact = plan.advanced and plan.dialect != "apimodels"
    keys = {f"job-{n}" for n in range(plan.jobs)}
    if plan.rival:
        keys |= {f"rival-{n}" for n in range(plan.jobs // 2)}
    tasks = {t["task_id"]: t for t in record["tasks"] if t["stage"] in stages}
    sessions: dict[str, str | None] = record.get("sessions", {})
    videos = {line["key"]: line["video_url"] for line in [*job_lines(plan), *job_lines(plan, True)]}

    def own_session(key: str, task_id: str) -> bool:
        """Whether ``task_id`` is the session of an official identify-face call on ``key``'s
        video: a result names it when its lip-sync task never came to exist (JobResult)."""
        return task_id in sessions and sessions[task_id] == videos[key]

    owner: dict[str, str] = {}
    per_step: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for task_id, task in tasks.items():
        owner[task_id] = job_of(task)
        per_step[owner[task_id], task["stage"]].append(task_id)
    per_job = {key: ids for (key, step), ids in per_step.items() if step == stage}
    reports: dict[str, list[tuple[int, dict[str, Any]]]] = collections.defaultdict(list)
    for n, run in enumerate(runs):
        for line in read_lines(run):
            reports[line["key"]].append((n, line))
    tally.reports += sum(len(v) for v in reports.values())

    # Nothing lost: every job reported by some run.
    lost = sorted(keys - set(reports))
    if lost:
        evidence = {k: per_job.get(k, []) for k in lost[:5]}
        raise Violation(f"nothing lost: {len(lost)} jobs never reported, e.g. {evidence}")

    # No result not the job's own, and what it says is what the server says.
    for key, lines in reports.items():
        for n, line in lines:
            task_id = line["task_id"]
            if task_id is None:
                continue
            if task_id not in tasks and line["state"] != "succeeded" and own_session(key, task_id):
                continue  # (its identify-face session: no lip-sync task was made, or found)
            if task_id not in tasks:
                raise Violation(f"{key}: run {n} reported task {task_id}, not created: {line}")
            if owner[task_id] != key:
                raise Violation(
                    f"not the job's own: run {n} reported {owner[task_id]}'s task {task_id} "
                    f"for {key}: {line}"
                )
            state = tasks[task_id]["state"]
            if line["state"] == "succeeded" and (state, tasks[task_id]["stage"]) != (
                "succeed",
                stage,
            ):
                raise Violation(f"{key}: reported succeeded, the server says {state}: {line}")
            failed_task = line["state"] == "failed" and line["error_type"] == "TaskFailedError"
            if failed_task and state != "failed":
                raise Violation(f"{key}: reported a failed task, the server says {state}")

    # No job ends without its task while one exists (an unclear submit may end unknown).
    for key, lines in reports.items():
        last = latest(plan, runs, lines)
        # A task that failed is left behind by retry_failed, which submits the job afresh.
        retry = any("--retry-failed" in run.flags for run in runs)
        abandoned = {line["task_id"] for _, line in lines if retry and line["state"] == "failed"}
        if last["task_id"] not in tasks and set(per_job.get(key, ())) - abandoned:
            kind = last["error_type"]
            if exact or kind != "SubmitOutcomeUnknownError":
                raise Violation(
                    f"{key} ended without its task {per_job[key]} ({kind}: {last['error']})"
                )

    # Nothing paid twice: one task per job, but for the documented exceptions.
    for (key, step), ids in per_step.items():
        if len(ids) < 2:
            continue
        step_lines = [line for _, line in reports.get(key, [])]
        failed_before = any(not line_ok(line) for line in step_lines)
        retried = any("--retry-failed" in run.flags for run in runs)
        # retry_failed: one new task per earlier failure; resubmit_unknown (basic lip-sync
        # only: an advanced resend carries the same external id) in a run after an unclear
        # submit or a kill with a submit on the wire (PostgreSQL: workers run side by side).
        retry = retried and failed_before and len(ids) <= 2
        resend = not exact and resent_after_doubt(plan, runs, reports.get(key, []))
        # The rival batch is never killed nor retried: no exception applies to it.
        if (retry or resend) and not key.startswith("rival-"):
            tally.duplicates_allowed += 1
            newest = max(ids, key=lambda t: tasks[t]["created_at"])
            # (apimodels: a result may name the job's identify-face task instead)
            named = latest(plan, runs, reports[key])["task_id"]
            if retry and step == stage and named in ids and named != newest:
                raise Violation(
                    f"{key}: retry_failed made task {newest}, but its latest result names "
                    f"{named}: {latest(plan, runs, reports[key])}"
                )
            continue
        states = [tasks[t]["state"] for t in ids]
        raise Violation(
            f"paid twice: {key} has {len(ids)} {step} tasks {ids} ({states}); reported: {lines}"
        )
    # The journals: every job once, finished, with its own task.
    for journal, rows in (journals or {}).items():
        seen = collections.Counter(row["key"] for row in rows)
        twice = [key for key, times in seen.items() if times > 1]
        if twice:
            raise Violation(f"journal {journal} lists {twice[:3]} more than once")
        for row in rows:
            if row["key"] not in keys:
                raise Violation(f"journal {journal} lists an unknown job: {row}")
            if row["state"] in ("pending", "submitting", "running"):
                raise Violation(f"journal {journal}: {row['key']} is left {row['state']}: {row}")
            held = row["task_id"]
            theirs = held is not None and owner.get(held) != row["key"]
            if theirs and not (held not in tasks and own_session(row["key"], held)):
                raise Violation(f"journal {journal}: {row['key']} holds another's task: {row}")

    # SQLite: a result kept by the journal (a success, a failed task) is reported again by a
    # later run only when it was handed over in the last moment before a kill (the "taken"
    # marks are committed within a millisecond or two): never one handed over long before.
    if plan.backend == "sqlite":
        for key, lines in reports.items():
            for (n, line), (m, again) in itertools.pairwise(lines):
                if m != n and not held_at_a_kill(runs, n, line, runs[n + 1 : m + 1]):
                    ended = "was killed" if runs[n].killed else "completed"
                    raise Violation(
                        f"{key}: run {m} reported it again ({again}) though run {n} had handed"
                        f" over its kept result ({line}) and {ended}"
                    )

    # A run that completes (a surviving worker) reports each job at most once.
    for n, run in enumerate(runs):
        seen = collections.Counter(line["key"] for line in read_lines(run))
        twice = [key for key, times in seen.items() if times > 1]
        if not run.gone and twice:
            raise Violation(f"run {n} reported {len(twice)} jobs twice, e.g. {twice[:3]}")

    # The account's limit: never more tasks at once than max_in_flight (a task whose submit
    # ended unclear is no job's, and holds no slot: such rounds are not checked).
    unclear_any = any(
        line["error_type"] == "SubmitOutcomeUnknownError"
        for lines in reports.values()
        for _, line in lines
    )
    limit = plan.in_flight * (2 if plan.rival else 1)  # each batch has its own
    if not unclear_any and record["max_running_seen"] > limit:
        raise Violation(
            f"the account held {record['max_running_seen']} tasks at once, max_in_flight is {limit}"
        )
    tally.tasks += len(tasks)
    for lines in reports.values():
        for _, line in lines:
            tally.adopted += bool(line.get("adopted"))
            tally.unknown += line["error_type"] == "SubmitOutcomeUnknownError"
            tally.failed += line["state"] == "failed"
            tally.timed_out += line["state"] == "timed_out"


def latest(plan: Plan, runs: list[Run], lines: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """A job's latest result: the last run's (SQLite: one after the other, a killed one's
    too), the last a surviving worker handed over (PostgreSQL: side by side), else the last
    one seen."""
    if plan.backend == "pg":
        # The one handed over last: a worker that starts later runs again a job whose result
        # another worker reported but did not keep (an unknown outcome), and reports it anew.
        alive = [
            (line.get("at", 0.0), i, line) for i, (n, line) in enumerate(lines) if not runs[n].gone
        ]
        if alive:
            return max(alive)[2]
    return lines[-1][1]


def job_of(task: dict[str, Any]) -> str:
    """The key of the job whose request created ``task`` (its mark, else its video)."""
    text = json.dumps(task["input"])
    found = set(MARK.findall(text))
    if not found and task["stage"] == "identify-face":
        found = {("line", n) for n in VIDEO.findall(text)}
    if len(found) != 1:
        raise Violation(f"task {task['task_id']} belongs to no single job: {task['input']}")
    name, n = found.pop()
    return f"{'rival' if name == 'rival' else 'job'}-{n}"


def resent_after_doubt(
    plan: Plan, runs: list[Run], lines: list[tuple[int, dict[str, Any]]]
) -> bool:
    """Whether a run with resubmit_unknown followed a doubt about the job's submit."""
    unclear = {n for n, line in lines if line["error_type"] == "SubmitOutcomeUnknownError"}
    for n, run in enumerate(runs):
        if "--resubmit-unknown" not in run.flags:
            continue
        if plan.backend == "pg":
            if any(other.gone for other in runs) or unclear:
                return True
        elif any(runs[m].killed or m in unclear for m in range(n)):
            return True
    return False


def held_at_a_kill(runs: list[Run], n: int, line: dict[str, Any], later: list[Run]) -> bool:
    """Whether run ``n``'s result ``line`` may be reported again by the last of ``later``.

    ``later``: the runs after run ``n``, up to the one that reported it again.
    """
    kept = line["state"] == "succeeded" or line["error_type"] == "TaskFailedError"
    retried = any("--retry-failed" in run.flags for run in later)
    if not kept or (retried and not line_ok(line)):
        return True  # a rerun improves it, or retry_failed runs it again (maybe killed)
    if not runs[n].killed:
        return False
    # Handed over within half a second of the kill (the CLI's lines do not say when).
    return "at" not in line or runs[n].killed_at - line["at"] < 0.5


def line_ok(line: dict[str, Any]) -> bool:
    """Whether a results line is a success."""
    return line["state"] == "succeeded" and not line.get("error")


def soak_round(
    plan: Plan, tally: Tally, bound: float, keep: Path, keep_all: bool, pg_server: Any
) -> tuple[bool, str]:
    """Run and check one round; (passed, evidence)."""
    if not STARTUP:
        STARTUP.append(startup_seconds())
    where = Path(tempfile.mkdtemp(prefix=f"soak-{plan.seed}-{plan.round}-"))
    with open(where / "jobs.jsonl", "w") as jobs:
        for line in job_lines(plan):
            jobs.write(json.dumps(line) + "\n")
    server = Server(plan, where)
    runs: list[Run] = []
    rivals: list[Run] = []
    database = ""
    problem = ""
    try:
        if plan.rival:
            with open(where / "rival.jsonl", "w") as jobs:
                for line in job_lines(plan, rival=True):
                    jobs.write(json.dumps(line) + "\n")
            out = where / "rival-0.jsonl"
            journal = str(where / "rival.journal")
            rivals.append(Run(worker_argv(plan, server.url, journal, out, set(), True), out, set()))
            start(rivals[0], where)
        if plan.backend == "pg":
            database = pg_server.new_database()
            runs = run_pg(plan, server.url, where, bound, database)
        else:
            runs = run_sqlite(plan, server.url, where, bound)
        for rival in rivals:
            finish(rival, None, bound)
            if rival.exit != 0:
                raise Violation(f"the rival batch ended with {rival.exit}: {tail(rival.stderr)}")
    except Violation as exc:
        problem = str(exc)
    finally:
        runs += rivals
        for run in runs:
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
        record = server.stop()
    if not problem:
        try:
            journals = {"rival": export(str(where / "rival.journal"))} if rivals else {}
            journals["batch"] = export(database or str(where / "batch.journal"))
            save(where, plan, runs, journals)
            check(plan, runs, record, tally, journals)
        except Violation as exc:
            problem = str(exc)
    tally.rounds += 1
    tally.jobs += plan.jobs
    tally.runs += len(runs)
    tally.kills += sum(run.killed for run in runs)
    tally.lapses += sum(run.lapsed for run in runs)
    tally.faults.update(record["faults_hit"])
    tally.faults["task_failure"] += sum(
        1 for t in record["tasks"] if t["reason"] and "risk control" in t["reason"]
    )
    if problem or keep_all:
        kept = keep / where.name
        if kept != where:
            shutil.move(str(where), kept)
        if problem:
            return False, f"{problem}\n  (the round's files: {kept})"
    else:
        shutil.rmtree(where, ignore_errors=True)
    lapsed = sum(r.lapsed for r in runs)
    gone = f"{sum(r.killed for r in runs)} killed" + (f", {lapsed} lapsed" if lapsed else "")
    return True, f"{len(runs)} runs ({gone}), " + ", ".join(f"{r.seconds:.1f}s" for r in runs)


def save(where: Path, plan: Plan, runs: list[Run], journals: dict[str, Any]) -> None:
    """Keep what :func:`check` reads beside the round's files, for ``--recheck``."""
    ran = [
        {
            "out": r.out.name,
            "flags": sorted(r.flags),
            "killed": r.killed,
            "lapsed": r.lapsed,
            "killed_at": r.killed_at,
            "span": r.span,
        }
        for r in runs
    ]
    state = {"plan": asdict(plan), "runs": ran, "journals": journals}
    (where / "round.json").write_text(json.dumps(state))


def recheck(where: Path) -> int:
    """Check a kept round's files again (after a change to the checks)."""
    state = json.loads((where / "round.json").read_text())
    plan = Plan(**state["plan"])
    runs = [
        Run(
            argv=[],
            out=where / run["out"],
            flags=set(run["flags"]),
            killed=run["killed"],
            lapsed=run.get("lapsed", False),
            killed_at=run.get("killed_at", 0.0),
            span=run.get("span"),
        )
        for run in state["runs"]
    ]
    record = json.loads((where / "server.json").read_text())
    try:
        check(plan, runs, record, Tally(), state["journals"])
    except Violation as exc:
        print(f"seed {plan.seed} round {plan.round}: VIOLATION {exc}")
        return 1
    print(f"seed {plan.seed} round {plan.round}: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--backend", choices=["sqlite", "pg"], default="sqlite")
    parser.add_argument("--first-round", type=int, default=0, help="start at this round")
    parser.add_argument("--bound", type=float, default=120.0, help="seconds a run may take")
    parser.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--go-on", action="store_true", help="run every round despite failures")
    parser.add_argument("--keep-all", action="store_true", help="keep every round's files")
    parser.add_argument("--recheck", type=Path, help="check a kept round's files again")
    args = parser.parse_args(argv)
    if args.recheck:
        return recheck(args.recheck)
    pg_server = None
    if args.backend == "pg":
        from pg import PgServer

        pg_server = PgServer()
        pg_server.start()
    tally = Tally()
    began = time.monotonic()
    failures = 0
    try:
        for number in range(args.first_round, args.first_round + args.rounds):
            plan = draw(args.seed, number, args.jobs, args.backend)
            passed, evidence = soak_round(
                plan, tally, args.bound, args.keep, args.keep_all, pg_server
            )
            verdict = "ok" if passed else "VIOLATION"
            print(f"seed {args.seed} round {number}: {verdict} [{plan.describe()}] {evidence}")
            sys.stdout.flush()
            if not passed:
                failures += 1
                if not args.go_on:
                    break
    finally:
        if pg_server is not None:
            pg_server.stop()
    tally.wall = time.monotonic() - began
    print(f"soak seed {args.seed} ({args.backend}): {tally.line()}; {failures} violations")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        serve(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_worker":
        work(sys.argv[2:])
    else:
        sys.exit(main())
