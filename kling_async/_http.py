"""Plain records of HTTP requests and answers, and URL joining that keeps gateway prefixes.

Dialects build :class:`HttpRequest` values and parse :class:`HttpResponse` values without doing
any I/O; the transport is the only code that turns one into the other over the network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Literal
from urllib.parse import SplitResult, urlencode, urlsplit

import attrs

from ._errors import MalformedResponseError, ValidationError

__all__ = [
    "URL_RULE",
    "HttpRequest",
    "HttpResponse",
    "check_http_url",
    "join_url",
    "normalize_base_url",
    "normalize_prefix",
]

Method = Literal["GET", "POST"]


@attrs.frozen(kw_only=True)
class HttpRequest:
    """A request to send: ``path`` is relative to the base URL and already carries any prefix.

    ``idempotent`` is False for requests that create (and bill) a task: the client never repeats
    those unless the server certainly created nothing.  The body stays out of the repr: it
    carries the callback URL, whose token is a secret, and megabytes of base64 audio.
    """

    method: Method
    path: str
    params: tuple[tuple[str, str], ...] = ()
    json: object = attrs.field(default=None, repr=False)
    idempotent: bool = True

    def url(self, base_url: str) -> str:
        """The absolute URL of this request against ``base_url``."""
        url = join_url(base_url, self.path)
        return f"{url}?{urlencode(self.params)}" if self.params else url


@attrs.frozen(kw_only=True)
class HttpResponse:
    """An answer as received: status, headers and the raw body.

    ``headers`` answers lookups by lower-case name (the transport hands over aiohttp's
    case-insensitive headers as they are; a plain dict must hold lower-case names).
    """

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = attrs.field(factory=dict)

    def json(self) -> object:
        """The body decoded as JSON, ``None`` for an empty body.

        Raises :class:`MalformedResponseError` when the body is not JSON (some gateways answer
        errors with HTML pages).
        """
        body = self.body
        if not body or body.isspace():  # (the same test as ``not body.strip()``, without a copy)
            return None
        try:
            if body.startswith(b'{"'):
                # What json.loads would detect for these first bytes (no BOM, no NUL): UTF-8.
                # Decoding here skips its encoding sniffing, with the same result.
                return json.loads(body.decode("utf-8", "surrogatepass"))
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            # RecursionError: a pathologically nested body must not escape as a non-KlingError;
            # ValueError (beside JSONDecodeError and UnicodeDecodeError, its subclasses): a
            # number of more than 4300 digits, which Python refuses to convert.
            raise MalformedResponseError(
                f"HTTP {self.status} answer is not JSON: {exc}", status=self.status
            ) from None

    @property
    def retry_after(self) -> float | None:
        """The Retry-After header in seconds, when it is a number of seconds."""
        raw = self.headers.get("retry-after")
        if raw is None:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            return None
        # "inf" and "nan" parse as floats but are no delay anyone can wait for.
        return seconds if math.isfinite(seconds) and seconds >= 0 else None


#: The rule every URL this library accepts from a caller follows.
URL_RULE = "must be an http:// or https:// URL with a host"


def check_http_url(field: str, value: object) -> SplitResult:
    """Check that ``value`` is an http(s) URL with a host; return its parts.

    Raises :class:`ValidationError` naming ``field`` (never a bare ``ValueError``: ``urlsplit``
    raises one for "http://[::1" and a bad port).  The host must be real: "https://:80/x" and
    "https://user@/x" have a netloc but no host.
    """
    if not isinstance(value, str):
        raise ValidationError(field, URL_RULE)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValidationError(field, URL_RULE) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(field, URL_RULE)
    return parts


def normalize_base_url(base_url: str) -> str:
    """Check that ``base_url`` is an http(s) URL with a host, and drop a trailing slash.

    Surrounding whitespace (a trailing newline from an environment file) is dropped too.
    """
    if not isinstance(base_url, str):
        raise ValidationError("base_url", URL_RULE)
    base_url = base_url.strip()
    # urlsplit silently deletes tabs and newlines inside a URL, so it cannot be trusted to see
    # them; the joined URL would still carry them.
    if any(ch.isspace() or ord(ch) < 32 for ch in base_url):
        raise ValidationError("base_url", "must not contain whitespace or control characters")
    check_http_url("base_url", base_url)
    # Checked on the text: urlsplit reports an empty query for "https://host?", and joining
    # paths after any "?" or "#" would put them in the query or fragment.
    if "?" in base_url or "#" in base_url:
        raise ValidationError("base_url", "must not carry a query or fragment")
    return base_url.rstrip("/")


def normalize_prefix(prefix: str) -> str:
    """Return ``prefix`` as ``/segment[/segment...]`` without a trailing slash, or ``""``."""
    stripped = prefix.strip("/")
    return f"/{stripped}" if stripped else ""


def join_url(base_url: str, path: str) -> str:
    """Join ``base_url`` and an absolute ``path`` by plain concatenation.

    ``urljoin`` and ``aiohttp.ClientSession(base_url=...)`` follow RFC 3986, where a path starting
    with ``/`` replaces the base's own path and so silently drops a gateway prefix such as
    ``https://host/kling`` (docs/protocol.md, Prefix trap).  Concatenation keeps it.
    """
    return base_url.rstrip("/") + "/" + path.lstrip("/")
