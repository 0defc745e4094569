"""Signed callbacks (Standard Webhooks): the documented test vector, forged, stale and rotated
signatures, on every path the receiver serves (aiohttp app and handler, ASGI, handle_callback),
the newer callback form, and the fake server's own signed callbacks end to end."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import kling_client, text_job
from test_webhook import SLOW_POLL, TOKEN, Tracked, asgi, official, until_tracked

import kling_async as ka
from kling_async._signature import WebhookSecret
from kling_async.testing import FakeKlingServer
from kling_async.webhook import CallbackReceiver

pytestmark = pytest.mark.anyio

# The test vector of Kling's callback documentation (docs/protocol.md, "Signed callbacks").
VECTOR_SECRET = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
VECTOR_ID = "9876543210"
VECTOR_TIMESTAMP = 1781080794
VECTOR_BODY = (
    b'{"id":"1234567890","status":"succeeded","message":"","create_time":1781080778802,'
    b'"update_time":1781080794151}'
)
VECTOR_SIGNATURE = "v1,UsKlJP00XoQyOn410NM9xv34sP+Gl0jnOO9Lcpr7NJ4="
OTHER_SECRET = "whsec_b3RoZXJzZWNyZXRvdGhlcnNlY3JldG90aGVyc2VjcmV0"

VECTOR_HEADERS = {
    "webhook-id": VECTOR_ID,
    "webhook-timestamp": str(VECTOR_TIMESTAMP),
    "webhook-signature": VECTOR_SIGNATURE,
}


JSON = {"Content-Type": "application/json"}


def at(moment: float) -> Any:
    return lambda: moment


# -- the pure module -----------------------------------------------------------------------------


def test_documented_test_vector() -> None:
    secret = WebhookSecret(VECTOR_SECRET)
    assert secret.sign(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE
    secret.verify(VECTOR_BODY, VECTOR_HEADERS, now=VECTOR_TIMESTAMP + 299)
    # Header names in any case, once lower-cased as the receiver does.
    mixed = {"Webhook-Id": VECTOR_ID, "WEBHOOK-TIMESTAMP": str(VECTOR_TIMESTAMP)}
    mixed["webhook-Signature"] = VECTOR_SIGNATURE
    client = ka.KlingClient.kling(
        api_key="sk", base_url="http://127.0.0.1:9", webhook_secret=VECTOR_SECRET
    )
    client._clock = at(VECTOR_TIMESTAMP)
    with pytest.raises(ka.MalformedResponseError):  # verified; then: a success without a video
        client.handle_callback(VECTOR_BODY, headers=mixed)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"webhook-signature": "v1,UsKlJP00XoQyOn410NM9xv34sP+Gl0jnOO9Lcpr8NJ4="}, "no signature"),
        ({"webhook-signature": "v2," + VECTOR_SIGNATURE[3:]}, "no signature"),
        ({"webhook-signature": "v1,not base64!!"}, "no signature"),
        ({"webhook-signature": "garbage"}, "no signature"),
        ({"webhook-id": "9876543211"}, "no signature"),
        ({"webhook-timestamp": str(VECTOR_TIMESTAMP + 1)}, "no signature"),
        ({"webhook-timestamp": "1781080794.0"}, "Unix seconds"),
        ({"webhook-timestamp": "nan"}, "Unix seconds"),
        ({"webhook-signature": ""}, "missing"),
        ({"webhook-id": ""}, "missing"),
    ],
)
def test_forged_signatures_are_refused(change: dict[str, str], reason: str) -> None:
    headers = {**VECTOR_HEADERS, **change}
    with pytest.raises(ka.CallbackSignatureError, match=reason):
        WebhookSecret(VECTOR_SECRET).verify(VECTOR_BODY, headers, now=VECTOR_TIMESTAMP)
    with pytest.raises(ka.CallbackSignatureError, match="no signature"):
        WebhookSecret(VECTOR_SECRET).verify(
            VECTOR_BODY + b" ", VECTOR_HEADERS, now=VECTOR_TIMESTAMP
        )


def test_stale_and_future_timestamps_are_refused() -> None:
    secret = WebhookSecret(VECTOR_SECRET)
    now: float
    for now in (VECTOR_TIMESTAMP + 300, VECTOR_TIMESTAMP - 300):
        secret.verify(VECTOR_BODY, VECTOR_HEADERS, now=now)  # the edge of the window passes
    for now in (VECTOR_TIMESTAMP + 301, VECTOR_TIMESTAMP - 301, time.time()):
        with pytest.raises(ka.CallbackSignatureError, match="5 minutes"):
            secret.verify(VECTOR_BODY, VECTOR_HEADERS, now=now)


def test_rotation_any_signature_and_any_secret_passes() -> None:
    old, new = WebhookSecret(VECTOR_SECRET), WebhookSecret(OTHER_SECRET)
    both = WebhookSecret([OTHER_SECRET, VECTOR_SECRET])
    signed_by_both = both.sign("m1", VECTOR_TIMESTAMP, VECTOR_BODY)
    assert signed_by_both.count("v1,") == 2
    headers = {**VECTOR_HEADERS, "webhook-id": "m1", "webhook-signature": signed_by_both}
    # While Kling rotates, each callback carries both signatures: either secret verifies it.
    old.verify(VECTOR_BODY, headers, now=VECTOR_TIMESTAMP)
    new.verify(VECTOR_BODY, headers, now=VECTOR_TIMESTAMP)
    # A receiver holding both secrets takes a callback signed by either.
    both.verify(VECTOR_BODY, VECTOR_HEADERS, now=VECTOR_TIMESTAMP)
    only_new = {**VECTOR_HEADERS, "webhook-signature": "v1,bad= " + VECTOR_SIGNATURE}
    old.verify(VECTOR_BODY, only_new, now=VECTOR_TIMESTAMP)
    with pytest.raises(ka.CallbackSignatureError):
        new.verify(VECTOR_BODY, VECTOR_HEADERS, now=VECTOR_TIMESTAMP)


@pytest.mark.parametrize("bad", ["", "whsec_", "whsec_!!!", "whsec_c2hvcnQ=", 42, []])
def test_bad_secrets_are_validation_errors(bad: Any) -> None:
    with pytest.raises(ka.ValidationError, match="webhook_secret"):
        WebhookSecret(bad)


def test_secrets_stay_out_of_reprs() -> None:
    secret = WebhookSecret(VECTOR_SECRET)
    key_text = VECTOR_SECRET.removeprefix("whsec_")
    client = ka.KlingClient.kling(
        api_key="sk", base_url="http://127.0.0.1:9", webhook_secret=VECTOR_SECRET
    )
    receiver = CallbackReceiver(client, token=TOKEN)
    for shown in (repr(secret), repr(client), repr(receiver), str(vars(secret))):
        assert key_text not in shown and "dGVzdHNl" not in shown
    assert "signed=True" in repr(receiver)


# -- the receiver: every path ----------------------------------------------------------------------


def new_form(task_id: str, status: str = "succeeded") -> bytes:
    outputs = []
    if status == "succeeded":
        outputs = [
            {
                "type": "video",
                "id": "vid-" + task_id,
                "url": "https://cdn.example/v.mp4",
                "watermark_url": "https://cdn.example/v-wm.mp4",
                "duration": "5.2",
            }
        ]
    body = {
        "id": task_id,
        "status": status,
        "message": "",
        "create_time": 1781080778802,
        "update_time": 1781080794151,
        "external_id": "",
        "outputs": outputs,
        "billing": [{"charge_type": "unit", "amount": "0.5", "package_type": "video"}],
    }
    return json.dumps(body).encode()


def signed(body: bytes, secret: str = VECTOR_SECRET, *, when: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if when is None else when
    return {**WebhookSecret(secret).headers("msg-1", stamp, body), **JSON}


async def test_aiohttp_app_and_handler_verify_every_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kling_async")
    async with FakeKlingServer() as server:
        async with kling_client(server, poll=SLOW_POLL) as client:
            receiver = CallbackReceiver(client, token=TOKEN, webhook_secret=VECTOR_SECRET)
            app = web.Application()
            app.add_subapp("/app", receiver.aiohttp_app())
            app.router.add_route("*", "/own/{token}", receiver.aiohttp_handler)
            tracked = Tracked(client.track(["t1", "t2"]))
            async with anyio.create_task_group() as group:
                group.start_soon(tracked.read)
                await until_tracked(client, "t2")
                async with TestClient(TestServer(app)) as http:
                    for path in ("/app" + receiver.path, f"/own/{TOKEN}"):
                        refused = [
                            {"Content-Type": "application/json"},  # unsigned
                            signed(official("t1"), OTHER_SECRET),  # another secret
                            signed(official("t1"), when=int(time.time()) - 400),  # stale
                            signed(official("t2")),  # signed, but for another body
                        ]
                        for headers in refused:
                            async with http.post(path, data=official("t1"), headers=headers) as a:
                                assert a.status == 401, (path, headers)
                    await tracked.nothing_yet()  # nothing changed
                    body = official("t1")
                    async with http.post(
                        "/app" + receiver.path, data=body, headers=signed(body)
                    ) as answer:
                        assert answer.status == 200
                    body = new_form("t2")
                    async with http.post(f"/own/{TOKEN}", data=body, headers=signed(body)) as a:
                        assert a.status == 200
                    got = await tracked.wait(2)
                group.cancel_scope.cancel()
    assert receiver.counts["unsigned"] == 8 and receiver.counts["accepted"] == 2
    assert got["t1"].ok and got["t2"].video_url == "https://cdn.example/v.mp4"
    assert got["t2"].video_id == "vid-t2" and got["t2"].units == 0.5
    assert got["t2"].watermark_url == "https://cdn.example/v-wm.mp4"
    assert got["t2"].video_duration == 5.2
    assert "whsec" not in caplog.text and "dGVzdHNl" not in caplog.text


async def test_asgi_and_handle_callback_verify_too() -> None:
    async with FakeKlingServer() as server:
        async with kling_client(server, poll=SLOW_POLL, webhook_secret=VECTOR_SECRET) as client:
            # No secret given to the receiver: it takes the client's.
            receiver = CallbackReceiver(client, token=TOKEN)
            tracked = Tracked(client.track(["t1", "t2"]))
            async with anyio.create_task_group() as group:
                group.start_soon(tracked.read)
                await until_tracked(client, "t2")
                body = official("t1")
                plain = {"content-type": "application/json"}
                assert (await asgi(receiver, body, headers=plain)).status == 401
                stale = signed(body, when=int(time.time()) + 301)
                assert (await asgi(receiver, body, headers=stale)).status == 401
                with pytest.raises(ka.CallbackSignatureError):
                    client.handle_callback(official("t2"))
                with pytest.raises(ka.CallbackSignatureError):
                    client.handle_callback(official("t2"), headers=signed(official("t1")))
                await tracked.nothing_yet()
                assert (await asgi(receiver, body, headers=signed(body))).status == 200
                body2 = official("t2", "failed")
                assert client.handle_callback(body2, headers=list(signed(body2).items()))
                got = await tracked.wait(2)
                group.cancel_scope.cancel()
    assert got["t1"].ok and got["t2"].state is ka.TaskState.FAILED


async def test_console_test_callback_is_answered_200() -> None:
    async with FakeKlingServer() as server:
        async with kling_client(server, poll=SLOW_POLL) as client:
            receiver = CallbackReceiver(client, token=TOKEN, webhook_secret=VECTOR_SECRET)
            async with TestClient(TestServer(receiver.aiohttp_app())) as http:
                body = json.dumps({"id": "console-test", "status": "submitted", "outputs": []})
                data = body.encode()
                async with http.post(receiver.path, data=data, headers=signed(data)) as answer:
                    assert answer.status == 200
                # The same body unsigned, or a finished task nobody tracks: refused.
                async with http.post(receiver.path, data=data, headers=JSON) as answer:
                    assert answer.status == 401
                done = new_form("nobody")
                async with http.post(receiver.path, data=done, headers=signed(done)) as answer:
                    assert answer.status == 404
    assert receiver.counts["early"] == 1


def test_new_form_parsing() -> None:
    dialect = ka.KlingClient.kling(api_key="sk", base_url="http://127.0.0.1:9").dialect
    snap = dialect.parse_callback(new_form("t9"))
    assert (snap.task_id, snap.state, snap.units) == ("t9", ka.TaskState.SUCCEEDED, 0.5)
    cash = json.loads(new_form("t9", "failed"))
    cash["billing"] = [{"charge_type": "cash", "amount": "0.07", "list_price": "0.14"}]
    cash["message"] = "content policy"
    snap = dialect.parse_callback(json.dumps(cash).encode())
    assert snap.state is ka.TaskState.FAILED and snap.message == "content policy"
    assert snap.units is None
    assert snap.balance_deduction == ka.BalanceDeduction(quota=0.07, list_price=0.14)
    for broken in ({"id": "x", "status": "weird"}, {"id": 5.5, "status": "failed"}):
        with pytest.raises(ka.MalformedResponseError):
            dialect.parse_callback(json.dumps(broken).encode())


# -- end to end: the fake server signs ---------------------------------------------------------


async def test_fake_server_signs_its_callbacks() -> None:
    async with FakeKlingServer(task_duration=0.1, webhook_secret=OTHER_SECRET) as server:
        async with kling_client(server, poll=SLOW_POLL) as client:
            good = CallbackReceiver(client, webhook_secret=OTHER_SECRET)
            wrong = CallbackReceiver(client, webhook_secret=VECTOR_SECRET)
            app = web.Application()
            app.add_subapp("/good", good.aiohttp_app())
            app.add_subapp("/wrong", wrong.aiohttp_app())
            async with TestServer(app) as hooks:
                base = str(hooks.make_url("/"))
                jobs = [text_job(n, key=f"job-{n}") for n in range(4)]
                with anyio.fail_after(5):
                    results = [
                        r
                        async for r in client.run_batch(
                            jobs, callback_url=good.callback_url(base + "good")
                        )
                    ]
                # A receiver holding another secret refuses the same server's callbacks.
                task = next(iter(server.tasks.values()))
                task.notified = None
                task.callback_url = wrong.callback_url(base + "wrong")
                assert server._dispatcher is not None  # (a callback_url was given)
                server._dispatcher.watch(task)
                for _ in range(200):
                    if wrong.counts["unsigned"]:
                        break
                    await anyio.sleep(0.01)
    assert all(r.ok and r.polls == 0 for r in results)
    assert good.counts["accepted"] >= 4 and good.counts["unsigned"] == 0
    assert wrong.counts["unsigned"] == 1 and wrong.counts["accepted"] == 0
