"""A rewriting proxy in front of FakeKlingServer: answers the fake cannot give by itself.

Tests put :func:`proxy_app` (run in aiohttp's ``TestServer``) between a client and the fake
server; it forwards every request and hands each JSON answer to a rewrite first, so that a real
batch meets a quirk of the wire (a figure sent as a string, a null list, an unreadable row).
:func:`run_through` runs a whole batch that way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import anyio
from aiohttp import web
from aiohttp.test_utils import TestServer

import kling_async as ka
from kling_async.testing import FakeKlingServer

#: Changes a decoded JSON answer in place: ``(request, request body, answer)``.
Rewrite = Callable[[web.Request, bytes, dict[str, object]], None]
#: Changes an answer's raw bytes: ``(request, answer bytes) -> answer bytes``.
RawRewrite = Callable[[web.Request, bytes], bytes]


def _keep(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
    """The rewrite that changes nothing."""


def proxy_app(
    target: str,
    rewrite: Rewrite = _keep,
    page_size: int | None = None,
    *,
    raw: RawRewrite | None = None,
) -> web.Application:
    """Forward every request to ``target``; JSON answers pass through ``rewrite`` first.

    With ``page_size`` list requests ask for pages of that size, whatever the client asked
    (a gateway with a page size of its own).  With ``raw`` the answer's bytes are rewritten
    instead, and passed on as they come out (JSON or not).
    """
    session: list[aiohttp.ClientSession] = []

    async def forward(request: web.Request) -> web.Response:
        if not session:
            session.append(aiohttp.ClientSession())
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        body = await request.read()
        url = target + request.path_qs
        if page_size is not None and "pageSize" in request.query:
            url = str(request.rel_url.update_query(pageSize=str(page_size)))
            url = target + url
        async with session[0].request(
            request.method,
            url,
            data=body or None,
            headers={**headers, "Content-Type": "application/json"} if body else headers,
        ) as answer:
            content = await answer.read()
            status = answer.status
        if raw is not None:
            content = raw(request, content)
            return web.Response(body=content, status=status, content_type="application/json")
        try:
            decoded = json.loads(content)
        except ValueError:
            return web.Response(body=content, status=status)
        rewrite(request, body, decoded)
        return web.json_response(decoded, status=status)

    async def close(app: web.Application) -> None:
        if session:
            await session[0].close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_cleanup.append(close)
    return app


async def run_through(
    fake: FakeKlingServer,
    app: web.Application,
    jobs: Sequence[ka.LipSyncJob],
    *,
    make: Callable[..., ka.KlingClient] = ka.KlingClient.kling,
    **options: Any,
) -> list[ka.JobResult]:
    """Run ``jobs`` as one batch of a client (``make(api_key=, base_url=, **options)``) whose
    requests go through ``app`` (a :func:`proxy_app` in front of ``fake``), within 20 s."""
    from helpers import API_KEY, FAST_RETRY

    options.setdefault("retry", FAST_RETRY)
    async with TestServer(app) as proxy:
        url = str(proxy.make_url("")).rstrip("/")
        async with make(api_key=API_KEY, base_url=url, **options) as client:
            with anyio.fail_after(20):
                return [r async for r in client.run_batch(jobs)]
