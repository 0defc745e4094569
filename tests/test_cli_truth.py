"""The command line tells the whole truth: resumes, interrupts, local I/O errors, summaries."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import EXAMPLES, _env, cli, results, text_job, write_jsonl

from kling_async.testing import video_bytes

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and /dev/full")


def interrupt_after(
    command: list[str], out: Path, lines: int, sig: int = signal.SIGINT
) -> tuple[int, str]:
    """Run ``command``; Ctrl-C (``sig``) it once ``out`` has ``lines`` lines; status, stderr."""
    env = _env(KLING_ASYNC_SANDBOX_DURATION="0.3")
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 20
        while not (out.exists() and out.read_text().count("\n") >= lines):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=20)
    return process.returncode, stderr


def run_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kling_async", "run", str(EXAMPLES / "jobs.jsonl"), *args]


@POSIX
def test_ctrl_c_without_a_journal_names_the_paid_tasks_still_running(tmp_path: Path) -> None:
    out, summary = tmp_path / "results.jsonl", tmp_path / "s.json"
    command = run_command("--out", str(out), "--sandbox", "--max-in-flight", "3")
    status, stderr = interrupt_after([*command, "--summary-json", str(summary)], out, 2)
    assert status == 130, stderr
    assert stderr.strip().splitlines()[-1] == "kling-async: interrupted"
    running = json.loads(summary.read_text())["running_task_ids"]
    assert len(running) <= 3 and not set(running) & {line["task_id"] for line in results(out)}
    notes = [line for line in stderr.splitlines() if "(paid for) will not be reported" in line]
    if running:  # (none when Ctrl-C came between a result and the next submit)
        (note,) = notes
        assert note.split("reported: ")[1].split(";")[0].split() == running
        assert "--journal" in note
    else:
        assert notes == []


@POSIX
def test_sigterm_stops_a_run_as_cleanly_as_ctrl_c(tmp_path: Path) -> None:
    out, summary, videos = tmp_path / "results.jsonl", tmp_path / "s.json", tmp_path / "v"
    command = run_command("--out", str(out), "--sandbox", "--max-in-flight", "3")
    command += ["--summary-json", str(summary), "--download", str(videos)]
    status, stderr = interrupt_after(command, out, 2, signal.SIGTERM)
    assert status == 143, stderr
    assert stderr.strip().splitlines()[-1] == "kling-async: terminated"
    stopped = json.loads(summary.read_text())
    assert stopped["exit_status"] == 143
    running = stopped["running_task_ids"]
    if running:  # the paid tasks left running are named (no journal keeps them)
        assert "(paid for) will not be reported: " + " ".join(running) in stderr
    saved = results(out)
    assert 2 <= len(saved) < 20 and all(line["ok"] for line in saved)
    # Every video reported is whole, and no partial download is left behind.
    assert all(Path(line["path"]).read_bytes() == video_bytes(line["task_id"]) for line in saved)
    assert [p.name for p in videos.iterdir() if p.name.startswith(".")] == []


@POSIX
def test_a_sandbox_run_resumes_after_ctrl_c_and_counts_the_whole_journal(tmp_path: Path) -> None:
    out, journal = tmp_path / "r.jsonl", tmp_path / "dub.journal"
    stopped, summary = tmp_path / "stopped.json", tmp_path / "s.json"
    common = ("--out", str(out), "--sandbox", "--journal", str(journal), "--max-in-flight", "2")
    status, stderr = interrupt_after(run_command(*common, "--summary-json", str(stopped)), out, 3)
    assert status == 130, stderr
    left = json.loads(stopped.read_text())
    assert left["exit_status"] == 130
    if left["running_task_ids"]:  # (none when Ctrl-C came between a result and the next submit)
        assert "in the journal: run the same command again" in stderr
    first = len(results(out))
    again = cli("run", str(EXAMPLES / "jobs.jsonl"), *common, "--summary-json", str(summary))
    # examples/jobs.jsonl has one job the sandbox fails: the exit status says so.
    assert again.returncode == 1, again.stderr
    resumed = [line for line in again.stderr.splitlines() if "resumed:" in line]
    assert resumed == [f"kling-async: resumed: {first} of 20 jobs already reported (0 failed)"]
    assert len(results(out)) == 20 and len({r["key"] for r in results(out)}) == 20
    counts = json.loads(summary.read_text())
    assert counts["jobs"] == counts["done"] == 20 and counts["resumed"] == first
    # The sandbox starts empty each run: what the first run left running is not found.
    lost = [r for r in results(out) if not r["ok"] and r["key"] != "fails-on-purpose"]
    assert len(lost) <= 2 and "starts empty each run" in again.stderr
    assert all(
        "task not found" in r["error"] or r["error_type"] == "SubmitOutcomeUnknownError"
        for r in lost
    )
    assert counts["failed"] == 1 + len(lost) and counts["exit_status"] == 1
    # Once more: the earlier failures still make the status 1.  A submit Ctrl-C cut off in
    # flight ends as SubmitOutcomeUnknownError, which a rerun does not keep: it is looked for
    # again (and, the sandbox being empty, reported again as unknown).  Only when the Ctrl-C
    # came outside a submit (the usual timing; CI under load hit the other) is nothing left.
    unknown = sorted(r["key"] for r in lost if r["error_type"] == "SubmitOutcomeUnknownError")
    third = cli("run", str(EXAMPLES / "jobs.jsonl"), *common)
    assert third.returncode == 1, third.stderr
    kept, kept_failed = 20 - len(unknown), 1 + len(lost) - len(unknown)
    said = f"{kept} of" if unknown else "all"
    assert f"resumed: {said} 20 jobs already reported ({kept_failed} failed)" in third.stderr, (
        third.stderr
    )
    again_reported = results(out)[20:]
    assert len(again_reported) == len(unknown)
    assert sorted(r["key"] for r in again_reported) == unknown
    assert all(r["error_type"] == "SubmitOutcomeUnknownError" for r in again_reported)


def test_paths_are_checked_before_anything_is_sent_or_started(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", text_job(1))
    out = tmp_path / "r.jsonl"
    a_file = write_jsonl(tmp_path / "file", "x")
    bad = {
        "--journal": str(tmp_path / "no" / "such" / "dir" / "j.journal"),
        "--download": str(a_file / "videos"),
        "--summary-json": str(tmp_path / "missing" / "s.json"),
    }
    for option, path in bad.items():
        done = cli("run", str(jobs), "--out", str(out), "--sandbox", option, path)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()  # no sandbox line: it never started
        assert line.startswith("kling-async: error: ") and option in line
        assert not out.exists()
    nowhere = cli("run", str(jobs), "--out", str(tmp_path / "gone" / "r.jsonl"), "--sandbox")
    assert nowhere.returncode == 2 and "--out" in nowhere.stderr
    assert "sandbox server" not in nowhere.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_out_is_one_line_and_the_result_survives(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *(text_job(n, key=f"k{n}") for n in range(3)))
    journal = tmp_path / "j.journal"
    full = cli("run", str(jobs), "--out", "/dev/full", "--sandbox", "--journal", str(journal))
    assert full.returncode == 2
    error = full.stderr.strip().splitlines()[-1]
    assert error.startswith("kling-async: error: cannot write results to /dev/full: ")
    assert "No space left on device" in error
    (shown,) = (json.loads(line) for line in full.stdout.splitlines())
    assert shown["ok"] and shown["task_id"]
    # The journal kept it: the rerun reports it (and the rest) to a working file.
    out = tmp_path / "r.jsonl"
    again = cli("run", str(jobs), "--out", str(out), "--sandbox", "--journal", str(journal))
    # (A task the first run left running is unknown to the new sandbox server: status 1.)
    assert again.returncode in (0, 1), again.stderr
    assert "resumed:" not in again.stderr  # the unwritten result was not taken
    by_key = {line["key"]: line for line in results(out)}
    assert set(by_key) == {"k0", "k1", "k2"}
    assert by_key[shown["key"]]["task_id"] == shown["task_id"]


def test_summary_json_and_json_logs(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", text_job(1))
    summary = tmp_path / "s.json"
    done = cli(
        "run", str(jobs), "--out", str(tmp_path / "r.jsonl"), "--sandbox", "-v",
        "--log-format", "json", "--summary-json", str(summary),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    logs = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert logs and all({"time", "level", "logger", "message"} <= set(log) for log in logs)
    assert any("batch started" in log["message"] for log in logs)
    counts = json.loads(summary.read_text())
    assert counts["states"] == {"succeeded": 1} and counts["tasks_submitted"] == 1
    assert counts["requests"] >= 2 and counts["wall_seconds"] > 0
    assert counts["exit_status"] == 0 and counts["running_task_ids"] == []
    # "1 job", not "1 jobs".
    assert "kling-async: 1 job in " in done.stderr


def test_empty_job_file_and_appending_without_a_journal_are_said(tmp_path: Path) -> None:
    empty = write_jsonl(tmp_path / "empty.jsonl", "")
    out = tmp_path / "r.jsonl"
    done = cli("run", str(empty), "--out", str(out), "--sandbox")
    assert done.returncode == 0
    assert "warning: " in done.stderr and "holds no jobs" in done.stderr
    jobs = write_jsonl(tmp_path / "jobs.jsonl", text_job(1))
    assert cli("run", str(jobs), "--out", str(out), "--sandbox").returncode == 0
    again = cli("run", str(jobs), "--out", str(out), "--sandbox")
    assert again.returncode == 0
    assert f"{out} already holds 1 result line; appending" in again.stderr
    assert len(results(out)) == 2


def test_help_lists_exit_status_130_and_fake_server_quiet_wording() -> None:
    top = cli("run", "--help")
    assert "130 when interrupted" in " ".join(top.stdout.split())
    serve = cli("fake-server", "--help")
    assert "print only the first line" in " ".join(serve.stdout.split())
    assert "progress display" not in serve.stdout


def test_long_values_are_cut_in_error_messages(tmp_path: Path) -> None:
    huge = "z" * 1_000_000
    jobs = write_jsonl(tmp_path / "jobs.jsonl", text_job(1, **{f"bad_{huge}": 1}))
    done = cli("run", str(jobs), "--out", str(tmp_path / "r.jsonl"), "--sandbox")
    assert done.returncode == 2
    assert len(done.stderr) < 2000 and "characters]" in done.stderr
