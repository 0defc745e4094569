"""Run a batch with ``KlingClient.run_batch`` and print each result as it finishes.

    python examples/batch.py

The script starts a FakeKlingServer (the sandbox) and points the client at it, so it runs with
no account and no network.  For real work, drop the server and build the client for your
account instead, for example::

    client = ka.KlingClient.kling(access_key=..., secret_key=...)   # the official API (JWT)
    client = ka.KlingClient.dmxapi(api_key=...)                      # the DMXAPI gateway
"""

from __future__ import annotations

import anyio

import kling_async as ka
from kling_async.testing import SANDBOX_API_KEY, FakeKlingServer


def make_jobs() -> list[ka.LipSyncJob]:
    jobs = [
        ka.LipSyncJob.from_text(
            video_url=f"https://example.com/ep1/clip{n:02d}.mp4",
            text=f"This is line {n}.",
            voice_id="genshin_vindi2",
            voice_language="en",
            key=f"ep1-line{n:02d}",
        )
        for n in range(1, 6)
    ]
    jobs += [
        ka.LipSyncJob.from_audio(
            video_url=f"https://example.com/ep2/clip{n:02d}.mp4",
            audio_url=f"https://example.com/ep2/line{n:02d}.mp3",
            key=f"ep2-line{n:02d}",
        )
        for n in range(1, 6)
    ]
    # A video without a person: the server fails this task, and the batch reports it as a value.
    jobs.append(
        ka.LipSyncJob.from_audio(
            video_url="https://example.com/no-human-landscape.mp4",
            audio_url="https://example.com/ep2/line06.mp3",
            key="fails-on-purpose",
        )
    )
    return jobs


async def main() -> None:
    # Tasks take half a second here (minutes on the real service); at most 3 run at once.
    async with FakeKlingServer(task_duration=0.5, task_limit=3) as server:
        client = ka.KlingClient.kling(
            api_key=SANDBOX_API_KEY,
            base_url=server.url,
            max_in_flight=3,
            # Poll often: sandbox tasks are short.  Keep the defaults for the real service.
            poll=ka.PollPolicy(first_delay=0.25, max_interval=0.5),
        )
        async with client:
            async for result in client.run_batch(make_jobs()):
                if result.ok:
                    print(f"{result.key}: {result.video_url}")
                else:
                    print(f"{result.key}: failed: {result.error}")


if __name__ == "__main__":
    anyio.run(main)
