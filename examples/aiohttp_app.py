"""An aiohttp.web app that shares one KlingClient across all its requests.

    python examples/aiohttp_app.py
    curl -X POST localhost:8080/jobs -H 'Content-Type: application/json' \
         -d '{"video_url": "https://example.com/a.mp4", "audio_url": "https://example.com/a.mp3"}'
    curl localhost:8080/tasks/TASK_ID

The client is opened once, in the app's cleanup context, and closed at shutdown: its session,
connection pool and token cache serve every request.  Set KLING_API_KEY (with KLING_BASE_URL and
KLING_PREFIX for a gateway) for a real account; without it the app starts a sandbox server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

import kling_async as ka

KLING = web.AppKey("kling", ka.KlingClient)


@contextlib.asynccontextmanager
async def open_client() -> AsyncIterator[ka.KlingClient]:
    api_key = os.environ.get("KLING_API_KEY")
    if api_key:
        client = ka.KlingClient.kling(
            api_key=api_key,
            base_url=os.environ.get("KLING_BASE_URL", ka.OFFICIAL_BASE_URL),
            prefix=os.environ.get("KLING_PREFIX", ""),
        )
        async with client:
            yield client
        return
    from kling_async.testing import SANDBOX_API_KEY, FakeKlingServer

    async with FakeKlingServer(task_duration=2.0) as server:
        print(f"no KLING_API_KEY: using a sandbox server at {server.url}")
        async with ka.KlingClient.kling(api_key=SANDBOX_API_KEY, base_url=server.url) as client:
            yield client


async def kling_client(app: web.Application) -> AsyncIterator[None]:
    # cleanup_ctx: the code before `yield` runs at startup, the rest at shutdown.
    async with open_client() as client:
        app[KLING] = client
        yield


def job_from_json(fields: dict[str, Any]) -> ka.LipSyncJob:
    """A text job when the JSON has "text", else an audio job (audio_url)."""
    fields = {name: value for name, value in fields.items() if value is not None}
    if "audio_file" in fields:
        raise ka.ValidationError("audio_file", "send an audio_url to this service")
    if "text" in fields:
        fields.setdefault("voice_id", None)  # missing: a ValidationError naming the field
        return ka.LipSyncJob.from_text(**fields)
    return ka.LipSyncJob.from_audio(**fields)


def task_json(snapshot: ka.TaskSnapshot) -> dict[str, Any]:
    return {
        "task_id": snapshot.task_id,
        "state": snapshot.state.value,
        "message": snapshot.message,
        "video_url": snapshot.video_url,
    }


async def submit(request: web.Request) -> web.Response:
    """POST /jobs: create the task; answers 202 with its id (poll GET /tasks/{id})."""
    try:
        fields = await request.json()
        job = job_from_json(fields if isinstance(fields, dict) else {})
    except (ValueError, TypeError) as exc:  # bad JSON, a broken rule, an unknown field
        return web.json_response({"error": str(exc)}, status=400)
    try:
        snapshot = await request.app[KLING].submit(job)
    except ka.KlingError as exc:
        return web.json_response({"error": str(exc)}, status=502)
    return web.json_response(task_json(snapshot), status=202)


async def task(request: web.Request) -> web.Response:
    """GET /tasks/{task_id}: what the server says about the task now."""
    try:
        snapshot = await request.app[KLING].get_task(request.match_info["task_id"])
    except ka.NotFoundError:
        return web.json_response({"error": "no such task"}, status=404)
    except ka.KlingError as exc:
        return web.json_response({"error": str(exc)}, status=502)
    return web.json_response(task_json(snapshot))


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(kling_client)
    app.router.add_post("/jobs", submit)
    app.router.add_get("/tasks/{task_id}", task)
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=8080)
