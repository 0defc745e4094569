"""How the journal spells jobs, snapshots and results: a request hash and JSON codecs.

The journal (:mod:`._sqlite`) stores text, never pickles: a journal written by one version of
the library must stay readable by the next, and must not execute anything when read.

* :func:`request_hash` fingerprints everything about a job that shapes its request (every field
  but ``key``; audio bytes by their own SHA-256), so that a changed job under an old key is
  caught before its old task is mistaken for the new job's.
* :func:`result_to_json` / :func:`result_from_json` keep a :class:`JobResult`, its error rebuilt
  as the same :class:`KlingError` class with the same message.
* :func:`snapshot_to_json` / :func:`snapshot_from_json` keep the terminal snapshot of a
  synchronous step (the official identify-face), whose session a resumed job needs.
"""

from __future__ import annotations

import hashlib
import json
import operator
from typing import Any

import attrs
import cattrs

from .. import _errors
from .._errors import JournalError, KlingError
from .._jobs import LipSyncJob
from .._results import BalanceDeduction, JobResult, TaskSnapshot, TaskState, returned_fields

__all__ = [
    "UNREADABLE",
    "error_from_json",
    "error_to_json",
    "request_hash",
    "result_from_json",
    "result_to_json",
    "snapshot_from_json",
    "snapshot_to_json",
    "unreadable",
]

#: What decoding a damaged record (a job's result, a snapshot, a meta value) raises: the
#: journal turns these into a :class:`JournalError` naming its file.
UNREADABLE: tuple[type[Exception], ...] = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    cattrs.BaseValidationError,
)


def unreadable(name: str, exc: BaseException) -> JournalError:
    """The :class:`JournalError` for a record of the journal ``name`` that raised ``exc``."""
    return JournalError(f"journal {name}: unreadable record ({exc!r:.200})")


# Bumped if the hashed form of a job ever changes, so old journals refuse instead of mismatching.
_HASH_VERSION = "kling_async.job.v1"
# Job fields added after v1: left out of the hash while unset, so that a journal written before
# they existed still recognises its jobs (a job that sets one is a different request anyway).
_ADDED_AFTER_V1 = ("audio_id", "watermark", "external_task_id")
# Error attributes worth keeping: plain JSON values only (never the request or response).
_PLAIN = (str, int, float, bool, type(None))


#: One encoder for every write: json.dumps with options builds a new one each call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _dumps(value: object) -> str:
    return _ENCODER.encode(value)


def request_hash(job: LipSyncJob) -> str:
    """A stable SHA-256 (hex) of every field of ``job`` that affects its request.

    ``key`` is left out (it names the job, it is not part of it), and so is an absent
    ``external_task_id`` (journals written before it existed stay valid); ``audio_file`` enters
    as the SHA-256 of its bytes; numbers enter as floats, so ``1`` and ``1.0`` hash alike.
    """
    # (Read with one attrgetter call and normalised in one comprehension: attrs.asdict and a
    # loop cost a fifth more, on every job of a journaled batch.)
    fields: dict[str, Any] = {
        name: float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else value
        for name, value in zip(_JOB_FIELDS, _job_values(job), strict=True)
    }
    for name in _ADDED_AFTER_V1:
        if fields.get(name, 0) is None:
            del fields[name]  # (absent before it existed: old hashes hold)
    audio = fields.pop("audio_file", None)
    fields["audio_file_sha256"] = hashlib.sha256(audio).hexdigest() if audio else None
    text = f"{_HASH_VERSION}\n{_dumps(fields)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: Every field of a job but ``key``, and a getter of their values in that order.
_JOB_FIELDS = tuple(field.name for field in attrs.fields(LipSyncJob) if field.name != "key")
_job_values = operator.attrgetter(*_JOB_FIELDS)


# -- errors --------------------------------------------------------------------------------


