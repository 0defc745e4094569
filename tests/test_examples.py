"""The examples run: scripts in a subprocess, the web apps in-process against the sandbox."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from aiohttp.test_utils import TestClient, TestServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
AUDIO_JOB = {"video_url": "https://example.com/a.mp4", "audio_url": "https://example.com/a.mp3"}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_batch_script() -> None:
    lines = run_script("batch").splitlines()
    assert len(lines) == 11
    assert "fails-on-purpose: failed: there is no human in the video" in lines
    assert sum(": http://127.0.0.1:" in line for line in lines) == 10


def test_callback_receiver_script() -> None:
    lines = run_script("callback_receiver").splitlines()
    assert sum(line.startswith("result: ") and "succeeded" in line for line in lines) == 3
    assert sum(line.strip().startswith("callback: ") for line in lines) >= 3


@pytest.mark.anyio
async def test_aiohttp_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLING_API_KEY", raising=False)  # the app starts its sandbox
    app = load("aiohttp_app").make_app()
    async with TestClient(TestServer(app)) as client:
        answer = await client.post("/jobs", json=AUDIO_JOB)
        assert answer.status == 202
        task_id = (await answer.json())["task_id"]
        answer = await client.get(f"/tasks/{task_id}")
        assert answer.status == 200
        assert (await answer.json())["state"] in ("submitted", "processing")
        bad = await client.post("/jobs", json={**AUDIO_JOB, "text": "Hi"})
        assert bad.status == 400 and "voice_id" in (await bad.json())["error"]
        assert (await client.get("/tasks/123")).status == 404


@pytest.mark.anyio
async def test_fastapi_app(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    monkeypatch.delenv("KLING_API_KEY", raising=False)
    app = load("fastapi_app").app
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            answer = await client.post("/jobs", json=AUDIO_JOB)
            assert answer.status_code == 202
            task_id = answer.json()["task_id"]
            answer = await client.get(f"/tasks/{task_id}")
            assert answer.json()["state"] in ("submitted", "processing")
            bad = await client.post("/jobs", json={**AUDIO_JOB, "voice_speed": 1.5})
            assert bad.status_code == 422 and "voice_speed" in bad.json()["detail"]
            assert (await client.get("/tasks/123")).status_code == 404


class _Recorder:
    """Stands in for an OpenTelemetry meter (the SDK is not installed): sums what it is given."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str], float] = {}

    def _instrument(self, name: str, **_: object) -> _Recorder.Instrument:
        return _Recorder.Instrument(self, name)

    create_counter = create_histogram = _instrument

    class Instrument:
        def __init__(self, meter: _Recorder, name: str) -> None:
            self.meter, self.name = meter, name

        def add(self, amount: float, attributes: dict[str, object] | None = None) -> None:
            key = (self.name, ",".join(f"{k}={v}" for k, v in (attributes or {}).items()))
            self.meter.sums[key] = self.meter.sums.get(key, 0) + amount

        record = add


@pytest.mark.anyio
async def test_otel_example_counts_what_the_batch_does() -> None:
    import kling_async as ka
    from kling_async.testing import SANDBOX_API_KEY, FakeKlingServer

    meter = _Recorder()
    on_event = load("otel_metrics").otel_metrics(meter)
    jobs = [
        ka.LipSyncJob.from_audio(
            video_url=AUDIO_JOB["video_url"], audio_url=AUDIO_JOB["audio_url"], key=f"k{n}"
        )
        for n in range(6)
    ]
    async with FakeKlingServer(task_duration=0.02, task_limit=2) as server:
        client = ka.KlingClient.kling(
            api_key=SANDBOX_API_KEY,
            base_url=server.url,
            poll=ka.PollPolicy(first_delay=0.01, max_interval=0.05),
            retry=ka.RetryPolicy(concurrency_delay=0.01, base_delay=0.01),
        )
        async with client:
            async for _ in client.run_batch(jobs, on_event=on_event):
                pass
    sums = meter.sums
    assert sums["kling.jobs", "state=succeeded"] == 6
    assert sums["kling.tasks", "stage=lip-sync"] == 6
    assert sums["kling.refusals", "code=1303"] >= 1
    assert sums["kling.requests", ""] == sum(
        server.requests[r] for r in ("submit", "query", "list")
    )


def test_otel_example_script_runs_without_an_sdk() -> None:
    assert run_script("otel_metrics").count("succeeded") == 5


def test_prometheus_example_script() -> None:
    text = run_script("prometheus_metrics")
    assert 'kling_jobs_total{state="succeeded"} 6.0' in text
    assert "kling_tasks_submitted_total 6.0" in text
