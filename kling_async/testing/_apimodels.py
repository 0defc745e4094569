"""apimodels.app's unified format: identify-face, then advanced lip-sync.

The wire format is described in docs/protocol.md, apimodels.app.

``POST /api/v1/audio/generations`` [apimodels-submit] creates a task of either model;
``GET /api/v1/audio/generations?task_id=`` [apimodels-query] reads one.  Both models are tasks
and both count against the account's task limit.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from ._gate import Gate
from ._official import face_count
from ._state import Account, FakeTask, State
from ._validate import check_callback_url, check_face_choose, is_http_url
from ._wire import Refusal, apimodels_ok, read_json

__all__ = [
    "IDENTIFY_MODEL",
    "LIP_SYNC_MODEL",
    "NO_FACES_REASON",
    "ApimodelsRoutes",
    "callback_body",
]

IDENTIFY_MODEL = "kling-identify-face"
LIP_SYNC_MODEL = "kling-advanced-lip-sync"
#: The failMsg of an identify-face task that found nobody (apimodels' own sample).
NO_FACES_REASON = "Face detection failed: no faces found"
PATH = "/api/v1/audio/generations"
# apimodels' words for the official states.
STATES: dict[State, str] = {
    "submitted": "pending",
    "processing": "processing",
    "succeed": "completed",
    "failed": "failed",
}
VIDEO_SECONDS = 5


def _fail_code(task: FakeTask) -> str:
    return "FACE_NOT_FOUND" if task.reason == NO_FACES_REASON else "TASK_FAILED"


def _result(task: FakeTask, account: Account) -> dict[str, Any] | None:
    """The finished task's result: faces of an identify task, or the video of a lip-sync."""
    if task.state != "succeed":
        return None
    if task.stage == "identify-face":
        session = task.session
        faces = session.faces if session else ()
        return {
            "faceData": {
                "session_id": session.session_id if session else None,
                "face_list": [
                    {
                        "face_id": face.face_id,
                        "face_reference": f"{account.base_url}/faces/{face.face_id}.jpg",
                    }
                    for face in faces
                ],
            }
        }
    return {"resultUrls": [task.result_url], "videoDuration": VIDEO_SECONDS}


def render_task(task: FakeTask, account: Account) -> dict[str, Any]:
    """The query answer's ``data``."""
    state = task.state
    data: dict[str, Any] = {
        "taskId": task.task_id,
        "state": STATES[state],
        "model": task.model,
        "createTime": account.clock.ms(task.born),
    }
    if state == "failed":
        data.update(failMsg=task.reason, failCode=_fail_code(task))
    data.update(_result(task, account) or {})
    if task.terminal:
        data["completeTime"] = account.clock.ms(task.ends_at)
        data["costTime"] = account.clock.ms(task.ends_at) - account.clock.ms(task.born)
    return data


def callback_body(task: FakeTask, account: Account) -> dict[str, Any] | None:
    """The callback apimodels posts, for terminal states only (None before).

    ``param`` and ``resultJson`` are JSON *strings*, as documented (docs/protocol.md,
    apimodels.app callbacks).
    """
    if not task.terminal:
        return None
    state = task.state
    result = _result(task, account)
    data = {
        "taskId": task.task_id,
        # The documented callback sample prefixes the model with its family.
        "model": f"kling-video/{task.model}",
        "state": STATES[state],
        "param": json.dumps(task.input),
        "resultJson": None if result is None else json.dumps(result),
        "failCode": _fail_code(task) if state == "failed" else None,
        "failMsg": task.reason,
        "costTime": account.clock.ms(task.ends_at) - account.clock.ms(task.born),
        "completeTime": account.clock.ms(task.ends_at),
        "createTime": account.clock.ms(task.born),
    }
    return {"code": 200, "msg": "success", "data": data}


class ApimodelsRoutes:
    """Handlers of the apimodels format; see the module docstring."""

    def __init__(self, *, account: Account, gate: Gate) -> None:
        self._account = account
        self._gate = gate

    def add_to(self, app: web.Application) -> None:
        """Register the two routes."""
        app.router.add_post(
            PATH, self._gate.guard("apimodels-submit", "apimodels", "submit", self.submit)
        )
        app.router.add_get(
            PATH,
            self._gate.guard("apimodels-query", "apimodels", "query", self.query),
            allow_head=False,
        )

    async def submit(self, request: web.Request, request_id: str) -> web.Response:
        """Create an identify-face or an advanced lip-sync task."""
        body = await read_json(request)
        model = body.get("model")
        callback_url = check_callback_url(body)
        if model == IDENTIFY_MODEL:
            video_url = body.get("video_url")
            if not is_http_url(video_url):
                raise Refusal(400, "video_url: is required and must be an http(s) URL")
            faces = face_count(video_url)
            task = self._create(body, callback_url, no_faces=faces == 0)
            if faces:
                task.session = self._account.new_session(
                    "apimodels", faces, video_url=video_url, identify_task_id=task.task_id
                )
        elif model == LIP_SYNC_MODEL:
            self._check_session(body)
            task = self._create(body, callback_url, no_faces=False)
        else:
            raise Refusal(400, f"model: must be {IDENTIFY_MODEL} or {LIP_SYNC_MODEL}")
        if self._gate.faults.answer_delay:
            await asyncio.sleep(self._gate.faults.answer_delay)
        return apimodels_ok({"taskId": task.task_id, "state": "pending", "model": model})

    def _check_session(self, body: dict[str, Any]) -> None:
        session_id = body.get("session_id")
        session = self._account.sessions.get(session_id) if isinstance(session_id, str) else None
        identify = self._account.tasks.get(session.identify_task_id or "") if session else None
        if session is None or identify is None or identify.state != "succeed":
            raise Refusal(400, "session_id: unknown, or its identify-face task has not completed")
        check_face_choose(body, session, official=False)

    def _create(
        self, body: dict[str, Any], callback_url: str | None, *, no_faces: bool
    ) -> FakeTask:
        model = str(body["model"])
        return self._account.create(
            dialect="apimodels",
            stage="identify-face" if model == IDENTIFY_MODEL else "advanced-lip-sync",
            body=body,
            callback_url=callback_url,
            model=model,
            fail_reason=NO_FACES_REASON if no_faces else None,
        )

    async def query(self, request: web.Request, request_id: str) -> web.Response:
        """One task, by ``task_id``."""
        task_id = request.query.get("task_id")
        if not task_id:
            raise Refusal(400, "task_id: is required")
        task = self._account.tasks.get(task_id)
        if task is None or task.dialect != "apimodels":
            raise Refusal(404, "task not found")
        return apimodels_ok(render_task(task, self._account))
