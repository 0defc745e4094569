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
