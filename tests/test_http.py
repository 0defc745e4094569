"""HTTP records, URL joining that keeps gateway prefixes, base URL and prefix normalisation."""

from __future__ import annotations

import json
from urllib.parse import urljoin, urlsplit

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kling_async import KlingError, MalformedResponseError, TransportError, ValidationError
from kling_async._http import (
    HttpRequest,
    HttpResponse,
    join_url,
    normalize_base_url,
    normalize_prefix,
)

SETTINGS = settings(max_examples=80, deadline=None)
LIP_SYNC = "/kling/v1/videos/lip-sync"

# --- join_url ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "path", "expected"),
    [
        ("https://www.dmxapi.cn", LIP_SYNC, "https://www.dmxapi.cn/kling/v1/videos/lip-sync"),
        ("https://www.dmxapi.cn/", LIP_SYNC, "https://www.dmxapi.cn/kling/v1/videos/lip-sync"),
        ("https://host/proxy/", LIP_SYNC, "https://host/proxy/kling/v1/videos/lip-sync"),
        ("https://host/proxy", LIP_SYNC, "https://host/proxy/kling/v1/videos/lip-sync"),
        ("https://host/a/b//", "v1/x", "https://host/a/b/v1/x"),
        ("https://host/kling", "/v1/videos/lip-sync/123", "https://host/kling/v1/videos/lip-sync/123"),
        ("http://127.0.0.1:8080", "//api/v1/audio/generations", "http://127.0.0.1:8080/api/v1/audio/generations"),
        ("https://api-singapore.klingai.com", "/v1/videos/lip-sync", "https://api-singapore.klingai.com/v1/videos/lip-sync"),
    ],
)  # fmt: skip
def test_join_url_keeps_the_prefix(base: str, path: str, expected: str) -> None:
    assert join_url(base, path) == expected


def test_join_url_avoids_the_rfc3986_prefix_trap() -> None:
    # docs/protocol.md, Prefix trap: RFC 3986 joining drops the base's path.
    base = "https://gateway.example.com/kling"
    assert urljoin(base, "/v1/videos/lip-sync") == "https://gateway.example.com/v1/videos/lip-sync"
    assert (
        join_url(base, "/v1/videos/lip-sync")
        == "https://gateway.example.com/kling/v1/videos/lip-sync"
    )


SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~", min_size=1, max_size=8)
HOST = st.sampled_from(
    ["www.dmxapi.cn", "host", "127.0.0.1:8080", "[::1]:9000", "api-singapore.klingai.com"]
)


@SETTINGS
@given(
    scheme=st.sampled_from(["http", "https"]),
    host=HOST,
    base_path=st.lists(SEGMENT, max_size=3),
    base_slashes=st.integers(0, 3),
    path=st.lists(SEGMENT, min_size=1, max_size=5),
    path_slashes=st.integers(0, 3),
)
def test_join_url_never_drops_the_base_path_nor_doubles_slashes(
    scheme: str,
    host: str,
    base_path: list[str],
    base_slashes: int,
    path: list[str],
    path_slashes: int,
) -> None:
    base = f"{scheme}://{host}" + "".join(f"/{s}" for s in base_path) + "/" * base_slashes
    rel = "/" * path_slashes + "/".join(path)
    url = join_url(base, rel)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == (scheme, host)
    assert parts.path == "/" + "/".join([*base_path, *path])
    assert url.startswith(base.rstrip("/") + "/")
    assert "//" not in url[len(f"{scheme}://") :]


# --- HttpRequest ------------------------------------------------------------------------------


def test_request_url_with_params() -> None:
    request = HttpRequest(
        method="GET", path=LIP_SYNC, params=(("pageNum", "1"), ("pageSize", "500"))
    )
    assert request.url("https://www.dmxapi.cn") == (
        "https://www.dmxapi.cn/kling/v1/videos/lip-sync?pageNum=1&pageSize=500"
    )


