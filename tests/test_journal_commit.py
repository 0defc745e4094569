"""The journal's committer: transactions on the loop, fsyncs and checkpoints in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
from helpers import apimodels_client, engine, journal_job, kling_client, text_job

import kling_async as ka
from kling_async.dialects.kling import STAGE_ADVANCED_LIP_SYNC, STAGE_LIP_SYNC
from kling_async.journal._sqlite import CREATED, SUBMITTING, Journal
from kling_async.journal._sqlite_commit import Committer
from kling_async.journal._sqlite_log import JOB, fold
from kling_async.journal._sqlite_store import Store
from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio

META = {"dialect": "kling", "stage": "lip-sync", "base_url": "http://127.0.0.1:9"}


def job(key: str) -> tuple[object, ...]:
    """The change log's row that records job ``key``."""
    return (JOB, key, "h", None)


@contextlib.asynccontextmanager
async def committing(path: Path, **options: int) -> AsyncIterator[tuple[Store, Committer]]:
    store = Store(str(path), timeout=1.0)
    store.open(META)
    committer = Committer(store, **options)
    try:
        yield store, committer
    finally:
        committer.close()
        try:
            await anyio.to_thread.run_sync(committer.stop)
        finally:
            store.close()


def on_disk(path: Path) -> list[tuple[object, ...]]:
    # What another process, or a crash, would find (closing(): ``with`` alone never closes).
    with contextlib.closing(sqlite3.connect(path)) as conn:
        fold(conn, str(path))
        return conn.execute("SELECT key FROM jobs ORDER BY key").fetchall()


async def test_writers_waiting_together_share_one_transaction(tmp_path: Path) -> None:
    async with committing(tmp_path / "j.sqlite") as (store, committer):
        for n in range(3):
            committer.add(job(f"k{n}"))
        await committer.wait(3)
        assert committer.committed == 3
        assert committer.synced == 0  # nobody asked for the disk: no fsync
        # Locked to this connection (EXCLUSIVE): read through it, on the loop's thread.
        [(text,)] = store._conn.execute("SELECT changes FROM events").fetchall()
        assert [change[1] for change in json.loads(text)] == ["k0", "k1", "k2"]
        await committer.wait(2)  # committed already: no wait, no transaction
        assert store.transactions == 1
    assert on_disk(tmp_path / "j.sqlite") == [("k0",), ("k1",), ("k2",)]


async def test_a_durable_write_returns_once_the_wal_is_synced(tmp_path: Path) -> None:
    async with committing(tmp_path / "j.sqlite") as (_, committer):
        committer.add(job("a"))
        await committer.wait(1)
        assert (committer.committed, committer.synced) == (1, 0)
        committer.add(job("b"))
        await committer.wait(2, durable=True)
        assert committer.synced >= 2  # the thread fsynced the WAL after the commit
        # A durable wait for statements committed (not synced) earlier syncs them too.
        committer.add(job("c"))
        await committer.wait(3)
        await committer.wait(3, durable=True)
        assert committer.synced == 3


async def test_the_thread_checkpoints_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with committing(path, checkpoint_every=4) as (store, committer):
        for n in range(12):
            committer.add(job(f"k{n:02}"))
            await committer.wait(n + 1)  # one transaction each
        assert store.transactions == 12
        with anyio.fail_after(5):
            await until(lambda: store.checkpoints >= 2)
        # Copied into the file itself: what a reader without the WAL would find (the WAL is
        # the connection's: another connection cannot open the locked file meanwhile).
        assert (await anyio.Path(path).stat()).st_size > 4096 * 3


async def test_a_cancelled_writer_waits_for_its_commit_then_is_cancelled(tmp_path: Path) -> None:
    caught: list[bool] = []
    async with committing(tmp_path / "j.sqlite") as (store, committer):

        async def writer() -> None:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await committer.wait(1, durable=True)
                pytest.fail("the cancellation was swallowed")  # pragma: no cover
            caught.append(scope.cancelled_caught)
            assert committer.synced == 1  # the statement was on disk before the writer left

        committer.add(job("a"))
        # Hold the commit up, so the cancellation surely arrives while the writer waits for it
        # (a commit that wins the race leaves nothing to cancel: wait() has returned).
        store.write_lock.acquire()
        try:
            task = asyncio.ensure_future(writer())
            await anyio.sleep(0.05)
            assert not task.done()  # cancelled, yet waiting for its statement's commit
            assert committer.committed == 0
        finally:
            store.write_lock.release()
        with anyio.fail_after(5):
            await task
        assert caught == [True]


