"""The error tree, and error_from_response over the business codes and apimodels' bodies.

Both are described in docs/protocol.md, Business codes and apimodels.app errors.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kling_async
from kling_async import _errors
from kling_async._errors import (
    AccountError,
    APIError,
    AuthenticationError,
    ConcurrencyLimitError,
    ConnectError,
    ContentPolicyError,
    DownloadError,
    InvalidRequestError,
    JournalError,
    KlingError,
    LocalWriteError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    SubmitOutcomeUnknownError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimedOutError,
    TransportError,
    TransportTimeout,
    ValidationError,
    created_nothing,
    error_from_response,
)

SETTINGS = settings(max_examples=80, deadline=None)

# docs/protocol.md, Business codes: code, documented HTTP status, class.
BUSINESS_CODES: list[tuple[int, int, type[APIError]]] = [
    (1000, 401, AuthenticationError),
    (1001, 401, AuthenticationError),
    (1002, 401, AuthenticationError),
    (1003, 401, AuthenticationError),
    (1004, 401, AuthenticationError),
    (1100, 429, AccountError),
    (1101, 429, AccountError),
    (1102, 429, AccountError),
    (1103, 403, PermissionDeniedError),
    (1200, 400, InvalidRequestError),
    (1201, 400, InvalidRequestError),
    (1202, 404, InvalidRequestError),  # "invalid method": refused, not a missing resource
    (1203, 404, NotFoundError),
    (1300, 400, ContentPolicyError),
    (1301, 400, ContentPolicyError),
    (1302, 429, RateLimitError),
    (1303, 429, ConcurrencyLimitError),
    (1304, 429, PermissionDeniedError),
    (5000, 500, ServerError),
    (5001, 503, ServerError),
    (5002, 504, ServerError),
]


# Every body code with a class of its own: the business codes and apimodels' HTTP-like codes.
KNOWN_CODES = {code for code, _, _ in BUSINESS_CODES} | {400, 401, 402, 403, 404, 422, 429}


def kling_body(
    code: int, message: str = "something happened", request_id: str = "req-123"
) -> dict[str, Any]:
    return {"code": code, "message": message, "request_id": request_id, "data": None}


# --- business codes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status", "cls"), BUSINESS_CODES)
@pytest.mark.parametrize("gateway_200", [False, True], ids=["documented-status", "http-200"])
def test_business_code_maps_to_class(
    code: int, status: int, cls: type[APIError], gateway_200: bool
) -> None:
    # Some gateways answer business errors with HTTP 200 and only the body code
    # (docs/protocol.md, Business codes).
    http = 200 if gateway_200 else status
    err = error_from_response(http, kling_body(code, f"code {code} says no"), retry_after=2.5)
    assert type(err) is cls
    assert err.status == http
    assert err.code == code
    assert err.message == f"code {code} says no"
    assert err.request_id == "req-123"
    assert err.retry_after == 2.5


@SETTINGS
@given(
    row=st.sampled_from(BUSINESS_CODES),
    status=st.integers(min_value=100, max_value=599),
)
def test_business_code_decides_whatever_the_status(
    row: tuple[int, int, type[APIError]], status: int
) -> None:
    code, _, cls = row
    err = error_from_response(status, {"code": code, "message": "x"})
    assert type(err) is cls
    assert (err.status, err.code) == (status, code)


def test_http_429_branches_on_the_body_code() -> None:
    # 429 carries both retryable (1302, 1303) and fatal (1100-1102, 1304) codes.
    assert type(error_from_response(429, kling_body(1303))) is ConcurrencyLimitError
    assert type(error_from_response(429, kling_body(1101))) is AccountError
    assert type(error_from_response(429, kling_body(1304))) is PermissionDeniedError
    assert type(error_from_response(429, None)) is RateLimitError


def test_token_expired() -> None:
    def auth(code: int | None, message: str = "auth failed") -> AuthenticationError:
        err = error_from_response(401, {"code": code, "message": message})
        assert isinstance(err, AuthenticationError)
        return err

    assert auth(1003).token_expired
    assert auth(1004).token_expired
    assert not auth(1000).token_expired
    assert not auth(1002).token_expired
    assert auth(None, "Signature invalid").token_expired
    assert auth(1000, "JWT signature invalid").token_expired


# --- apimodels.app bodies (docs/protocol.md, apimodels.app errors) -----------------------------

APIMODELS: list[tuple[int, type[APIError]]] = [
    (400, InvalidRequestError),
    (401, AuthenticationError),
    (402, AccountError),
    (404, NotFoundError),
    (500, ServerError),
]


@pytest.mark.parametrize(("code", "cls"), APIMODELS)
@pytest.mark.parametrize("http_200", [False, True], ids=["same-status", "http-200"])
def test_apimodels_bodies(code: int, cls: type[APIError], http_200: bool) -> None:
    status = 200 if http_200 else code
    err = error_from_response(status, {"code": code, "msg": "Insufficient credits"})
    assert type(err) is cls
    assert err.message == "Insufficient credits"
    assert err.code == code
    assert err.status == status
    assert err.request_id is None


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, InvalidRequestError),
        (401, AuthenticationError),
        (402, AccountError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (422, InvalidRequestError),
        (429, RateLimitError),
        (418, APIError),
        (409, APIError),
        (302, APIError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
        (504, ServerError),
        (599, ServerError),
    ],
)
def test_status_decides_without_a_known_code(status: int, cls: type[APIError]) -> None:
    for body in (None, {}, {"code": 9999, "message": "odd"}, {"message": "plain"}):
        err = error_from_response(status, body)
        assert type(err) is cls, body
        assert err.status == status


# --- successes and odd bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {"code": 0, "message": "SUCCEED", "request_id": "r", "data": {"task_id": "1"}}),
        (200, {"code": 200, "msg": "success", "data": {"taskId": "t"}}),
        (200, {"data": {"task_id": "1"}}),
        (200, {}),
        (200, None),
        (201, {"code": 0}),
        (204, None),
        (200, [{"task_id": "1"}]),
        (200, "ok"),
        (200, 42),
        (200, {"code": True}),  # a bool is no business code
    ],
)
def test_successes(status: int, body: object) -> None:
    assert error_from_response(status, body) is None


@SETTINGS
@given(
    status=st.integers(min_value=200, max_value=299),
    code=st.sampled_from([None, 0, 200]),
    extra=st.dictionaries(st.sampled_from(["message", "msg", "data", "request_id"]), st.text()),
)
def test_any_2xx_with_a_success_code_is_a_success(
    status: int, code: int | None, extra: dict[str, str]
) -> None:
    body: dict[str, object] = dict(extra)
    if code is not None:
        body["code"] = code
    assert error_from_response(status, body) is None


@SETTINGS
@given(
    status=st.integers(min_value=300, max_value=599),
    body=st.one_of(
        st.none(),
        st.text(),
        st.lists(st.integers()),
        st.fixed_dictionaries({"code": st.integers(), "message": st.text()}),
        st.fixed_dictionaries({"code": st.integers(), "msg": st.text()}),
    ),
)
def test_any_non_2xx_is_an_api_error(status: int, body: object) -> None:
    err = error_from_response(status, body)
    assert isinstance(err, APIError)
    assert err.status == status
    assert err.message  # never empty: a default names the status
    code = body.get("code") if isinstance(body, dict) else None
    if status >= 500 and code not in KNOWN_CODES:
        assert type(err) is ServerError
    if code in KNOWN_CODES:
        assert err.code == code


@pytest.mark.parametrize("body", [None, "Bad Gateway", ["x"], 3.5])
@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_http_5xx_without_a_json_object_is_a_server_error(status: int, body: object) -> None:
    err = error_from_response(status, body, retry_after=7.0)
    assert type(err) is ServerError
    assert err.code is None
    assert err.request_id is None
    assert err.retry_after == 7.0
    assert f"HTTP {status}" in err.message


def test_default_message_names_status_and_code() -> None:
    err = error_from_response(429, {"code": 1303, "message": ""})
    assert err is not None
    assert err.message == "the server answered HTTP 429 with code 1303"


def test_message_beats_msg_and_request_id_is_text() -> None:
    err = error_from_response(400, {"code": 1201, "message": "bad voice_id", "msg": "other"})
    assert err is not None
    assert err.message == "bad voice_id"
    err = error_from_response(400, {"code": 1201, "msg": "bad", "request_id": 12345})
    assert err is not None
    assert err.request_id == "12345"
    err = error_from_response(400, {"code": 1201, "msg": "bad", "request_id": ""})
    assert err is not None
    assert err.request_id is None


def test_non_integer_codes_are_ignored() -> None:
    # Only an int (or a string of digits) is a business code; the HTTP status decides otherwise.
    for code in ("abc", 1303.0, None, True, [1303]):
        err = error_from_response(404, {"code": code, "message": "m"})
        assert type(err) is NotFoundError
        assert err.code is None


def test_codes_sent_as_strings_are_understood() -> None:
    # A gateway that quotes its codes must not turn a 1303 into a success.
    err = error_from_response(200, {"code": "1303", "message": "busy"})
    assert type(err) is ConcurrencyLimitError
    assert err.code == 1303
    assert error_from_response(200, {"code": "0", "data": {}}) is None


def test_retry_after_defaults_to_none() -> None:
    err = error_from_response(429, kling_body(1302))
    assert err is not None
    assert err.retry_after is None


# --- flags ------------------------------------------------------------------------------------

FATAL = {AuthenticationError, PermissionDeniedError, AccountError, JournalError}
RETRYABLE = {
    TransportError,
    ConnectError,
    TransportTimeout,
    MalformedResponseError,
    RateLimitError,
    ConcurrencyLimitError,
    ServerError,
}
ALL_CLASSES: list[type[KlingError]] = [
    KlingError,
    ValidationError,
    TransportError,
    ConnectError,
    TransportTimeout,
    MalformedResponseError,
    APIError,
    AuthenticationError,
    PermissionDeniedError,
    AccountError,
    RateLimitError,
    ConcurrencyLimitError,
    InvalidRequestError,
    NotFoundError,
    ContentPolicyError,
    ServerError,
    TaskFailedError,
    TaskTimedOutError,
    TaskCancelledError,
    SubmitOutcomeUnknownError,
    JournalError,
    DownloadError,
    LocalWriteError,
    kling_async.BudgetExceededError,
    kling_async.CallbackSignatureError,
]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_fatal_and_retryable_flags(cls: type[KlingError]) -> None:
    assert cls.fatal is (cls in FATAL)
    assert cls.retryable is (cls in RETRYABLE)
    assert not (cls.fatal and cls.retryable)
    assert cls.submitted_task_ids == ()


@pytest.mark.parametrize(("code", "status", "cls"), BUSINESS_CODES)
def test_flags_on_instances(code: int, status: int, cls: type[APIError]) -> None:
    err = error_from_response(status, kling_body(code))
    assert err is not None
    assert err.fatal is (cls in FATAL)
    assert err.retryable is (cls in RETRYABLE)


# --- created_nothing --------------------------------------------------------------------------


def api(status: int, code: int | None) -> APIError:
    err = error_from_response(status, {"code": code, "message": "m"} if code else None)
    assert err is not None
    return err


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectError("connection refused"), True),
        (api(429, 1302), True),
        (api(429, 1303), True),
        (api(200, 1303), True),
        (api(503, 5001), True),
        (api(200, 5001), True),
        (api(503, None), True),
        (api(401, 1004), True),  # a refused token: nothing was created
        (TransportTimeout("read timed out"), False),
        (TransportError("connection reset"), False),
        (MalformedResponseError("not JSON", status=200), False),
        (api(500, 5000), False),
        (api(504, 5002), False),
        (api(503, 5000), False),
        (api(500, None), False),
        (api(502, None), False),
        (api(504, None), False),
        (api(400, 1201), False),
        (api(429, 1102), False),
        (api(429, 1304), False),
        (api(400, 1301), False),
        (api(404, 1203), False),
        (ValidationError("text", "too long"), False),
        (TaskFailedError("no face", task_id="t"), False),
        (ValueError("x"), False),
        (TimeoutError(), False),
    ],
    ids=repr,
)
def test_created_nothing(error: BaseException, expected: bool) -> None:
    assert created_nothing(error) is expected


# --- str / repr -------------------------------------------------------------------------------


def test_api_error_str_and_repr() -> None:
    err = error_from_response(429, kling_body(1303, "too many tasks", "req-9"))
    assert err is not None
    assert str(err) == "too many tasks (HTTP 429, code 1303, request_id req-9)"
    assert repr(err) == (
        "ConcurrencyLimitError('too many tasks', status=429, code=1303, request_id='req-9')"
    )
    bare = APIError("gateway broke", status=502)
    assert str(bare) == "gateway broke (HTTP 502)"
    assert repr(bare) == "APIError('gateway broke', status=502, code=None, request_id=None)"
    assert bare.args == ("gateway broke",)


def test_other_errors_keep_their_fields() -> None:
    v = ValidationError("voice_speed", "must be from 0.8 to 2.0")
    assert (v.field, v.rule, str(v)) == ("voice_speed", "must be from 0.8 to 2.0", str(v))
    assert str(v) == "voice_speed: must be from 0.8 to 2.0"
    m = MalformedResponseError("not JSON", status=502)
    assert (m.status, str(m)) == (502, "not JSON")
    assert MalformedResponseError("x").status is None
    f = TaskFailedError("there is no human in the video", task_id="t1", code="1201")
    assert (str(f), f.task_id, f.code) == ("there is no human in the video", "t1", "1201")
    t = TaskTimedOutError("t2", 7200.0)
    assert (t.task_id, t.timeout) == ("t2", 7200.0)
    assert str(t) == "task t2 still unfinished after 7200 s"
    assert str(TaskCancelledError("t3")) == "task t3 cancelled before it finished"
    assert str(TaskCancelledError(None)) == "job cancelled before it finished"


# --- the class tree matches the drawing in the module docstring --------------------------------


def _drawn_tree() -> list[tuple[str, str]]:
    """(child, parent) pairs read from the box drawing in kling_async/_errors.py's docstring."""
    doc = _errors.__doc__ or ""
    pairs: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []  # (column of the name, name)
    for line in doc.splitlines():
        match = re.match(r"^([\s│├└─]*)([A-Z]\w+)", line)
        if not match or ("── " not in match.group(1) and line.strip() != "KlingError"):
            continue
        column, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            pairs.append((name, stack[-1][1]))
        stack.append((column, name))
    return pairs


