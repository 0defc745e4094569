"""How the journal spells jobs, snapshots and results: a request hash and JSON codecs.

The journal (:mod:`._sqlite`) stores text, never pickles: a journal written by one version of
the library must stay readable by the next, and must not execute anything when read.

* :func:`request_hash` fingerprints everything about a job that shapes its request (every field
  but ``key``; audio bytes by their own SHA-256), so that a changed job under an old key is
  caught before its old task is mistaken for the new job's.  A running SQLite journal logs a
  job's :func:`request_values` instead and hashes them (:func:`hash_request`) when the log is
  folded: the hash costs the running batch nothing.
* :func:`result_to_json` / :func:`result_from_json` keep a :class:`JobResult`, its error rebuilt
  as the same :class:`KlingError` class with the same message; likewise a running SQLite
  journal logs :func:`result_values`, spelt as that JSON (:func:`result_json`) when folded.
* :func:`snapshot_to_json` / :func:`snapshot_from_json` keep the terminal snapshot of a
  synchronous step (the official identify-face), whose session a resumed job needs.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Sequence
from typing import Any

import cattrs

from .. import _errors
from .._errors import JournalError, KlingError
from .._jobs import LipSyncJob
from .._results import BalanceDeduction, JobResult, TaskSnapshot, TaskState, returned_fields

__all__ = [
    "REQUEST_FIELDS",
    "RESULT_FIELDS",
    "UNREADABLE",
    "error_from_json",
    "error_to_json",
    "hash_request",
    "request_hash",
    "request_values",
    "result_from_json",
    "result_json",
    "result_to_json",
    "result_values",
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
    return hash_request(request_values(job))


#: The fields of a job its request hash covers, in the order :func:`request_values` gives them
#: (``audio_file`` by the SHA-256 of its bytes).  The SQLite journal's log keeps a job's
#: values in this order, so it never changes: a field added to LipSyncJob gets a new log
#: operation (tests/test_journal.py checks that these are the job's fields).
REQUEST_FIELDS = (
    "video_url",
    "video_id",
    "source_task_id",
    "text",
    "voice_id",
    "voice_language",
    "voice_speed",
    "audio_url",
    "audio_file",
    "audio_format",
    "audio_id",
    "watermark",
    "sound_start_time",
    "sound_end_time",
    "sound_insert_time",
    "sound_volume",
    "original_audio_volume",
    "face_index",
    "face_id",
    "callback_url",
    "external_task_id",
)
_job_values = operator.attrgetter(*REQUEST_FIELDS)
_AUDIO = REQUEST_FIELDS.index("audio_file")


def request_values(job: LipSyncJob) -> tuple[Any, ...]:
    """``job``'s :data:`REQUEST_FIELDS` as plain JSON values (audio bytes as their SHA-256).

    What the SQLite journal logs for a new job: :func:`hash_request` turns it into the request
    hash when the log is folded, off the running batch's loop.
    """
    values: tuple[Any, ...] = _job_values(job)
    audio = values[_AUDIO]
    if audio is not None:
        digest = hashlib.sha256(audio).hexdigest() if audio else None
        values = (*values[:_AUDIO], digest, *values[_AUDIO + 1 :])
    return values


def hash_request(values: Sequence[Any]) -> str:
    """The :func:`request_hash` of a job whose :func:`request_values` are ``values``."""
    # (Normalised in one comprehension: attrs.asdict and a loop cost a fifth more.)
    fields: dict[str, Any] = {
        name: float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else value
        for name, value in zip(REQUEST_FIELDS, values, strict=True)
    }
    for name in _ADDED_AFTER_V1:
        if fields.get(name, 0) is None:
            del fields[name]  # (absent before it existed: old hashes hold)
    fields["audio_file_sha256"] = fields.pop("audio_file")
    text = f"{_HASH_VERSION}\n{_dumps(fields)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


#: The fields of a result's JSON, in the order :func:`result_values` gives them.  The SQLite
#: journal's log keeps a result's values in this order, so it never changes: a field added to
#: the result's JSON gets a new log operation.
RESULT_FIELDS = (
    "key",
    "task_id",
    "state",
    "video_urls",
    "error",
    "submitted_at",
    "finished_at",
    "polls",
    "adopted",
    # What the server returned (absent from journals written before these existed).
    "video_id",
    "video_duration",
    "watermark_url",
    "units",
    "balance_deduction",
)


def result_to_json(result: JobResult) -> str:
    """``result`` as compact JSON (its error by :func:`error_to_json`)."""
    return result_json(result_values(result))


def result_values(result: JobResult) -> tuple[Any, ...]:
    """``result``'s :data:`RESULT_FIELDS` as plain JSON values: :func:`result_json` spells them.

    What the SQLite journal logs for a result (spelt as JSON when the log is folded).
    """
    return (
        result.key,
        result.task_id,
        result.state.value,
        list(result.video_urls),
        error_to_json(result.error) if result.error is not None else None,
        result.submitted_at,
        result.finished_at,
        result.polls,
        result.adopted,
        *returned_fields(result).values(),
    )


def result_json(values: Sequence[Any]) -> str:
    """The JSON :func:`result_to_json` writes, of a result whose :func:`result_values` these are."""
    return _dumps(dict(zip(RESULT_FIELDS, values, strict=True)))


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
