"""Exceptions raised by kling_async, and the table that maps server answers to them.

Every exception the library raises on purpose is a :class:`KlingError`::

    KlingError
    ├── ValidationError            bad input, caught before any request (also a ValueError)
    ├── TransportError             no usable HTTP answer
    │   ├── ConnectError           the connection was never made: nothing reached the server
    │   ├── TransportTimeout       no answer in time; the server may have acted
    │   └── MalformedResponseError an answer that is not the JSON the protocol promises
    ├── APIError                   the server said no: status, code, message, request_id
    │   ├── AuthenticationError    1000-1004, HTTP 401: bad or expired key or token
    │   ├── PermissionDeniedError  1103, 1304, HTTP 403: no access to this API, or IP not allowed
    │   ├── AccountError           1100-1102, apimodels' HTTP 402: account in arrears, no balance
    │   ├── RateLimitError         1302: requests too fast (retryable)
    │   │   └── ConcurrencyLimitError  1303: more running tasks than the account allows (retryable)
    │   ├── InvalidRequestError    1200-1202, HTTP 400: the request was refused as invalid
    │   │   └── NotFoundError      1203, HTTP 404: no such task or resource
    │   ├── ContentPolicyError     1300, 1301: platform or content-security policy
    │   └── ServerError            5000-5002, HTTP 5xx (retryable)
    ├── TaskFailedError            the task ran and failed; ``str()`` is the server's reason
    ├── TaskTimedOutError          tracked longer than ``PollPolicy.timeout``; the task id is kept
    ├── TaskCancelledError         the batch was left before the task ended
    ├── SubmitOutcomeUnknownError  a submit may have created a task that could not be found
    ├── JournalError               the batch journal cannot be read or written (stops the batch)
    ├── DownloadError              a result video could not be saved (gone, cut short, wrong size)
    │   └── LocalWriteError        because of this machine: a full disk, a folder gone
    ├── BudgetExceededError        a job not submitted: its estimate would pass the batch's budget
    └── CallbackSignatureError     a callback whose Standard Webhooks signature does not verify

:func:`error_from_response` turns an (HTTP status, body) pair into one of the :class:`APIError`
classes.  It reads both, because some gateways answer business errors with HTTP 200 and only a
non-zero body ``code`` (docs/protocol.md, Business codes).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "SUCCESS_CODES",
    "APIError",
    "AccountError",
    "AuthenticationError",
    "BudgetExceededError",
    "CallbackSignatureError",
    "ConcurrencyLimitError",
    "ConnectError",
    "ContentPolicyError",
    "DownloadError",
    "InvalidRequestError",
    "JournalError",
    "KlingError",
    "LocalWriteError",
    "MalformedResponseError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "SubmitOutcomeUnknownError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskTimedOutError",
    "TransportError",
    "TransportTimeout",
    "ValidationError",
    "business_code",
    "created_nothing",
    "error_from_response",
]


class KlingError(Exception):
    """Base class of every error kling_async raises on purpose.

    ``submitted_task_ids`` lists the tasks a batch had created when this error stopped it, so
    that nothing paid for is lost (empty when the error did not stop a batch).
    """

    submitted_task_ids: tuple[str, ...] = ()

    #: True for errors that end a whole batch: the account itself is unusable.
    fatal: bool = False

    #: True where trying the same request again later may succeed.
    retryable: bool = False


class ValidationError(KlingError, ValueError):
    """A job or option breaks a documented rule; raised before any request is sent.

    ``field`` names the offending field (wire-independent, as the user spelled it) and ``rule``
    says what it must satisfy.
    """

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        # A message quotes what it refuses: a 10 MB value must not come out whole.
        super().__init__(f"{shorten(field, 80)}: {shorten(rule, 400)}")


def shorten(text: str, limit: int) -> str:
    """``text``, or its first and last characters around a count when it is over ``limit``."""
    if len(text) <= limit:
        return text
    keep = max(limit - 30, 10)
    return f"{text[: keep - 10]}...[{len(text)} characters]...{text[-10:]}"


class TransportError(KlingError):
    """No usable HTTP answer arrived (connection, time-out or unreadable answer)."""

    retryable = True


class ConnectError(TransportError):
    """The connection could not be made, so the request certainly never reached the server."""


class TransportTimeout(TransportError, TimeoutError):
    """The server did not answer in time; it may still have acted on the request."""


class MalformedResponseError(TransportError):
    """The answer is not the JSON shape the protocol promises.

    ``status`` is the HTTP status of that answer.  The body is not kept: it may be large, and a
    broken gateway may echo request headers into it.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class APIError(KlingError):
    """The server answered with an error.

    ``status`` is the HTTP status, ``code`` the body's business code (``None`` when the body had
    none), ``message`` the server's own words and ``request_id`` the id to quote to the vendor.
    ``retry_after`` holds the server's Retry-After hint in seconds, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(message)

    def __str__(self) -> str:
        where = f"HTTP {self.status}" + (f", code {self.code}" if self.code is not None else "")
        tail = f", request_id {self.request_id}" if self.request_id else ""
        return f"{self.message} ({where}{tail})"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status}, code={self.code}, "
            f"request_id={self.request_id!r})"
        )


class AuthenticationError(APIError):
    """The key or token was refused (1000-1004, HTTP 401)."""

    fatal = True

    @property
    def token_expired(self) -> bool:
        """Whether a freshly minted token may succeed (1003, 1004 or "signature invalid")."""
        return self.code in (1003, 1004) or "signature" in self.message.lower()


class PermissionDeniedError(APIError):
    """The account may not use this API or model, or the IP is not allowed (1103, 1304, 403)."""

    fatal = True


class AccountError(APIError):
    """The account cannot pay: exception, arrears, resource pack used up (1100-1102, HTTP 402)."""

    fatal = True


class RateLimitError(APIError):
    """Requests arrive too fast (1302); back off and try again."""

    retryable = True


class ConcurrencyLimitError(RateLimitError):
    """More running tasks than the account's resource pack allows (1303); wait for a slot.

    A batch waits for a slot instead of failing, for at most ``RetryPolicy.max_slot_wait``; a
    job that waited longer ends with this error, ``blocking_task_ids`` naming the tasks known to
    hold the slots (empty when other clients hold them).
    """

    blocking_task_ids: tuple[str, ...] = ()


class InvalidRequestError(APIError):
    """The server refused the request as invalid (1200-1202, HTTP 400)."""


class NotFoundError(InvalidRequestError):
    """No such task or resource (1203, HTTP 404)."""


class ContentPolicyError(APIError):
    """The platform or content-security policy refused the request (1300, 1301)."""


class ServerError(APIError):
    """The server failed (5000-5002, HTTP 5xx); trying again later may succeed."""

    retryable = True


class TaskFailedError(KlingError):
    """The task ran and failed.  ``str(error)`` is the server's reason, ``code`` its code."""

    def __init__(self, message: str, *, task_id: str | None, code: str | int | None = None) -> None:
        self.task_id = task_id
        self.code = code
        super().__init__(message)


