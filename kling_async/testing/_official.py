"""The official Kling format, served under every configured prefix.

The wire format is described in docs/protocol.md, Official format.

Routes, each behind the :class:`~._gate.Gate` under the name in brackets:

* ``POST {prefix}/v1/videos/lip-sync`` [submit], ``GET .../lip-sync/{task_id}`` [query],
  ``GET .../lip-sync?pageNum&pageSize`` [list];
* ``POST {prefix}/v1/videos/identify-face`` [identify-face], synchronous;
* ``POST {prefix}/v1/videos/advanced-lip-sync`` [advanced-submit], its query by id
  [advanced-query] and its list [advanced-list].
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from ._gate import Gate, Kind, RouteHandler
from ._state import NO_HUMAN_REASON, Account, FaceSession, FakeTask, Stage
from ._validate import (
    check_callback_url,
    check_face_choose,
    check_lip_sync,
    check_video_source,
    check_watermark,
)
from ._wire import Refusal, official_ok, read_json

__all__ = ["UNITS_PER_5_SECONDS", "OfficialRoutes", "face_count", "output_seconds", "render_task"]

#: Length of every fake basic lip-sync video, as the wire spells durations (a string of seconds).
VIDEO_DURATION = "5.0"
#: What the fake charges a succeeded task, per started 5 s of output (``final_unit_deduction``).
UNITS_PER_5_SECONDS = 0.5
# docs/protocol.md, Query many: page numbers and sizes the list query accepts.
MAX_PAGE_NUM = 1000
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 30
ADV: Stage = "advanced-lip-sync"


def face_count(video_url: object) -> int:
    """How many faces the fake "finds" in a video.

    None for URLs containing "no-face" or "no-human", two for "two-faces", else one.
    """
    url = video_url if isinstance(video_url, str) else ""
    if "no-face" in url or "no-human" in url:
        return 0
    return 2 if "two-faces" in url else 1


def _parent_video(account: Account, video_id: object, video_url: object) -> dict[str, Any]:
    ident = str(video_id) if video_id is not None else "uploaded"
    url = video_url if isinstance(video_url, str) else f"{account.base_url}/videos/src-{ident}.mp4"
    return {"id": ident, "url": url, "duration": VIDEO_DURATION}


def output_seconds(task: FakeTask) -> float:
    """How long the task's video lasts: the trimmed audio (advanced), else 5 s."""
    choices = task.input.get("face_choose")
    if task.stage == ADV and isinstance(choices, list) and choices:
        choice = choices[0]
        return float(choice["sound_end_time"] - choice["sound_start_time"]) / 1000
    return float(VIDEO_DURATION)


def _units(seconds: float) -> str:
    # A string on the wire, as the official answers spell it.
    return f"{UNITS_PER_5_SECONDS * math.ceil(seconds / 5 - 1e-9):g}"


def render_task(task: FakeTask, account: Account) -> dict[str, Any]:
    """The official task object: the query's ``data`` and a callback's body."""
    state = task.state
    info: dict[str, Any]
    if task.stage == "lip-sync":
        fields = task.input.get("input", {})
        info = {
            "parent_video": _parent_video(account, fields.get("video_id"), fields.get("video_url"))
        }
    else:
        session = task.session
        video = session.video_url if session else None
        info = {"parent_video": _parent_video(account, None, video)}
        if task.input.get("external_task_id") is not None:
            info["external_task_id"] = task.input["external_task_id"]
    videos = []
    seconds = output_seconds(task)
    watermark = task.input.get("watermark_info")
    if state == "succeed":
        made = {"id": f"v{task.task_id}", "url": task.result_url, "duration": f"{seconds:g}"}
        if isinstance(watermark, dict) and watermark.get("enabled"):
            made["watermark_url"] = task.result_url.removesuffix(".mp4") + "-wm.mp4"
        videos = [made]
    answer: dict[str, Any] = {
        "task_id": task.task_id,
        "task_status": state,
        "task_status_msg": task.reason or "",
        "task_info": info,
        "task_result": {"videos": videos},
        "created_at": account.clock.ms(task.born),
        "updated_at": account.clock.ms(task.changed_at()),
    }
    if watermark is not None:
        answer["watermark_info"] = watermark
    if task.terminal:  # a failed task costs nothing
        answer["final_unit_deduction"] = _units(seconds) if state == "succeed" else "0"
    return answer


