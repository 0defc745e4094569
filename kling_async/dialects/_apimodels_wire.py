"""Wire structures of apimodels.app's unified format and their mapping onto :class:`TaskSnapshot`.

The private attrs classes below carry the wire's own (camelCase) field names (docs/protocol.md,
apimodels.app); one cattrs converter structures decoded JSON into them and turns request structs
into JSON, and :func:`to_snapshot` maps them onto the public model, so no wire name reaches
:mod:`kling_async._results`.  A missing or ill-typed field becomes a
:class:`MalformedResponseError` naming the field, never echoing the body (a broken gateway may
echo request headers into it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar, get_args, get_origin

import attrs
import cattrs
import cattrs.v
from cattrs.errors import IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn

from .._errors import MalformedResponseError
from .._results import Face, Returned, TaskSnapshot, TaskState
from ._base import lenient_number

__all__ = [
    "ADVANCED_LIP_SYNC",
    "IDENTIFY_FACE",
    "MODELS",
    "FaceChoice",
    "IdentifyFaceBody",
    "LipSyncBody",
    "WireTask",
    "parse_callback_data",
    "parse_task",
    "to_json",
    "to_snapshot",
]

#: Stage name of the first task, which finds the faces in the video.
IDENTIFY_FACE: Final = "identify-face"
#: Stage name of the second task, which makes the video.
ADVANCED_LIP_SYNC: Final = "advanced-lip-sync"
#: The ``model`` a create request names for each stage.
MODELS: Final = {IDENTIFY_FACE: "kling-identify-face", ADVANCED_LIP_SYNC: "kling-advanced-lip-sync"}

# docs/protocol.md, apimodels.app states.  Anything else is a protocol break, not a guess.
_STATES: Final = {
    "pending": TaskState.SUBMITTED,
    "processing": TaskState.PROCESSING,
    "completed": TaskState.SUCCEEDED,
    "failed": TaskState.FAILED,
}

_T = TypeVar("_T")
# failCode is documented as "null | string"; numbers are accepted too, as the official format uses.
_Code = str | int | None


# --- requests ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class IdentifyFaceBody:
    """The create request of an identify-face task."""

    model: str
    video_url: str
    callback_url: str | None = None


@attrs.frozen(kw_only=True)
class FaceChoice:
    """One ``face_choose`` entry; names as the official advanced API, times in ms."""

    face_id: str
    sound_file: str
    sound_start_time: int
    sound_end_time: int | None = None
    sound_insert_time: int
    sound_volume: float
    original_audio_volume: float


@attrs.frozen(kw_only=True)
class LipSyncBody:
    """The create request of an advanced lip-sync task."""

    model: str
    session_id: str
    face_choose: list[FaceChoice]
    callback_url: str | None = None


# --- answers ----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _Face:
    face_id: str
    face_reference: str | None = None


@attrs.frozen(kw_only=True)
class _FaceData:
    session_id: str
    face_list: list[_Face] | None = None  # null: no faces, as an empty list


@attrs.frozen(kw_only=True)
class WireTask:
    """``data`` of a create or query answer."""

    taskId: str | None = None
    state: str | None = None
    model: str | None = None
    faceData: _FaceData | None = None
    resultUrls: list[str] | None = None
    # A figure beside the result, read leniently (to_snapshot): "8.04" or garbage must not make
    # a completed, paid-for task unreadable (docs/protocol.md, apimodels.app).
    videoDuration: Any = None
    failMsg: str | None = None
    failCode: _Code = None
    createTime: float | None = None
    completeTime: float | None = None


@attrs.frozen(kw_only=True)
class _Param:
    # The decoded ``param`` of a callback: the create request, of which one field is kept.
    video_url: str | None = None


@attrs.frozen(kw_only=True)
class _Result:
    # The decoded ``resultJson`` of a callback.
    resultUrls: list[str] | None = None
    faceData: _FaceData | None = None
    videoDuration: Any = None  # read leniently, as WireTask's


@attrs.frozen(kw_only=True)
class _Callback:
    # ``data`` of a callback body; ``param`` and ``resultJson`` arrive as JSON strings.
    taskId: str
    state: str
    model: str | None = None
    param: _Param | None = None
    resultJson: _Result | None = None
    faceData: _FaceData | None = None
    resultUrls: list[str] | None = None
    failMsg: str | None = None
    failCode: _Code = None
    createTime: float | None = None
    completeTime: float | None = None


# --- the converter ----------------------------------------------------------------------------


class _WireTypeError(TypeError):
    """A value of the wrong JSON type; its message is shown as is."""


def _exact(kind: type[_T], what: str) -> Callable[[object, object], _T]:
    # cattrs' default str/int hooks coerce (str(5) == "5"); a wire value of the wrong type is a
    # protocol break and must be reported, not silently converted.
    def structure(value: object, _: object) -> _T:
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
        raise _WireTypeError(f"expected {what}")

    return structure


def _number(value: object, _: object) -> float:
    # Millisecond times.  A numeric string ("1705123450000") is read as the official format's
    # converter reads it (some upstreams send figures as strings); anything else, True or
    # "nan" included, is a protocol break.
    found = lenient_number(value)
    if found is None:
        raise _WireTypeError("expected a number")
    return found


def _code(value: object, _: object) -> str | int | None:
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return value
    raise _WireTypeError("expected a string or an integer")


def _is_list(type_: Any) -> bool:
    origin: object = get_origin(type_)
    return origin is list


def _list_hook(conv: cattrs.Converter) -> Callable[[Any], Callable[[object, object], list[Any]]]:
    # The default list hook iterates whatever it gets, so a string would become a list of
    # characters; only a JSON array is a list here.  Errors keep their index for the path.
    def factory(list_type: Any) -> Callable[[object, object], list[Any]]:
        (item_type,) = get_args(list_type)

        def structure(value: object, _: object) -> list[Any]:
            if not isinstance(value, list):
                raise _WireTypeError("expected a list")
            items: list[Any] = []
            errors: list[Exception] = []
            for index, item in enumerate(value):
                try:
                    items.append(conv.structure(item, item_type))
                except Exception as exc:
                    note = IterableValidationNote(f"@ index {index}", index, item_type)
                    exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]
                    errors.append(exc)
            if errors:
                raise IterableValidationError(f"while structuring {list_type!r}", errors, list_type)
            return items

        return structure

    return factory


def _object_hook(
    conv: cattrs.Converter, cls: type[_T], *, json_text: bool
) -> Callable[[object, object], _T | None]:
    # The generated hook would index a string or a list as if it were an object and blame the
    # first field; say what is wrong instead.  With json_text, a string is decoded first.
    structure_object = make_dict_structure_fn(cls, conv)

    def structure(value: object, _: object) -> _T | None:
        if json_text and isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as exc:
                raise _WireTypeError(f"is a string but not valid JSON ({exc})") from None
            if value is None:
                return None
        if not isinstance(value, Mapping):
            wanted = "a JSON object, or a string holding one" if json_text else "a JSON object"
            raise _WireTypeError(f"expected {wanted}")
        return structure_object(value, cls)

    return structure


def _make_converter() -> cattrs.Converter:
    # omit_if_default drops the None-defaulted request fields (callback_url, sound_end_time).
    conv = cattrs.Converter(omit_if_default=True)
    conv.register_structure_hook(str, _exact(str, "a string"))
    conv.register_structure_hook(int, _exact(int, "an integer"))
    conv.register_structure_hook(float, _number)
    conv.register_structure_hook(_Code, _code)
    conv.register_structure_hook_factory(_is_list, _list_hook(conv))
    # Inner classes first: an object hook looks its fields' hooks up when it is made.  param and
    # resultJson are JSON *strings* (docs/protocol.md, apimodels.app callbacks): their hooks
    # decode them once, then structure the object (an already-decoded object is accepted as well).
    wire_classes: tuple[tuple[type[Any], bool], ...] = (
        (_Face, False),
        (_FaceData, False),
        (WireTask, False),
        (_Param, True),
        (_Result, True),
        (_Callback, False),
    )
    for cls, json_text in wire_classes:
        conv.register_structure_hook(cls, _object_hook(conv, cls, json_text=json_text))
    return conv


_converter: Final = _make_converter()


def _format_error(exc: BaseException, expected: type | None) -> str:
    if isinstance(exc, _WireTypeError):
        return str(exc)
    return cattrs.v.format_exception(exc, expected)


def _structure(value: object, cls: type[_T], what: str, status: int | None) -> _T:
    """Structure ``value`` into ``cls``, turning every cattrs error into MalformedResponseError."""
    if not isinstance(value, Mapping):
        raise MalformedResponseError(
            f"apimodels {what}: data is missing or not a JSON object", status=status
        )
    try:
        return _converter.structure(value, cls)
    except cattrs.BaseValidationError as exc:
        found = cattrs.transform_error(exc, path="data", format_exception=_format_error)
        problems = "; ".join(found)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        problems = _format_error(exc, cls)
    raise MalformedResponseError(f"apimodels {what}: {problems}", status=status) from None


def to_json(body: IdentifyFaceBody | LipSyncBody) -> dict[str, Any]:
    """A request body as JSON-ready data, without its unset (None) optional fields."""
    unstructured: dict[str, Any] = _converter.unstructure(body)
    return unstructured


def parse_task(data: object, *, what: str, status: int) -> WireTask:
    """The ``data`` of a create or query answer."""
    return _structure(data, WireTask, what, status)


def parse_callback_data(data: object) -> tuple[WireTask, str | None]:
    """The ``data`` of a callback, as a task, and the source video's URL when ``param`` has it.

    ``resultJson`` is folded into the task: its ``resultUrls`` (and ``faceData``) count as the
    task's own.  A field given directly in ``data`` wins.
    """
    callback = _structure(data, _Callback, "callback", None)
    result = callback.resultJson or _Result()
    task = WireTask(
        taskId=callback.taskId,
        state=callback.state,
        model=callback.model,
        faceData=callback.faceData or result.faceData,
        resultUrls=callback.resultUrls or result.resultUrls,
        videoDuration=result.videoDuration,
        failMsg=callback.failMsg,
        failCode=callback.failCode,
        createTime=callback.createTime,
        completeTime=callback.completeTime,
    )
    return task, callback.param.video_url if callback.param else None


# --- wire -> snapshot -------------------------------------------------------------------------


def _state(raw: str | None, what: str, status: int | None) -> TaskState:
    if raw is None:
        raise MalformedResponseError(f"apimodels {what}: data.state is missing", status=status)
    try:
        return _STATES[raw]
    except KeyError:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise MalformedResponseError(
            f"apimodels {what}: unknown task state {shown!r}", status=status
        ) from None


def _stage(model: str | None, fallback: str) -> str:
    # The answer's model names its stage (a callback's may read "kling-video/kling-..."), which
    # beats the caller's guess: get_task() on an identify-face id passes the default stage.
    if model is not None:
        if "identify-face" in model:
            return IDENTIFY_FACE
        if "lip-sync" in model:
            return ADVANCED_LIP_SYNC
    return fallback


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def to_snapshot(
    task: WireTask,
    *,
    task_id: str,
    stage: str,
    what: str,
    status: int | None,
    default_state: TaskState | None = None,
    parent_video_url: str | None = None,
) -> TaskSnapshot:
    """Map ``task`` onto a snapshot of ``task_id``.

    ``stage`` is the caller's guess, overruled by the answer's ``model``.  ``default_state``
    stands in for a missing ``state``; without it a missing state is malformed.
    """
    if task.state is None and default_state is not None:
        state = default_state
    else:
        state = _state(task.state, what, status)
    stage = _stage(task.model, stage)
    # A completed task without its product is a broken answer, not a success without a video.
    if state is TaskState.SUCCEEDED:
        if stage == IDENTIFY_FACE and task.faceData is None:
            raise MalformedResponseError(
                f"apimodels {what}: completed identify-face task has no faceData", status=status
            )
        if stage == ADVANCED_LIP_SYNC and not task.resultUrls:
            raise MalformedResponseError(
                f"apimodels {what}: completed lip-sync task has no resultUrls", status=status
            )
    face_data = task.faceData
    duration = lenient_number(task.videoDuration)
    faces = tuple(
        Face(face_id=face.face_id, image_url=face.face_reference)
        for face in ((face_data.face_list or ()) if face_data else ())
    )
    return TaskSnapshot(
        task_id=task_id,
        state=state,
        message=task.failMsg,
        error_code=task.failCode,
        video_urls=tuple(task.resultUrls or ()),
        created_at=_seconds(task.createTime),
        updated_at=_seconds(task.completeTime),
        parent_video_url=parent_video_url,
        session_id=face_data.session_id if face_data else None,
        faces=faces,
        returned=None if duration is None else Returned(video_duration=duration),
    )