def error_to_json(error: KlingError) -> dict[str, Any]:
    """The class name, message arguments and plain attributes of ``error``."""
    attributes = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in vars(error).items()
        if not name.startswith("_") and (isinstance(value, _PLAIN) or _plain_tuple(value))
    }
    args = [arg for arg in error.args if isinstance(arg, _PLAIN)]
    return {"type": type(error).__name__, "message": str(error), "args": args, "attrs": attributes}


def _plain_tuple(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(item, str) for item in value)


def error_from_json(data: dict[str, Any]) -> KlingError:
    """The error :func:`error_to_json` described: the same class (when it still exists) and text.

    An unknown class name (written by another version) comes back as a plain
    :class:`KlingError` carrying the recorded message.
    """
    cls = getattr(_errors, str(data.get("type")), None)
    message = str(data.get("message", ""))
    if not (isinstance(cls, type) and issubclass(cls, KlingError)):
        return KlingError(message)
    # Rebuilt without calling __init__: every class has its own signature, and the recorded
    # arguments and attributes are exactly what __str__ reads.
    error: KlingError = cls.__new__(cls)
    error.args = tuple(data.get("args") or (message,))
    for name, value in dict(data.get("attrs") or {}).items():
        if isinstance(name, str) and not name.startswith("_"):
            if isinstance(value, list) and _plain_tuple(tuple(value)):
                setattr(error, name, tuple(value))  # (ids such as candidates: kept as tuples)
            elif isinstance(value, _PLAIN):
                setattr(error, name, value)
    if str(error) != message:  # a class whose __str__ needs more than was kept
        error.args = (message,)
    return error


# -- results -------------------------------------------------------------------------------


def result_to_json(result: JobResult) -> str:
    """``result`` as compact JSON (its error by :func:`error_to_json`)."""
    return _dumps(
        {
            "key": result.key,
            "task_id": result.task_id,
            "state": result.state.value,
            "video_urls": list(result.video_urls),
            "error": error_to_json(result.error) if result.error is not None else None,
            "submitted_at": result.submitted_at,
            "finished_at": result.finished_at,
            "polls": result.polls,
            "adopted": result.adopted,
            # What the server returned (absent from journals written before these existed).
            **returned_fields(result),
        }
    )


def result_from_json(text: str) -> JobResult:
    """The :class:`JobResult` :func:`result_to_json` wrote."""
    data = json.loads(text)
    error = data.get("error")
    return JobResult(
        key=str(data["key"]),
        task_id=data.get("task_id"),
        state=TaskState(data["state"]),
        video_urls=tuple(data.get("video_urls") or ()),
        error=error_from_json(error) if isinstance(error, dict) else None,
        submitted_at=data.get("submitted_at"),
        finished_at=data.get("finished_at"),
        polls=int(data.get("polls") or 0),
        adopted=bool(data.get("adopted", False)),
        video_id=data.get("video_id"),
        video_duration=data.get("video_duration"),
        watermark_url=data.get("watermark_url"),
        units=data.get("units"),
        balance_deduction=_balance(data.get("balance_deduction")),
    )


def _balance(data: object) -> BalanceDeduction | None:
    if not isinstance(data, dict):
        return None
    return BalanceDeduction(quota=data.get("quota"), list_price=data.get("list_price"))


# -- snapshots -----------------------------------------------------------------------------


def _code(value: object, _: object) -> str | int | None:
    if value is None or isinstance(value, (str, int)):
        return value
    raise TypeError(f"expected a string or integer code, got {type(value).__name__}")


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter()
    converter.register_structure_hook_func(lambda t: t == (str | int | None), _code)
    return converter


_CONVERTER = _make_converter()


def snapshot_to_json(snapshot: TaskSnapshot) -> str:
    """``snapshot`` as compact JSON."""
    return _dumps(_CONVERTER.unstructure(snapshot))


def snapshot_from_json(text: str) -> TaskSnapshot:
    """The :class:`TaskSnapshot` :func:`snapshot_to_json` wrote."""
    return _CONVERTER.structure(json.loads(text), TaskSnapshot)
