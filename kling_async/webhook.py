"""Receiving the server's callbacks, so a task finishes the moment the server says so.

A batch started with ``callback_url=`` passes that URL with every task; the server POSTs the
task's news there (official format: the task object on each state change, possibly repeated or
out of order; apimodels: an envelope on terminal states, retried for up to 30 minutes until it
gets a 2xx; docs/protocol.md, Callbacks and apimodels.app callbacks).  :class:`CallbackReceiver`
receives them and hands them to the client's live batches, which then poll only as a slow safety
net (``PollPolicy.callback_safety_interval``)::

    receiver = CallbackReceiver(client)
    app.add_subapp("/hooks", receiver.aiohttp_app())                # aiohttp
    fastapi_app.mount("/hooks", receiver.asgi_app)                  # FastAPI / Starlette
    url = receiver.callback_url("https://dub.example.com/hooks")    # what the vendor can reach
    async for result in client.run_batch(jobs, callback_url=url):
        ...

The URL carries an unguessable token (compared in constant time).  Since 2026 the official
API can also sign its callbacks (Standard Webhooks, docs/protocol.md, Signed callbacks):
given the account's ``webhook_secret`` (``whsec_...``), the receiver refuses every callback
whose ``webhook-*`` signature headers are missing, stale (more than 5 minutes from now) or do
not match, before reading what it says; the token stays as a second layer.  Gateways do not
sign: leave ``webhook_secret`` unset for them.  Anything else at that address is answered with
a short status and no work:

====  ==============================================================================
200   a readable callback about a task this client tracks now or tracked recently (its
      last 16384 tasks): late and repeated callbacks too, so the vendor stops retrying;
      and a ``submitted`` callback about a task not known yet (the console's test callback
      is one; a submit's own callback may beat its answer): it changes nothing
400   the body is not a callback in the client's dialect
401   with a ``webhook_secret``: a missing, stale or wrong signature (nothing changes)
404   wrong token (nothing revealed), or a task this client does not know (the vendor
      retries, which gives a batch resumed from its journal a chance to take it); a
      terminal one is kept a while too, since a task may be called back before its
      submit's answer arrives: it ends the task once tracked
405   a method other than POST
413   a body larger than ``max_body`` (read no further than that)
415   a Content-Type that is not JSON
====  ==============================================================================
"""

from __future__ import annotations

import collections
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import attrs
from aiohttp import web

from ._config import check_count
from ._errors import CallbackSignatureError, KlingError, ValidationError
from ._http import check_http_url
from ._results import TaskState
from ._signature import WebhookSecret, lower_headers

if TYPE_CHECKING:
    from ._client import KlingClient

__all__ = ["CALLBACK_SEGMENT", "CallbackReceiver"]

logger = logging.getLogger("kling_async")

#: The path segment before the token: callback URLs end in ``/kling-callback/<token>``.
CALLBACK_SEGMENT = "kling-callback"
#: The default bound on a callback body: a task object or envelope is a few KiB.
DEFAULT_MAX_BODY = 64 * 1024

_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}")

#: ASGI types, spelled out so that no ASGI framework is needed.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@attrs.frozen
class _Reply:
    status: int
    text: str
    headers: tuple[tuple[str, str], ...] = ()


_OK = _Reply(200, "ok")
_NOT_FOUND = _Reply(404, "not found")
_BAD_METHOD = _Reply(405, "method not allowed", (("Allow", "POST"),))
_TOO_LARGE = _Reply(413, "body too large")
_NOT_JSON = _Reply(415, "JSON only")
_MALFORMED = _Reply(400, "not a callback")
_UNSIGNED = _Reply(401, "signature required")


class _Refused(Exception):
    """Stop reading the request and answer with ``reply``."""

    def __init__(self, reply: _Reply) -> None:
        self.reply = reply


class _Disconnected(Exception):
    """The ASGI client went away before its body arrived: nothing to answer."""


