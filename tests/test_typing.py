"""The public signatures accept what the README shows: documented calls pass ``mypy --strict``.

A user who type-checks their pipeline must not be told that a documented call is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

from mypy import api

import kling_async as ka

# Each journal form the README documents for run_batch: a SQLite path (str or Path), a
# PostgreSQL URL, and a PostgresJournal with lease settings; an audio file as a path (str or
# Path) or bytes.  And every public name of the package, which it imports lazily.
DOCUMENTED = """
from pathlib import Path

import kling_async as ka
from kling_async.journal import PostgresJournal


async def main(client: ka.KlingClient, jobs: list[ka.LipSyncJob]) -> None:
    journal = PostgresJournal(url="postgresql://dubber@db-host/dub_batch", lease=30.0, renew=10.0)
    for where in ("dub.journal", Path("dub.journal"), "postgresql://db-host/dub", journal):
        async for result in client.run_batch(jobs, journal=where):
            print(result.ok, result.task_id)


def audio_jobs() -> list[ka.LipSyncJob]:
    video = "https://example.com/face.mp4"
    return [
        ka.LipSyncJob.from_audio(video_url=video, audio_file=audio)
        for audio in ("line.wav", Path("line.wav"), b"RIFF")
    ]


PUBLIC = [%s]
"""
# A misspelt public name is an error, not Any (the package's lazy __getattr__ is hidden from
# type checkers); this line is appended to DOCUMENTED, and must be its only error.
MISSPELT = "job = ka.LipSyncJb\n"


def test_documented_calls_type_check_and_a_misspelt_name_does_not(tmp_path: Path) -> None:
    names = ", ".join(f"ka.{name}" for name in [*ka.__all__, "events", "__version__"])
    documented = DOCUMENTED % names
    source = tmp_path / "uses.py"
    source.write_text(documented + MISSPELT)
    misspelt_line = documented.count("\n") + 1
    out, err, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", os.devnull, str(source)]
    )
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert status == 1, out + err
    assert len(errors) == 1, out + err
    assert f"uses.py:{misspelt_line}: error: Module has no attribute " in errors[0], out
    assert '"LipSyncJb"' in errors[0] and "[attr-defined]" in errors[0], out