DRAWN = _drawn_tree()


def test_the_drawing_names_every_error_class() -> None:
    drawn = {child for child, _ in DRAWN} | {"KlingError"}
    exported = {
        name
        for name in _errors.__all__
        if isinstance(getattr(_errors, name), type)
        and issubclass(getattr(_errors, name), Exception)
    }
    assert drawn == exported
    assert len(DRAWN) == len(ALL_CLASSES) - 1
    for name in drawn:
        assert getattr(kling_async, name) is getattr(_errors, name)


@pytest.mark.parametrize(("child", "parent"), DRAWN, ids=[f"{c}<{p}" for c, p in DRAWN])
def test_drawn_parent_is_the_direct_base(child: str, parent: str) -> None:
    child_cls = getattr(_errors, child)
    parent_cls = getattr(_errors, parent)
    assert parent_cls in child_cls.__bases__
    kling_bases = [b for b in child_cls.__bases__ if issubclass(b, KlingError)]
    assert kling_bases == [parent_cls]


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        (ValidationError, KlingError),
        (ValidationError, ValueError),
        (TransportError, KlingError),
        (ConnectError, TransportError),
        (TransportTimeout, TransportError),
        (TransportTimeout, TimeoutError),
        (MalformedResponseError, TransportError),
        (APIError, KlingError),
        (AuthenticationError, APIError),
        (PermissionDeniedError, APIError),
        (AccountError, APIError),
        (RateLimitError, APIError),
        (ConcurrencyLimitError, RateLimitError),
        (InvalidRequestError, APIError),
        (NotFoundError, InvalidRequestError),
        (ContentPolicyError, APIError),
        (ServerError, APIError),
        (TaskFailedError, KlingError),
        (TaskTimedOutError, KlingError),
        (TaskTimedOutError, TimeoutError),
        (TaskCancelledError, KlingError),
    ],
    ids=lambda c: c.__name__,
)
def test_issubclass(child: type, parent: type) -> None:
    assert issubclass(child, parent)


@pytest.mark.parametrize(
    ("child", "other"),
    [
        (APIError, TransportError),
        (TransportError, APIError),
        (ValidationError, APIError),
        (NotFoundError, ServerError),
        (ConcurrencyLimitError, ServerError),
        (AccountError, RateLimitError),
        (ConnectError, TimeoutError),
        (APIError, ValueError),
        (TaskCancelledError, TimeoutError),
    ],
    ids=lambda c: c.__name__,
)
def test_not_issubclass(child: type, other: type) -> None:
    assert not issubclass(child, other)
