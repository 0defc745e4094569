"""The apimodels.app dialect: advanced lip-sync in two tasks (docs/protocol.md, apimodels.app).

A job runs as two billed tasks created at the same endpoint, ``POST /api/v1/audio/generations``:

1. ``kling-identify-face`` with the ``video_url`` finds the faces; its completed answer carries
   ``faceData = {session_id, face_list: [{face_id, face_reference}]}``.
2. ``kling-advanced-lip-sync`` with that ``session_id`` and one ``face_choose`` entry (the chosen
   face and its audio) makes the video; its completed answer carries ``resultUrls``.

Both are tracked with ``GET /api/v1/audio/generations?task_id=...``; there is no list query.  The
wire names and their converter live in :mod:`._apimodels_wire`.
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping
from typing import Final

import attrs

from .._errors import MalformedResponseError, ValidationError
from .._http import HttpRequest, HttpResponse
from .._jobs import LipSyncJob
from .._results import TaskSnapshot, TaskState
from ._apimodels_wire import (
    ADVANCED_LIP_SYNC,
    IDENTIFY_FACE,
    MODELS,
    FaceChoice,
    IdentifyFaceBody,
    LipSyncBody,
    parse_callback_data,
    parse_task,
    to_json,
    to_snapshot,
)
from ._base import LipSyncFlow, Submit, choose_face, decode_envelope, sound_source

__all__ = ["ADVANCED_LIP_SYNC", "IDENTIFY_FACE", "ApimodelsDialect"]

_PATH: Final = "/api/v1/audio/generations"


def _create(body: IdentifyFaceBody | LipSyncBody) -> HttpRequest:
    # A create bills a task: never repeated blindly (idempotent=False).
    return HttpRequest(method="POST", path=_PATH, json=to_json(body), idempotent=False)


def _lip_sync_flow(job: LipSyncJob, callback_url: str | None) -> LipSyncFlow:
    assert job.video_url is not None  # check_job ran first
    identify_body = IdentifyFaceBody(
        model=MODELS[IDENTIFY_FACE], video_url=job.video_url, callback_url=callback_url
    )
    # final=False: the video comes from the second task, so submit() goes on past this one.
    identified = yield Submit(request=_create(identify_body), stage=IDENTIFY_FACE, final=False)
    if identified.state is not TaskState.SUCCEEDED:
        return identified  # e.g. "Face detection failed: no faces found"
    # A missing face fails the job here, before a (billed) lip-sync task is created.
    face = choose_face(job, identified.faces)
    if isinstance(face, str):
        return attrs.evolve(identified, state=TaskState.FAILED, message=face)
    if identified.session_id is None:
        message = "identify-face task finished without a session_id"
        return attrs.evolve(identified, state=TaskState.FAILED, message=message)
    choice = FaceChoice(
        face_id=face.face_id,
        sound_file=sound_source(job),
        sound_start_time=job.sound_start_time,
        sound_end_time=job.sound_end_time,
        sound_insert_time=job.sound_insert_time,
        sound_volume=job.sound_volume,
        original_audio_volume=job.original_audio_volume,
    )
    lip_sync_body = LipSyncBody(
        model=MODELS[ADVANCED_LIP_SYNC],
        session_id=identified.session_id,
        face_choose=[choice],
        callback_url=callback_url,
    )
    return (yield Submit(request=_create(lip_sync_body), stage=ADVANCED_LIP_SYNC))


class ApimodelsDialect:
    """apimodels.app's unified format: identify-face, then advanced lip-sync.

    The wire format: docs/protocol.md, apimodels.app.

    Takes audio jobs on a ``video_url``; the face is ``job.face_id`` when set, else the
    ``job.face_index``-th face found.  A missing face ends the job as a FAILED snapshot of the
    identify-face task, before the lip-sync task is created.
    """

    name = "apimodels"
    default_stage = ADVANCED_LIP_SYNC
    #: No list query: every task is tracked with its own query.
    list_page_size = 0
    #: No external task ids (docs/protocol.md, apimodels.app, documents none).
    external_ids = False
    #: Its errors may come with HTTP 200 (docs/protocol.md, apimodels.app).
    refusals_may_be_2xx = True

    def check_job(self, job: LipSyncJob) -> None:
        """Refuse text, ``video_id``, ``audio_id`` and ``watermark`` jobs: not on this service."""
        for field in ("audio_id", "watermark"):
            if getattr(job, field) is not None:
                raise ValidationError(field, "apimodels does not take it")
        if job.text is not None:
            raise ValidationError(
                "text", "apimodels runs advanced lip-sync, which takes audio, not text"
            )
        if job.video_id is not None or job.video_url is None:
            raise ValidationError(
                "video_id", "apimodels takes a video_url only, not a Kling video_id"
            )
        if job.external_task_id is not None:
            raise ValidationError("external_task_id", "apimodels takes no external task id")

    def flow(self, job: LipSyncJob, *, callback_url: str | None = None) -> LipSyncFlow:
        """Two submits: identify-face, then advanced lip-sync with the chosen face.

        ``callback_url`` wins over ``job.callback_url``; both tasks report to it.  Raises
        :class:`ValidationError` here, at once, for a job :meth:`check_job` refuses.
        """
        self.check_job(job)
        return _lip_sync_flow(job, callback_url or job.callback_url)

    def parse_submit(self, stage: str, response: HttpResponse) -> TaskSnapshot:
        """The new task's snapshot (``pending`` is SUBMITTED, as is an answer with no state)."""
        what, status = "create answer", response.status
        task = parse_task(decode_envelope(response).get("data"), what=what, status=status)
        if task.taskId is None or not task.taskId.strip():
            # An empty id names no task to poll: the submit's outcome is unclear, not a task.
            raise MalformedResponseError(f"apimodels {what}: data.taskId is missing", status=status)
        # The task exists once it has an id; a missing state must not lose a billed task.
        return to_snapshot(
            task,
            task_id=task.taskId,
            stage=stage,
            what=what,
            status=status,
            default_state=TaskState.SUBMITTED,
        )

    def query_request(self, stage: str, task_id: str) -> HttpRequest:
        """``GET /api/v1/audio/generations?task_id=...``, the same for both stages."""
        if not isinstance(task_id, str) or not task_id:
            raise ValidationError("task_id", "must be a non-empty string")
        return HttpRequest(method="GET", path=_PATH, params=(("task_id", task_id),))

    def parse_query(self, stage: str, task_id: str, response: HttpResponse) -> TaskSnapshot:
        """The snapshot of ``task_id``; an answer about another task is malformed."""
        what, status = "query answer", response.status
        task = parse_task(decode_envelope(response).get("data"), what=what, status=status)
        if task.taskId is not None and task.taskId != task_id:
            raise MalformedResponseError(
                f"apimodels {what}: answer is about another task than {task_id}", status=status
            )
        return to_snapshot(task, task_id=task_id, stage=stage, what=what, status=status)

    def list_request(self, stage: str, page: int, page_size: int) -> HttpRequest | None:
        """Always None: apimodels has no list query."""
        return None

    def parse_list(self, stage: str, response: HttpResponse) -> list[TaskSnapshot]:
        """Never called (``list_page_size`` is 0); raises NotImplementedError."""
        raise NotImplementedError("apimodels has no list query")

    def parse_list_rows(
        self, stage: str, response: HttpResponse
    ) -> tuple[list[TaskSnapshot], list[MalformedResponseError]]:
        """Never called (``list_page_size`` is 0); raises NotImplementedError."""
        raise NotImplementedError("apimodels has no list query")

    def parse_list_page(
        self, stage: str, response: HttpResponse, wanted: Container[str]
    ) -> tuple[int, list[tuple[int, TaskSnapshot]]]:
        """Never called (``list_page_size`` is 0); raises NotImplementedError."""
        raise NotImplementedError("apimodels has no list query")

    def parse_external(self, stage: str, external_id: str, response: HttpResponse) -> TaskSnapshot:
        """Never called (``external_ids`` is False); raises NotImplementedError."""
        raise NotImplementedError("apimodels has no external task ids")

    def parse_callback(self, body: bytes) -> TaskSnapshot:
        """The snapshot a callback carries (terminal states only).

        The body: docs/protocol.md, apimodels.app callbacks.

        ``param`` and ``resultJson`` are JSON strings, decoded once; a null ``resultJson`` is
        fine for a failed task.  The stage comes from the callback's ``model``.
        """
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError) as exc:  # (ValueError: a 5000-digit number too)
            raise MalformedResponseError(f"apimodels callback is not JSON: {exc}") from None
        if not isinstance(decoded, Mapping):
            raise MalformedResponseError("apimodels callback is not a JSON object")
        task, video_url = parse_callback_data(decoded.get("data"))
        assert task.taskId is not None  # required in a callback
        return to_snapshot(
            task,
            task_id=task.taskId,
            stage="",
            what="callback",
            status=None,
            parent_video_url=video_url,
        )
