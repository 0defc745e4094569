"""The batch journal: its file, resuming in-process, refusals, and a process killed mid-batch.

Everything runs against real things: SQLite files in a temporary directory, FakeKlingServer on
loopback, and (for the crash tests) a separate Python process killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from helpers import (
    WAV,
    apimodels_client,
    dmx_client,
    journal_job,
    kling_client,
    requests_sent,
    text_job,
)

import kling_async as ka
from kling_async._cli._connect import CliError, add_connection_options, make_client
from kling_async._resume import is_final
from kling_async.journal._codec import (
    REQUEST_FIELDS,
    RESULT_FIELDS,
    request_hash,
    result_from_json,
    result_to_json,
    snapshot_from_json,
    snapshot_to_json,
)
from kling_async.journal._export import read_jobs
from kling_async.journal._sqlite import Journal
from kling_async.journal._sqlite_log import fold
from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio

WORKER = Path(__file__).with_name("journal_worker.py")
META = {"dialect": "kling", "stage": "lip-sync", "base_url": "http://127.0.0.1:1"}


async def open_journal(path: Path, **overrides: Any) -> Journal:
    options: dict[str, Any] = {**META, **overrides}
    return await Journal.open(path, **options)


async def run(
    client: ka.KlingClient,
    jobs: Iterable[ka.LipSyncJob] | AsyncIterable[ka.LipSyncJob],
    journal: Path,
    **options: Any,
) -> list[ka.JobResult]:
    out = []
    with anyio.fail_after(20):
        async for result in client.run_batch(jobs, journal=journal, **options):
            out.append(result)
    return out


async def run_some(
    client: ka.KlingClient, jobs: Iterable[ka.LipSyncJob], journal: Path, count: int
) -> list[ka.JobResult]:
    """Take ``count`` results, then leave ``async with`` normally (all of them count as taken)."""
    out = []
    with anyio.fail_after(20):
        async with client.run_batch(jobs, journal=journal) as results:
            async for result in results:
                out.append(result)
                if len(out) == count:
                    break
    return out


def keys(results: Iterable[ka.JobResult]) -> list[str]:
    return sorted(r.key for r in results)


# -- the codec ---------------------------------------------------------------------------------


def test_request_hash_ignores_the_key_and_sees_every_other_field() -> None:
    base = text_job(1, key="a")
    assert request_hash(base) == request_hash(text_job(1, key="b"))
    assert request_hash(base) == request_hash(text_job(1))
    assert request_hash(base) != request_hash(text_job(2, key="a"))
    audio = ka.LipSyncJob.from_audio(video_url="https://e.com/v.mp4", audio_file=WAV)
    other = ka.LipSyncJob.from_audio(video_url="https://e.com/v.mp4", audio_file=WAV + b"\x00")
    assert request_hash(audio) != request_hash(other)
    fast = ka.LipSyncJob.from_text(video_url="https://e.com/v.mp4", text="x", voice_id="v")
    assert request_hash(fast) == request_hash(
        ka.LipSyncJob.from_text(
            video_url="https://e.com/v.mp4", text="x", voice_id="v", voice_speed=1
        )
    )


#: Hashes version 0.x wrote for these jobs: a journal's hash form may never change.
PINNED_HASHES = {
    "text": "cdb31b6c4b586c6496b9b24ac7b801ba3e1f45db88270e7ce26b501f924a1287",
    "audio bytes": "a1abd2bfee3deced79264a3cfa1376089530ea6d8fce9f7e70fcc30251cdad0e",
    "video id": "d00ac3398f7bdec6fcd662b70f733fb28df95b3b93ee07d10c4b77e71ecb7c1c",
}
PINNED_JOBS = {
    "text": text_job(1),
    "audio bytes": ka.LipSyncJob.from_audio(video_url="https://e.com/v.mp4", audio_file=WAV),
    "video id": journal_job(None),
}


def test_the_request_fields_are_every_field_of_a_job_but_its_key() -> None:
    # The log keeps a job's values in REQUEST_FIELDS' order: a new field needs a new operation.
    names = tuple(field.name for field in attrs.fields(ka.LipSyncJob) if field.name != "key")
    assert sorted(REQUEST_FIELDS) == sorted(names)


@pytest.mark.parametrize("name", sorted(PINNED_JOBS))
async def test_a_job_logged_by_its_values_folds_into_its_request_hash(
    tmp_path: Path, name: str
) -> None:
    job = PINNED_JOBS[name]
    assert request_hash(job) == PINNED_HASHES[name]
    journal = await open_journal(tmp_path / "j.sqlite")
    journal.begin("a", job)
    await journal.submitting("a", "lip-sync", 1.0)
    begun = journal.job("a")
    assert begun is not None and begun.request_hash is None  # hashed at the fold, not now
    await journal.close()
    again = await open_journal(tmp_path / "j.sqlite")
    record = again.job("a")
    await again.close()
    assert record is not None and record.request_hash == PINNED_HASHES[name]
    assert record.video_url == job.video_url


async def test_a_result_logged_by_its_values_folds_into_its_json(tmp_path: Path) -> None:
    result = ka.JobResult(
        key="a",
        task_id="7",
        state=ka.TaskState.FAILED,
        error=ka.ServerError("busy", status=500, code=5000, request_id="r-1"),
        submitted_at=1.5,
        finished_at=float("nan"),  # (a value JSON spells only as Python does: kept as before)
        polls=3,
        video_duration=4.2,
        units=1.0,
        balance_deduction=ka.BalanceDeduction(quota=2.0, list_price=None),
    )
    journal = await open_journal(tmp_path / "j.sqlite")
    journal.begin("a", text_job(1))
    await journal.finished(result, final=True)
    await journal.close()
    rows = read_as_a_crash_leaves_it(tmp_path / "j.sqlite", "SELECT result, final FROM jobs")
    assert rows == [(result_to_json(result), 1)]
    written = json.loads(rows[0][0])
    assert set(written) == set(RESULT_FIELDS)
    returned = {name: written[name] for name in RESULT_FIELDS[-5:]}
    assert returned == {
        "video_id": None,
        "video_duration": 4.2,
        "watermark_url": None,
        "units": 1.0,
        "balance_deduction": {"quota": 2.0, "list_price": None},
    }
    again = await open_journal(tmp_path / "j.sqlite")
    record = again.job("a")
    await again.close()
    assert record is not None and record.result is not None and record.final
    assert record.result.video_duration == 4.2 and str(record.result.error) == str(result.error)


@pytest.mark.parametrize(
    "error",
    [
        ka.TaskFailedError("there is no human in the video", task_id="7", code=1),
        ka.TaskTimedOutError("7", 30.0),
        ka.ServerError("busy", status=500, code=5000, request_id="r-1"),
        ka.ContentPolicyError("content policy", status=400, code=1301),
        ka.SubmitOutcomeUnknownError("lip-sync", cause=ka.TransportTimeout("slow")),
        ka.ValidationError("sound_end_time", "is required"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_results_come_back_with_the_same_error_class_and_text(error: ka.KlingError) -> None:
    result = ka.JobResult(
        key="k", task_id="7", state=ka.TaskState.FAILED, error=error, submitted_at=1.5, polls=3
    )
    back = result_from_json(result_to_json(result))
    assert back == result  # error is left out of equality...
    assert type(back.error) is type(error)  # ...so compare it here
    assert str(back.error) == str(error)
    assert back.error is not None and back.error.fatal == error.fatal


def test_unknown_error_class_comes_back_as_kling_error() -> None:
    text = result_to_json(
        ka.JobResult(key="k", task_id=None, state=ka.TaskState.FAILED, error=ka.KlingError("odd"))
    )
    back = result_from_json(text.replace('"KlingError"', '"NoSuchErrorAnyMore"'))
    assert type(back.error) is ka.KlingError and str(back.error) == "odd"


def test_snapshots_with_faces_round_trip() -> None:
    snapshot = ka.TaskSnapshot(
        task_id="s-1",
        state=ka.TaskState.SUCCEEDED,
        session_id="s-1",
        faces=(ka.Face(face_id="f1", start_ms=0, end_ms=5000), ka.Face(face_id="f2")),
        error_code="x",
    )
    assert snapshot_from_json(snapshot_to_json(snapshot)) == snapshot


def test_what_a_rerun_keeps() -> None:
    def result(state: ka.TaskState, error: ka.KlingError | None = None) -> ka.JobResult:
        return ka.JobResult(key="k", task_id=None, state=state, error=error)

    assert is_final(result(ka.TaskState.SUCCEEDED))
    assert is_final(result(ka.TaskState.FAILED, ka.TaskFailedError("no", task_id="1")))
    assert is_final(result(ka.TaskState.FAILED, ka.InvalidRequestError("bad", status=400)))
    assert not is_final(result(ka.TaskState.TIMED_OUT, ka.TaskTimedOutError("1", 1.0)))
    assert not is_final(result(ka.TaskState.FAILED, ka.SubmitOutcomeUnknownError("lip-sync")))
    assert not is_final(result(ka.TaskState.FAILED, ka.ConnectError("refused")))
    assert not is_final(result(ka.TaskState.FAILED, ka.RateLimitError("slow", status=429)))


# -- the journal file --------------------------------------------------------------------------


async def test_journal_keeps_stages_results_and_marks_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = await open_journal(path)
    journal.begin("a", journal_job("https://e.com/a.mp4"))
    journal.begin("b", journal_job(None))
    await journal.submitting("a", "lip-sync", 100.0)
    await journal.created("a", "lip-sync", "task-1")
    await journal.submitting("b", "identify-face", 101.0)
    face = ka.TaskSnapshot(
        task_id="s", state=ka.TaskState.SUCCEEDED, session_id="s", faces=(ka.Face(face_id="f"),)
    )
    await journal.created("b", "identify-face", "s", face)
    await journal.submitting("b", "advanced-lip-sync", 102.0)
    done = ka.JobResult(
        key="a",
        task_id="task-1",
        state=ka.TaskState.SUCCEEDED,
        video_urls=("https://e.com/out.mp4",),
    )
    await journal.finished(done, final=True)
    journal.reported("a")
    journal.begin("never-written", journal_job(None))  # no change: no row
    await journal.close()
    await journal.close()  # idempotent

    again = await open_journal(path)
    try:
        a, b = again.job("a"), again.job("b")
        assert a is not None and b is not None
        assert again.job("never-written") is None
        assert (
            a.request_hash == request_hash(journal_job("https://e.com/a.mp4"))
            and a.video_url == "https://e.com/a.mp4"
        )
        assert a.final and a.reported and a.result == done
        assert a.stages["lip-sync"].status == "created"
        assert a.stages["lip-sync"].task_id == "task-1"
        assert a.stages["lip-sync"].intent_at == 100.0
        assert b.result is None and not b.final
        assert b.stages["identify-face"].snapshot == face
        assert b.stages["advanced-lip-sync"].status == "submitting"
        assert b.stages["advanced-lip-sync"].task_id is None
        assert again.owner("task-1") == "a" and again.owner("nope") is None
        assert again.unresolved("x", "advanced-lip-sync", "u", 102.0, 60) == 0  # b has no URL
    finally:
        await again.close()


def read_as_a_crash_leaves_it(path: Path, query: str) -> list[tuple[Any, ...]]:
    """Run ``query`` on a copy of the journal and its write-ahead log (the file is locked)."""
    copy = path.with_name("copy.sqlite")
    copy.write_bytes(path.read_bytes())
    wal = Path(f"{path}-wal")
    if wal.exists():
        Path(f"{copy}-wal").write_bytes(wal.read_bytes())
    # closing(): a connection's own `with` commits but does not close (Python 3.13 warns).
    with contextlib.closing(sqlite3.connect(copy)) as conn:
        fold(conn, str(copy))  # the change log into the tables, as the next open does
        return conn.execute(query).fetchall()


async def test_every_submit_intent_is_committed_before_the_call_returns(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = await open_journal(path)
    journal.begin("a", journal_job(None))
    await journal.submitting("a", "lip-sync", 5.0)
    rows = read_as_a_crash_leaves_it(path, "SELECT key, stage, status, intent_at FROM stages")
    assert rows == [("a", "lip-sync", "submitting", 5.0)]
    await journal.close()


async def test_concurrent_writes_share_transactions(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path / "j.sqlite")
    for n in range(50):
        journal.begin(f"k{n}", journal_job(None))
    async with anyio.create_task_group() as group:
        for n in range(50):
            group.start_soon(journal.submitting, f"k{n}", "lip-sync", float(n))
    records = [journal.job(f"k{n}") for n in range(50)]
    assert all(r is not None and r.stages["lip-sync"].intent_at == n for n, r in enumerate(records))
    assert journal.transactions < 50  # group commit: writes that wait together commit together
    await journal.close()
    again = await open_journal(tmp_path / "j.sqlite")
    assert sum(1 for n in range(50) if again.job(f"k{n}") is not None) == 50
    await again.close()


async def test_a_cancelled_writer_still_gets_its_write_committed(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path / "j.sqlite")
    journal.begin("a", journal_job(None))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await journal.created("a", "lip-sync", "task-9")
    await journal.close()
    again = await open_journal(tmp_path / "j.sqlite")
    record = again.job("a")
    assert record is not None and record.stages["lip-sync"].task_id == "task-9"
    await again.close()


async def test_a_journal_in_use_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    first = await open_journal(path)
    with pytest.raises(ka.JournalError, match="another batch"):
        await open_journal(path, lock_timeout=0.05)
    await first.close()
    second = await open_journal(path, lock_timeout=0.05)  # free again once closed
    await second.close()


async def test_a_journal_of_another_server_or_dialect_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    await (await open_journal(path)).close()
    with pytest.raises(ka.ValidationError, match=r"journal: .* was written by a batch for kling"):
        await open_journal(path, base_url="http://elsewhere")
    with pytest.raises(ka.ValidationError, match="apimodels"):
        await open_journal(path, dialect="apimodels")


async def test_files_that_are_no_journal_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ka.JournalError, match="garbage"):
        await open_journal(garbage)
    other = tmp_path / "other.sqlite"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(ka.JournalError, match="layout version 0"):
        await open_journal(other)
    with pytest.raises(ka.JournalError):
        await open_journal(tmp_path / "no-such-dir" / "j.sqlite")


@pytest.mark.parametrize(
    "damage",
    [
        'UPDATE jobs SET result = \'{"key": "a"}\'',  # a result without its state
        'UPDATE stages SET snapshot = \'{"task_id": "t", "state": "odd"}\'',
        "INSERT OR REPLACE INTO meta VALUES ('clock_offset', 'soon')",
        "INSERT INTO events (changes) VALUES ('[[6, \"a\"], []]')",  # a change without its op
    ],
    ids=["result", "snapshot", "meta", "log"],
)
async def test_a_damaged_record_is_one_clear_error_and_leaves_the_file_free(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "dub.journal"
    journal = await open_journal(path)
    journal.begin("a", journal_job(None))
    await journal.submitting("a", "lip-sync", 1.0)
    done = ka.TaskState.SUCCEEDED
    await journal.created("a", "lip-sync", "t1", ka.TaskSnapshot(task_id="t1", state=done))
    await journal.finished(ka.JobResult(key="a", task_id="t1", state=done), final=True)
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        fold(conn, str(path))
        conn.execute(damage)
        conn.commit()
    wanted = rf"journal {path}: (unreadable record|unknown change)"
    for _ in range(2):
        started = anyio.current_time()
        # Before the fix: a damaged snapshot raised cattrs' own error, a damaged log an
        # IndexError, naming no file, and a damaged record kept the file locked: the second
        # open waited, then said "in use".
        with pytest.raises(ka.JournalError, match=wanted):
            await open_journal(path, lock_timeout=2.0)
        assert anyio.current_time() - started < 1.0
    if "meta" not in damage:  # (what kling-async results reads: the records, not the meta)
        with pytest.raises(ka.JournalError, match=wanted):
            await read_jobs(path)


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="needs file permissions that bind"
)
@pytest.mark.parametrize("what", ["file", "folder"])
async def test_a_journal_that_cannot_be_written_says_it_is_read_only(
    tmp_path: Path, what: str
) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    path = folder / "dub.journal"
    journal = await open_journal(path)
    journal.begin("a", journal_job(None))
    await journal.submitting("a", "lip-sync", 1.0)
    await journal.close()
    target = path if what == "file" else folder
    target.chmod(0o444 if what == "file" else 0o555)
    try:
        # Before the fix: "disk I/O error" (a read-only file) or "attempt to write a readonly
        # database" (a read-only folder): nothing said which, or that it was no disk fault.
        with pytest.raises(ka.JournalError, match=rf"\({target} is read-only: a batch writes"):
            await open_journal(path)
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)


async def test_a_journal_of_a_newer_layout_is_refused_also_by_its_readers(tmp_path: Path) -> None:
    path = tmp_path / "dub.journal"
    journal = await open_journal(path)
    journal.begin("a", journal_job(None))
    await journal.finished(
        ka.JobResult(key="a", task_id="t1", state=ka.TaskState.SUCCEEDED), final=True
    )
    await journal.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 4")  # what a newer kling_async may write
    with pytest.raises(ka.JournalError, match=rf"journal {path}: layout version 4"):
        await open_journal(path)
    # kling-async results / status read it too (before the fix: as if it were this version's).
    with pytest.raises(ka.JournalError, match=rf"journal {path}: layout version 4 is newer"):
        await read_jobs(path)


# -- resuming in-process -----------------------------------------------------------------------


async def test_resume_creates_nothing_twice_and_reports_every_job_once(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"line-{n}") for n in range(24)]
    async with FakeKlingServer(task_duration=0.05) as server:
        async with kling_client(server, max_in_flight=6) as client:
            first = await run_some(client, jobs, journal, 8)
            created_by_first = server.tasks_created
            second = await run(client, jobs, journal)
            third = await run(client, jobs, journal)  # everything reported: nothing to say
    assert 8 < created_by_first < 24  # the first run left tasks running, and jobs unsent
    assert server.tasks_created == 24
    assert keys(first + second) == sorted(j.key for j in jobs if j.key)
    assert not set(keys(first)) & set(keys(second))
    assert third == []
    assert all(r.ok for r in first + second)
    assert len({r.task_id for r in first + second}) == 24


async def test_breaking_out_of_a_bare_loop_reports_the_last_result_again(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"line-{n}") for n in range(6)]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=2) as client:
            first: list[ka.JobResult] = []
            async for result in client.run_batch(jobs, journal=journal):
                first.append(result)
                if len(first) == 3:
                    break  # no aclose: the batch cannot tell "done with it" from a failure
            second = await run(client, jobs, journal)
    assert server.tasks_created == 6
    assert set(keys(first)) & set(keys(second)) == {first[-1].key}
    assert set(keys(first)) | set(keys(second)) == {j.key for j in jobs}


async def test_an_exception_in_the_consumer_leaves_its_result_unreported(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"line-{n}") for n in range(4)]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=4) as client:
            taken: list[ka.JobResult] = []

            async def consume() -> None:
                async with client.run_batch(jobs, journal=journal) as results:
                    async for result in results:
                        taken.append(result)
                        if len(taken) == 2:
                            raise RuntimeError("disk full")

            with pytest.raises(RuntimeError, match="disk full"):
                await consume()
            await anyio.sleep(0.1)  # the other two finish on the server meanwhile
            before = requests_sent(server)
            again = await run(client, jobs, journal)
    assert keys(again) == sorted({j.key for j in jobs if j.key} - {taken[0].key})
    assert server.tasks_created == 4
    by_key = {r.key: r for r in again}
    assert by_key[taken[1].key] == taken[1]  # reported from the journal, as it was
    # Only the two tasks left running were asked about; the finished ones cost no request.
    assert requests_sent(server) - before <= 2 * 10


async def test_finished_jobs_are_reported_from_the_journal_without_a_request(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(3)]
    jobs.append(
        ka.LipSyncJob.from_text(
            video_url="https://e.com/no-human.mp4", text="hi", voice_id="v", key="bad"
        )
    )
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            first: list[ka.JobResult] = []

            async def consume() -> None:
                async with client.run_batch(jobs, journal=journal) as results:
                    async for result in results:
                        first.append(result)
                        if len(first) == len(jobs):
                            raise RuntimeError("crash before the last result was handled")

            with pytest.raises(RuntimeError, match="crash before"):
                await consume()
            before = requests_sent(server)
            again = await run(client, jobs, journal)
    assert requests_sent(server) == before  # nothing asked: all four were finished
    assert again == [first[-1]]
    failed = next(r for r in first if r.key == "bad")
    assert isinstance(failed.error, ka.TaskFailedError)


async def test_a_timed_out_job_is_tracked_again_not_resubmitted(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(3)]
    impatient = ka.PollPolicy(first_delay=0.01, max_interval=0.02, timeout=0.05)
    async with FakeKlingServer(task_duration=0.3) as server:
        async with kling_client(server, poll=impatient) as client:
            first = await run(client, jobs, journal)
        async with kling_client(server) as client:
            second = await run(client, jobs, journal)
    assert all(r.state is ka.TaskState.TIMED_OUT for r in first)
    assert all(r.ok for r in second)
    assert {r.task_id for r in first} == {r.task_id for r in second}
    assert server.tasks_created == 3


async def test_official_advanced_flow_resumes_without_repeating_identify_face(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "adv.journal"
    jobs = [
        ka.LipSyncJob.from_audio(
            video_url=f"https://e.com/v{n}.mp4",
            audio_url=f"https://e.com/a{n}.mp3",
            sound_end_time=3000,
            key=f"adv-{n}",
        )
        for n in range(8)
    ]
    async with FakeKlingServer(task_duration=0.1) as server:
        async with kling_client(server, advanced=True, max_in_flight=8) as client:
            first = await run_some(client, jobs, journal, 1)
            second = await run(client, jobs, journal)
    assert server.requests["identify-face"] == 8
    assert server.requests["advanced-submit"] == 8 == server.tasks_created
    assert keys(first + second) == sorted(j.key for j in jobs if j.key)
    assert all(r.ok for r in first + second)


# -- refusals ----------------------------------------------------------------------------------


async def test_duplicate_keys_are_refused_and_the_batch_stays_resumable(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"

    async def jobs() -> AsyncIterator[ka.LipSyncJob]:
        for n in range(4):
            yield text_job(n, key=f"k{n}")
        for _ in range(1000):  # the first four running (a fixed sleep was short under load)
            if server.tasks_created == 4:
                break
            await anyio.sleep(0.005)
        yield text_job(9, key="k1")

    async with FakeKlingServer(task_duration=0.3) as server:
        async with kling_client(server) as client:
            with pytest.raises(ka.ValidationError, match="'k1' names two jobs") as info:
                await run(client, jobs(), journal)
            assert info.value.field == "key"
            stopped_with = set(info.value.submitted_task_ids)
            assert server.tasks_created == 4
            # Index keys clash with explicit ones too.
            with pytest.raises(ka.ValidationError, match="'1' names two jobs"):
                await run(
                    client,
                    [text_job(0), text_job(1), text_job(2, key="1")],
                    tmp_path / "other.journal",
                )
            created = server.tasks_created
            results = await run(client, [text_job(n, key=f"k{n}") for n in range(4)], journal)
    assert stopped_with and stopped_with <= set(server.tasks)
    assert {r.task_id for r in results} >= stopped_with  # tracked, not resubmitted
    assert server.tasks_created == created


async def test_a_changed_job_under_an_old_key_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            await run(client, [text_job(1, key="a"), text_job(2, key="b")], journal)
            with pytest.raises(ka.ValidationError, match="'b' names another job"):
                await run(client, [text_job(1, key="a"), text_job(3, key="b")], journal)
            # The same jobs again are fine (and already reported).
            assert await run(client, [text_job(1, key="a"), text_job(2, key="b")], journal) == []
    assert server.tasks_created == 2


async def test_a_job_that_never_created_a_task_may_change(tmp_path: Path) -> None:
    journal = tmp_path / "adv.journal"
    broken = ka.LipSyncJob.from_audio(
        video_url="https://e.com/v.mp4", audio_url="https://e.com/a.mp3", key="a"
    )
    fixed = ka.LipSyncJob.from_audio(
        video_url="https://e.com/v.mp4",
        audio_url="https://e.com/a.mp3",
        sound_end_time=3000,
        key="a",
    )
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, advanced=True) as client:
            (first,) = await run(client, [broken], journal)
            (second,) = await run(client, [fixed], journal)
    assert isinstance(first.error, ka.ValidationError)  # sound_end_time is required there
    assert second.ok and server.tasks_created == 1


async def test_a_journal_is_refused_for_track_and_for_another_server(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    async with FakeKlingServer(task_duration=0.02) as one, FakeKlingServer() as two:
        async with kling_client(one) as client:
            await run(client, [text_job(1)], journal)
            with pytest.raises(ka.ValidationError, match="journal"):
                client._start(ka._batch.Batch(client._view(), task_ids=["1"], journal=journal))
        async with kling_client(two) as client:
            with pytest.raises(ka.ValidationError, match="was written by a batch for kling"):
                await run(client, [text_job(1)], journal)
    assert two.tasks_created == 0


# -- submits whose answer is lost --------------------------------------------------------------


@pytest.mark.parametrize("gateway", [False, True], ids=["official", "gateway"])
async def test_a_submit_whose_answer_was_cut_off_is_adopted_from_the_official_api_only(
    tmp_path: Path, gateway: bool
) -> None:
    # The official API's 200 whose body broke proves the task exists: the only task on its
    # video is it.  A gateway may send a refusal with HTTP 200, so its cut-off 200 proves
    # nothing: each job ends unknown, naming its own task as the candidate.
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(5)]
    async with FakeKlingServer(task_duration=0.02, faults=FaultPlan(lost_answer_rate=1)) as server:
        async with (dmx_client if gateway else kling_client)(server) as client:
            results = await run(client, jobs, journal)
    assert server.tasks_created == 5
    assert server.requests["list"] >= 1
    if not gateway:
        assert all(r.ok and r.adopted for r in results), [str(r.error) for r in results]
        assert {r.task_id for r in results} == set(server.tasks)
        return
    for result in results:
        assert isinstance(result.error, ka.SubmitOutcomeUnknownError), result.error
        assert not result.adopted and len(result.error.candidates) == 1


def test_only_the_official_api_answers_2xx_only_once_it_created_the_task() -> None:
    def gateway(client: ka.KlingClient) -> bool:
        return client.dialect.refusals_may_be_2xx

    assert not gateway(ka.KlingClient.kling(api_key="k"))
    assert not gateway(ka.KlingClient.kling(api_key="k", advanced=True))
    assert gateway(ka.KlingClient.kling(api_key="k", prefix="/kling"))
    assert gateway(ka.KlingClient.kling(api_key="k", base_url="https://gw.example", gateway=True))
    assert gateway(ka.KlingClient.dmxapi(api_key="k", prefix=""))
    assert gateway(ka.KlingClient.apimodels(api_key="k"))
    parser = argparse.ArgumentParser()
    add_connection_options(parser)
    for argv, expected in [([], False), (["--prefix", "/kling"], True), (["--gateway"], True)]:
        client = make_client(parser.parse_args(argv), creds={"api_key": "k"})
        assert gateway(client) is expected, argv
    with pytest.raises(CliError, match="--gateway does not apply to --dialect apimodels"):
        make_client(parser.parse_args(["--dialect", "apimodels", "--gateway"]), creds={})


async def test_a_timed_out_submit_names_its_candidate_and_is_not_guessed(tmp_path: Path) -> None:
    # A time-out proves nothing: the lone task on the video could be another client's.
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(3)]
    async with FakeKlingServer(task_duration=0.02, faults=FaultPlan(answer_delay=0.3)) as server:
        async with kling_client(server, timeouts=ka.Timeouts(total=0.1)) as client:
            results = await run(client, jobs, journal)
    assert server.tasks_created == 3
    for result in results:
        assert isinstance(result.error, ka.SubmitOutcomeUnknownError), result.error
        assert result.task_id is None and not result.adopted
        (candidate,) = result.error.candidates
        video = server.tasks[candidate].input["input"]["video_url"]
        assert video == f"https://example.com/clip-{result.key[1:]}.mp4"


async def test_two_lost_submits_on_one_video_stay_unknown(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    same = "https://example.com/shared.mp4"
    jobs = [
        ka.LipSyncJob.from_text(video_url=same, text=f"line {n}", voice_id="v", key=f"k{n}")
        for n in range(2)
    ]
    async with FakeKlingServer(task_duration=0.02, faults=FaultPlan(lost_answer_rate=1)) as server:
        async with kling_client(server, max_in_flight=2) as client:
            results = await run(client, jobs, journal)
    assert server.tasks_created == 2
    lost = {t.task_id for t in server.tasks.values() if t.input["input"]["video_url"] == same}
    for result in results:
        assert isinstance(result.error, ka.SubmitOutcomeUnknownError)
        assert "ambiguous" in str(result.error) and "resubmit_unknown=True" in str(result.error)
        assert isinstance(result.error.cause, ka.MalformedResponseError)
        assert result.error.candidates and set(result.error.candidates) <= lost  # none adopted


async def test_without_a_list_query_a_lost_submit_is_unknown_until_resubmitted(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "am.journal"
    jobs = [
        ka.LipSyncJob.from_audio(
            video_url=f"https://e.com/v{n}.mp4", audio_url=f"https://e.com/a{n}.mp3", key=f"k{n}"
        )
        for n in range(2)
    ]
    async with FakeKlingServer(task_duration=0.02) as server:
        server.faults = FaultPlan(answer_delay=0.3)
        async with apimodels_client(server, timeouts=ka.Timeouts(total=0.1)) as client:
            lost = await run(client, jobs, journal)
        server.faults = FaultPlan()
        async with apimodels_client(server) as client:
            still = await run(client, jobs, journal)
            created_before = server.tasks_created
            resent = await run(client, jobs, journal, resubmit_unknown=True)
    for result in lost + still:
        assert isinstance(result.error, ka.SubmitOutcomeUnknownError), result.error
        assert "no list query" in str(result.error)
    assert created_before == 2  # the lost identify-face tasks; nothing sent again until asked
    assert all(r.ok for r in resent)
    assert server.tasks_created == 2 + 2 * 2


# -- a process killed part-way -----------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def start_worker(
    server: FakeKlingServer,
    journal: Path,
    results: Path,
    count: int,
    in_flight: int,
    *flags: str,
) -> anyio.abc.Process:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [
        sys.executable,
        str(WORKER),
        server.url,
        str(journal),
        str(results),
        str(count),
        str(in_flight),
        *flags,
    ]
    return await anyio.open_process(argv, env=env, stdout=None, stderr=None)


async def kill_when(process: anyio.abc.Process, ready: Any, limit: float = 15.0) -> None:
    with anyio.fail_after(limit):
        while not ready():
            assert process.returncode is None, "the worker ended before the kill"
            await anyio.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert process.returncode == -signal.SIGKILL


async def finish(
    server: FakeKlingServer, journal: Path, results: Path, count: int, in_flight: int, *flags: str
) -> None:
    process = await start_worker(server, journal, results, count, in_flight, *flags)
    with anyio.fail_after(20):
        await process.wait()
    assert process.returncode == 0


def task_video(task: Any) -> str:
    if task.session is not None:
        return str(task.session.video_url)
    return str(task.input["input"]["video_url"])


def check_every_job_once(
    server: FakeKlingServer,
    first: Path,
    second: Path,
    count: int,
    unknown: Iterable[str] | None = (),
) -> None:
    """Every job reported, none twice, none with two tasks; errors only for ``unknown`` tasks
    (SubmitOutcomeUnknownError naming exactly that task; None: for any, each its own).
    """
    wanted = {f"job-{n}" for n in range(count)}
    assert server.tasks_created == count
    videos = [task_video(task) for task in server.tasks.values()]
    assert len(set(videos)) == count  # no job has two tasks
    before, after = read_results(first), read_results(second)
    after_keys = [line["key"] for line in after]
    assert len(after_keys) == len(set(after_keys))  # none twice in the run that finished
    assert {line["key"] for line in before} | set(after_keys) == wanted
    unnamed = [line for line in before + after if line["error"] and len(line["candidates"]) != 1]
    assert not unnamed, unnamed
    named = {line["candidates"][0]: line["key"] for line in before + after if line["error"]}
    if unknown is not None:
        assert set(named) == set(unknown)
    for task_id, key in named.items():  # each names its own task
        assert task_video(server.tasks[task_id]).endswith(f"/crash-{key[4:]}.mp4")
    # Reported by both runs: only the result the consumer held at the kill, and any taken in
    # the millisecond or two before it whose "taken" mark was not committed yet.
    assert len({line["key"] for line in before} & set(after_keys)) <= 2


async def test_killed_at_a_quiet_moment_and_rerun(tmp_path: Path) -> None:
    journal, first, second = tmp_path / "j", tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    count, in_flight = 30, 5
    async with FakeKlingServer(task_duration=0.2) as server:
        process = await start_worker(server, journal, first, count, in_flight)
        # Every slot holds a running task: no submit is between its intent and the server.
        await kill_when(
            process, lambda: len(read_results(first)) >= 10 and server.running == in_flight
        )
        assert server.tasks_created < count
        await finish(server, journal, second, count, in_flight)
        # A submit whose task was created but not yet answered at the kill is named, not
        # guessed (basic lip-sync has no external id to look up).
        check_every_job_once(server, first, second, count, unknown=None)


@pytest.mark.parametrize("advanced", [True, False], ids=["external-ids", "basic"])
async def test_killed_while_answers_are_on_the_way_and_rerun(
    tmp_path: Path, advanced: bool
) -> None:
    journal, first, second = tmp_path / "j", tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    count, in_flight, delay = 30, 5, 0.4
    flags = ("--advanced",) if advanced else ()
    async with FakeKlingServer(task_duration=0.02, faults=FaultPlan(answer_delay=delay)) as server:
        clock = anyio.current_time

        def unanswered() -> list[str]:
            # Created at least 50 ms ago and answered no sooner than 50 ms from now.
            return [
                task.task_id
                for task in server.tasks.values()
                if task.born + 0.05 <= clock() <= task.born + delay - 0.05
            ]

        process = await start_worker(server, journal, first, count, in_flight, *flags)
        # Every slot waits for the answer of a task the server has created.
        pending: list[str] = []

        def ready() -> bool:
            pending[:] = unanswered()
            return len(read_results(first)) >= 5 and len(pending) == in_flight

        await kill_when(process, ready)
        assert server.tasks_created < count
        known = {line["task_id"] for line in read_results(first)}
        assert not known & set(pending)
        await finish(server, journal, second, count, in_flight, *flags)
        if advanced:
            # Exact: each one looked up by its external id and tracked, none sent again.
            check_every_job_once(server, first, second, count)
            adopted = {line["task_id"] for line in read_results(second) if line["adopted"]}
            assert adopted == set(pending)
            assert server.requests["advanced-query"] >= in_flight
        else:
            # No external id, and a crash proves nothing: each is named, never guessed.
            check_every_job_once(server, first, second, count, unknown=pending)
            assert server.requests["list"] >= 1


async def test_closing_the_client_mid_batch_leaves_a_resumable_journal(tmp_path: Path) -> None:
    journal = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(10)]
    async with FakeKlingServer(task_duration=0.1) as server:
        async with kling_client(server, max_in_flight=4) as client:
            results = client.run_batch(jobs, journal=journal)
            first = await results.__anext__()
        # The client closed with the batch running: the journal was closed with it.
        async with kling_client(server, max_in_flight=4) as client:
            rest = await run(client, jobs, journal)
    assert server.tasks_created == 10
    assert first.key not in keys(rest) or len(rest) == 10  # the held one may come again
    assert set(keys(rest)) | {first.key} == {j.key for j in jobs}


async def test_a_stopping_batch_waits_for_submits_already_sent(tmp_path: Path) -> None:
    # apimodels has no list query: a submit cut off mid-flight could never be found again.
    journal = tmp_path / "am.journal"
    jobs = [
        ka.LipSyncJob.from_audio(
            video_url=f"https://e.com/v{n}.mp4", audio_url=f"https://e.com/a{n}.mp3", key=f"k{n}"
        )
        for n in range(6)
    ]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with apimodels_client(server, max_in_flight=3) as client:
            server.faults = FaultPlan(answer_delay=0.15)
            first = await run_some(client, jobs, journal, 1)
            server.faults = FaultPlan()
            rest = await run(client, jobs, journal)
    assert all(r.ok for r in first + rest), [str(r.error) for r in first + rest if r.error]
    assert keys(first + rest) == sorted(j.key for j in jobs if j.key)
    assert server.tasks_created == 2 * 6


async def test_a_missing_journal_directory_stops_the_batch_before_any_request(
    tmp_path: Path,
) -> None:
    async with FakeKlingServer() as server, kling_client(server) as client:
        with pytest.raises(ka.JournalError, match="no-such-dir"):
            await run(client, [text_job(1)], tmp_path / "no-such-dir" / "j")
    assert requests_sent(server) == 0
