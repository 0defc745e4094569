"""Wire structures of the official Kling format and their mapping onto :class:`TaskSnapshot`.

The private attrs classes below carry the wire's own field names (docs/protocol.md, Query one
and Advanced lip-sync); one cattrs converter structures decoded JSON into them, and the mapping
functions turn them into the public models, so no wire name reaches :mod:`kling_async._results`.
Anything missing or of the wrong type becomes a :class:`MalformedResponseError` naming the field
(never echoing values: bodies can be large).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

from .._errors import MalformedResponseError
from .._results import BalanceDeduction, Face, Returned, TaskSnapshot, TaskState
from ._base import lenient_number

__all__ = [
    "identify_face_snapshot",
    "lenient_number",
    "make_returned",
    "map_state",
    "seconds",
    "structure",
    "task_snapshot",
]

_T = TypeVar("_T")

# docs/protocol.md, Task states.  "succeeded" and "success" are not in the vendor pages but are
# accepted because gateways re-spell states; a state outside this table is a protocol break.
_STATES: dict[str, TaskState] = {
    "submitted": TaskState.SUBMITTED,
    "processing": TaskState.PROCESSING,
    "succeed": TaskState.SUCCEEDED,
    "succeeded": TaskState.SUCCEEDED,
    "success": TaskState.SUCCEEDED,
    "failed": TaskState.FAILED,
}


@attrs.frozen
class _Video:
    # A null url (a failed or unfinished task's placeholder) is no video; a success without
    # one is refused in task_snapshot.
    url: str | None = None
    id: str | None = None
    # Read leniently (see lenient_number, make_returned): a garbled figure or extra must not
    # lose a finished video.
    watermark_url: Any = None
    duration: Any = None


@attrs.frozen
class _TaskResult:
    # JSON null where a list is expected (as Go servers write an empty slice) is an empty list,
    # here and in every list field below: a failed task without videos must read as failed.
    videos: list[_Video] | None = None


@attrs.frozen
class _ParentVideo:
    url: str | None = None
    id: str | None = None


@attrs.frozen
class _TaskInfo:
    parent_video: _ParentVideo | None = None
    external_task_id: str | None = None


@attrs.frozen
class _Task:
    task_id: str
    task_status: str | None = None
    task_status_msg: str | None = None
    task_info: _TaskInfo | None = None
    task_result: _TaskResult | None = None
    created_at: float | None = None
    updated_at: float | None = None
    # Strings on the wire ("0.5"); read leniently, as is duration.
    final_unit_deduction: Any = None
    final_balance_deduction: Any = None


@attrs.frozen
class _FaceData:
    face_id: str
    face_image: str | None = None
    start_time: int | None = None
    end_time: int | None = None


@attrs.frozen
class _IdentifyFace:
    session_id: str
    face_data: list[_FaceData] | None = None  # null: no faces, as an empty list
    final_unit_deduction: Any = None  # what the call cost, when the answer says


def _structure_str(value: object, _: object) -> str:
    # Ids are strings on the wire, but a gateway may send an 18-digit id as a JSON number.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _structure_float(value: object, _: object) -> float:
    # Millisecond timestamps: cattrs' default would call float() on anything, even True or "nan".
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise TypeError(f"expected a number, got {type(value).__name__}")


def _structure_int(value: object, type_: object) -> int:
    number = _structure_float(value, type_)
    if not number.is_integer():
        raise TypeError("expected a whole number")
    return int(number)


def _objects_only(cls: type[Any], converter: cattrs.Converter) -> Callable[[object, Any], Any]:
    # cattrs would happily build a nested struct out of a string (every field defaulted); a
    # wire object must be a JSON object.
    structure_fields = make_dict_structure_fn(cls, converter)

    def structure(value: object, type_: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        return structure_fields(value, type_)

    return structure


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter()
    converter.register_structure_hook_factory(attrs.has, _objects_only)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(int, _structure_int)
    return converter


#: The one converter of the official-format dialect.
_CONVERTER = _make_converter()


def structure(raw: object, cls: type[_T], *, where: str, status: int | None) -> _T:
    if not isinstance(raw, Mapping):
        raise MalformedResponseError(f"{where} is not a JSON object", status=status)
    try:
        return _CONVERTER.structure(raw, cls)
    except cattrs.BaseValidationError as exc:
        problems = "; ".join(cattrs.transform_error(exc, path=where)[:5])
        message = f"unexpected answer shape: {problems}"
        raise MalformedResponseError(message, status=status) from None
    except (TypeError, ValueError, KeyError) as exc:  # pragma: no cover - detailed validation
        raise MalformedResponseError(f"{where}: {exc}", status=status) from None


def seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def map_state(raw: str, *, where: str, status: int | None) -> TaskState:
    """Map a wire ``task_status`` onto :class:`TaskState`; unknown words are malformed."""
    state = _STATES.get(raw) or _STATES.get(raw.strip().lower())
    if state is None:
        raise MalformedResponseError(
            f"{where}.task_status {_short(raw)!r} is not a known task state", status=status
        )
    return state


class _Flat(NamedTuple):
    """The fields of one task object that the snapshot needs, already checked."""

    task_id: str
    task_status: str | None
    task_status_msg: str | None
    urls: tuple[str, ...]
    created_at: float | None
    updated_at: float | None
    parent_video_url: str | None
    external_task_id: str | None
    #: The first video's id, duration and watermarked URL, and what the task cost.
    returned: Returned | None = None


# The exact types the fast path takes (tested with ``type(x) in ...``, inline: a helper call per
# field cost a tenth of the parse).  Numbers are exactly int or float: not bool, not a numeric
# string; anything else takes the strict path.
_OPT_STR = (str, type(None))
_NUMBER = (int, float)


def _fast_task(raw: object) -> _Flat | None:
    """The fields of a well-formed task object by plain dict access; None when in any doubt.

    Almost every answer is well-formed, and the cattrs converter costs several times as much.
    This path accepts only what the converter would accept *with the same result* (plain
    strings, numbers, JSON objects and lists where the wire structures say so); anything else,
    even when the converter would take it (an id sent as a number), returns None and takes the
    strict path, which also writes the error messages.
    """
    if type(raw) is not dict:
        return None
    get = raw.get
    task_id, status, message = get("task_id"), get("task_status"), get("task_status_msg")
    created, updated = get("created_at"), get("updated_at")
    if not (
        type(task_id) is str
        and type(status) in _OPT_STR
        and type(message) in _OPT_STR
        and (created is None or (type(created) in _NUMBER and math.isfinite(created)))
        and (updated is None or (type(updated) in _NUMBER and math.isfinite(updated)))
    ):
        return None
    urls: tuple[str, ...] = ()
    first = None
    result = get("task_result")
    if result is not None:
        videos = result.get("videos", ()) if type(result) is dict else None
        if type(videos) not in (list, tuple):
            return None
        for video in videos:  # type: ignore[union-attr]
            if type(video) is not dict or type(video.get("url")) is not str:
                return None
            if type(video.get("id")) not in _OPT_STR:
                return None
        urls = tuple(video["url"] for video in videos if video["url"])  # type: ignore[union-attr]
        if videos:
            first = videos[0]
    parent_url = external = None
    info = get("task_info")
    if info is not None:
        if type(info) is not dict:
            return None
        external, parent = info.get("external_task_id"), info.get("parent_video")
        if type(external) not in _OPT_STR:
            return None
        if parent is not None:
            if type(parent) is not dict:
                return None
            parent_url = parent.get("url")
            if type(parent_url) not in _OPT_STR or type(parent.get("id")) not in _OPT_STR:
                return None
    # Only finished tasks carry a video or a cost: most answers skip all of this.
    returned = None
    units, balance = get("final_unit_deduction"), get("final_balance_deduction")
    if first is not None or units is not None or balance is not None:
        returned = make_returned(
            first.get("id") if first else None,
            first.get("duration") if first else None,
            first.get("watermark_url") if first else None,
            units,
            balance,
        )
    return _Flat(
        task_id=task_id,
        task_status=status,
        task_status_msg=message,
        urls=urls,
        created_at=None if created is None else float(created),
        updated_at=None if updated is None else float(updated),
        parent_video_url=parent_url,
        external_task_id=external,
        returned=returned,
    )


def make_returned(
    video_id: str | None, duration: object, watermark: object, units: object, balance: object
) -> Returned | None:
    """What a finished task's answer says of its video and cost; None when it says nothing."""
    returned = Returned(
        video_id=video_id or None,
        video_duration=lenient_number(duration),
        watermark_url=watermark if type(watermark) is str and watermark else None,
        units=lenient_number(units),
        balance_deduction=_balance(balance),
    )
    return None if returned == _NOTHING else returned


