"""The public signatures accept what the README shows: documented calls pass ``mypy --strict``.

A user who type-checks their pipeline must not be told that a documented call is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from mypy import api

# Each journal form the README documents for run_batch: a SQLite path (str or Path), a
# PostgreSQL URL, and a PostgresJournal with lease settings.
DOCUMENTED = """
from pathlib import Path

import kling_async as ka
from kling_async.journal import PostgresJournal


async def main(client: ka.KlingClient, jobs: list[ka.LipSyncJob]) -> None:
    journal = PostgresJournal(url="postgresql://dubber@db-host/dub_batch", lease=30.0, renew=10.0)
    for where in ("dub.journal", Path("dub.journal"), "postgresql://db-host/dub", journal):
        async for result in client.run_batch(jobs, journal=where):
            print(result.ok, result.task_id)
"""


def test_every_documented_journal_form_type_checks(tmp_path: Path) -> None:
    source = tmp_path / "uses.py"
    source.write_text(DOCUMENTED)
    out, err, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", os.devnull, str(source)]
    )
    assert status == 0, out + err
    assert "Success: no issues found in 1 source file" in out