def test_request_params_are_encoded_in_order() -> None:
    request = HttpRequest(
        method="GET",
        path="/api/v1/audio/generations",
        params=(("task_id", "a b&c=d/é"), ("x", "")),
    )
    url = request.url("https://apimodels.app/")
    assert url == "https://apimodels.app/api/v1/audio/generations?task_id=a+b%26c%3Dd%2F%C3%A9&x="


def test_request_without_params_has_no_query() -> None:
    request = HttpRequest(method="POST", path=LIP_SYNC, json={"input": {}}, idempotent=False)
    assert request.url("https://host/proxy/") == "https://host/proxy/kling/v1/videos/lip-sync"
    assert request.json == {"input": {}}
    assert request.idempotent is False


def test_a_submits_repr_shows_neither_its_callback_token_nor_its_audio() -> None:
    """A submit's body carries the callback URL (its token is a secret) and base64 audio."""
    import kling_async as ka
    from kling_async.dialects import KlingDialect

    job = ka.LipSyncJob.from_audio(
        video_url="https://example.com/clip.mp4", audio_file=b"ID3" + bytes(range(200))
    )
    hook = "https://hooks.example.com/kling-callback/s3cr3t-t0ken-0123456789"
    submit = next(KlingDialect().flow(job, callback_url=hook))
    body = submit.request.json
    assert isinstance(body, dict)  # (HttpRequest.json is typed object)
    assert body["callback_url"] == hook
    shown = repr(submit)
    assert "s3cr3t-t0ken" not in shown and "audio_file" not in shown
    assert "/v1/videos/lip-sync" in shown


def test_a_number_of_more_than_4300_digits_is_malformed_not_a_value_error() -> None:
    """Python refuses to convert such a number with a plain ValueError, which escaped every
    parse of an answer (a batch's task group ended with it)."""
    body = b'{"code": 0, "data": {"task_id": "1", "created_at": 1' + b"0" * 5000 + b"}}"
    with pytest.raises(MalformedResponseError, match="not JSON"):
        HttpResponse(status=200, body=body).json()


def test_request_defaults_and_frozen() -> None:
    request = HttpRequest(method="GET", path="/v1/videos/lip-sync/1")
    assert (request.params, request.json, request.idempotent) == ((), None, True)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        request.path = "/other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        HttpRequest("GET", "/x")  # type: ignore[call-arg]  # positional on purpose


# --- HttpResponse.json ------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b" ", b"\r\n\t "])
def test_empty_body_is_none(body: bytes) -> None:
    assert HttpResponse(status=204, body=body).json() is None


def test_valid_json() -> None:
    body = '{"code": 0, "message": "成功", "data": [{"task_id": "1"}]}'.encode()
    assert HttpResponse(status=200, body=body).json() == {
        "code": 0,
        "message": "成功",
        "data": [{"task_id": "1"}],
    }
    assert HttpResponse(status=200, body=b"\xef\xbb\xbf[1, 2]").json() == [1, 2]  # UTF-8 BOM
    assert HttpResponse(status=200, body=b"null").json() is None


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        b"<!DOCTYPE html><title>Authorization: Bearer sk-secret-key</title>",
        b'{"code": 0, "message": "cut off',
        b"Internal Server Error",
        b'{"message": "caf\xc3"}',  # truncated UTF-8
        b'{"message": "\xff\xfe\xfd"}',  # not UTF-8 at all
        b"[" * 100_000,  # nested deeper than the parser's recursion limit
    ],
    ids=["html", "html-with-secret", "truncated", "text", "bad-utf8", "binary", "deep"],
)
def test_non_json_body_is_malformed(body: bytes) -> None:
    response = HttpResponse(status=502, body=body)
    with pytest.raises(MalformedResponseError) as info:
        response.json()
    err = info.value
    assert isinstance(err, TransportError)
    assert isinstance(err, KlingError)
    assert err.status == 502
    assert "HTTP 502" in str(err)
    assert "sk-secret" not in str(err)  # the body is never echoed
    assert err.__cause__ is None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@SETTINGS
