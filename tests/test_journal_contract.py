"""One contract, two backends: every test here runs on a SQLite file and on a real PostgreSQL.

What a batch asks of its journal (kling_async.journal.JournalBackend): a submit's intent is
committed before the call returns, task ids and results are kept, a cancelled writer's write
still lands, a journal of another server is refused, owners and unresolved submits are known.
What was written is read back from outside, as ``kling-async results`` reads it.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import journal_job

import kling_async as ka
from kling_async.journal import JournalBackend, PostgresJournal, open_journal
from kling_async.journal._codec import request_hash
from kling_async.journal._export import read_jobs
from kling_async.journal._sqlite import JournalJob

pytestmark = pytest.mark.anyio

META = {"dialect": "kling", "stage": "lip-sync", "base_url": "http://127.0.0.1:1"}

Opener = Callable[..., Awaitable[JournalBackend]]


class Backend:
    """Opens journals of one kind at one place, and reads them back as a crash leaves them."""

    def __init__(self, kind: str, target: str | Path, tmp: Path) -> None:
        self.kind = kind
        self.target = target
        self._tmp = tmp

    async def open(self, **overrides: Any) -> JournalBackend:
        options: dict[str, Any] = {**META, "max_in_flight": 4, **overrides}
        target: Any = self.target
        if self.kind == "postgres":
            target = PostgresJournal(url=str(self.target), lease=5.0, renew=1.0)
        return await open_journal(target, **options)

    async def read(self) -> dict[str, JournalJob]:
        """Every job as another process would find it now (the journal may still be open)."""
        source: Any = self.target
        if self.kind == "sqlite":
            # The open file is locked: read a copy of it and of its write-ahead log.
            source = self._tmp / "copy.sqlite"
            copy_as_a_crash_leaves_it(Path(self.target), source)
        return {job.key: job for job in await read_jobs(source)}


def copy_as_a_crash_leaves_it(path: Path, copy: Path) -> None:
    Path(f"{copy}-wal").unlink(missing_ok=True)
    shutil.copyfile(path, copy)
    wal = Path(f"{path}-wal")
    if wal.exists():
        shutil.copyfile(wal, Path(f"{copy}-wal"))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgres":
        return Backend("postgres", request.getfixturevalue("pg_url"), tmp_path)
    return Backend("sqlite", tmp_path / "j.sqlite", tmp_path)


async def test_intents_task_ids_results_and_marks_are_kept(backend: Backend) -> None:
    journal = await backend.open()
    journal.begin("a", journal_job("https://e.com/a.mp4"))
    journal.begin("b", journal_job(None))
    await journal.submitting("a", "lip-sync", 100.0)
    seen = await backend.read()  # committed before the call returned
    assert seen["a"].stages["lip-sync"].status == "submitting"
    assert seen["a"].stages["lip-sync"].intent_at == 100.0
    await journal.created("a", "lip-sync", "task-1")
    await journal.submitting("b", "identify-face", 101.0)
    face = ka.TaskSnapshot(
        task_id="s", state=ka.TaskState.SUCCEEDED, session_id="s", faces=(ka.Face(face_id="f"),)
    )
    await journal.created("b", "identify-face", "s", face)
    await journal.submitting("b", "advanced-lip-sync", 102.0)
    done = ka.JobResult(
        key="a", task_id="task-1", state=ka.TaskState.SUCCEEDED, video_urls=("https://e/o.mp4",)
    )
    await journal.finished(done, final=True)
    journal.reported("a")
    journal.begin("never-written", journal_job(None))
    assert journal.owner("task-1") == "a" and journal.owner("nope") is None
    await journal.close()
    await journal.close()  # idempotent

    jobs = await backend.read()
    assert set(jobs) == {"a", "b"}
    a, b = jobs["a"], jobs["b"]
    assert (
        a.request_hash == request_hash(journal_job("https://e.com/a.mp4"))
        and a.video_url == "https://e.com/a.mp4"
    )
    assert a.final and a.reported and a.result == done
    assert a.stages["lip-sync"].status == "created" and a.stages["lip-sync"].task_id == "task-1"
    assert a.stages["lip-sync"].intent_at == 100.0
    assert b.result is None and not b.final
    assert b.stages["identify-face"].snapshot == face
    assert b.stages["advanced-lip-sync"].status == "submitting"


async def test_a_refusal_clears_the_intent_and_a_job_may_start_over(backend: Backend) -> None:
    journal = await backend.open()
    journal.begin("a", journal_job("https://e.com/a.mp4"))
    await journal.submitting("a", "lip-sync", 1.0)
    await journal.refused("a", "lip-sync")
    await journal.refused("a", "lip-sync")  # nothing in flight any more: no change
    record = journal.job("a")
    assert record is not None and not record.may_have_task
    journal.begin("a", journal_job("https://e.com/a2.mp4"))  # it created nothing: may change
    await journal.submitting("a", "lip-sync", 2.0)
    await journal.close()
    (job,) = (await backend.read()).values()
    assert (
        job.request_hash == request_hash(journal_job("https://e.com/a2.mp4"))
        and job.video_url == "https://e.com/a2.mp4"
    )
    assert job.stages["lip-sync"].status == "submitting" and job.stages["lip-sync"].intent_at == 2


async def test_concurrent_writes_all_land(backend: Backend) -> None:
    journal = await backend.open()
    for n in range(40):
        journal.begin(f"k{n}", journal_job(None))
    async with anyio.create_task_group() as group:
        for n in range(40):
            group.start_soon(journal.submitting, f"k{n}", "lip-sync", float(n))
    assert journal.transactions >= 1
    jobs = await backend.read()
    assert {key: job.stages["lip-sync"].intent_at for key, job in jobs.items()} == {
        f"k{n}": float(n) for n in range(40)
    }
    await journal.close()


async def test_a_cancelled_writer_still_gets_its_write_committed(backend: Backend) -> None:
    journal = await backend.open()
    journal.begin("a", journal_job(None))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await journal.created("a", "lip-sync", "task-9")
    await journal.close()
    assert (await backend.read())["a"].stages["lip-sync"].task_id == "task-9"


async def test_a_journal_of_another_server_or_dialect_is_refused(backend: Backend) -> None:
    await (await backend.open()).close()
    with pytest.raises(ka.ValidationError, match=r"journal: .* was written by a batch for kling"):
        await backend.open(base_url="http://elsewhere")
    with pytest.raises(ka.ValidationError, match="apimodels"):
        await backend.open(dialect="apimodels")


async def test_unanswered_submits_on_one_video_are_counted(backend: Backend) -> None:
    journal = await backend.open()
    for key in ("a", "b", "c"):
        journal.begin(key, journal_job("https://e.com/same.mp4"))
    await journal.submitting("a", "lip-sync", 100.0)
    await journal.submitting("b", "lip-sync", 130.0)
    await journal.submitting("c", "lip-sync", 500.0)
    assert journal.unresolved("a", "lip-sync", "https://e.com/same.mp4", 100.0, 60.0) == 1
    assert journal.unresolved("c", "lip-sync", "https://e.com/same.mp4", 500.0, 60.0) == 0
    assert journal.unresolved("x", "lip-sync", "https://e.com/other.mp4", 100.0, 60.0) == 0
    await journal.created("b", "lip-sync", "t-b")
    assert journal.unresolved("a", "lip-sync", "https://e.com/same.mp4", 100.0, 60.0) == 0
    await journal.close()


async def test_writing_after_close_is_an_error(backend: Backend) -> None:
    journal = await backend.open()
    journal.begin("a", journal_job(None))
    await journal.close()
    with pytest.raises(ka.JournalError, match="closed"):
        await journal.submitting("a", "lip-sync", 1.0)


async def test_external_ids_adoption_and_the_batch_identity_are_kept(backend: Backend) -> None:
    journal = await backend.open()
    batch_id = journal.batch_id
    assert len(batch_id) >= 16
    journal.begin("a", journal_job("https://e.com/a.mp4"))
    await journal.submitting("a", "lip-sync", 7.0, external_id="ka-x-a")
    await journal.created("a", "lip-sync", "task-a", adopted=True)
    journal.set_clock_offset(-1.5, 2.0)
    journal.confirm_external_ids()
    assert [job.key for job in journal.jobs()] == ["a"]
    await journal.close()

    again = await backend.open()
    assert again.batch_id == batch_id  # every run (and every worker) derives the same ids
    assert again.clock_offset == (-1.5, 2.0)
    assert again.external_ids_confirmed
    await again.close()
    stage = (await backend.read())["a"].stages["lip-sync"]
    assert stage.external_id == "ka-x-a" and stage.adopted and stage.task_id == "task-a"
