"""Quirks of the wire in real batches: answers the vendors' pages allow but FakeKlingServer does
not give by itself, made by a proxy that rewrites its answers (figures sent as strings, nulls
where lists are expected).
"""

from __future__ import annotations

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import API_KEY, FAST_RETRY
from test_tracking_faults import proxy_app

import kling_async as ka
from kling_async.testing import FakeKlingServer

pytestmark = pytest.mark.anyio

POLL = ka.PollPolicy(first_delay=0.01, max_interval=0.05, timeout=3.0)


def _apimodels_job(n: int) -> ka.LipSyncJob:
    return ka.LipSyncJob.from_audio(
        video_url=f"https://example.com/clip-{n}.mp4",
        audio_url=f"https://example.com/line-{n}.mp3",
        key=f"k{n}",
    )


async def test_apimodels_figures_sent_as_strings_do_not_lose_the_video() -> None:
    """A completed apimodels task whose ``videoDuration`` and times come as strings is a success.

    Kling's own answers carry durations as strings ("5.0"), and an upstream that passes them
    through makes apimodels' ``videoDuration`` one too.  Such an answer was malformed, every
    query of the finished, paid-for task failed again, and the job timed out without its video.
    """
    rewritten: list[str] = []

    def stringify(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
        data = body.get("data")
        if request.method == "GET" and isinstance(data, dict):
            for field in ("videoDuration", "createTime", "completeTime"):
                value = data.get(field)
                if isinstance(value, int):
                    data[field] = f"{value}.0" if field == "videoDuration" else str(value)
                    rewritten.append(field)

    jobs = [_apimodels_job(n) for n in range(3)]
    async with FakeKlingServer(task_duration=0.05) as fake:
        async with TestServer(proxy_app(fake.url, stringify)) as proxy:
            url = str(proxy.make_url("")).rstrip("/")
            async with ka.KlingClient.apimodels(
                api_key=API_KEY, base_url=url, poll=POLL, retry=FAST_RETRY
            ) as client:
                with anyio.fail_after(20):
                    results = {r.key: r async for r in client.run_batch(jobs)}
    assert len(results) == 3
    for result in results.values():
        assert result.ok, (result.key, result.state.value, str(result.error))
        assert result.video_url is not None
        assert result.video_duration == 5.0
    assert "videoDuration" in rewritten and "completeTime" in rewritten
