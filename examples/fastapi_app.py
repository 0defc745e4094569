"""A FastAPI app that shares one KlingClient across all its requests.

    pip install fastapi uvicorn
    uvicorn fastapi_app:app --app-dir examples
    curl -X POST localhost:8000/jobs -H 'Content-Type: application/json' \
         -d '{"video_url": "https://example.com/a.mp4", "audio_url": "https://example.com/a.mp3"}'
    curl localhost:8000/tasks/TASK_ID

The client is opened once, in the app's lifespan, and closed at shutdown: its session,
connection pool and token cache serve every request.  Set KLING_API_KEY (with KLING_BASE_URL and
KLING_PREFIX for a gateway) for a real account; without it the app starts a sandbox server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

import kling_async as ka


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


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with open_client() as client:
        app.state.kling = client
        yield


app = FastAPI(lifespan=lifespan)


def kling(request: Request) -> ka.KlingClient:
    return request.app.state.kling  # type: ignore[no-any-return]


Kling = Annotated[ka.KlingClient, Depends(kling)]


class JobIn(BaseModel):
    """A lip-sync job: text + voice_id, or audio_url; video_url or video_id."""

    video_url: str | None = None
    video_id: str | None = None
    text: str | None = None
    voice_id: str | None = None
    voice_language: str | None = None
    voice_speed: float | None = None
    audio_url: str | None = None
    key: str | None = None


class TaskOut(BaseModel):
    task_id: str
    state: str
    message: str | None = None
    video_url: str | None = None


def task_out(snapshot: ka.TaskSnapshot) -> TaskOut:
    return TaskOut(
        task_id=snapshot.task_id,
        state=snapshot.state.value,
        message=snapshot.message,
        video_url=snapshot.video_url,
    )


@app.post("/jobs", status_code=202)
async def submit(job_in: JobIn, client: Kling) -> TaskOut:
    """Create the task; poll GET /tasks/{task_id} for its video."""
    fields: dict[str, Any] = job_in.model_dump(exclude_none=True)
    try:
        if "text" in fields:
            fields.setdefault("voice_id", None)  # missing: a ValidationError naming the field
            job = ka.LipSyncJob.from_text(**fields)
        else:
            job = ka.LipSyncJob.from_audio(**fields)
    except (ka.ValidationError, TypeError) as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    try:
        return task_out(await client.submit(job))
    except ka.KlingError as exc:
        raise HTTPException(status_code=502, detail=str(exc)) from None


@app.get("/tasks/{task_id}")
async def task(task_id: str, client: Kling) -> TaskOut:
    """What the server says about the task now."""
    try:
        return task_out(await client.get_task(task_id))
    except ka.NotFoundError:
        raise HTTPException(status_code=404, detail="no such task") from None
    except ka.KlingError as exc:
        raise HTTPException(status_code=502, detail=str(exc)) from None
