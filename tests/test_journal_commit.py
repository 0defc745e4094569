"""The journal's committer: one thread of its own commits what writers queue (group commit)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import anyio
import pytest

import kling_async as ka
from kling_async._journal_store import Committer, Store

pytestmark = pytest.mark.anyio

META = {"dialect": "kling", "stage": "lip-sync", "base_url": "http://127.0.0.1:9"}


def open_store(path: Path) -> Store:
    store = Store(str(path), timeout=1.0)
    store.open(META)
    return store


def on_disk(path: Path) -> list[tuple[object, ...]]:
    # What another process, or a crash, would find (closing(): ``with`` alone never closes).
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT key FROM jobs ORDER BY key").fetchall()


async def test_a_writer_returns_once_its_statements_are_on_disk(tmp_path: Path) -> None:
    store = open_store(tmp_path / "j.sqlite")
    committer = Committer(store)
    try:
        for n in range(3):
            store.add(
                "INSERT INTO jobs (key, request_hash) VALUES (?, 'h')", (f"k{n}",), durable=True
            )
        await committer.wait(3)
        assert store.committed == 3
        # Locked to this connection (EXCLUSIVE): read through it, on the loop's thread now idle.
        rows = store._conn.execute("SELECT key FROM jobs ORDER BY key").fetchall()
        assert rows == [("k0",), ("k1",), ("k2",)]
        await committer.wait(2)  # committed already: no wait, no transaction
        assert store.transactions == 1
    finally:
        await anyio.to_thread.run_sync(committer.stop)
        store.close()
    assert on_disk(tmp_path / "j.sqlite") == [("k0",), ("k1",), ("k2",)]


async def test_a_cancelled_writer_waits_for_its_commit_then_is_cancelled(tmp_path: Path) -> None:
    store = open_store(tmp_path / "j.sqlite")
    committer = Committer(store)
    try:
        store.add("INSERT INTO jobs (key, request_hash) VALUES ('a', 'h')", (), durable=True)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await committer.wait(1)
            pytest.fail("the cancellation was swallowed")  # pragma: no cover
        assert scope.cancelled_caught
        assert store.committed == 1  # the statement was committed before the writer left
    finally:
        await anyio.to_thread.run_sync(committer.stop)
        store.close()


async def test_a_failed_transaction_fails_every_writer_after_it(tmp_path: Path) -> None:
    store = open_store(tmp_path / "j.sqlite")
    committer = Committer(store)
    try:
        store.add("INSERT INTO no_such_table VALUES (1)", (), durable=False)
        with pytest.raises(ka.JournalError, match="no_such_table"):
            await committer.wait(1)
        store.add("INSERT INTO jobs (key, request_hash) VALUES ('b', 'h')", (), durable=False)
        with pytest.raises(ka.JournalError, match="no_such_table"):
            await committer.wait(2)  # the journal can no longer vouch for anything
    finally:
        await anyio.to_thread.run_sync(committer.stop)
        with pytest.raises(ka.JournalError):
            store.close()
