"""The official Kling format, at any URL prefix (docs/protocol.md, Official format).

Spoken by the official API (no prefix) and unchanged by many gateways under a prefix such as
``/kling``.  :class:`KlingDialect` builds the requests and parses the answers of

* basic lip-sync: one task, ``POST {prefix}/v1/videos/lip-sync``, polled at
  ``GET {prefix}/v1/videos/lip-sync/{task_id}`` or listed a page at a time;
* official advanced lip-sync (``advanced=True``): a synchronous identify-face call, then an
  ``advanced-lip-sync`` task for the chosen face.

Pure protocol: no I/O.  The wire structures and their mapping live in :mod:`._kling_wire`.
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping
from urllib.parse import quote

import attrs

from .._errors import SUCCESS_CODES, MalformedResponseError, ValidationError, business_code
from .._http import HttpRequest, HttpResponse, normalize_prefix
from .._jobs import LipSyncJob
from .._results import Face, TaskSnapshot, TaskState
from ._base import (
    LipSyncFlow,
    Submit,
    audio_base64,
    choose_face,
    decode_envelope,
    overlap_problem,
    sound_source,
)
from ._kling_newform import new_form_snapshot
from ._kling_wire import identify_face_snapshot, task_snapshot

__all__ = [
    "MAX_PAGE",
    "MAX_PAGE_SIZE",
    "STAGE_ADVANCED_LIP_SYNC",
    "STAGE_IDENTIFY_FACE",
    "STAGE_LIP_SYNC",
    "KlingDialect",
]

#: Stage of a basic lip-sync task.
STAGE_LIP_SYNC = "lip-sync"
#: Stage of the synchronous identify-face call that starts official advanced lip-sync.
STAGE_IDENTIFY_FACE = "identify-face"
#: Stage of an official advanced lip-sync task.
STAGE_ADVANCED_LIP_SYNC = "advanced-lip-sync"

#: Highest ``pageNum`` of the list query (docs/protocol.md, Query many).
MAX_PAGE = 1000
#: Largest ``pageSize`` of the list query.
MAX_PAGE_SIZE = 500

# Stages that create a task the server keeps, and where it lives.
_TASK_PATHS = {
    STAGE_LIP_SYNC: "/v1/videos/lip-sync",
    STAGE_ADVANCED_LIP_SYNC: "/v1/videos/advanced-lip-sync",
}
_IDENTIFY_FACE_PATH = "/v1/videos/identify-face"
_STAGES = (STAGE_LIP_SYNC, STAGE_IDENTIFY_FACE, STAGE_ADVANCED_LIP_SYNC)


class KlingDialect:
    """The official Kling format under ``prefix`` (``""`` for the official API, ``"/kling"``...).

    With ``advanced=True`` jobs run as official advanced lip-sync: identify-face, then an
    advanced lip-sync task for the face the job picks (``face_id``, else ``face_index``).  That
    API is audio-only and needs ``sound_end_time``.
    """

    name = "kling"
    list_page_size = MAX_PAGE_SIZE

    def __init__(
        self, *, prefix: str = "", advanced: bool = False, gateway: bool | None = None
    ) -> None:
        self.prefix = normalize_prefix(prefix)
        self.advanced = advanced
        #: A gateway (``gateway``, else a ``prefix``) may send refusals with HTTP 200; the
        #: official API sends each with its own status (docs/protocol.md, Business codes), so
        #: its 2xx answer means the task exists, even when the body was cut off.
        self.refusals_may_be_2xx = bool(self.prefix) if gateway is None else gateway
        self.default_stage = STAGE_ADVANCED_LIP_SYNC if advanced else STAGE_LIP_SYNC
        #: Official advanced lip-sync takes ``external_task_id`` (docs/protocol.md, Advanced
        #: lip-sync): unique per account, echoed in ``task_info``, queryable in place of the id.
        self.external_ids = advanced

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(prefix={self.prefix!r}, advanced={self.advanced},"
            f" gateway={self.refusals_may_be_2xx})"
        )

    # -- submitting -----------------------------------------------------------------------------

    def check_job(self, job: LipSyncJob) -> None:
        """Raise :class:`ValidationError` for a job this API cannot run.

        Basic lip-sync runs every valid job but those with ``audio_id`` or ``watermark``, which
        only advanced lip-sync takes (its other options are not sent).
        """
        if not self.advanced:
            if job.external_task_id is not None:
                raise ValidationError(
                    "external_task_id", "only official advanced lip-sync takes an external id"
                )
            for field in ("audio_id", "watermark"):
                if getattr(job, field) is not None:
                    raise ValidationError(
                        field, "only official advanced lip-sync takes it (advanced=True)"
                    )
            return
        if job.text is not None:
            raise ValidationError(
                "text", "official advanced lip-sync is audio-only: give audio_url or audio_file"
            )
        if job.sound_end_time is None:
            # The official API requires every sound_* time (docs/protocol.md, Advanced lip-sync).
            raise ValidationError("sound_end_time", "is required for official advanced lip-sync")

    def flow(self, job: LipSyncJob, *, callback_url: str | None = None) -> LipSyncFlow:
        """The submit steps of ``job`` (see :mod:`kling_async.dialects._base`).

        ``callback_url`` (the client's webhook) wins over the job's own.  The job is checked
        here, before the generator starts, so a bad job fails at once.
        """
        self.check_job(job)
        callback = callback_url or job.callback_url
        if self.advanced:
            return self._advanced_flow(job, callback)
        return self._basic_flow(self._lip_sync_request(job, callback))

    def _basic_flow(self, request: HttpRequest) -> LipSyncFlow:
        done = yield Submit(request=request, stage=STAGE_LIP_SYNC)
        return done

    def _advanced_flow(self, job: LipSyncJob, callback: str | None) -> LipSyncFlow:
        identify = HttpRequest(
            method="POST",
            path=self._path(_IDENTIFY_FACE_PATH),
            json=_video_ref(job),
            # Identify-face is answered at once and may be billed: never repeated blindly.
            idempotent=False,
        )
        # final=False: the video comes from the next step, not from this one.
        found = yield Submit(request=identify, stage=STAGE_IDENTIFY_FACE, final=False)
        if found.state is not TaskState.SUCCEEDED:
            return found
        face = choose_face(job, found.faces)
        if isinstance(face, str):
            return attrs.evolve(found, state=TaskState.FAILED, message=face)
        # Before the billed task: audio that misses the face would only fail there.
        missed = overlap_problem(job, face)
        if missed is not None:
            return attrs.evolve(found, state=TaskState.FAILED, message=missed)
        done = yield Submit(
            request=self._advanced_request(job, found.session_id or found.task_id, face, callback),
            stage=STAGE_ADVANCED_LIP_SYNC,
            external_id=job.external_task_id,
        )
        return done

    def _lip_sync_request(self, job: LipSyncJob, callback: str | None) -> HttpRequest:
        # Field rules: docs/protocol.md, Submit.  None fields are left out; `mode` is only
        # ever text2video or audio2video (std/pro on one gateway page is a documentation error).
        fields = _video_ref(job)
        if job.source_task_id is not None:
            fields["task_id"] = job.source_task_id
        fields["mode"] = job.mode
        if job.text is not None:
            fields["text"] = job.text
            fields["voice_id"] = job.voice_id
            if job.voice_language is not None:
                fields["voice_language"] = job.voice_language
            fields["voice_speed"] = round(float(job.voice_speed), 1)
        elif job.audio_url is not None:
            fields["audio_type"] = "url"
            fields["audio_url"] = job.audio_url
        else:
            fields["audio_type"] = "file"
            fields["audio_file"] = audio_base64(job)
        body: dict[str, object] = {"input": fields}
        if callback:
            body["callback_url"] = callback  # top level, not inside input
        return HttpRequest(
            method="POST", path=self._path(_TASK_PATHS[STAGE_LIP_SYNC]), json=body, idempotent=False
        )

    def _advanced_request(
        self, job: LipSyncJob, session_id: str, face: Face, callback: str | None
    ) -> HttpRequest:
        # docs/protocol.md, Advanced lip-sync: audio_id, or sound_file as a URL or base64.
        choice: dict[str, object] = {"face_id": face.face_id}
        if job.audio_id is not None:
            choice["audio_id"] = job.audio_id
        else:
            choice["sound_file"] = sound_source(job)
        choice |= {
            "sound_start_time": job.sound_start_time,
            "sound_end_time": job.sound_end_time,
            "sound_insert_time": job.sound_insert_time,
            "sound_volume": job.sound_volume,
            "original_audio_volume": job.original_audio_volume,
        }
        body: dict[str, object] = {"session_id": session_id, "face_choose": [choice]}
        if job.watermark is not None:
            body["watermark_info"] = {"enabled": job.watermark}
        if job.external_task_id is not None:
            body["external_task_id"] = job.external_task_id
        if callback:
            body["callback_url"] = callback
        return HttpRequest(
            method="POST",
            path=self._path(_TASK_PATHS[STAGE_ADVANCED_LIP_SYNC]),
            json=body,
            idempotent=False,
        )

    def parse_submit(self, stage: str, response: HttpResponse) -> TaskSnapshot:
        """The snapshot a submit answer describes; raises the error an error answer stands for.

        An identify-face answer is already final: ``SUCCEEDED``, with ``session_id`` and
        ``faces``, and ``task_id`` set to the session id.
        """
        _check_stage(stage)
        data = _data(decode_envelope(response), response.status)
        if stage == STAGE_IDENTIFY_FACE:
            return identify_face_snapshot(data, where="data", status=response.status)
        if isinstance(data, list) and len(data) == 1:
            data = data[0]  # a list-shaped single answer (docs/protocol.md, Query one)
        return _named(
            task_snapshot(
                data, where="data", status=response.status, default_state=TaskState.SUBMITTED
            ),
            "data",
            response.status,
        )

    # -- tracking -------------------------------------------------------------------------------

    def query_request(self, stage: str, task_id: str) -> HttpRequest:
        """``GET {prefix}/v1/videos/{lip-sync|advanced-lip-sync}/{task_id}``."""
        if not isinstance(task_id, str) or not task_id:
            raise ValidationError("task_id", "must be a non-empty string")
        path = _TASK_PATHS.get(_check_stage(stage))
        if path is None:
            raise ValidationError("stage", "identify-face answers at once: nothing to query")
        # Ids are digits and letters in practice: those need no quoting (quote() costs more
        # than the rest of the request's building).
        segment = task_id if task_id.isalnum() and task_id.isascii() else quote(task_id, safe="")
        return HttpRequest(method="GET", path=f"{self.prefix}{path}/{segment}")

    def parse_query(self, stage: str, task_id: str, response: HttpResponse) -> TaskSnapshot:
        """The snapshot of ``task_id`` in a query answer.

        ``data`` may be the task object or, as DMXAPI sends it, a list holding it (docs/protocol.md,
        Query one); an answer about another task is malformed.
        """
        _check_stage(stage)
        status = response.status
        data = _data(decode_envelope(response), status)
        if isinstance(data, list):
            index = next((i for i, item in enumerate(data) if _raw_id(item) == task_id), None)
            if index is None:
                raise MalformedResponseError(
                    f"query answer lists {len(data)} task(s), none of them {task_id}", status=status
                )
            return task_snapshot(data[index], where=f"data[{index}]", status=status)
        snapshot = task_snapshot(data, where="data", status=status)
        if snapshot.task_id != task_id:
            raise MalformedResponseError(
                f"query for task {task_id} answered about task {snapshot.task_id}", status=status
            )
        return snapshot

    def parse_external(self, stage: str, external_id: str, response: HttpResponse) -> TaskSnapshot:
        """The snapshot of the task a query by ``external_id`` found.

        The single-task path takes either id; an answer about a task with another external id
        is malformed.
        """
        _check_stage(stage)
        status = response.status
        data = _data(decode_envelope(response), status)
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        snapshot = task_snapshot(data, where="data", status=status)
        if snapshot.external_task_id != external_id:
            raise MalformedResponseError(
                f"query for external id {external_id} answered about task {snapshot.task_id}",
                status=status,
            )
        return snapshot

    def list_request(self, stage: str, page: int, page_size: int) -> HttpRequest | None:
        """``GET {prefix}/v1/videos/lip-sync?pageNum=N&pageSize=M`` (None for identify-face)."""
        path = _TASK_PATHS.get(_check_stage(stage))
        if path is None:
            return None
        _check_range("page", page, MAX_PAGE)
        _check_range("page_size", page_size, MAX_PAGE_SIZE)
        return HttpRequest(
            method="GET",
            path=self._path(path),
            params=(("pageNum", str(page)), ("pageSize", str(page_size))),
        )

    def parse_list(self, stage: str, response: HttpResponse) -> list[TaskSnapshot]:
        """The snapshots on one page of a list answer, newest first as the server sends them."""
        snapshots, unreadable = self.parse_list_rows(stage, response)
        if unreadable:
            raise unreadable[0]
        return snapshots

    def parse_list_rows(
        self, stage: str, response: HttpResponse
    ) -> tuple[list[TaskSnapshot], list[MalformedResponseError]]:
        """The snapshots of a list page's readable rows (newest first), and each other's fault."""
        _check_stage(stage)
        status = response.status
        data = _data(decode_envelope(response), status, allow_null=True)
        if data is None:
            return [], []  # an empty page, as some gateways spell it
        if not isinstance(data, list):
            raise MalformedResponseError("list answer's data is not a JSON list", status=status)
        snapshots: list[TaskSnapshot] = []
        unreadable: list[MalformedResponseError] = []
        for i, item in enumerate(data):
            try:
                snapshots.append(task_snapshot(item, where=f"data[{i}]", status=status))
            except MalformedResponseError as exc:
                unreadable.append(exc)
        return snapshots, unreadable

    def parse_list_page(
        self, stage: str, response: HttpResponse, wanted: Container[str]
    ) -> tuple[int, list[tuple[int, TaskSnapshot]]]:
        """The rows on one page of a list answer, and the snapshots of the ``wanted`` tasks."""
        _check_stage(stage)
        status = response.status
        data = _data(decode_envelope(response), status, allow_null=True)
        if data is None:
            return 0, []
        if not isinstance(data, list):
            raise MalformedResponseError("list answer's data is not a JSON list", status=status)
        # Only the rows of tasks being followed are turned into snapshots (on a 200-row page
        # that was half of reading it): the id is looked up in the raw row first.
        return len(data), [
            (i, task_snapshot(item, where=f"data[{i}]", status=status))
            for i, item in enumerate(data)
            if _raw_id(item) in wanted
        ]

    def parse_callback(self, body: bytes) -> TaskSnapshot:
        """The snapshot a callback body carries.

        The server POSTs the task object itself (docs/protocol.md, Callbacks); an envelope
        ``{"code": 0, "data": task}`` is accepted too, and so is the newer design's body
        ``{id, status, outputs, billing}`` (the console's test callback uses it).
        """
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as exc:  # (ValueError: a 5000-digit number too)
            raise MalformedResponseError(f"callback body is not JSON: {exc}") from None
        if isinstance(raw, Mapping) and "task_id" not in raw and "data" in raw:
            code = raw.get("code")
            # A code sent as a string ("0"), as some gateways send every code, is a success too.
            if code is not None and business_code(code) not in SUCCESS_CODES:
                raise MalformedResponseError(f"callback envelope carries code {code!r:.20}")
            raw = raw["data"]
            if isinstance(raw, list) and len(raw) == 1:
                raw = raw[0]
        if isinstance(raw, Mapping) and "task_id" not in raw and "id" in raw and "status" in raw:
            return new_form_snapshot(raw, where="callback")
        return _named(task_snapshot(raw, where="callback", status=None), "callback", None)

    def _path(self, path: str) -> str:
        return self.prefix + path


def _check_stage(stage: str) -> str:
    if stage not in _STAGES:
        raise ValidationError("stage", f"must be one of {', '.join(_STAGES)}")
    return stage


def _named(snapshot: TaskSnapshot, where: str, status: int | None) -> TaskSnapshot:
    """``snapshot``, unless its task id is empty: a task that cannot be named cannot be tracked.

    A submit so answered is unclear (its task is looked for), never a task to poll at an empty
    path.  (A list row with an empty id is left alone: no task followed has that id.)
    """
    if not snapshot.task_id.strip():
        raise MalformedResponseError(f"{where}.task_id is empty", status=status)
    return snapshot


def _check_range(field: str, value: int, highest: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= highest:
        raise ValidationError(field, f"must be a whole number from 1 to {highest}")


def _data(envelope: Mapping[str, object], status: int, *, allow_null: bool = False) -> object:
    data = envelope.get("data")
    if data is None and not allow_null:
        raise MalformedResponseError("answer carries no data", status=status)
    return data


def _raw_id(item: object) -> str | None:
    if not isinstance(item, Mapping):
        return None
    value = item.get("task_id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def _video_ref(job: LipSyncJob) -> dict[str, object]:
    if job.video_id is not None:
        return {"video_id": job.video_id}
    return {"video_url": job.video_url}
