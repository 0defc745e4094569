"""The command line, end to end: `python -m kling_async` in a subprocess against fake servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import kling_async as ka
from kling_async.testing import FakeKlingServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RESULT_FIELDS = {
    "key",
    "line",
    "task_id",
    "state",
    "ok",
    "video_url",
    "error",
    "error_type",
    "error_code",
    "submitted_at",
    "finished_at",
    "polls",
    "path",
    "adopted",
    "video_id",
    "video_duration",
    "watermark_url",
    "units",
    "balance_deduction",
}
SECRET = "sk-not-the-right-key-7f3a9c"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    env["KLING_ASYNC_SANDBOX_DURATION"] = "0.05"  # sandbox tasks take 50 ms in tests
    env.update(extra)
    return env


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kling_async", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=cwd,
        timeout=60,
        check=False,
    )


async def acli(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "kling_async", *args], env=_env(**env), check=False
    )


def write_jsonl(path: Path, *jobs: dict[str, Any] | str) -> Path:
    lines = [job if isinstance(job, str) else json.dumps(job) for job in jobs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def text_job(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "video_url": f"https://example.com/clip-{n}.mp4",
        "text": f"line {n}",
        "voice_id": "genshin_vindi2",
        "voice_language": "en",
        **extra,
    }


def audio_job(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "video_url": f"https://example.com/clip-{n}.mp4",
        "audio_url": f"https://example.com/line-{n}.mp3",
        **extra,
    }


def test_help() -> None:
    top = cli("--help")
    assert top.returncode == 0
    for command in ("run", "status", "fake-server", "KLING_API_KEY"):
        assert command in top.stdout
    run = cli("run", "--help")
    assert run.returncode == 0
    for option in ("--out", "--dialect", "--sandbox", "--skip-invalid", "--max-in-flight"):
        assert option in run.stdout
    assert cli().returncode == 2  # no command: a usage error


@pytest.mark.parametrize("dialect", ["kling", "dmxapi", "apimodels"])
def test_example_jobs_run_in_the_sandbox_with_every_dialect(dialect: str, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    # Run from elsewhere: audio_file paths are relative to the jobs file, not to the cwd.
    done = cli(
        "run", str(EXAMPLES / "jobs.jsonl"), "--out", str(out), "--sandbox",
        "--dialect", dialect, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # one job fails on purpose
    jobs = [json.loads(line) for line in (EXAMPLES / "jobs.jsonl").read_text().splitlines()]
    lines = results(out)
    assert sorted(r["key"] for r in lines) == sorted(job["key"] for job in jobs)
    for line in lines:
        assert set(line) == RESULT_FIELDS
        assert jobs[line["line"] - 1]["key"] == line["key"]
    by_key = {r["key"]: r for r in lines}
    failed = by_key.pop("fails-on-purpose")
    assert not failed["ok"] and failed["state"] == "failed"
    assert failed["error_type"] == "TaskFailedError" and failed["task_id"]
    assert ("no faces" if dialect == "apimodels" else "no human") in failed["error"]
    for key, line in by_key.items():
        job = jobs[line["line"] - 1]
        if dialect == "apimodels" and "text" in job:
            # apimodels runs advanced lip-sync only: text jobs fail, without a request.
            assert line["error_type"] == "ValidationError" and line["task_id"] is None
            continue
        assert line["ok"] and line["state"] == "succeeded", key
        assert line["video_url"].startswith("http://127.0.0.1:")
        assert line["finished_at"] >= line["submitted_at"] > 0 and line["polls"] >= 1
        assert line["adopted"] is False
    assert "20/20 done" in done.stderr and "Traceback" not in done.stderr


def test_all_succeeded_is_exit_0_and_keys_default_to_line_numbers(tmp_path: Path) -> None:
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl", text_job(1, key="first"), "", audio_job(3), text_job(4)
    )
    out = tmp_path / "out" / "results.jsonl"
    out.parent.mkdir()
    done = cli("run", str(jobs), "--out", str(out), "--sandbox", "--max-in-flight", "2")
    assert done.returncode == 0, done.stderr
    lines = {r["key"]: r for r in results(out)}
    assert set(lines) == {"first", "line-3", "line-4"}
    assert [lines[k]["line"] for k in ("first", "line-3", "line-4")] == [1, 3, 4]
    assert all(r["ok"] for r in lines.values())
    # The results file is appended to: a second run adds its lines.
    assert cli("run", str(jobs), "--out", str(out), "--sandbox", "-q").returncode == 0
    assert len(results(out)) == 6


def test_results_to_stdout(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", audio_job(1), audio_job(2))
    done = cli("run", str(jobs), "--out", "-", "--sandbox", "--quiet")
    assert done.returncode == 0
    assert sorted(json.loads(line)["key"] for line in done.stdout.splitlines()) == [
        "line-1",
        "line-2",
    ]
    assert done.stderr == ""


BAD_JOBS = (
    text_job(1),
    audio_job(2),
    text_job(3, voice_speed=3),
    "{not json",
    audio_job(5, colour="red"),
    audio_job(6, key="dup"),
    audio_job(7, key="dup"),
    audio_job(8, audio_file="missing.wav", audio_url=None),
)


@pytest.mark.anyio
async def test_bad_lines_stop_the_run_before_any_request(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *BAD_JOBS)
    out = tmp_path / "results.jsonl"
    async with FakeKlingServer() as server:
        done = await acli(
            "run", str(jobs), "--out", str(out), "--base-url", server.url,
            KLING_API_KEY="sk-sandbox",
        )  # fmt: skip
        assert server.tasks_created == 0
        assert sum(server.requests.values()) == 0
    assert done.returncode == 2
    stderr = done.stderr.decode()
    assert f"{jobs}:3: voice_speed: must be from 0.8 to 2.0" in stderr
    assert f"{jobs}:4: not valid JSON" in stderr
    assert f"{jobs}:5: colour: unknown field" in stderr
    assert f"{jobs}:7: key: 'dup' is already used on line 6" in stderr
    assert f"{jobs}:8: audio_file: cannot be read" in stderr
    assert f"{jobs}:1:" not in stderr and f"{jobs}:2:" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("kling-async: error: 5 bad job lines")
    assert not out.exists()


def test_skip_invalid_runs_the_rest(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *BAD_JOBS)
    out = tmp_path / "results.jsonl"
    done = cli("run", str(jobs), "--out", str(out), "--sandbox", "--skip-invalid")
    assert done.returncode == 1  # lines were skipped: not everything succeeded
    assert f"{jobs}:3: voice_speed" in done.stderr
    assert "skipping 5 bad job lines" in done.stderr
    lines = results(out)
    assert sorted(r["line"] for r in lines) == [1, 2, 6]
    assert all(r["ok"] for r in lines)


def test_csv_jobs(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes((EXAMPLES / "audio" / "hello.wav").read_bytes())
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "\ufeffkey,video_url,text,voice_id,voice_speed,audio_url,audio_file,sound_insert_time\n"
        "c1,https://example.com/1.mp4,Hello there,genshin_vindi2,1.2,,,\n"
        "c2,https://example.com/2.mp4,,,,https://example.com/2.mp3,,500\n"
        "\n"
        'c3,https://example.com/3.mp4,"Hi, again",genshin_vindi2,,,,\n'
        "c4,https://example.com/4.mp4,,,,,audio/a.wav,\n",
        encoding="utf-8",
    )
    out = tmp_path / "results.jsonl"
    done = cli("run", str(jobs), "--out", str(out), "--sandbox")
    assert done.returncode == 0, done.stderr
    lines = {r["key"]: r for r in results(out)}
    assert {k: r["line"] for k, r in lines.items()} == {"c1": 2, "c2": 3, "c3": 5, "c4": 6}
    assert all(r["ok"] for r in lines.values())

    bad = tmp_path / "bad.csv"
    bad.write_text("video_url,text,voice_id,voice_speed\nhttps://e.com/1.mp4,Hi,v,fast\n")
    done = cli("run", str(bad), "--out", str(out), "--sandbox")
    assert done.returncode == 2
    assert f"{bad}:2: voice_speed: must be a number, not 'fast'" in done.stderr
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("video_url,txet\nhttps://e.com/1.mp4,Hi\n")
    done = cli("run", str(unknown), "--out", str(out), "--sandbox", "--skip-invalid")
    assert done.returncode == 2
    assert done.stderr == (
        f"kling-async: error: {unknown}:1: txet: unknown field (did you mean 'text'?)\n"
    )


@pytest.mark.anyio
async def test_env_key_is_used_and_a_wrong_key_is_one_line_without_the_key(
    tmp_path: Path,
) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", audio_job(1), audio_job(2), audio_job(3))
    out = tmp_path / "results.jsonl"
    async with FakeKlingServer(api_keys=(SECRET,)) as server:
        wrong = await acli(
            "run", str(jobs), "--out", str(out), "--base-url", server.url,
            KLING_API_KEY=SECRET + "x",
        )  # fmt: skip
        assert wrong.returncode == 2
        stderr = wrong.stderr.decode()
        assert (
            stderr.strip().splitlines()[-1].startswith("kling-async: error: authentication failed")
        )
        assert "Traceback" not in stderr and SECRET not in stderr + wrong.stdout.decode()
        assert server.tasks_created == 0 and server.requests["submit"] == 1  # fail fast

        verbose = await acli(
            "run", str(jobs), "--out", str(out), "--base-url", server.url, "--verbose",
            KLING_API_KEY=SECRET + "x",
        )  # fmt: skip
        assert verbose.returncode == 2
        assert "Traceback" in verbose.stderr.decode()
        assert SECRET not in verbose.stderr.decode()

        server.set_account_error(1102)  # resource pack used up
        broke = await acli(
            "run", str(jobs), "--out", str(out), "--base-url", server.url, KLING_API_KEY=SECRET
        )
        assert broke.returncode == 2
        assert broke.stderr.decode().startswith("kling-async: error: ")
        assert server.tasks_created == 0


def test_missing_key_is_a_usage_error(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", audio_job(1))
    done = cli("run", str(jobs), "--out", str(tmp_path / "r.jsonl"))
    assert done.returncode == 2
    assert done.stderr.startswith("kling-async: error: no API key")
    half = cli("run", str(jobs), "--out", "-", KLING_ACCESS_KEY="ak-sandbox")
    assert half.returncode == 2 and "KLING_SECRET_KEY" in half.stderr
    assert cli("run", str(tmp_path / "nope.jsonl"), "--out", "-", "--sandbox").returncode == 2
    flags = cli("run", str(jobs), "--out", "-", "--sandbox", "--api-key", SECRET)
    assert flags.returncode == 2 and SECRET not in flags.stderr
    typo = cli("run", str(jobs), "--out", "-", "--api-kye", SECRET)
    assert typo.returncode == 2 and "--api-kye" in typo.stderr and SECRET not in typo.stderr


@pytest.mark.anyio
async def test_status(tmp_path: Path) -> None:
    async with FakeKlingServer(task_duration=60) as server:
        async with ka.KlingClient.kling(api_key="sk-sandbox", base_url=server.url) as client:
            job = ka.LipSyncJob.from_audio(**audio_job(1))
            first = await client.submit(job)
            second = await client.submit(job)
        server.finish(first.task_id)
        server.finish(second.task_id, "failed", "there is no human in the video")
        done = await acli(
            "status", second.task_id, first.task_id, "--base-url", server.url,
            KLING_API_KEY="sk-sandbox",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
        assert [line["task_id"] for line in lines] == [second.task_id, first.task_id]
        assert lines[0]["state"] == "failed" and "no human" in lines[0]["message"]
        assert lines[1]["state"] == "succeeded" and lines[1]["video_url"]

        # The official JWT from the environment; an unknown id is a line with an error.
        jwt = await acli(
            "status", first.task_id, "123456", "--base-url", server.url,
            KLING_ACCESS_KEY="ak-sandbox", KLING_SECRET_KEY="sk-sandbox-secret-for-hs256-tokens",
        )  # fmt: skip
        assert jwt.returncode == 1
        found, missing = (json.loads(line) for line in jwt.stdout.decode().splitlines())
        assert found["state"] == "succeeded"
        assert missing["task_id"] == "123456" and missing["error_type"] == "NotFoundError"


@pytest.mark.anyio
async def test_fake_server_command() -> None:
    command = [sys.executable, "-m", "kling_async", "fake-server", "--port", "0", "-q"]
    async with await anyio.open_process(command, env=_env()) as process:
        assert process.stdout is not None
        first = b""
        with anyio.fail_after(10):
            while b"\n" not in first:
                first += await process.stdout.receive()
        url = first.decode().split()[-1]
        assert url.startswith("http://127.0.0.1:")
        async with ka.KlingClient.dmxapi(api_key="sk-sandbox", base_url=url) as client:
            snapshot = await client.submit(ka.LipSyncJob.from_audio(**audio_job(1)))
            assert (await client.get_task(snapshot.task_id)).task_id == snapshot.task_id
        process.terminate()
        with anyio.fail_after(10):
            assert await process.wait() == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_keeps_the_results_so_far(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "kling_async", "run", str(EXAMPLES / "jobs.jsonl")]
    command += ["--out", str(out), "--sandbox", "--max-in-flight", "2"]
    env = _env(KLING_ASYNC_SANDBOX_DURATION="0.3")
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 20
        while not (out.exists() and out.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "kling-async: interrupted"
    lines = results(out)
    assert 2 <= len(lines) < 20 and all(line["ok"] for line in lines)


@pytest.mark.anyio
async def test_journal_resumes_without_creating_any_task_twice(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *(text_job(n, key=f"k{n}") for n in range(4)))
    journal = tmp_path / "dub.journal"
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    async with FakeKlingServer(task_duration=0.02) as server:
        common = ("--base-url", server.url, "--journal", str(journal), "--first-poll", "0.02")
        done = await acli(
            "run", str(jobs), "--out", str(first), *common, KLING_API_KEY="sk-sandbox"
        )
        assert done.returncode == 0, done.stderr.decode()
        assert server.tasks_created == 4
        # Two more lines, then the same command again: only the new jobs are submitted.
        write_jsonl(jobs, *(text_job(n, key=f"k{n}") for n in range(6)))
        again = await acli(
            "run", str(jobs), "--out", str(second), *common, KLING_API_KEY="sk-sandbox"
        )
        assert again.returncode == 0, again.stderr.decode()
    assert server.tasks_created == 6
    assert sorted(r["key"] for r in results(first)) == ["k0", "k1", "k2", "k3"]
    assert sorted(r["key"] for r in results(second)) == ["k4", "k5"]


def test_download_saves_the_videos(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", text_job(1, key="ep1/line 1"), text_job(2, key="b"))
    out = tmp_path / "results.jsonl"
    done = cli("run", str(jobs), "--out", str(out), "--sandbox", "--download", str(tmp_path / "v"))
    assert done.returncode == 0, done.stderr
    paths = [Path(r["path"]) for r in results(out)]
    assert len(paths) == 2
    assert all(path.parent == tmp_path / "v" and path.stat().st_size > 0 for path in paths)


def test_resubmit_unknown_needs_a_journal(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", text_job(1))
    done = cli(
        "run", str(jobs), "--out", str(tmp_path / "r.jsonl"), "--sandbox", "--resubmit-unknown"
    )
    assert done.returncode == 2
    assert "--resubmit-unknown goes with --journal" in done.stderr