_NOTHING = Returned()


def _balance(raw: object) -> BalanceDeduction | None:
    """``final_balance_deduction`` (``{quota, list_price}``), present only on cash payments."""
    if type(raw) is not dict:
        return None
    quota = lenient_number(raw.get("quota"))
    price = lenient_number(raw.get("list_price"))
    if quota is None and price is None:
        return None
    return BalanceDeduction(quota=quota, list_price=price)


def _strict_task(raw: object, *, where: str, status: int | None) -> _Flat:
    """The same fields through the cattrs converter, with its detailed error messages."""
    task = structure(raw, _Task, where=where, status=status)
    videos = (task.task_result.videos or []) if task.task_result else []
    info = task.task_info or _TaskInfo()
    parent = info.parent_video
    return _Flat(
        task_id=task.task_id,
        task_status=task.task_status,
        task_status_msg=task.task_status_msg,
        urls=tuple(video.url for video in videos if video.url),
        created_at=task.created_at,
        updated_at=task.updated_at,
        parent_video_url=parent.url if parent else None,
        external_task_id=info.external_task_id,
        returned=make_returned(
            videos[0].id if videos else None,
            videos[0].duration if videos else None,
            videos[0].watermark_url if videos else None,
            task.final_unit_deduction,
            task.final_balance_deduction,
        ),
    )


