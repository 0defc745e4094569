"""Bounded answers: an API answer longer than Timeouts.max_answer_bytes is refused early."""

from __future__ import annotations

import json

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import kling_async as ka

pytestmark = pytest.mark.anyio

CHUNK = b" " * 65536


def answer_app(sent: list[int]) -> web.Application:
    """``/v1/videos/lip-sync/{id}``: a task answer padded with endless chunked whitespace;
    ``/small/...``: an honest one; ``/declared/...``: a 3 MiB body with its length declared.
    """

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"code": 0, "data": {"task_id": "1", "task_status": "submitted"}')
        try:
            for _ in range(64 * 16):  # up to 64 MiB, unless the client hangs up first
                await response.write(CHUNK)
                sent[0] += len(CHUNK)
        except (ConnectionError, RuntimeError):
            pass
        return response

    async def small(request: web.Request) -> web.Response:
        task = {"task_id": "1", "task_status": "submitted"}
        return web.json_response({"code": 0, "data": task})

    async def declared(request: web.Request) -> web.Response:
        body = json.dumps({"code": 0, "data": {"task_id": "1", "task_status": "submitted"}})
        return web.Response(body=body.encode() + b" " * (3 << 20), content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/videos/lip-sync/{id}", endless)
    app.router.add_get("/small/v1/videos/lip-sync/{id}", small)
    app.router.add_get("/declared/v1/videos/lip-sync/{id}", declared)
    return app


def client_for(url: str, prefix: str = "", **limits: int) -> ka.KlingClient:
    timeouts = ka.Timeouts(total=10.0, **limits)
    retry = ka.RetryPolicy(max_attempts=1)
    return ka.KlingClient.kling(
        api_key="k", base_url=url, prefix=prefix, timeouts=timeouts, retry=retry
    )


async def test_a_chunked_answer_is_refused_as_soon_as_it_passes_the_cap() -> None:
    sent = [0]
    async with TestServer(answer_app(sent)) as server:
        url = str(server.make_url("")).rstrip("/")
        async with client_for(url) as client:
            with anyio.fail_after(5), pytest.raises(ka.MalformedResponseError, match="cap"):
                await client.get_task("1")
            await anyio.sleep(0.2)  # the server notices the hang-up
            assert sent[0] < 12 * 1024 * 1024  # 2 MiB read, socket buffers: not 64 MiB
            async with client_for(url, prefix="/small") as small:
                assert (await small.get_task("1")).task_id == "1"
            async with client_for(url, prefix="/declared") as big:
                with pytest.raises(ka.MalformedResponseError, match="exceeds"):
                    await big.get_task("1")
            async with client_for(url, prefix="/declared", max_answer_bytes=4 << 20) as roomy:
                assert (await roomy.get_task("1")).task_id == "1"


def test_the_cap_is_validated_and_defaults_to_two_mib() -> None:
    assert ka.Timeouts().max_answer_bytes == 2 * 1024 * 1024
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ka.ValidationError, match="max_answer_bytes"):
            ka.Timeouts(max_answer_bytes=bad)  # type: ignore[arg-type]
