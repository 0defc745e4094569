"""The command line under real local I/O faults: a file-size limit (EFBIG, as a full disk fails a
write part-way) on the results file, stdout that cannot be written (/dev/full)."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from test_cli import _env, results, text_job, write_jsonl

from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not Path("/dev/full").exists(), reason="POSIX limits, /dev/full"
)


def _limit_file_size(limit: int) -> None:
    # In the child: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored, as a full disk
    # fails them with ENOSPC) once what fits has been written.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def cli_limited(
    limit: int, *args: str, stdout: int | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kling_async", *args],
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        timeout=60,
        check=False,
        preexec_fn=lambda: _limit_file_size(limit),
    )


def test_a_results_file_cut_by_a_full_disk_keeps_whole_lines_for_the_rerun(
    tmp_path: Path,
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *(text_job(n, key=f"k{n}") for n in range(3)))
    out = tmp_path / "r.jsonl"
    # Room for two result lines (about 450 bytes each) and part of a third.
    full = cli_limited(1000, "run", str(jobs), "--out", str(out), "--sandbox", "-q")
    assert full.returncode == 2, full.stderr
    (error,) = full.stderr.strip().splitlines()
    assert error.startswith(f"kling-async: error: cannot write results to {out}: File too large")
    (shown,) = (json.loads(line) for line in full.stdout.splitlines())
    assert shown["ok"] and shown["task_id"] and f"({shown['key']}'s line is on stdout)" in error
    # Only whole lines stay: the half line the limit let through was cut off again.
    assert out.read_bytes().endswith(b"\n")
    kept = results(out)
    assert len(kept) == 2 and shown["key"] not in {line["key"] for line in kept}
    # The rerun (no journal: every job again) appends whole lines after whole lines.
    again = cli_limited(1 << 30, "run", str(jobs), "--out", str(out), "--sandbox", "-q")
    assert again.returncode == 0, again.stderr
    assert sorted(line["key"] for line in results(out)[2:]) == ["k0", "k1", "k2"]
    assert len(results(out)) == 5


def test_half_a_line_left_by_a_crash_is_not_glued_to_the_next_runs_first_line(
    tmp_path: Path,
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", text_job(1, key="only"))
    out = tmp_path / "r.jsonl"
    out.write_text('{"key": "a", "ok": true}\n{"key": "cut sho', encoding="utf-8")
    done = cli_limited(1 << 30, "run", str(jobs), "--out", str(out), "--sandbox", "-q")
    assert done.returncode == 0, done.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ['{"key": "a", "ok": true}', '{"key": "cut sho']
    assert [json.loads(line)["key"] for line in lines[2:]] == ["only"]


def test_results_that_neither_the_file_nor_stdout_take_name_the_file_and_the_task(
    tmp_path: Path,
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", text_job(1, key="k1"))
    out = tmp_path / "r.jsonl"
    with open("/dev/full", "w") as full_stdout:
        done = cli_limited(
            10, "run", str(jobs), "--out", str(out), "--sandbox", "-q", stdout=full_stdout.fileno()
        )
    assert done.returncode == 2, done.stderr
    (error,) = done.stderr.strip().splitlines()
    assert error.startswith(f"kling-async: error: cannot write results to {out}: File too large")
    assert "(k1's task: " in error and "kling-async status" in error
    task_id = error.split("(k1's task: ")[1].split(";")[0]
    assert task_id.isdigit()
    assert out.read_bytes() == b""


def test_files_that_are_one_are_refused_before_anything_runs(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *(text_job(n, key=f"k{n}") for n in range(3)))
    before = jobs.read_bytes()
    journal = tmp_path / "dub.journal"
    journal.write_bytes(b"")
    (tmp_path / "link.jsonl").symlink_to(jobs)
    clashes = [
        (["--out", str(jobs)], "--out", "JOBS"),  # results would be read back as jobs
        (["--out", str(tmp_path / "link.jsonl")], "--out", "JOBS"),
        (["--out", str(tmp_path / "r.jsonl"), "--journal", str(jobs)], "--journal", "JOBS"),
        (
            [
                *("--out", str(tmp_path / "r.jsonl"), "--journal", str(journal)),
                *("--summary-json", str(tmp_path / "." / "dub.journal")),
            ],
            "--summary-json",
            "--journal",
        ),
        (["--out", str(journal), "--journal", str(journal)], "--journal", "--out"),
    ]
    for options, option, other in clashes:
        done = cli_limited(1 << 30, "run", str(jobs), "--sandbox", *options)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()  # no sandbox line: it never started
        assert line.startswith(f"kling-async: error: {option} ") and f"same file as {other}" in line
    assert jobs.read_bytes() == before and journal.read_bytes() == b""


def test_results_export_never_overwrites_the_journal_nor_leaves_a_cut_file(
    tmp_path: Path,
) -> None:
    # 100 jobs: an export of about 50 kB.
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *(text_job(n, key=f"k{n}") for n in range(100)))
    journal, out = tmp_path / "dub.journal", tmp_path / "r.jsonl"
    run = ("run", str(jobs), "--out", str(out), "--sandbox", "--journal", str(journal), "-q")
    assert cli_limited(1 << 30, *run).returncode == 0
    before = journal.read_bytes()
    onto = cli_limited(1 << 30, "results", "--journal", str(journal), "--out", str(journal))
    assert onto.returncode == 2
    (line,) = onto.stderr.strip().splitlines()
    assert line == f"kling-async: error: --out {journal} is the journal itself: " + (
        "give the export its own file"
    )
    assert journal.read_bytes() == before
    # A full disk in mid-export: one line naming the file, and no file cut short.  (Room for
    # SQLite's 32 KiB shared-memory file, which reading the journal writes.)
    export = tmp_path / "all.jsonl"
    full = cli_limited(40_000, "results", "--journal", str(journal), "--out", str(export))
    assert full.returncode == 2
    (line,) = full.stderr.strip().splitlines()
    assert line == f"kling-async: error: cannot write {export}: File too large"
    assert not export.exists()
    # The journal still holds the batch: the same run again has nothing left to do.
    again = cli_limited(1 << 30, *run)
    assert again.returncode == 0, again.stderr
    assert len(results(out)) == 100


def test_a_stderr_that_fails_does_not_stop_the_run(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *(text_job(n, key=f"k{n}") for n in range(3)))
    out, summary = tmp_path / "r.jsonl", tmp_path / "s.json"
    command = [sys.executable, "-m", "kling_async", "run", str(jobs), "--out", str(out)]
    command += ["--sandbox", "--summary-json", str(summary)]
    # The reader of stderr (a log shipper, `| head -1`) goes away after the first line.
    with subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE) as process:
        assert process.stderr is not None
        assert process.stderr.readline().startswith(b"kling-async: sandbox server at ")
        process.stderr.close()
        assert process.wait(timeout=60) == 0
    assert sorted(line["key"] for line in results(out)) == ["k0", "k1", "k2"]
    assert json.loads(summary.read_text())["exit_status"] == 0
    # stderr on a full disk from the start: the same.
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*command, "--out", str(tmp_path / "again.jsonl")],
            env=_env(),
            stderr=full,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0
    assert len(results(tmp_path / "again.jsonl")) == 3


@pytest.mark.anyio
async def test_videos_a_full_download_folder_left_unsaved_are_saved_by_the_rerun(
    tmp_path: Path,
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *(text_job(n, key=f"k{n}") for n in range(6)))
    out, journal, videos = tmp_path / "r.jsonl", tmp_path / "dub.journal", tmp_path / "v"
    env = _env(KLING_API_KEY="sk-sandbox")
    async with FakeKlingServer(task_duration=0.2) as server:  # (its videos outlive a run)
        command = [sys.executable, "-m", "kling_async", "run", str(jobs), "--out", str(out)]
        command += ["--base-url", server.url, "--first-poll", "0.02", "--max-in-flight", "1"]
        command += ["--journal", str(journal), "--download", str(videos), "-q"]
        async with await anyio.open_process(command, env=env) as process:
            for _ in range(1500):  # (30 s at most)
                if out.exists() and out.read_text().count("\n") >= 1:
                    break
                await anyio.sleep(0.02)
            else:
                pytest.fail("no result within 30 s")
            videos.rename(tmp_path / "kept")  # nothing can be saved there any more
            videos.write_text("in the way")
            with anyio.fail_after(30):
                assert await process.wait() == 1  # videos not saved are failures
        first = results(out)
        unsaved = {line["key"] for line in first if line["path"] is None}
        assert len(unsaved) >= 4 and all(line["ok"] for line in first)
        created = server.tasks_created
        # Space back: the same command saves them (no new task), and only then exits 0.
        videos.unlink()
        (tmp_path / "kept").rename(videos)
        again = await anyio.run_process(command, env=env, check=False)
        assert again.returncode == 0, again.stderr.decode()
        assert server.tasks_created == created
    second = results(out)[len(first) :]
    assert {line["key"] for line in second} == unsaved
    assert all(line["path"] and line["error"] is None for line in second)
    assert sorted(p.name for p in videos.iterdir()) == [f"k{n}.mp4" for n in range(6)]
