"""A SKETCH of a receiver for the server's task callbacks, with a demo batch that sends them.

    python examples/callback_receiver.py

With a ``callback_url`` the server POSTs news of a task to you: the official format sends the
task object on each state change, apimodels.app an envelope on terminal states only, retrying
until you answer 2xx (docs/protocol.md, Callbacks and apimodels.app callbacks).  Neither signs
its callbacks, so the URL itself carries a secret.  A callback is a hint (it may come twice,
late, or out of order): the status query stays the source of truth, which is why the batch below
keeps polling.

This is only a sketch: it receives, checks and parses callbacks, and prints them.  A later
release of kling_async will ship ``kling_async.webhook``, which feeds callbacks into a running
batch; until then, use a receiver like this one for logging or to notify your own systems.
"""

from __future__ import annotations

import hmac
import secrets

import anyio
from aiohttp import web

import kling_async as ka
from kling_async.dialects.kling import KlingDialect
from kling_async.testing import SANDBOX_API_KEY, FakeKlingServer

# The secret part of the callback URL: anyone who knows it can post fake news of your tasks.
SECRET = secrets.token_urlsafe(16)


def make_receiver(dialect: KlingDialect) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.match_info["secret"], SECRET):
            raise web.HTTPNotFound()
        try:
            snapshot = dialect.parse_callback(await request.read())
        except ka.KlingError:
            raise web.HTTPBadRequest() from None
        print(f"  callback: task {snapshot.task_id} is {snapshot.state.value}")
        # Answer at once: slow answers make the sender retry.  Do real work elsewhere.
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/kling-callback/{secret}", receive)
    return app


async def main() -> None:
    runner = web.AppRunner(make_receiver(KlingDialect()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    callback_url = f"http://{host}:{port}/kling-callback/{SECRET}"
    try:
        async with FakeKlingServer(task_duration=0.5) as server:
            client = ka.KlingClient.kling(
                api_key=SANDBOX_API_KEY,
                base_url=server.url,
                poll=ka.PollPolicy(first_delay=0.25, max_interval=0.5),
            )
            jobs = [
                ka.LipSyncJob.from_audio(
                    video_url=f"https://example.com/clip{n}.mp4",
                    audio_url=f"https://example.com/line{n}.mp3",
                    callback_url=callback_url,  # per job: the batch still polls as usual
                    key=f"line{n}",
                )
                for n in range(1, 4)
            ]
            async with client:
                async for result in client.run_batch(jobs):
                    print(f"result: {result.key} {result.state.value} {result.video_url}")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    anyio.run(main)
