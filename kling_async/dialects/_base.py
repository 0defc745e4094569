"""What every dialect provides, and the envelope decoding they share.

A dialect is pure protocol: it turns a :class:`LipSyncJob` into requests and answers into
:class:`TaskSnapshot` values, and never does I/O.  The client drives it:

* :meth:`Dialect.flow` is a generator.  Each value it yields is a :class:`Submit` (a request that
  creates a task).  The client sends it, parses the answer with :meth:`Dialect.parse_submit`,
  tracks the task until it ends (with :meth:`Dialect.query_request` / :meth:`Dialect.parse_query`,
  or list queries) and sends the *terminal* snapshot back into the generator.  The generator
  returns the snapshot that decides the job: a one-step dialect returns the first one, a two-step
  flow (identify-face, then lip-sync) yields a second :class:`Submit` built from the first result.
* Errors are raised as :class:`~kling_async.APIError` (from :func:`decode_envelope`) or
  :class:`~kling_async.MalformedResponseError`; the client decides what to retry.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Container, Generator, Mapping, Sequence
from typing import Protocol

import attrs

from .._errors import SUCCESS_CODES, MalformedResponseError, error_from_response
from .._http import HttpRequest, HttpResponse
from .._jobs import MIN_SOUND_MS, LipSyncJob
from .._results import Face, TaskSnapshot

__all__ = [
    "Dialect",
    "LipSyncFlow",
    "Submit",
    "audio_base64",
    "choose_face",
    "decode_envelope",
    "lenient_number",
    "overlap_problem",
    "sound_source",
]


@attrs.frozen(kw_only=True)
class Submit:
    """A request that creates a task at ``stage`` (``"lip-sync"``, ``"identify-face"``...).

    ``final`` is False for preparatory steps (identify-face): the task that makes the video comes
    from a later step, so :meth:`KlingClient.submit` waits for this one and goes on.
    ``external_id`` is the external task id the request carries (None when it carries none).
    """

    request: HttpRequest
    stage: str
    final: bool = True
    external_id: str | None = None


#: Yields :class:`Submit` steps, receives each step's terminal snapshot, returns the deciding one.
LipSyncFlow = Generator[Submit, TaskSnapshot, TaskSnapshot]


class Dialect(Protocol):
    """The protocol of one family of servers (official format, apimodels, ...)."""

    #: Short name, as the CLI's ``--dialect`` spells it.
    name: str
    #: The stage :meth:`query_request` uses when a caller names only a task id.
    default_stage: str
    #: Largest page of the list query, or 0 when the dialect has none.
    list_page_size: int
    #: Whether the task stage takes an external task id, unique on the account and queryable:
    #: :meth:`query_request` then takes one in place of a task id, answered by
    #: :meth:`parse_external`.
    external_ids: bool
    #: Whether a refusal may come with a 2xx status (and only the body's code says so), as some
    #: gateways send them (docs/protocol.md, Business codes).  Then a 2xx answer whose body was
    #: cut off does not prove that a task was created, and no task is adopted on that proof.
    refusals_may_be_2xx: bool

    def check_job(self, job: LipSyncJob) -> None:
        """Raise :class:`~kling_async.ValidationError` for a job this dialect cannot run."""

    def flow(self, job: LipSyncJob, *, callback_url: str | None = None) -> LipSyncFlow:
        """The submit steps of ``job``; see the module docstring."""
        ...

    def parse_submit(self, stage: str, response: HttpResponse) -> TaskSnapshot:
        """The snapshot of the task a submit created; raises on an error answer."""
        ...

    def query_request(self, stage: str, task_id: str) -> HttpRequest:
        """The request that asks about one task."""
        ...

    def parse_query(self, stage: str, task_id: str, response: HttpResponse) -> TaskSnapshot:
        """The snapshot of ``task_id`` in a query answer; raises on an error answer."""
        ...

    def list_request(self, stage: str, page: int, page_size: int) -> HttpRequest | None:
        """One page of recent tasks (newest first), or None where there is no list query."""
        ...

    def parse_list(self, stage: str, response: HttpResponse) -> list[TaskSnapshot]:
        """The snapshots on one page of a list answer."""
        ...

    def parse_list_rows(
        self, stage: str, response: HttpResponse
    ) -> tuple[list[TaskSnapshot], list[MalformedResponseError]]:
        """The snapshots of a list page's readable rows, and why each other row is unreadable.

        A row's fault (a state word the client does not know, a success without its video)
        concerns that row only; the page's own (an error answer, ``data`` not a list) is raised.
        :meth:`parse_list` is this, raising the first row's fault.
        """
        ...

    def parse_list_page(
        self, stage: str, response: HttpResponse, wanted: Container[str]
    ) -> tuple[int, list[tuple[int, TaskSnapshot]]]:
        """How many rows a list page holds, and the snapshots of those in ``wanted``.

        Each snapshot comes with its row's index.  Rows of other tasks are not parsed: a
        tracker reads pages of a busy account for the few tasks it follows.
        """
        ...

    def parse_external(self, stage: str, external_id: str, response: HttpResponse) -> TaskSnapshot:
        """The snapshot of the task whose external id is ``external_id``, from a query answer.

        Raises :class:`~kling_async.NotFoundError` when no task has it.
        """
        ...

    def parse_callback(self, body: bytes) -> TaskSnapshot:
        """The snapshot a callback body carries; MalformedResponseError when unreadable."""
        ...


def decode_envelope(response: HttpResponse) -> Mapping[str, object]:
    """Decode a JSON answer and return its envelope, raising the error it stands for.

    Both dialects wrap answers in ``{"code", "message"|"msg", "data", ...}``; success is HTTP 2xx
    with code 0 (official) or 200 (apimodels), and an error may arrive with HTTP 200
    (docs/protocol.md, Business codes).
    """
    try:
        body = response.json()
    except MalformedResponseError:
        if 200 <= response.status < 300:
            raise
        body = None  # an HTML error page: the status alone tells what went wrong
    # Almost every answer is a success: a JSON object with code 0 (or 200, or none) under HTTP
    # 2xx.  Those skip the error lookup and the Retry-After parse; anything else (a code sent as
    # a string, as some gateways do) takes the full rule below, which decides the same way.
    if type(body) is dict and 200 <= response.status < 300:
        code = body.get("code")
        if code is None or (type(code) is int and code in SUCCESS_CODES):
            return body
    error = error_from_response(response.status, body, retry_after=response.retry_after)
    if error is not None:
        raise error
    if not isinstance(body, Mapping):
        raise MalformedResponseError(
            f"HTTP {response.status} answer is not a JSON object", status=response.status
        )
    return body


def lenient_number(value: object) -> float | None:
    """A finite number sent as a number or a numeric string, else None (a figure, not a key).

    For figures an answer reports beside its result (a video's duration, a cost): one sent as a
    string, or garbled, must not make a finished task's answer unreadable.
    """
    if type(value) in (int, float):
        number = float(value)  # type: ignore[arg-type]
    elif type(value) is str:
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def audio_base64(job: LipSyncJob) -> str:
    """The job's audio bytes as base64, as every dialect sends a file.

    See docs/protocol.md, Submit and apimodels.app.
    """
    if job.audio_file is None:  # pragma: no cover - LipSyncJob guarantees one audio source
        raise ValueError("the job has no audio_file")
    return base64.b64encode(job.audio_file).decode("ascii")


def sound_source(job: LipSyncJob) -> str:
    """What advanced lip-sync's ``sound_file`` takes: the audio URL, else base64 of the file."""
    return job.audio_url if job.audio_url is not None else audio_base64(job)


def choose_face(job: LipSyncJob, faces: Sequence[Face]) -> Face | str:
    """The face ``job`` asks for (``face_id``, else ``face_index``), or why there is none.

    The reason becomes the failed job's message, so it names what the video does have.
    """
    count = f"{len(faces)} face{'' if len(faces) == 1 else 's'}"
    if job.face_id is not None:
        for face in faces:
            if face.face_id == job.face_id:
                return face
        known = ", ".join(repr(face.face_id) for face in faces[:10])
        listing = f"{count}: {known}" if faces else count
        return f"no face with id {job.face_id[:60]!r}: the video has {listing}"
    if job.face_index < len(faces):
        return faces[job.face_index]
    return f"no face with index {job.face_index}: the video has {count}"


def overlap_problem(job: LipSyncJob, face: Face) -> str | None:
    """Why ``job``'s audio would miss ``face``, or None (docs/protocol.md, Advanced lip-sync).

    The inserted audio must overlap the face's lip-sync interval by at least 2 s.  Checked
    between identify-face and the (billed) lip-sync task, where the interval is known; a face
    without one (apimodels gives none) or a job without ``sound_end_time`` passes.
    """
    if face.start_ms is None or face.end_ms is None or job.sound_end_time is None:
        return None
    start = job.sound_insert_time
    end = start + job.sound_end_time - job.sound_start_time
    overlap = min(end, face.end_ms) - max(start, face.start_ms)
    if overlap >= MIN_SOUND_MS:
        return None
    return (
        f"the audio inserted at {start}-{end} ms overlaps face {face.face_id[:60]!r}"
        f" (visible {face.start_ms}-{face.end_ms} ms) by {max(overlap, 0)} ms;"
        f" at least {MIN_SOUND_MS} ms are needed"
    )