def task_snapshot(
    raw: object,
    *,
    where: str,
    status: int | None,
    default_state: TaskState | None = None,
) -> TaskSnapshot:
    """The snapshot of one task object (a submit answer's, a query's ``data``, a callback body).

    ``default_state`` stands in for a missing ``task_status`` (a submit answer without one can
    only mean the task was just submitted); without it a missing status is malformed.
    """
    task = _fast_task(raw) or _strict_task(raw, where=where, status=status)
    if task.task_status is not None:
        state = map_state(task.task_status, where=where, status=status)
    elif default_state is not None:
        state = default_state
    else:
        raise MalformedResponseError(f"{where}.task_status is missing", status=status)
    urls = task.urls
    if state is TaskState.SUCCEEDED and not urls:
        # A success without a video cannot be delivered; a later query may well carry it.
        raise MalformedResponseError(
            f"{where}: task {task.task_id} succeeded without task_result.videos[].url",
            status=status,
        )
    return TaskSnapshot(
        task_id=task.task_id,
        state=state,
        message=task.task_status_msg or None,
        video_urls=urls,
        created_at=seconds(task.created_at),
        updated_at=seconds(task.updated_at),
        parent_video_url=task.parent_video_url or None,
        external_task_id=task.external_task_id or None,
        returned=task.returned,
    )


def identify_face_snapshot(raw: object, *, where: str, status: int | None) -> TaskSnapshot:
    """The snapshot of an identify-face answer: finished at once, ``task_id`` = session id.

    The official identify-face call answers synchronously (docs/protocol.md, Advanced
    lip-sync), so there is nothing to poll: the snapshot is already ``SUCCEEDED``.
    """
    answer = structure(raw, _IdentifyFace, where=where, status=status)
    faces = tuple(
        Face(
            face_id=face.face_id,
            image_url=face.face_image or None,
            start_ms=face.start_time,
            end_ms=face.end_time,
        )
        for face in answer.face_data or ()
    )
    return TaskSnapshot(
        task_id=answer.session_id,
        state=TaskState.SUCCEEDED,
        session_id=answer.session_id,
        faces=faces,
        returned=make_returned(None, None, None, answer.final_unit_deduction, None),
    )
