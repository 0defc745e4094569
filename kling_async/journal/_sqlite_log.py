"""The SQLite journal's change log: a running batch appends its changes to ``events``.

A batch writes each change of a job (its record, a submit's intent, a task id, a result, a
"taken" mark, a budget charge, a meta value) as an operation code and its parameters, and each
transaction appends all of its changes as one row of ``events`` (a JSON array of
``[op, param, ...]`` arrays).  One row a transaction is the cheapest write SQLite has: no index
is looked up, one B-tree grows at its end, and the per-row cost (about 5-9 us, a third of a
journaled job's storage) is paid once for every change of the transaction; updating ``jobs``
and ``stages`` in place cost several times as much a job (benchmarks/README.md,
"2026-11-30 (2)").

The log is folded into ``jobs``, ``stages``, ``charges`` and ``meta`` by :func:`fold`: when a
journal opens (before it is read), and in a copy when a journal is exported.  Each operation
is the very statement a batch ran on those tables before the log existed, so folding the log
replays the batch's writes in their order.  A new job's record and a result are logged by
their values: folding hashes the one and spells the other as JSON, work a running batch would
otherwise do on its loop for every job.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import JournalError
from ._codec import REQUEST_FIELDS, RESULT_FIELDS, UNREADABLE, hash_request, result_json

__all__ = [
    "CHARGE",
    "CREATED",
    "EVENTS",
    "FINISHED",
    "FINISHED_RESULT",
    "INSERT_EVENT",
    "JOB",
    "JOB_REQUEST",
    "JOB_RESET",
    "META",
    "REFUSED",
    "REPORTED",
    "SUBMITTING",
    "encode",
    "fold",
]

#: Operation codes; never renumber one (files keep them): add new ones at the end.
JOB, JOB_RESET, SUBMITTING, CREATED, REFUSED, FINISHED, REPORTED, CHARGE, META = range(9)
#: A job's record by its request's values (``key, *request_values``) and a result by its own
#: (``final, *result_values``): the request hash and the result's JSON are made when the log is
#: folded (they were the costliest part of a journaled job on the loop); they fold into the
#: statements of ``JOB`` and ``FINISHED``, which logs of earlier versions hold.
JOB_REQUEST, FINISHED_RESULT = 9, 10

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


def _job_row(change: Sequence[Any]) -> tuple[Any, ...]:
    key, *values = change
    return key, hash_request(values), values[_VIDEO_URL]


def _result_row(change: Sequence[Any]) -> tuple[Any, ...]:
    final, *values = change
    return result_json(values), final, values[0]


_VIDEO_URL = REQUEST_FIELDS.index("video_url")
#: Operations logged by their values: what they fold into (operation, parameters of its
#: statement), and how many values they hold.
_FOLDS: dict[int, tuple[int, Callable[[Sequence[Any]], tuple[Any, ...]], int]] = {
    JOB_REQUEST: (JOB, _job_row, 1 + len(REQUEST_FIELDS)),
    FINISHED_RESULT: (FINISHED, _result_row, 1 + len(RESULT_FIELDS)),
}
_ARITY = {op: sql.count("?") for op, sql in enumerate(_STATEMENTS)} | {
    op: arity for op, (_, _, arity) in _FOLDS.items()
}

#: The log's table (a rowid table: ``seq`` is the order of the transactions).
EVENTS = "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, changes TEXT NOT NULL)"
#: Appends one transaction's changes (:func:`encode`).
INSERT_EVENT = "INSERT INTO events (changes) VALUES (?)"

# (NaN and infinities pass as Python's JSON spells them: a result's values may hold what a
# server sent, and its JSON, written at the fold, always took them.)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(changes: Sequence[tuple[Any, ...]]) -> str:
    """The ``events`` row of ``changes`` (each an operation code and its values)."""
    return _ENCODER.encode(changes)


def fold(conn: sqlite3.Connection, path: str) -> int:
    """Apply the log to the tables and empty it (inside the caller's transaction).

    Returns how many changes were applied.  Raises :class:`JournalError` for an operation this
    version does not know (a file written by a newer one).
    """
    changes: list[list[Any]] = []
    try:
        for (text,) in conn.execute("SELECT changes FROM events ORDER BY seq"):
            changes.extend(json.loads(text))
    except (TypeError, ValueError) as exc:
        raise JournalError(f"journal {path}: unreadable change log ({exc})") from None
    start, count = 0, len(changes)
    while start < count:  # runs of one operation: one executemany each
        op = _op(changes[start])
        if not (isinstance(op, int) and op in _ARITY):
            raise JournalError(
                f"journal {path}: unknown change {changes[start]!r:.80} in its log (written by"
                " another version of kling_async?)"
            )
        end = start + 1
        while end < count and _op(changes[end]) == op:
            end += 1
        params: list[Sequence[Any]] = [change[1:] for change in changes[start:end]]
        if any(len(values) != _ARITY[op] for values in params):
            raise JournalError(f"journal {path}: malformed change of operation {op} in its log")
        if op in _FOLDS:
            op, row, _ = _FOLDS[op]
            try:
                params = [row(values) for values in params]
            except UNREADABLE as exc:
                raise JournalError(f"journal {path}: malformed change in its log ({exc})") from None
        conn.executemany(_STATEMENTS[op], params)
        start = end
    conn.execute("DELETE FROM events")
    return count


def _op(change: object) -> object:
    """The operation code of one logged change (None for something that is no change)."""
    return change[0] if isinstance(change, list) and change else None