def _page(request: web.Request) -> tuple[int, int]:
    numbers = []
    for name, default, top in (
        ("pageNum", 1, MAX_PAGE_NUM),
        ("pageSize", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
    ):
        raw = request.query.get(name)
        try:
            value = default if raw is None else int(raw)
        except ValueError:
            value = 0
        if not 1 <= value <= top:
            raise Refusal(1201, f"{name}: must be a whole number from 1 to {top}")
        numbers.append(value)
    return numbers[0], numbers[1]


class OfficialRoutes:
    """Handlers of the official format; see the module docstring."""

    def __init__(self, *, account: Account, gate: Gate) -> None:
        self._account = account
        self._gate = gate

    def add_to(self, app: web.Application, prefixes: Sequence[str]) -> None:
        """Register every route under each of ``prefixes``."""
        table: list[tuple[str, str, str, Kind, RouteHandler]] = [
            ("POST", "lip-sync", "submit", "submit", self.submit),
            ("GET", "lip-sync/{task_id}", "query", "query", self._query("lip-sync")),
            ("GET", "lip-sync", "list", "query", self._list("lip-sync")),
            ("POST", "identify-face", "identify-face", "submit", self.identify_face),
            ("POST", "advanced-lip-sync", "advanced-submit", "submit", self.advanced_submit),
            ("GET", "advanced-lip-sync/{task_id}", "advanced-query", "query", self._query(ADV)),
            ("GET", "advanced-lip-sync", "advanced-list", "query", self._list(ADV)),
        ]
        for prefix in prefixes:
            for method, path, route, kind, handler in table:
                guarded = self._gate.guard(route, "kling", kind, handler)
                app.router.add_route(method, f"{prefix}/v1/videos/{path}", guarded)

    async def submit(self, request: web.Request, request_id: str) -> web.Response:
        """Create a lip-sync task."""
        body = await read_json(request)
        fields = check_lip_sync(body)
        video_url = fields.get("video_url")
        no_human = isinstance(video_url, str) and "no-human" in video_url
        reason = NO_HUMAN_REASON if no_human else None
        return await self._create(body, "lip-sync", request_id, fail_reason=reason)

    async def advanced_submit(self, request: web.Request, request_id: str) -> web.Response:
        """Create an advanced lip-sync task for faces of an identify-face session."""
        body = await read_json(request)
        session_id = body.get("session_id")
        session = self._account.sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None or session.dialect != "kling":
            raise Refusal(1201, "session_id: unknown session; call identify-face first")
        check_face_choose(body, session, official=True)
        check_watermark(body)
        external = body.get("external_task_id")
        if external is not None:
            if not isinstance(external, str) or not external.strip():
                raise Refusal(1201, "external_task_id: must be a non-empty string")
            if external in self._account.external_ids:
                # Unique per account (docs/protocol.md, Advanced lip-sync).
                raise Refusal(1201, "external_task_id: already used by another task")
            self._account.external_ids[external] = ""  # taken now: a twin sent meanwhile fails
        try:
            return await self._create(body, ADV, request_id, session=session, external=external)
        except BaseException:
            if external is not None and not self._account.external_ids.get(external):
                del self._account.external_ids[external]  # nothing was created after all
            raise

    async def _create(
        self,
        body: Mapping[str, Any],
        stage: Stage,
        request_id: str,
        *,
        fail_reason: str | None = None,
        session: FaceSession | None = None,
        external: str | None = None,
    ) -> web.Response:
        callback_url = check_callback_url(body)
        if self._gate.faults.create_delay:
            await asyncio.sleep(self._gate.faults.create_delay)
        task = self._account.create(
            dialect="kling",
            stage=stage,
            body=body,
            callback_url=callback_url,
            session=session,
            fail_reason=fail_reason,
        )
        if external is not None:
            self._account.external_ids[external] = task.task_id
        if self._gate.faults.answer_delay:
            await asyncio.sleep(self._gate.faults.answer_delay)
        data: dict[str, Any] = {
            "task_id": task.task_id,
            "task_status": "submitted",
            "created_at": self._account.clock.ms(task.born),
            "updated_at": self._account.clock.ms(task.born),
        }
        if stage == ADV:
            data["task_info"] = {"external_task_id": external}
        return official_ok(data, request_id)

    def _query(self, stage: Stage) -> RouteHandler:
        async def query(request: web.Request, request_id: str) -> web.Response:
            wanted = request.match_info["task_id"]
            task = self._account.tasks.get(wanted)
            if task is None and stage == ADV:
                # The single-task path takes the task id or the caller's external_task_id.
                task = self._account.tasks.get(self._account.external_ids.get(wanted, ""))
            if task is None or task.dialect != "kling" or task.stage != stage:
                raise Refusal(1203, "task not found")
            data = render_task(task, self._account)
            # DMXAPI's sample shows a one-element list here (docs/protocol.md, Query one).
            return official_ok([data] if self._gate.faults.data_as_list else data, request_id)

        return query

    def _list(self, stage: Stage) -> RouteHandler:
        async def list_tasks(request: web.Request, request_id: str) -> web.Response:
            number, size = _page(request)
            self._account.list_pages[number] += 1
            self._account.list_page_sizes[size] += 1
            tasks = self._account.newest_first("kling", stage, (number - 1) * size, size)
            return official_ok([render_task(task, self._account) for task in tasks], request_id)

        return list_tasks

    async def identify_face(self, request: web.Request, request_id: str) -> web.Response:
        """Find the faces of a video at once, and open a session for advanced lip-sync."""
        body = await read_json(request)
        check_video_source(body)
        video_url = body.get("video_url")
        session = self._account.new_session(
            "kling",
            face_count(video_url),
            video_url=video_url if isinstance(video_url, str) else None,
        )
        faces = [
            {
                "face_id": face.face_id,
                "face_image": f"{self._account.base_url}/faces/{face.face_id}.jpg",
                "start_time": face.start_ms,
                "end_time": face.end_ms,
            }
            for face in session.faces
        ]
        data: dict[str, object] = {"session_id": session.session_id, "face_data": faces}
        if self._account.identify_face_units is not None:
            data["final_unit_deduction"] = f"{self._account.identify_face_units:g}"
        return official_ok(data, request_id)
