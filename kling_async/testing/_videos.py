"""Result videos: ``GET /videos/{task_id}.mp4`` serves a few deterministic bytes, with Range.

Only a task that has succeeded has a video, as on the real CDN; downloads need no key.
"""

from __future__ import annotations

import collections
import hashlib

from aiohttp import web

from ._state import Account

__all__ = ["VideoRoute", "video_bytes"]

#: Size of every fake result video, in bytes: big enough for Range requests to matter.
VIDEO_SIZE = 64 * 1024
# The start of an ISO base media file ("ftyp" box), so the bytes look like an .mp4.
_MP4_HEAD = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom"


def video_bytes(task_id: str) -> bytes:
    """The fake video of ``task_id``: the same bytes every time, different for each task."""
    seed = hashlib.sha256(task_id.encode()).digest()
    filler = seed * (VIDEO_SIZE // len(seed) + 1)
    return (_MP4_HEAD + filler)[:VIDEO_SIZE]


class VideoRoute:
    """The download route; each request counts under ``"download"``."""

    def __init__(self, *, account: Account, requests: collections.Counter[str]) -> None:
        self._account = account
        self._requests = requests

    def add_to(self, app: web.Application) -> None:
        """Register ``GET`` (and ``HEAD``) ``/videos/{task_id}.mp4``."""
        app.router.add_get("/videos/{task_id}.mp4", self.download)

    async def download(self, request: web.Request) -> web.Response:
        """The video, whole or the single byte range asked for (RFC 9110 section 14)."""
        self._requests["download"] += 1
        # "<id>-wm.mp4" is the watermarked copy a task made with watermark_info enabled.
        task = self._account.tasks.get(request.match_info["task_id"].removesuffix("-wm"))
        if task is None or task.video_url is None:
            return web.Response(status=404, text="no such video")
        body = video_bytes(task.task_id)
        headers = {"Accept-Ranges": "bytes"}
        if "Range" not in request.headers:
            return web.Response(body=body, content_type="video/mp4", headers=headers)
        try:
            wanted = request.http_range
        except ValueError:
            wanted = None
        start, stop, _ = wanted.indices(len(body)) if wanted else (0, 0, 1)
        if wanted is None or (wanted.start or 0) >= len(body) or start >= stop:
            headers["Content-Range"] = f"bytes */{len(body)}"
            return web.Response(status=416, headers=headers)
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(body)}"
        return web.Response(
            status=206, body=body[start:stop], content_type="video/mp4", headers=headers
        )
