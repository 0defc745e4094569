"""A batch that finishes its tasks from signed callbacks, with a demo server that sends them.

    python examples/callback_receiver.py

With a ``callback_url`` the server POSTs news of a task to you (docs/protocol.md, Callbacks).
Since 2026 the official API can sign them (Standard Webhooks, docs/protocol.md, Signed
callbacks): give the account's Webhook Secret to the receiver and every callback whose signature
does not verify is answered 401 and changes nothing.  The URL also carries a secret token, the
only protection where callbacks are unsigned (gateways).  A callback is a hint (it may come
twice, late, or out of order): the batch still polls, slowly, in case one is lost.

Here the fake server plays Kling: it signs with a demo secret, and a hook on the receiver's
application prints each callback as it arrives.
"""

from __future__ import annotations

import base64
import secrets

import anyio
from aiohttp import web
from aiohttp.typedefs import Handler

import kling_async as ka
from kling_async.testing import SANDBOX_API_KEY, FakeKlingServer
from kling_async.webhook import CallbackReceiver

# Yours comes from Kling's console ("whsec_..."); keep it out of the source, like an API key.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@web.middleware
async def show(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    print(f"  callback: answered {response.status}")
    return response


async def main() -> None:
    async with FakeKlingServer(task_duration=0.5, webhook_secret=WEBHOOK_SECRET) as server:
        client = ka.KlingClient.kling(
            api_key=SANDBOX_API_KEY,
            base_url=server.url,
            webhook_secret=WEBHOOK_SECRET,
            poll=ka.PollPolicy(first_delay=0.25, max_interval=0.5),
        )
        async with client:
            receiver = CallbackReceiver(client)  # takes the client's webhook secret
            app = web.Application(middlewares=[show])
            app.add_subapp("/hooks", receiver.aiohttp_app())
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            try:
                # In production: your public https origin, not a loopback address.
                callback_url = receiver.callback_url(f"http://{host}:{port}/hooks")
                jobs = [
                    ka.LipSyncJob.from_audio(
                        video_url=f"https://example.com/clip{n}.mp4",
                        audio_url=f"https://example.com/line{n}.mp3",
                        key=f"line{n}",
                    )
                    for n in range(1, 4)
                ]
                async for result in client.run_batch(jobs, callback_url=callback_url):
                    print(f"result: {result.key} {result.state.value} {result.video_url}")
            finally:
                await runner.cleanup()
        print(f"receiver: {dict(receiver.counts)}")


if __name__ == "__main__":
    anyio.run(main)
