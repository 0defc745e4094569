"""The SQLite journal's change log: a running batch appends its changes as rows of ``events``.

A batch writes each change of a job (its record, a submit's intent, a task id, a result, a
"taken" mark, a budget charge, a meta value) as one row of ``events``: an operation code and
its parameters.  Appending rows to one table is the cheapest write SQLite has (no index is
looked up, the last page of one B-tree changes), and a transaction of many changes is one
``executemany``; updating ``jobs`` and ``stages`` in place cost three times as much a job
(benchmarks/README.md, "2026-11-30 (2)").

The log is folded into ``jobs``, ``stages``, ``charges`` and ``meta`` by :func:`fold`: when a
journal opens (before it is read), and in a copy when a journal is exported.  Each operation
is the very statement a batch ran on those tables before the log existed, so folding the log
replays the batch's writes in their order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from .._errors import JournalError

__all__ = [
    "CHARGE",
    "CREATED",
    "EVENTS",
    "FINISHED",
    "INSERT_EVENT",
    "JOB",
    "JOB_RESET",
    "META",
    "REFUSED",
    "REPORTED",
    "SUBMITTING",
    "event",
    "fold",
]

#: Operation codes; never renumber one (files keep them): add new ones at the end.
JOB, JOB_RESET, SUBMITTING, CREATED, REFUSED, FINISHED, REPORTED, CHARGE, META = range(9)

#: The statement each operation runs on the tables, by code.
_STATEMENTS: tuple[str, ...] = (
    "INSERT OR REPLACE INTO jobs (key, request_hash, video_url) VALUES (?, ?, ?)",
    # A record started over: its earlier stages were all refused (none may be tracked).
    "DELETE FROM stages WHERE key = ?",
    "INSERT OR REPLACE INTO stages (key, stage, status, intent_at, external_id)"
    " VALUES (?, ?, 'submitting', ?, ?)",
    "INSERT OR REPLACE INTO stages VALUES (?, ?, 'created', ?, ?, ?, ?, ?)",
    "UPDATE stages SET status = 'refused' WHERE key = ? AND stage = ?",
    "UPDATE jobs SET result = ?, final = ?, reported = 0 WHERE key = ?",
    "UPDATE jobs SET reported = 1 WHERE key = ?",
    "INSERT OR REPLACE INTO charges VALUES (?, ?, ?)",
    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
)
_ARITY = tuple(sql.count("?") for sql in _STATEMENTS)
_WIDTH = max(_ARITY)
_PAD = tuple((None,) * (_WIDTH - arity) for arity in range(_WIDTH + 1))

#: The log's table (a rowid table: ``seq`` is the order of the changes).
EVENTS = (
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, op INTEGER NOT NULL, "
    + ", ".join(f"p{n}" for n in range(1, _WIDTH + 1))
    + ")"
)
#: Appends one :func:`event` row.
INSERT_EVENT = (
    "INSERT INTO events (op, "
    + ", ".join(f"p{n}" for n in range(1, _WIDTH + 1))
    + ") VALUES (?"
    + ", ?" * _WIDTH
    + ")"
)


def event(op: int, params: Sequence[Any]) -> tuple[Any, ...]:
    """The ``events`` row of operation ``op`` with ``params`` (as :data:`INSERT_EVENT` takes it)."""
    return (op, *params, *_PAD[len(params)])


def fold(conn: sqlite3.Connection, path: str) -> int:
    """Apply the log to the tables and empty it (inside the caller's transaction).

    Returns how many changes were applied.  Raises :class:`JournalError` for an operation this
    version does not know (a file written by a newer one).
    """
    rows = conn.execute("SELECT * FROM events ORDER BY seq").fetchall()
    if not rows:
        return 0
    start, count = 0, len(rows)
    while start < count:  # runs of one operation: one executemany each
        op = rows[start][1]
        end = start + 1
        while end < count and rows[end][1] == op:
            end += 1
        if not (isinstance(op, int) and 0 <= op < len(_STATEMENTS)):
            raise JournalError(
                f"journal {path}: unknown change {op!r} in its log (written by another version"
                " of kling_async?)"
            )
        arity = _ARITY[op]
        conn.executemany(_STATEMENTS[op], [row[2 : 2 + arity] for row in rows[start:end]])
        start = end
    conn.execute("DELETE FROM events")
    return count
