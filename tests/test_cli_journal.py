"""`kling-async results` and `status --journal` on both backends, and workers sharing a batch
through the CLI (`run --journal postgresql://...` in two processes at once)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import anyio
import pytest
from test_cli import acli, cli, results, text_job, write_jsonl

from kling_async.testing import FakeKlingServer


@pytest.fixture(params=["sqlite", "postgres"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "dub.journal")


def test_results_and_status_of_a_finished_batch(journal: str, tmp_path: Path) -> None:
    jobs = [text_job(n, key=f"k{n}") for n in range(5)]
    jobs.append(text_job(9, key="bad", video_url="https://example.com/no-human.mp4"))
    path = write_jsonl(tmp_path / "jobs.jsonl", *jobs)
    done = cli(
        "run",
        str(path),
        "--out",
        str(tmp_path / "out.jsonl"),
        "--sandbox",
        "-q",
        "--journal",
        journal,
    )
    assert done.returncode == 1, done.stderr  # one job failed

    exported = cli("results", "--journal", journal)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert sorted(line["key"] for line in lines) == ["bad", "k0", "k1", "k2", "k3", "k4"]
    by_key = {line["key"]: line for line in lines}
    assert all(by_key[f"k{n}"]["ok"] and by_key[f"k{n}"]["video_url"] for n in range(5))
    assert not by_key["bad"]["ok"] and by_key["bad"]["error_type"] == "TaskFailedError"
    ran = {line["key"]: line["task_id"] for line in results(tmp_path / "out.jsonl")}
    assert {key: line["task_id"] for key, line in by_key.items()} == ran

    as_csv = cli(
        "results", "--journal", journal, "--format", "csv", "--out", str(tmp_path / "r.csv")
    )
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert sorted(row["key"] for row in rows) == sorted(by_key)
    assert {row["key"]: row["task_id"] for row in rows} == ran

    status = cli("status", "--journal", journal)
    assert status.returncode == 0, status.stderr
    assert "6 jobs (failed 1, succeeded 5)" in status.stdout
    assert "tasks running: 0" in status.stdout
    if journal.startswith("postgresql://"):
        assert "0 task slots held" in status.stdout and "workers:" in status.stdout


def test_status_needs_task_ids_or_a_journal_and_a_missing_journal_is_one_line(
    tmp_path: Path,
) -> None:
    neither = cli("status")
    assert neither.returncode == 2 and "--journal" in neither.stderr
    missing = cli("results", "--journal", str(tmp_path / "nope.journal"))
    assert missing.returncode == 2 and "nope.journal" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.anyio
async def test_two_workers_run_one_batch_through_the_cli(pg_url: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", *(text_job(n, key=f"k{n}") for n in range(40)))
    outs = [tmp_path / "one.jsonl", tmp_path / "two.jsonl"]
    limit = 4
    async with FakeKlingServer(task_duration=0.02, task_limit=limit) as server:
        common = (
            "--base-url",
            server.url,
            "--journal",
            pg_url,
            "--first-poll",
            "0.02",
            "--max-in-flight",
            str(limit),
            "-q",
        )
        done: list[int] = []

        async def worker(out: Path) -> None:
            run = await acli(
                "run", str(path), "--out", str(out), *common, KLING_API_KEY="sk-sandbox"
            )
            assert run.returncode == 0, run.stderr.decode()
            done.append(run.returncode)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                for out in outs:
                    group.start_soon(worker, out)
        assert server.tasks_created == 40
        assert server.requests["limited"] == 0
    keys = [line["key"] for out in outs for line in results(out)]
    assert sorted(keys) == sorted(f"k{n}" for n in range(40))
