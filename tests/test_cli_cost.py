"""The command line's cost features, end to end in a subprocess: `kling-async estimate`,
`run --max-units` (with and without a journal) and the result lines' server fields."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import pytest
from test_cli import acli, cli, results, write_jsonl

from kling_async.testing import FakeKlingServer

VIDEO = "https://example.com/clip.mp4"


def audio_line(n: int, **extra: object) -> dict[str, object]:
    return {
        "key": f"k{n}",
        "video_url": VIDEO,
        "audio_url": f"https://example.com/line-{n}.mp3",
        "sound_end_time": 7000,
        **extra,
    }


def test_estimate_prints_each_job_and_a_total(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(1)
        writer.setframerate(8000)
        writer.writeframes(b"\x80" * 8000 * 11)  # 11 s: three started 5 s steps
    (tmp_path / "line.wav").write_bytes(buffer.getvalue())
    jobs = write_jsonl(
        tmp_path / "jobs.jsonl",
        audio_line(1),
        {"key": "wav", "video_url": VIDEO, "audio_file": "line.wav"},
        {"key": "text", "video_url": VIDEO, "text": "hi", "voice_id": "v"},
    )
    done = cli("estimate", str(jobs))
    assert done.returncode == 0, done.stderr
    lines = [line.split('"units": ')[1].split(",")[0] for line in done.stdout.splitlines()]
    assert lines == ["1.0", "1.5", "null"]
    assert "2 jobs" not in done.stderr
    assert "3 jobs: 2.5 units estimated (about $0.35); 1 of unknown length" in done.stderr
    priced = cli("estimate", str(jobs), "--dialect", "apimodels", "--identify-face-units", "0.5")
    assert "3 jobs: 3.5 units estimated" in priced.stderr  # plus an identify-face call each
    bad = write_jsonl(tmp_path / "bad.jsonl", audio_line(1, sound_end_time=500))
    refused = cli("estimate", str(bad))
    assert refused.returncode == 1 and "sound_end_time" in refused.stderr
    assert cli("estimate", str(jobs), "--units-per-5s", "-1").returncode == 2


@pytest.mark.anyio
async def test_run_with_max_units_stops_and_lines_carry_the_cost(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", *(audio_line(n) for n in range(1, 7)))
    out, journal = tmp_path / "out.jsonl", tmp_path / "dub.journal"
    async with FakeKlingServer(task_duration=0.02) as server:
        args: tuple[str, ...]  # grows below
        args = ("run", str(jobs), "--base-url", server.url, "--out", str(out))
        args += ("--max-in-flight", "1", "--journal", str(journal), "--first-poll", "0.02")
        done = await acli(*args, "--max-units", "2", KLING_API_KEY="sk-sandbox")
        first_run = results(out)
        # Rerun with a larger budget: what was spent counts, so two more jobs fit under 3.
        out.unlink()
        again = await acli(*args, "--max-units", "3", KLING_API_KEY="sk-sandbox")
    assert server.tasks_created == 5
    assert done.returncode == 1  # some jobs were not submitted
    lines = {line["key"]: line for line in first_run}
    ok = sorted(key for key, line in lines.items() if line["ok"])
    assert ok == ["k1", "k2", "k3"]  # 1.0 reserved each, 0.5 charged: a fourth would reach 2.5
    assert {lines[k]["error_type"] for k in ("k4", "k5", "k6")} == {"BudgetExceededError"}
    first = lines["k1"]
    assert first["units"] == 0.5 and first["video_duration"] == 5.0
    assert first["video_id"] == "v" + first["task_id"] and first["watermark_url"] is None
    assert "3 succeeded, 3 failed, 1.5 units charged" in done.stderr.decode()
    lines = {line["key"]: line for line in results(out)}
    assert sorted(key for key, line in lines.items() if line["ok"]) == ["k4", "k5"]
    assert lines["k6"]["error_type"] == "BudgetExceededError"
    assert again.returncode == 1


@pytest.mark.anyio
async def test_csv_jobs_with_audio_id_and_watermark_run_advanced(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "key,video_id,audio_id,sound_end_time,watermark\n"
        "a,kling-video-1,tts-1,6000,true\n"
        "b,kling-video-2,tts-2,3000,no\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    async with FakeKlingServer(task_duration=0.02) as server:
        done = await acli(
            *("run", str(jobs), "--base-url", server.url, "--advanced", "--out", str(out)),
            *("--first-poll", "0.02"),
            KLING_API_KEY="sk-sandbox",
        )
    assert done.returncode == 0, done.stderr.decode()
    lines = {line["key"]: line for line in results(out)}
    assert lines["a"]["watermark_url"] and lines["b"]["watermark_url"] is None
    assert (lines["a"]["units"], lines["b"]["units"]) == (1.0, 0.5)
    assert "1.5 units charged" in done.stderr.decode()
    bad = tmp_path / "bad.csv"
    bad.write_text("key,video_id,audio_id,sound_end_time,watermark\nc,v,t,3000,maybe\n")
    refused = cli("estimate", str(bad))
    assert refused.returncode == 1 and "watermark: must be true or false" in refused.stderr