class CallbackReceiver:
    """Receives a client's callbacks over HTTP; see the module docstring.

    ``token`` is the secret in the callback URL; a fresh one (``secrets.token_urlsafe(32)``) is
    made when none is given.  Pass a fixed token (16 to 256 letters, digits, ``-`` or ``_``,
    kept as secret as an API key) when a batch resumed from a journal must still receive
    callbacks for tasks submitted before a restart: those tasks carry the old URL.
    ``max_body`` bounds a callback's size in bytes.  apimodels' callbacks echo the request in
    ``param``: with audio sent as base64 they can exceed the default 64 KiB, so raise it (or
    send audio URLs); a refused callback is still caught by the safety polls.

    ``webhook_secret`` (``"whsec_..."``, or several while you rotate it) makes the receiver
    verify Kling's Standard Webhooks signature of every callback (401 when it fails); without
    it the client's own ``webhook_secret``, if any, is used.  ``clock`` (Unix seconds, default
    the client's) judges the signature's timestamp.

    ``counts`` tallies answers by outcome (``"accepted"``, ``"early"``, ``"unknown"``,
    ``"forged"``, ``"unsigned"``, ``"malformed"``, ``"too_large"``, ``"bad_method"``,
    ``"not_json"``).
    """

    def __init__(
        self,
        client: KlingClient,
        *,
        token: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        webhook_secret: str | Iterable[str] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if token is None:
            token = secrets.token_urlsafe(32)
        elif not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise ValidationError(
                "token", "must be 16 to 256 URL-safe characters (letters, digits, '-', '_')"
            )
        check_count("max_body", max_body)
        self._client = client
        self._token = token
        self._token_bytes = token.encode("ascii")
        self.max_body = max_body
        self._secret = (
            WebhookSecret(webhook_secret) if webhook_secret is not None else client.webhook_secret
        )
        self._clock = clock or client._clock
        self.counts: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        # The token and the webhook secret are secrets: never in a repr.
        return (
            f"CallbackReceiver(client={self._client!r}, max_body={self.max_body}, "
            f"signed={self._secret is not None})"
        )

    @property
    def path(self) -> str:
        """``/kling-callback/<token>``: the path the receiving routes answer (a secret)."""
        return f"/{CALLBACK_SEGMENT}/{self._token}"

    def callback_url(self, base: str) -> str:
        """The URL to pass as ``callback_url``: ``base`` followed by :attr:`path`.

        ``base`` is the public origin the vendor's servers can reach, plus the prefix the
        receiver is mounted under (``"https://dub.example.com/hooks"``), not a loopback
        address; use https, since the URL carries the token.
        """
        parts = check_http_url("base", base)
        if parts.query or parts.fragment:
            raise ValidationError("base", "must be an http(s) URL without query or fragment")
        return base.rstrip("/") + self.path

    # -- aiohttp -------------------------------------------------------------------------

    def aiohttp_app(self) -> web.Application:
        """An aiohttp application answering ``/kling-callback/{token}`` (any method).

        Serve it alone, or nest it: ``app.add_subapp("/hooks", receiver.aiohttp_app())``.
        """
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", f"/{CALLBACK_SEGMENT}/{{token}}", self.aiohttp_handler)
        return app

    async def aiohttp_handler(self, request: web.Request) -> web.Response:
        """An aiohttp handler, for a route of your own app.

        Register it at :attr:`path`, or at any pattern with a ``{token}`` part
        (``app.router.add_route("*", "/hooks/kling-callback/{token}", receiver.aiohttp_handler)``).
        """
        token = request.match_info.get("token")
        if token is None:
            token = _token_in(request.path)
        try:
            self._check(token, request.method, request.headers)
            body = await self._read_aiohttp(request)
            reply = self._accept(body, request.headers.items())
        except _Refused as refused:
            reply = refused.reply
        response = web.Response(status=reply.status, text=reply.text, headers=dict(reply.headers))
        if reply is _TOO_LARGE:
            response.force_close()  # rather than read the rest of the body to keep the connection
        return response

    async def _read_aiohttp(self, request: web.Request) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > self.max_body:
                raise self._refuse("too_large", _TOO_LARGE)
            chunks.append(chunk)
        return b"".join(chunks)

    # -- ASGI ----------------------------------------------------------------------------

    async def asgi_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A plain ASGI application: mount it in FastAPI or Starlette, or serve it alone.

        ``app.mount("/hooks", receiver.asgi_app)`` answers ``/hooks/kling-callback/<token>``.
        """
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # a websocket: closing without accepting refuses it
        headers = {
            bytes(name).decode("latin-1").lower(): bytes(value).decode("latin-1")
            for name, value in scope.get("headers", ())
        }
        try:
            self._check(_token_in(_relative_path(scope)), str(scope.get("method", "")), headers)
            body = await self._read_asgi(receive)
            reply = self._accept(body, headers.items())
        except _Refused as refused:
            reply = refused.reply
        except _Disconnected:
            return
        text = reply.text.encode()
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(text)).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in reply.headers),
                ],
            }
        )
        await send({"type": "http.response.body", "body": text})

    async def _read_asgi(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            if message["type"] != "http.request":
                continue
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_body:
                raise self._refuse("too_large", _TOO_LARGE)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # -- what both share -----------------------------------------------------------------

    def _check(self, token: str | None, method: str, headers: Mapping[str, str]) -> None:
        """Refuse what needs no body: a wrong token first, so that nothing else is revealed.

        ``headers`` must find lower-case names (aiohttp's headers do, in any case).
        """
        given = (token or "").encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(given, self._token_bytes):
            raise self._refuse("forged", _NOT_FOUND)
        if method.upper() != "POST":
            raise self._refuse("bad_method", _BAD_METHOD)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise self._refuse("malformed", _MALFORMED)
            if int(declared) > self.max_body:
                raise self._refuse("too_large", _TOO_LARGE)
        content_type = headers.get("content-type")
        if content_type is not None and not _is_json(content_type):
            raise self._refuse("not_json", _NOT_JSON)

    def _accept(self, body: bytes, headers: Iterable[tuple[str, str]]) -> _Reply:
        """Verify, parse and deliver a callback; the tracker update is all the work there is."""
        if self._secret is not None:
            try:
                self._secret.verify(body, lower_headers(headers), now=self._clock())
            except CallbackSignatureError as exc:
                logger.warning("callback refused: %s", exc)  # (the reason names no secret)
                return self._refuse("unsigned", _UNSIGNED).reply
        try:
            snapshot = self._client.dialect.parse_callback(body)
        except KlingError as exc:
            # The class only: a message may quote the body, and apimodels echoes the callback
            # URL (with its token) in ``param``.
            logger.warning("callback not understood (%s)", type(exc).__name__)
            return self._refuse("malformed", _MALFORMED).reply
        if self._client.deliver_callback(snapshot):
            self.counts["accepted"] += 1
            logger.debug("callback: task %s is %s", snapshot.task_id, snapshot.state.value)
            return _OK
        if snapshot.state is TaskState.SUBMITTED:
            # Nothing to do either way, and the console's "send test callback" wants a 200.
            self.counts["early"] += 1
            return _OK
        logger.debug("callback about a task this client does not track")
        return self._refuse("unknown", _NOT_FOUND).reply

    def _refuse(self, outcome: str, reply: _Reply) -> _Refused:
        self.counts[outcome] += 1
        return _Refused(reply)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def _token_in(path: str) -> str | None:
    """The token of a path ``.../kling-callback/<token>``, else None."""
    parts = path.rstrip("/").rsplit("/", 2)
    if len(parts) == 3 and parts[1] == CALLBACK_SEGMENT:
        return parts[2]
    return None


def _relative_path(scope: Scope) -> str:
    # Starlette's Mount keeps the full path and moves the prefix into root_path (older
    # versions stripped the path instead): accept both, but only the callback path itself.
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", "")).rstrip("/")
    if root and path.startswith(root + "/"):
        path = path[len(root) :]
    return path if path.count("/") == 2 else ""


async def _lifespan(receive: Receive, send: Send) -> None:
    # Served alone (uvicorn), the app is asked to start and stop: there is nothing to do.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