@given(value=JSON_VALUES)
def test_json_round_trip(value: object) -> None:
    for raw in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert HttpResponse(status=200, body=raw.encode()).json() == value


@SETTINGS
@given(body=st.binary(max_size=200))
def test_any_body_decodes_or_is_malformed(body: bytes) -> None:
    error: MalformedResponseError | None = None
    try:
        HttpResponse(status=200, body=body).json()
    except MalformedResponseError as err:  # anything else fails the test
        error = err
    assert error is None or error.status == 200


# --- HttpResponse.retry_after -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (" 30 ", 30.0),
        ("120", 120.0),
        ("-1", None),
        ("", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("inf", None),
        ("Infinity", None),
        ("nan", None),
        ("1e400", None),
    ],
)
def test_retry_after(value: str, expected: float | None) -> None:
    assert HttpResponse(status=429, headers={"retry-after": value}).retry_after == expected


def test_retry_after_missing() -> None:
    assert HttpResponse(status=429).retry_after is None
    assert (
        HttpResponse(status=429, headers={"content-type": "application/json"}).retry_after is None
    )


@SETTINGS
@given(seconds=st.floats(min_value=0, max_value=1e6))
def test_retry_after_any_non_negative_number(seconds: float) -> None:
    assert HttpResponse(status=503, headers={"retry-after": repr(seconds)}).retry_after == seconds


def test_response_defaults() -> None:
    response = HttpResponse(status=200)
    assert (response.body, dict(response.headers)) == (b"", {})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        response.status = 500  # type: ignore[misc]


# --- normalize_base_url -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://www.dmxapi.cn", "https://www.dmxapi.cn"),
        ("https://www.dmxapi.cn/", "https://www.dmxapi.cn"),
        ("https://host/proxy///", "https://host/proxy"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://[::1]:8080/", "http://[::1]:8080"),
        ("https://api-singapore.klingai.com", "https://api-singapore.klingai.com"),
        ("  https://apimodels.app/\n", "https://apimodels.app"),  # as read from an env file
    ],
)
def test_normalize_base_url(raw: str, expected: str) -> None:
    assert normalize_base_url(raw) == expected
    assert normalize_base_url(expected) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "www.dmxapi.cn",
        "/kling",
        "ftp://host",
        "file:///tmp",
        "https://",
        "https:///path",
        "https://:443",
        "https://user@/x",
        "https://host?x=1",
        "https://host/?",
        "https://host#frag",
        "https://host/#",
        "https://[::1",
        "https://host:abc",
        "https://host:99999",
        "https://ho st",
        "https://host/a\tb",
        "https://host/a\nb",
        None,
        123,
        b"https://host",
    ],
)
def test_normalize_base_url_refuses(raw: object) -> None:
    with pytest.raises(ValidationError) as info:
        normalize_base_url(raw)  # type: ignore[arg-type]
    assert info.value.field == "base_url"
    assert str(info.value).startswith("base_url")
    assert isinstance(info.value, ValueError)


# --- normalize_prefix -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", ""),
        ("/", ""),
        ("//", ""),
        ("kling", "/kling"),
        ("/kling", "/kling"),
        ("/kling/", "/kling"),
        ("//kling//", "/kling"),
        ("proxy/kling/", "/proxy/kling"),
    ],
)
def test_normalize_prefix(raw: str, expected: str) -> None:
    assert normalize_prefix(raw) == expected


@SETTINGS
@given(segments=st.lists(SEGMENT, max_size=4), lead=st.integers(0, 2), trail=st.integers(0, 2))
def test_normalize_prefix_shape(segments: list[str], lead: int, trail: int) -> None:
    raw = "/" * lead + "/".join(segments) + "/" * trail
    prefix = normalize_prefix(raw)
    assert prefix == "".join(f"/{s}" for s in segments)
    assert normalize_prefix(prefix) == prefix
    assert join_url("https://www.dmxapi.cn", prefix + "/v1/videos/lip-sync") == (
        "https://www.dmxapi.cn" + prefix + "/v1/videos/lip-sync"
    )