class TaskTimedOutError(KlingError, TimeoutError):
    """The task was tracked longer than ``PollPolicy.timeout``; it may still finish later."""

    def __init__(self, task_id: str | None, timeout: float) -> None:
        self.task_id = task_id
        self.timeout = timeout
        super().__init__(f"task {task_id} still unfinished after {timeout:g} s")


class TaskCancelledError(KlingError):
    """The batch was left (or cancelled) before this job's task ended."""

    def __init__(self, task_id: str | None) -> None:
        self.task_id = task_id
        what = f"task {task_id}" if task_id else "job"
        super().__init__(f"{what} cancelled before it finished")


class DownloadError(KlingError):
    """A result video could not be saved to disk.

    ``url`` is the video's address without its query string (signed CDN URLs carry secrets
    there), ``status`` the HTTP status of the last answer when there was one.  ``retryable`` is
    True when trying later may succeed (a server error, a dropped connection); an expired URL
    (HTTP 403, 404, 410) is not.  ``retry_after`` is the host's Retry-After hint in seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.url = url
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        super().__init__(message)


class LocalWriteError(DownloadError):
    """A video could not be written on this machine (a full disk, a folder gone or read-only).

    ``path`` is the folder it was to be saved in.  The video itself is fine: its URL works.
    """

    def __init__(self, message: str, *, url: str, path: Path) -> None:
        self.path = path
        super().__init__(message, url=url)


class SubmitOutcomeUnknownError(KlingError):
    """A submit got no clear answer, and whether it created a task cannot be proven either way.

    A job's result (never raised out of a batch) when a submit's answer was lost (a run stopped
    while it was in flight, a time-out, an answer cut off, 5000/5002, a proxy's 502/504) and the
    lookup found no task that is provably this job's (see the README's "Guarantees").  ``stage``
    is the submit's stage, ``cause`` the error it met (``None`` after a crash) and
    ``candidates`` the ids of tasks that might be this job's (on its video, around the submit's
    time, owned by no other job): check them before paying again.  Sending it again might pay
    for a second task: rerun the batch with ``resubmit_unknown=True`` to do so anyway.
    """

    #: (Class defaults: a result read back from a journal keeps only its plain attributes.)
    cause: KlingError | None = None
    candidates: tuple[str, ...] = ()

    def __init__(
        self,
        stage: str,
        *,
        cause: KlingError | None = None,
        detail: str = "",
        candidates: tuple[str, ...] = (),
    ) -> None:
        self.stage = stage
        self.cause = cause
        self.candidates = tuple(candidates)
        why = "a run stopped mid-submit" if cause is None else f"{type(cause).__name__}: {cause}"
        extra = f"; {detail}" if detail else ""
        super().__init__(
            f"{stage} submit outcome unknown ({why}{extra}): the server may have created a task;"
            " rerun with resubmit_unknown=True to submit again"
        )


class JournalError(KlingError):
    """The batch journal cannot be opened, read or written; the batch stops.

    Without a working journal a crash could lose what was submitted, so no further request is
    sent.  ``str(error)`` names the file and SQLite's reason.
    """

    fatal = True


class BudgetExceededError(KlingError):
    """A job was not submitted because its estimated cost would pass the batch's budget.

    A job's result, never raised out of a batch: once one job would pass
    ``Budget.units``, submitting stops and every job not yet submitted ends with this error.
    Nothing was created, so a rerun with a larger budget submits it.  ``units`` is the job's
    estimate, ``spent`` what the batch had spent or reserved, ``limit`` the budget.
    """

    def __init__(self, *, units: float, spent: float, limit: float) -> None:
        self.units = units
        self.spent = spent
        self.limit = limit
        super().__init__(
            f"not submitted: estimated at {units:g} unit(s), it would pass the budget of"
            f" {limit:g} units ({spent:g} already spent or reserved)"
        )


class CallbackSignatureError(KlingError):
    """A callback's ``webhook-*`` signature headers are missing, stale or do not match.

    ``str()`` says which check failed; it never quotes a signature or a secret.
    """


# Business codes of the official format, docs/protocol.md, Business codes.
_CODE_TABLE: dict[int, type[APIError]] = {
    **dict.fromkeys((1000, 1001, 1002, 1003, 1004), AuthenticationError),
    **dict.fromkeys((1100, 1101, 1102), AccountError),
    1103: PermissionDeniedError,
    **dict.fromkeys((1200, 1201, 1202), InvalidRequestError),
    1203: NotFoundError,
    **dict.fromkeys((1300, 1301), ContentPolicyError),
    1302: RateLimitError,
    1303: ConcurrencyLimitError,
    1304: PermissionDeniedError,
    **dict.fromkeys((5000, 5001, 5002), ServerError),
}

# HTTP statuses, used where the body carries no known business code (apimodels' body codes are
# HTTP numbers too: docs/protocol.md, apimodels.app errors).
_STATUS_TABLE: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    402: AccountError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: InvalidRequestError,
    429: RateLimitError,
}

#: Body codes that mean success: 0 in the official format, 200 at apimodels.
SUCCESS_CODES = frozenset((0, 200))


def error_from_response(
    status: int,
    body: object,
    *,
    retry_after: float | None = None,
) -> APIError | None:
    """Return the error an answer stands for, or ``None`` when it is a success.

    ``body`` is the decoded JSON (or ``None`` when there was none).  The body's business ``code``
    decides where it is known, else the HTTP status: HTTP 429 carries both retryable (1302, 1303)
    and fatal (1100-1102, 1304) codes, and some gateways send errors with HTTP 200.
    """
    fields: Mapping[str, object] = body if isinstance(body, Mapping) else {}
    code = business_code(fields.get("code"))
    ok_status = 200 <= status < 300
    if ok_status and (code is None or code in SUCCESS_CODES):
        return None
    raw_message = fields.get("message") or fields.get("msg")
    message = str(raw_message) if raw_message else _default_message(status, code)
    raw_request_id = fields.get("request_id")
    request_id = str(raw_request_id) if raw_request_id else None
    cls = _class_for(status, code)
    return cls(
        message,
        status=status,
        code=code,
        request_id=request_id,
        retry_after=retry_after,
    )


def business_code(raw: object) -> int | None:
    """A body's business ``code`` as a number, or None when it is not one.

    Some gateways send the code as a string ("1303"): both forms are accepted.
    """
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        return int(raw)
    return None


def _class_for(status: int, code: int | None) -> type[APIError]:
    if code is not None and code in _CODE_TABLE:
        return _CODE_TABLE[code]
    if code is not None and code in _STATUS_TABLE:
        return _STATUS_TABLE[code]
    if code is not None and code >= 500 and code < 600:
        return ServerError
    if status in _STATUS_TABLE:
        return _STATUS_TABLE[status]
    if status >= 500:
        return ServerError
    return APIError


def _default_message(status: int, code: int | None) -> str:
    return f"the server answered HTTP {status}" + (f" with code {code}" if code is not None else "")


def created_nothing(error: BaseException) -> bool:
    """Whether a failed *submit* certainly created no task, so sending it again cannot pay twice.

    True only for answers that say so (1302, 1303, 5001 / HTTP 503, and a 401 token refusal), for
    connections that were never made, and for jobs the budget kept from being sent.  A time-out,
    a dropped connection, 5000 or 5002 may hide a task the server did create: those submits are
    never repeated blindly.
    """
    if isinstance(error, (ConnectError, BudgetExceededError)):
        return True
    if isinstance(error, RateLimitError):
        return True
    if isinstance(error, AuthenticationError):
        return True
    if isinstance(error, ServerError):
        return error.code == 5001 or (error.code is None and error.status == 503)
    return False
