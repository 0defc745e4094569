"""A journal on a full disk: one clear error naming the file, and nothing paid lost.

The disk fills for real: each scenario runs in a process of its own under a file size limit
(``RLIMIT_FSIZE``, which needs no privileges: a write past it fails with EFBIG, as one on a full
disk fails with ENOSPC).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE")


def run_script(script: str, *args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


# Opens a journal while no file may grow at all (its lock file cannot be written), twice, then
# once more with room again: prints each outcome.
OPEN_ON_A_FULL_DISK = """
    import resource, sys
    import anyio
    from kling_async.journal._sqlite import Journal

    async def attempt() -> None:
        try:
            journal = await Journal.open(
                sys.argv[1], dialect="kling", stage="lip-sync", base_url="http://127.0.0.1:1"
            )
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}")
        else:
            await journal.close()
            print("opened")

    async def main() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        await attempt()
        await attempt()
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        await attempt()

    anyio.run(main)
"""


def test_a_lock_file_that_cannot_be_written_is_one_clear_error_and_no_stale_lock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dub.journal"
    first, second, third = run_script(OPEN_ON_A_FULL_DISK, str(path))
    # Before the fix: a bare "OSError: [Errno 27] File too large" naming no file, and the lock
    # stayed taken, so that this very process was refused its own journal ("in use").
    wanted = f"JournalError: journal {path}: cannot write {path}.lock: File too large"
    assert first == wanted
    assert second == wanted
    assert third == "opened"


# A journaled batch whose disk fills once every task is created and recorded, before any ends:
# the results' own commits fail.  Prints what the consumer got and what the error said.
FULL_BEFORE_THE_RESULTS = """
    import json, os, resource, sys
    import anyio
    import kling_async as ka
    from kling_async.testing import FakeKlingServer
    from helpers import engine, kling_client, text_job

    async def main() -> None:
        path, count = sys.argv[1], int(sys.argv[2])
        jobs = [text_job(n, key=f"k{n}") for n in range(count)]
        got, error, running = [], None, []
        async with FakeKlingServer(task_duration=0.5) as server:
            async with kling_client(server, max_in_flight=count) as client:
                batch = client.run_batch(jobs, journal=path)

                async def fill_the_disk() -> None:
                    while engine(batch).resume is None:
                        await anyio.sleep(0.001)
                    resume = engine(batch).resume
                    assert resume is not None
                    journal = resume.journal
                    committer = journal._committer

                    def recorded() -> bool:  # every task id known, and committed
                        stages = [s for job in journal.jobs() for s in job.stages.values()]
                        created = [s for s in stages if s.status == "created"]
                        return len(created) == count and committer.committed == committer.queued

                    while not recorded():
                        await anyio.sleep(0.001)
                    # Every task id is on disk; nothing more may be written.
                    limit = os.path.getsize(f"{path}-wal")
                    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
                    print(json.dumps({"full": True, "done": len(got)}), flush=True)

                async with anyio.create_task_group() as group:
                    group.start_soon(fill_the_disk)
                    try:
                        async with batch:
                            async for result in batch:
                                got.append(result.task_id)
                    except ka.JournalError as exc:
                        error, running = str(exc), list(exc.submitted_task_ids)
            created = sorted(server.tasks)
            # Room again: the rerun reports every job and creates nothing.
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            async with kling_client(server, max_in_flight=count) as client:
                async with client.run_batch(jobs, journal=path) as batch:
                    again = [result.key async for result in batch if result.ok]
            after = server.tasks_created
        print(json.dumps({"got": got, "error": error, "running": running, "created": created}))
        print(json.dumps({"again": sorted(again), "created": after}))

    anyio.run(main)
"""


def test_results_whose_commit_fails_on_a_full_disk_are_still_handed_over(tmp_path: Path) -> None:
    path = tmp_path / "dub.journal"
    lines = run_script(FULL_BEFORE_THE_RESULTS, str(path), "6")
    full, outcome, rerun = (json.loads(line) for line in lines)
    assert full == {"full": True, "done": 0}  # filled before any result came
    assert outcome["error"].startswith(f"journal {path}: ")
    assert len(outcome["created"]) == 6
    # Every paid task is either handed over (its result known) or named as still running:
    # before the fix the results whose commit failed were dropped, named nowhere.
    assert sorted(outcome["got"] + outcome["running"]) == outcome["created"]
    assert len(outcome["got"]) >= 1
    assert rerun == {"again": [f"k{n}" for n in range(6)], "created": 6}  # nothing paid twice


# Records three jobs, closes (their changes stay in the log until the next open folds them),
# then opens again with room for the lock file only: the fold cannot be written.  Then once
# more with room: prints each outcome.
FOLD_ON_A_FULL_DISK = """
    import resource, sys
    import anyio
    from kling_async import LipSyncJob
    from kling_async.journal._sqlite import Journal

    META = dict(dialect="kling", stage="lip-sync", base_url="http://127.0.0.1:1")
    JOB = LipSyncJob.from_text(video_url="https://e.com/v.mp4", text="hi", voice_id="v1")

    async def main() -> None:
        journal = await Journal.open(sys.argv[1], **META)
        for key in ("a", "b", "c"):
            journal.begin(key, JOB)
            await journal.submitting(key, "lip-sync", 1.0)
            await journal.created(key, "lip-sync", f"task-{key}", adopted=True)
        await journal.close()
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))
        try:
            await Journal.open(sys.argv[1], **META)
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}")
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        journal = await Journal.open(sys.argv[1], **META)
        print(sorted(journal.owner(f"task-{key}") or "?" for key in ("a", "b", "c")))
        await journal.close()

    anyio.run(main)
"""


def test_a_fold_that_cannot_be_written_is_one_clear_error_and_loses_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dub.journal"
    failed, after = run_script(FOLD_ON_A_FULL_DISK, str(path))
    assert failed.startswith(f"JournalError: journal {path}: "), failed
    assert after == "['a', 'b', 'c']"  # the failed fold was rolled back: every task is known