async def test_a_failed_transaction_fails_every_writer_after_it(tmp_path: Path) -> None:
    async with committing(tmp_path / "j.sqlite") as (store, committer):
        store._conn.execute("DROP TABLE events")  # (SQLite refuses the next transaction)
        committer.add(job("a"))
        with pytest.raises(ka.JournalError, match="no such table: events"):
            await committer.wait(1)
        committer.add(job("b"))
        with pytest.raises(ka.JournalError, match="no such table: events"):
            await committer.wait(2)  # the journal can no longer vouch for anything
        with pytest.raises(ka.JournalError, match="no such table: events"):
            await committer.wait(2, durable=True)


async def test_a_change_that_cannot_be_recorded_fails_its_writer(tmp_path: Path) -> None:
    async with committing(tmp_path / "j.sqlite") as (_, committer):
        committer.add((0, object()))  # (no JSON value: a bug of ours must fail, not hang)
        with pytest.raises(ka.JournalError, match="cannot record a change"):
            await committer.wait(1)


async def test_a_failed_sync_fails_the_durable_writer(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    async with committing(path) as (_, committer):
        committer.add(job("a"))
        await committer.wait(1)
        # The WAL vanishes under the journal (a disk taken away): the fsync cannot happen.
        await anyio.Path(f"{path}-wal").unlink()
        committer.add(job("b"))
        with pytest.raises(ka.JournalError, match=r"j\.sqlite-wal"):
            await committer.wait(2, durable=True)


# -- a submit's answer is committed, not waited for ----------------------------------------------


async def until(ready: Callable[[], bool]) -> None:
    while True:
        if ready():
            return
        await anyio.sleep(0.001)


def copy_as_crash_leaves_it(source: Path, target: Path) -> None:
    """Copy a journal whose committer is held off: the committed transactions and no others.

    With the store's write lock held nothing is being written, so the file and its WAL are what
    a process killed at this moment leaves behind (NORMAL commits survive the process dying).
    """
    for suffix in ("", "-wal"):
        part = Path(f"{source}{suffix}")
        if part.exists():
            Path(f"{target}{suffix}").write_bytes(part.read_bytes())


@pytest.mark.parametrize("advanced", [True, False], ids=["external-ids", "basic"])
async def test_a_crash_before_an_answered_task_id_is_on_disk_creates_no_second_task(
    tmp_path: Path, advanced: bool
) -> None:
    # The job goes on as soon as its submit is answered; the task id's commit runs behind it.
    # A crash in between leaves the intent alone: the rerun must resolve it, never resubmit.
    journal, crashed = tmp_path / "live.journal", tmp_path / "crashed.journal"
    if advanced:
        job = ka.LipSyncJob.from_audio(
            video_url="https://e.com/v.mp4",
            audio_url="https://e.com/a.mp3",
            sound_end_time=3000,
            key="k0",
        )
    else:
        job = text_job(0, key="k0")
    faults = FaultPlan(answer_delay=0.05)
    async with FakeKlingServer(task_duration=0.3, faults=faults) as server:
        async with kling_client(server, advanced=advanced) as client:
            with anyio.fail_after(10):
                async with client.run_batch([job], journal=journal) as batch:
                    await until(lambda: server.tasks_created > 0)  # its intent was on disk
                    resume = engine(batch).resume  # (the live journal: held off, not replaced)
                    assert resume is not None
                    assert isinstance(resume.journal, Journal)  # a file path: SQLite
                    store = resume.journal._store
                    await until(lambda: store.write_lock.acquire(blocking=False))
                    try:
                        record = resume.journal.job("k0")
                        assert record is not None
                        stage = STAGE_ADVANCED_LIP_SYNC if advanced else STAGE_LIP_SYNC
                        # Answered (memory says so at once); its commit is held off.
                        await until(lambda: record.stages[stage].status == CREATED)
                        copy_as_crash_leaves_it(journal, crashed)
                    finally:
                        store.write_lock.release()
                    [first] = [result async for result in batch]
            assert first.ok
            conn = sqlite3.connect(crashed)  # the window was hit: the intent alone
            try:
                fold(conn, str(crashed))
                statuses = dict(conn.execute("SELECT stage, status FROM stages").fetchall())
            finally:
                conn.close()
            assert "submitting" in statuses.values(), statuses
            async with kling_client(server, advanced=advanced) as client:
                with anyio.fail_after(10):
                    [again] = [r async for r in client.run_batch([job], journal=crashed)]
    assert server.tasks_created == 1  # no second task
    if advanced:  # exact: found by its external id, and taken
        assert again.ok and again.adopted and again.task_id == first.task_id
    else:  # a crash proves nothing: named, never guessed, never sent again
        assert isinstance(again.error, ka.SubmitOutcomeUnknownError)
        assert list(again.error.candidates) == [first.task_id]


async def test_a_batch_stopped_while_an_intent_is_committed_never_sends_it(
    tmp_path: Path,
) -> None:
    # The stop arrives while a submit's intent waits for its commit (held off here): the
    # request must not leave, and the journal must say so, or the rerun takes the intent for a
    # submit whose answer was lost (apimodels cannot look one up: the job would fail unknown).
    journal = tmp_path / "am.journal"
    job = ka.LipSyncJob.from_audio(
        video_url="https://e.com/v.mp4", audio_url="https://e.com/a.mp3", key="k0"
    )
    async with FakeKlingServer(task_duration=0.02) as server:
        async with apimodels_client(server) as client:
            with anyio.fail_after(10):
                async with client.run_batch([job], journal=journal) as batch:
                    control = engine(batch)
                    await until(lambda: control.resume is not None)
                    resume = control.resume
                    assert resume is not None
                    assert isinstance(resume.journal, Journal)  # a file path: SQLite
                    store = resume.journal._store
                    # Transactions run on this thread: nothing is being written right now.
                    assert store.write_lock.acquire(blocking=False)
                    try:
                        await until(lambda: intents(resume.journal.job("k0")) == [SUBMITTING])
                        control.cancel()
                        await anyio.sleep(0.05)  # the runner is cancelled while it waits
                    finally:
                        store.write_lock.release()
            assert server.tasks_created == 0, server.requests  # the request never left
            async with apimodels_client(server) as client:
                with anyio.fail_after(10):
                    [again] = [r async for r in client.run_batch([job], journal=journal)]
    assert again.ok, again.error  # sent now, once (before the fix: SubmitOutcomeUnknownError)
    assert server.tasks_created == 2  # identify-face and lip-sync, each once


def intents(record: object) -> list[str]:
    stages = getattr(record, "stages", {})
    return [stage.status for stage in stages.values()]


async def test_a_journal_whose_last_transaction_fails_still_releases_its_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite"
    journal = await Journal.open(path, dialect="kling", stage="lip-sync", base_url="http://x")
    journal.begin("a", journal_job(None))
    journal.reported("a")  # (queued, not waited for)
    journal._store._conn.execute("DROP TABLE events")  # SQLite refuses the last transaction
    with pytest.raises(ka.JournalError, match="no such table: events"):
        await journal.close()
    # Released all the same: the next batch opens it (its open recreates the missing log).
    again = await Journal.open(path, dialect="kling", stage="lip-sync", base_url="http://x")
    await again.close()


async def test_a_failed_transaction_nobody_waited_for_fails_the_close(tmp_path: Path) -> None:
    # Marks, charges and answered task ids are not waited for: when only their transaction
    # fails, no writer hears of it, and the batch must not end as if its journal were current
    # (before the fix close() returned quietly and a rerun reported those results again).
    path = tmp_path / "j.sqlite"
    journal = await Journal.open(path, dialect="kling", stage="lip-sync", base_url="http://x")
    journal.begin("a", journal_job(None))
    journal.charge("a", 1.5, False)  # (queued, not waited for)
    journal._store._conn.execute("DROP TABLE events")  # SQLite refuses that transaction
    committer = journal._committer
    with anyio.fail_after(5):  # (the loop commits it a moment later: it fails)
        await until(lambda: committer.committed > 0 or committer._error is not None)
    assert committer._error is not None
    with pytest.raises(ka.JournalError, match="no such table: events"):
        await journal.close()
    again = await Journal.open(path, dialect="kling", stage="lip-sync", base_url="http://x")
    await again.close()  # released all the same
