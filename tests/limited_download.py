"""One download in its own process under a file-size limit, for test_download.py's disk-full test.

Usage: python limited_download.py URL FOLDER LIMIT

Sets RLIMIT_FSIZE to LIMIT bytes (SIGXFSZ ignored: a write past it fails with EFBIG after what
fits, as a full disk fails with ENOSPC), downloads URL into FOLDER with a real client and prints
one JSON object: the error's type and message, or the saved path.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

import anyio

import kling_async as ka


async def main(url: str, folder: Path) -> dict[str, str | None]:
    """Download ``url`` into ``folder``; what happened."""
    snapshot = ka.TaskSnapshot(task_id="t1", state=ka.TaskState.SUCCEEDED, video_urls=(url,))
    retry = ka.RetryPolicy(max_attempts=2, base_delay=0.005, max_delay=0.01)
    async with ka.KlingClient.kling(
        api_key="sk-unused", base_url="http://127.0.0.1:9", retry=retry
    ) as client:
        try:
            path = await client.download(snapshot, folder)
        except ka.KlingError as exc:
            return {"error_type": type(exc).__name__, "error": str(exc), "path": None}
    return {"error_type": None, "error": None, "path": str(path)}


if __name__ == "__main__":
    url, folder, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    print(json.dumps(anyio.run(main, url, folder)))
