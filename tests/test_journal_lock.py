"""One batch per journal: a second process is refused at once, naming the holder."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from helpers import kling_client, text_job

import kling_async as ka
from kling_async.journal._sqlite import Journal
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio


async def open_journal(path: Path) -> Journal:
    """The journal at ``path`` for a kling batch (the server is never contacted)."""
    return await Journal.open(
        path, dialect="kling", stage="lip-sync", base_url="http://127.0.0.1:1"
    )


# Opens the journal in another process and prints how long the refusal took, then the error.
CONTENDER = textwrap.dedent(
    """
    import sys, time
    import anyio
    from kling_async import JournalError
    from kling_async.journal._sqlite import Journal

    async def main() -> None:
        started = time.monotonic()
        try:
            journal = await Journal.open(
                sys.argv[1], dialect="kling", stage="lip-sync", base_url="http://127.0.0.1:1"
            )
        except JournalError as exc:
            print(f"{time.monotonic() - started:.3f}")
            print(exc)
        else:
            await journal.close()
            print("opened")

    anyio.run(main)
    """
)


def contend(path: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", CONTENDER, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.splitlines()


async def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "dub.journal"
    journal = await open_journal(path)
    try:
        took, message = await anyio.to_thread.run_sync(contend, path)
    finally:
        await journal.close()
    assert float(took) < 1.0
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "in use by another batch" in message
    assert await anyio.to_thread.run_sync(contend, path) == ["opened"]  # free once closed


async def test_a_batch_is_refused_while_another_process_runs_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "dub.journal"
    holder = textwrap.dedent(
        """
        import sys, anyio
        from kling_async.journal._sqlite import Journal

        async def main() -> None:
            journal = await Journal.open(
                sys.argv[1], dialect="kling", stage="lip-sync", base_url=sys.argv[2]
            )
            print("held", flush=True)
            sys.stdin.readline()
            await journal.close()

        anyio.run(main)
        """
    )
    async with FakeKlingServer() as server:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        argv = [sys.executable, "-c", holder, str(path), server.url]
        async with await anyio.open_process(argv, env=env) as process:
            assert process.stdout is not None and process.stdin is not None
            with anyio.fail_after(20):
                assert (await process.stdout.receive()).startswith(b"held")
            async with kling_client(server) as client:
                started = anyio.current_time()
                with pytest.raises(ka.JournalError, match=f"pid {process.pid} on host"):
                    async for _ in client.run_batch([text_job(1)], journal=path):
                        pass
                assert anyio.current_time() - started < 1.0
            await process.stdin.send(b"\n")
            await process.wait()
        assert server.tasks_created == 0


async def test_a_journal_whose_jobs_were_all_reported_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dub.journal"
    jobs = [text_job(n, key=f"k{n}") for n in range(3)] + [
        ka.LipSyncJob.from_text(
            video_url="https://example.com/no-human.mp4", text="x", voice_id="v", key="bad"
        )
    ]
    async with FakeKlingServer(task_duration=0.02) as server, kling_client(server) as client:
        first = [r async for r in client.run_batch(jobs, journal=path)]
        with caplog.at_level(logging.WARNING, logger="kling_async"):
            again = [r async for r in client.run_batch(jobs, journal=path)]
    assert len(first) == 4 and sum(not r.ok for r in first) == 1
    assert again == []
    assert "all 4 jobs already reported, 1 failed" in caplog.text


async def test_a_version_1_journal_is_upgraded_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "old.journal"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE jobs (key TEXT PRIMARY KEY, request_hash TEXT NOT NULL, video_url TEXT,
            result TEXT, final INTEGER NOT NULL DEFAULT 0, reported INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE stages (key TEXT NOT NULL REFERENCES jobs(key), stage TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('submitting', 'created', 'refused')),
            intent_at REAL NOT NULL, task_id TEXT, snapshot TEXT, PRIMARY KEY (key, stage));
        INSERT INTO meta VALUES ('dialect', 'kling'), ('stage', 'lip-sync'),
            ('base_url', 'http://127.0.0.1:1');
        INSERT INTO jobs (key, request_hash, video_url) VALUES ('k1', 'h', 'https://e.com/v.mp4');
        INSERT INTO stages VALUES ('k1', 'lip-sync', 'created', 12.5, '777', NULL);
        PRAGMA user_version=1;
        """
    )
    conn.close()
    journal = await open_journal(path)
    try:
        record = journal.job("k1")
        assert record is not None and record.stages["lip-sync"].task_id == "777"
        assert record.stages["lip-sync"].external_id is None
        assert not record.stages["lip-sync"].adopted
        batch_id = journal.batch_id
        await journal.created("k1", "lip-sync", "778", adopted=True)
    finally:
        await journal.close()
    again = await open_journal(path)
    try:
        assert again.batch_id == batch_id  # kept from the first opening
        record = again.job("k1")
        assert record is not None
        stage = record.stages["lip-sync"]
        assert (stage.task_id, stage.adopted) == ("778", True)
    finally:
        await again.close()
