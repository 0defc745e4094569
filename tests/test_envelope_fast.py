"""The envelope's and the body's fast paths answer exactly as the full rules do."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kling_async._errors import KlingError, MalformedResponseError, error_from_response
from kling_async._http import HttpResponse
from kling_async.dialects import decode_envelope

SETTINGS = settings(max_examples=400, deadline=None)

codes = st.one_of(
    st.sampled_from([0, 200, 1303, 5000, "0", "200", " 0", "1303", "x", ""]),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, max_value=300, min_value=-1),
    st.integers(-5, 2000),
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "code": codes,
        "message": st.sampled_from(["SUCCEED", "", "bad things", None]),
        "request_id": st.sampled_from(["r-1", "", None, 7]),
        "data": st.sampled_from([{"task_id": "1"}, [], None, "x"]),
    },
)
bodies = st.one_of(
    envelopes.map(lambda e: json.dumps(e).encode()),
    st.sampled_from([b"", b"  ", b"[1]", b"null", b"<html>busy</html>", b'{"code": 0', b"7"]),
)
statuses = st.sampled_from([200, 201, 299, 300, 400, 401, 404, 429, 500, 503])


def full_rule(response: HttpResponse) -> Mapping[str, object]:
    """decode_envelope as it was before its fast path: every answer through error_from_response."""
    try:
        body = response.json()
    except MalformedResponseError:
        if 200 <= response.status < 300:
            raise
        body = None
    error = error_from_response(response.status, body, retry_after=response.retry_after)
    if error is not None:
        raise error
    if not isinstance(body, Mapping):
        raise MalformedResponseError(
            f"HTTP {response.status} answer is not a JSON object", status=response.status
        )
    return body


def outcome(decode: Any, response: HttpResponse) -> object:
    try:
        return decode(response)
    except KlingError as exc:
        return (type(exc), str(exc), getattr(exc, "code", None), exc.retryable)


@SETTINGS
@given(status=statuses, body=bodies, retry_after=st.sampled_from([None, "3", "x"]))
def test_decode_envelope_agrees_with_the_full_rule(
    status: int, body: bytes, retry_after: str | None
) -> None:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    response = HttpResponse(status=status, body=body, headers=headers)
    assert outcome(decode_envelope, response) == outcome(full_rule, response)


@SETTINGS
@given(rest=st.binary(max_size=60))
def test_object_bodies_decode_as_json_loads_does(rest: bytes) -> None:
    # Bodies starting '{"' skip json.loads' encoding detection: same value, same refusals.
    body = b'{"' + rest
    try:
        expected: object = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        expected = MalformedResponseError
    try:
        got: object = HttpResponse(status=200, body=body).json()
    except MalformedResponseError:
        got = MalformedResponseError
    assert got == expected


def test_object_bodies_keep_surrogates_as_json_loads_does() -> None:
    body = '{"a": "\\ud800", "b": "é"}'.encode()
    assert HttpResponse(status=200, body=body).json() == json.loads(body)
    lone = b'{"a": "\xed\xa0\x80"}'  # a UTF-8-encoded surrogate: json.loads passes it through
    assert HttpResponse(status=200, body=lone).json() == json.loads(lone)
