"""kling_async.webhook: real HTTP callbacks to the receiver (aiohttp's test server), the ASGI app
driven with real scope/receive/send messages, and the fake server's callbacks end to end."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from anyio.abc import TaskGroup
from helpers import FAST_POLL, apimodels_client, audio_job, kling_client, text_job
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kling_async as ka
from kling_async._early import EARLY_CALLBACKS, EarlyCallbacks
from kling_async._signature import WebhookSecret
from kling_async.testing import FakeKlingServer, FaultPlan
from kling_async.webhook import CallbackReceiver

pytestmark = pytest.mark.anyio

SAMPLES = Path(__file__).parent / "samples"
#: Polling so slow that only a callback can finish a task while a test runs.
SLOW_POLL = ka.PollPolicy(
    first_delay=60.0, max_interval=60.0, callback_safety_interval=60.0, timeout=120.0
)
TOKEN = "t0ken-for-tests-0123456789_abcdef"
JSON = {"Content-Type": "application/json"}

MakeClient = Callable[..., ka.KlingClient]


def official(
    task_id: str, status: str = "succeed", url: str = "https://cdn.example/v.mp4"
) -> bytes:
    body = json.loads((SAMPLES / "kling" / "callback.json").read_text())
    body["task_id"] = task_id
    body["task_status"] = status
    body["task_result"]["videos"][0]["url"] = url
    if status != "succeed":
        body["task_result"] = {"videos": []}
    if status == "failed":
        body["task_status_msg"] = "there is no human in the video"
    return json.dumps(body).encode()


def apimodels(task_id: str, name: str = "callback_completed") -> bytes:
    body = json.loads((SAMPLES / "apimodels" / f"{name}.json").read_text())
    body["data"]["taskId"] = task_id
    return json.dumps(body).encode()


class Tracked:
    """Results of a ``client.track(...)``, read by a background task into ``got``."""

    def __init__(self, results: ka.BatchIterator) -> None:
        self.results = results
        self.got: list[ka.JobResult] = []
        self._changed = anyio.Event()

    async def read(self) -> None:
        try:
            async for result in self.results:
                self.got.append(result)
                self._changed.set()
                self._changed = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True):
                await self.results.aclose()

    async def wait(self, count: int = 1) -> dict[str, ka.JobResult]:
        """The results, once there are ``count`` of them (fails after a second)."""
        with anyio.fail_after(1):
            while len(self.got) < count:
                await self._changed.wait()
        return {r.task_id or "": r for r in self.got}

    async def nothing_yet(self) -> None:
        """Wait a moment and check that no further result came."""
        before = len(self.got)
        await anyio.sleep(0.05)
        assert len(self.got) == before, "a result arrived that no genuine callback allowed"


class Hooks:
    """A client, its receiver, an HTTP client aimed at the receiver, a group for readers."""

    def __init__(
        self,
        client: ka.KlingClient,
        receiver: CallbackReceiver,
        http: TestClient[Any, Any],
        group: TaskGroup,
    ) -> None:
        self.client = client
        self.receiver = receiver
        self.http = http
        self.group = group

    async def post(
        self, body: bytes, *, path: str | None = None, content_type: str = "application/json"
    ) -> tuple[int, str]:
        async with self.http.post(
            path or self.receiver.path, data=body, headers={"Content-Type": content_type}
        ) as answer:
            return answer.status, await answer.text()

    async def track(self, *task_ids: str) -> Tracked:
        tracked = Tracked(self.client.track(task_ids))
        self.group.start_soon(tracked.read)
        for task_id in task_ids:
            await until_tracked(self.client, task_id)
        return tracked


async def until_tracked(client: ka.KlingClient, task_id: str) -> None:
    # A non-terminal snapshot changes nothing; it only says whether the task is known.
    probe = ka.TaskSnapshot(task_id=task_id, state=ka.TaskState.PROCESSING)
    for _ in range(400):
        if client.deliver_callback(probe):
            return
        await anyio.sleep(0.005)
    raise AssertionError(f"{task_id} never tracked")


@asynccontextmanager
async def hooks(make: MakeClient = kling_client, **options: Any) -> AsyncIterator[Hooks]:
    async with FakeKlingServer() as server:
        async with make(server, poll=SLOW_POLL) as client:
            receiver = CallbackReceiver(client, token=TOKEN, **options)
            async with TestClient(TestServer(receiver.aiohttp_app())) as http:
                async with anyio.create_task_group() as group:
                    yield Hooks(client, receiver, http, group)
                    group.cancel_scope.cancel()
            assert server.requests["query"] + server.requests["list"] == 0


# -- callbacks that finish tasks ----------------------------------------------------------------


async def test_official_callback_finishes_its_task_at_once() -> None:
    async with hooks() as h:
        results = await h.track("CjikY2gHPbcAAAAABI5n9g", "other-task")
        assert await h.post(official("CjikY2gHPbcAAAAABI5n9g")) == (200, "ok")
        result = (await results.wait())["CjikY2gHPbcAAAAABI5n9g"]
        await results.nothing_yet()  # the other task still runs
    assert result.task_id == "CjikY2gHPbcAAAAABI5n9g"
    assert result.ok and result.video_url == "https://cdn.example/v.mp4"
    assert result.polls == 0
    assert h.receiver.counts["accepted"] == 1  # the probe went round the receiver


async def test_official_failure_and_envelope_form() -> None:
    async with hooks() as h:
        results = await h.track("t-failed", "t-enveloped")
        assert (await h.post(official("t-failed", "failed")))[0] == 200
        envelope = {"code": 0, "message": "SUCCEED", "data": json.loads(official("t-enveloped"))}
        assert (await h.post(json.dumps(envelope).encode()))[0] == 200
        got = await results.wait(2)
    assert got["t-failed"].state is ka.TaskState.FAILED
    assert str(got["t-failed"].error) == "there is no human in the video"
    assert got["t-enveloped"].ok


async def test_envelope_with_its_code_as_a_string_is_a_callback() -> None:
    """A gateway that sends every business code as a string wraps callbacks so too: ``"0"``.

    Such callbacks were refused (400) and lost (official callbacks are not retried): their
    tasks ended only at the next safety poll, minutes later.  An error code is still refused.
    """
    async with hooks() as h:
        results = await h.track("t-string-code", "t-error-code")
        task = json.loads(official("t-string-code"))
        envelope = {"code": "0", "message": "SUCCEED", "data": [task]}
        assert (await h.post(json.dumps(envelope).encode()))[0] == 200
        refused = {"code": "1303", "data": json.loads(official("t-error-code"))}
        assert (await h.post(json.dumps(refused).encode()))[0] == 400
        got = await results.wait(1)
        await results.nothing_yet()
    assert got["t-string-code"].ok and "t-error-code" not in got


async def test_a_number_python_cannot_convert_is_a_400_not_a_500() -> None:
    """JSON with a number of more than 4300 digits makes ``json.loads`` raise a plain ValueError
    (not a JSONDecodeError): it escaped the receiver as an HTTP 500 with a traceback."""
    huge = b'{"task_id": "t-huge", "task_status": "succeed", "created_at": 1' + b"0" * 5000 + b"}"
    async with hooks() as h:
        results = await h.track("t-huge")
        assert await h.post(huge) == (400, "not a callback")
        await results.nothing_yet()
    assert h.receiver.counts["malformed"] == 1


async def test_apimodels_envelopes_with_json_string_fields() -> None:
    async with hooks(apimodels_client) as h:
        results = await h.track("clx7lipsync00001", "clx7lipsync00003")
        assert await h.post(apimodels("clx7lipsync00001")) == (200, "ok")
        assert await h.post(apimodels("clx7lipsync00003", "callback_failed")) == (200, "ok")
        got = await results.wait(2)
    assert got["clx7lipsync00001"].video_url == "https://r2.apimodels.app/videos/lip_synced.mp4"
    failed = got["clx7lipsync00003"]
    assert failed.state is ka.TaskState.FAILED
    assert str(failed.error) == "Face detection failed: no faces found"


async def test_official_body_to_an_apimodels_client_is_malformed() -> None:
    async with hooks(apimodels_client) as h:
        results = await h.track("clx7lipsync00001")
        assert (await h.post(official("clx7lipsync00001")))[0] == 400
        await results.nothing_yet()


# -- what is refused ----------------------------------------------------------------------------


async def test_forged_tokens_are_404_and_change_nothing() -> None:
    async with hooks() as h:
        results = await h.track("t1")
        body = official("t1")
        forged = [
            "/kling-callback/" + TOKEN[:-1] + "X",  # same length, last character wrong
            "/kling-callback/" + TOKEN[:-1],
            "/kling-callback/" + TOKEN + "0",
            "/kling-callback/" + TOKEN.upper(),
            "/kling-callback/" + "é" * len(TOKEN),
            "/kling-callback/",
            "/" + TOKEN,
            "/kling-callback/" + TOKEN + "/more",
        ]
        for path in forged:
            assert (await h.post(body, path=path))[0] == 404, path
        for method in ("GET", "PUT", "DELETE"):
            async with h.http.request(method, "/kling-callback/" + "x" * 40) as answer:
                assert answer.status == 404  # a wrong token is not told it used a wrong method
        await results.nothing_yet()
        assert h.receiver.counts["forged"] == 5 + 3  # the others never reached the handler
        assert await h.post(body) == (200, "ok")
        assert (await results.wait())["t1"].ok


async def test_methods_other_than_post_are_405() -> None:
    async with hooks() as h:
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            async with h.http.request(method, h.receiver.path) as answer:
                assert answer.status == 405
                assert answer.headers["Allow"] == "POST"


async def test_oversized_bodies_are_413() -> None:
    async with hooks(max_body=1024) as h:
        results = await h.track("t1")
        padded = json.loads(official("t1"))
        padded["task_status_msg"] = "x" * 2000
        assert (await h.post(json.dumps(padded).encode()))[0] == 413  # Content-Length says so

        produced = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal produced
            yield b'{"task_id": "t1", "task_status_msg": "'
            while produced < 2000:
                produced += 1
                yield b"x" * 256
                await anyio.sleep(0.001)

        # Chunked: no length declared, so the receiver counts and stops reading early.
        async with h.http.post(
            h.receiver.path, data=endless(), headers={"Content-Type": "application/json"}
        ) as answer:
            assert answer.status == 413
            assert produced < 100
        await results.nothing_yet()
        assert h.receiver.counts["too_large"] == 2


async def test_only_json_is_read() -> None:
    async with hooks() as h:
        results = await h.track("t1")
        body = official("t1")
        for content_type in ("text/html", "application/x-www-form-urlencoded", "text/plain"):
            assert (await h.post(body, content_type=content_type))[0] == 415
        for bad in (b"", b"not json", b"[]", b"{}", b'{"task_id": 1}', b"\xff\xfe", b"[" * 5000):
            assert (await h.post(bad))[0] == 400, bad
        await results.nothing_yet()
        assert (await h.post(body, content_type="application/json; charset=utf-8"))[0] == 200
        assert (await results.wait())["t1"].ok


async def test_unknown_tasks_are_404_and_recent_ones_200() -> None:
    async with hooks() as h:
        assert (await h.post(official("never-tracked")))[0] == 404
        assert h.receiver.counts["unknown"] == 1
        results = await h.track("t1")
        assert (await h.post(official("t1")))[0] == 200
        await results.wait()
        # The batch has ended: late, repeated and out-of-order news about t1 is answered 2xx
        # (so a vendor stops retrying) and changes nothing.
        for late in (official("t1"), official("t1", "processing"), official("t1", "failed")):
            assert (await h.post(late))[0] == 200
        await anyio.sleep(0.02)
    assert [r.state for r in results.got] == [ka.TaskState.SUCCEEDED]


async def test_duplicates_and_out_of_order_updates_are_harmless() -> None:
    async with hooks() as h:
        results = await h.track("t1", "t2")
        assert (await h.post(official("t1", "processing")))[0] == 200
        await results.nothing_yet()  # a non-terminal update finishes nothing
        async with anyio.create_task_group() as group:
            for _ in range(5):  # the same terminal callback, five times at once
                group.start_soon(h.post, official("t1"))
        assert (await h.post(official("t1", "failed")))[0] == 200  # after the end: ignored
        assert (await h.post(official("t1", "submitted")))[0] == 200
        first = (await results.wait())["t1"]
        await anyio.sleep(0.05)
    assert first.state is ka.TaskState.SUCCEEDED
    assert results.got == [first]  # t1 reported once; t2 still running


async def test_callback_after_polling_finished_the_task_is_200() -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, poll=FAST_POLL) as client:
            receiver = CallbackReceiver(client)
            [done] = [r async for r in client.run_batch([text_job(1)])]
            assert done.task_id is not None and done.polls >= 1
            async with TestClient(TestServer(receiver.aiohttp_app())) as http:
                for task_id, status in ((done.task_id, 200), ("x" + done.task_id, 404)):
                    async with http.post(
                        receiver.path, data=official(task_id), headers=JSON
                    ) as answer:
                        assert answer.status == status


# -- mounting in an existing aiohttp app --------------------------------------------------------


async def test_handler_inside_an_existing_aiohttp_app() -> None:
    async with FakeKlingServer() as server:
        async with kling_client(server, poll=SLOW_POLL) as client:
            receiver = CallbackReceiver(client)
            app = web.Application()
            app.router.add_post("/a" + receiver.path, receiver.aiohttp_handler)
            app.router.add_route("*", "/b/{token}", receiver.aiohttp_handler)
            app.add_subapp("/c", receiver.aiohttp_app())
            results = client.track(["t-a", "t-b", "t-c"])
            await until_tracked(client, "t-c")
            async with TestClient(TestServer(app)) as http:
                token = receiver.path.rsplit("/", 1)[1]
                for path, task_id in (
                    ("/a" + receiver.path, "t-a"),
                    (f"/b/{token}", "t-b"),
                    ("/c" + receiver.path, "t-c"),
                ):
                    async with http.post(path, data=official(task_id), headers=JSON) as answer:
                        assert answer.status == 200, path
                async with http.post(
                    "/b/wrong-token", data=official("t-b"), headers=JSON
                ) as answer:
                    assert answer.status == 404
                with anyio.fail_after(1):
                    assert {r.task_id async for r in results} == {"t-a", "t-b", "t-c"}


# -- ASGI ---------------------------------------------------------------------------------------


class Asgi:
    """One ASGI request, spoken by hand: what was received and what was sent."""

    def __init__(self, chunks: list[bytes], *, endless: bool = False) -> None:
        self.chunks = chunks
        self.endless = endless
        self.receives = 0
        self.sent: list[MutableMapping[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        if self.endless:  # "endless": a receiver that never stops reading fails, not hangs
            return {"type": "http.request", "body": b"x" * 1000, "more_body": self.receives < 1000}
        if self.chunks:
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None


async def asgi(
    receiver: CallbackReceiver,
    body: bytes | list[bytes] = b"",
    *,
    path: str | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    root_path: str = "",
    endless: bool = False,
) -> Asgi:
    chunks = body if isinstance(body, list) else [body]
    call = Asgi(list(chunks), endless=endless)
    if headers is None:
        headers = {"content-type": "application/json"}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path if path is not None else receiver.path,
        "root_path": root_path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    await receiver.asgi_app(scope, call.receive, call.send)
    return call


async def test_asgi_app_speaks_the_same_rules() -> None:
    async with hooks() as h:
        r = h.receiver
        results = await h.track("t1")
        assert (await asgi(r, official("t1"), path="/kling-callback/wrong-token")).status == 404
        assert (await asgi(r, official("t1"), method="GET")).status == 405
        assert (await asgi(r, official("t1"), headers={"content-type": "text/html"})).status == 415
        big = {"content-type": "application/json", "content-length": "999999"}
        too_big = await asgi(r, official("t1"), headers=big)
        assert too_big.status == 413 and too_big.receives == 0  # refused before reading
        assert (await asgi(r, b"{not json")).status == 400
        assert (await asgi(r, official("unknown"))).status == 404
        await results.nothing_yet()
        # The body in pieces, with no Content-Type at all: fine.
        body = official("t1")
        ok = await asgi(r, [body[:10], body[10:50], body[50:]], headers={})
        assert ok.status == 200
        assert ok.sent[1] == {"type": "http.response.body", "body": b"ok"}
        assert (await results.wait())["t1"].ok


async def test_asgi_stops_reading_an_endless_body() -> None:
    async with hooks(max_body=4096) as h:
        call = await asgi(h.receiver, endless=True)
    assert call.status == 413
    assert call.receives == 5  # 5000 bytes read > 4096: no further


async def test_asgi_mounted_paths_disconnects_and_other_scopes() -> None:
    async with hooks() as h:
        r = h.receiver
        results = await h.track("t1", "t2")
        # Starlette's Mount: the full path with the prefix in root_path, or (older versions)
        # the path stripped of it.
        full = await asgi(r, official("t1"), path="/hooks" + r.path, root_path="/hooks")
        stripped = await asgi(r, official("t2"), path=r.path, root_path="/hooks")
        assert full.status == stripped.status == 200
        deeper = await asgi(r, official("t1"), path="/x/hooks" + r.path, root_path="/hooks")
        assert deeper.status == 404
        gone = await asgi(r, [])  # the client left before sending its body
        assert gone.status is None and gone.sent == []
        assert set(await results.wait(2)) == {"t1", "t2"}

        lifespan = Asgi([])
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict[str, Any]:
            return next(messages)

        await r.asgi_app({"type": "lifespan"}, receive, lifespan.send)
        assert [m["type"] for m in lifespan.sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        socket = Asgi([])
        await r.asgi_app({"type": "websocket", "path": r.path}, socket.receive, socket.send)
        assert socket.sent == []


async def test_mounted_in_a_starlette_app() -> None:
    starlette = pytest.importorskip("starlette.applications")
    routing = pytest.importorskip("starlette.routing")
    httpx = pytest.importorskip("httpx")
    async with hooks() as h:
        results = await h.track("t1")
        app = starlette.Starlette(routes=[routing.Mount("/hooks", app=h.receiver.asgi_app)])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            forged = await http.post("/hooks/kling-callback/nope-nope-nope-nope", content=b"{}")
            answer = await http.post("/hooks" + h.receiver.path, content=official("t1"))
        assert forged.status_code == 404
        assert answer.status_code == 200 and answer.text == "ok"
        assert (await results.wait())["t1"].ok


# -- the receiver itself ------------------------------------------------------------------------


async def test_tokens_urls_and_secrecy() -> None:
    async with FakeKlingServer() as server:
        client = kling_client(server)
        one, two = CallbackReceiver(client), CallbackReceiver(client)
        assert one.path != two.path and len(one.path) > 40
        assert one.path.startswith("/kling-callback/")
        assert one.path.rsplit("/", 1)[1] not in repr(one)
        fixed = CallbackReceiver(client, token=TOKEN)
        assert fixed.callback_url("https://dub.example.com/hooks/") == (
            f"https://dub.example.com/hooks/kling-callback/{TOKEN}"
        )
        for base in ("dub.example.com", "ftp://x.example", "https://x.example/?a=1", "https://"):
            with pytest.raises(ka.ValidationError, match="base"):
                fixed.callback_url(base)
        for token in ("short", "x" * 15, "has space in it ok", "slash/in/the/token/x", "é" * 20):
            with pytest.raises(ka.ValidationError, match="token"):
                CallbackReceiver(client, token=token)
        with pytest.raises(ka.ValidationError, match="max_body"):
            CallbackReceiver(client, max_body=0)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "task_id",
                            "task_status",
                            "task_result",
                            "videos",
                            "url",
                            "data",
                            "code",
                            "taskId",
                            "state",
                            "resultJson",
                            "param",
                            "failMsg",
                            "model",
                            "x",
                        ]
                    ),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=12,
        ).map(lambda value: json.dumps(value).encode()),
    )
)
@example(body=b'{"task_id": "1", "task_status": "succeed", "created_at": 1' + b"0" * 5000 + b"}")
@example(body=b'{"code": 200, "data": {"taskId": "1", "costTime": 9' + b"9" * 4400 + b"}}")
def test_any_body_is_a_verdict_never_a_crash(body: bytes) -> None:
    for make in (ka.KlingClient.kling, ka.KlingClient.apimodels):
        client = make(api_key="sk", base_url="http://127.0.0.1:9")
        with contextlib.suppress(ka.KlingError):
            assert client.handle_callback(body) is False  # nothing is tracked


# -- end to end: the fake server's own callbacks ------------------------------------------------


@pytest.mark.parametrize(
    ("make", "job"),
    [(kling_client, text_job), (apimodels_client, audio_job)],
    ids=["official", "apimodels"],
)
async def test_fake_server_callbacks_finish_a_batch(make: MakeClient, job: Any) -> None:
    async with FakeKlingServer(task_duration=0.1) as server:
        async with make(server, poll=SLOW_POLL) as client:
            receiver = CallbackReceiver(client)
            async with TestServer(receiver.aiohttp_app()) as hook_server:
                url = receiver.callback_url(str(hook_server.make_url("/")))
                jobs = [job(n, key=f"job-{n}") for n in range(8)]
                started = time.monotonic()
                with anyio.fail_after(5):
                    results = [r async for r in client.run_batch(jobs, callback_url=url)]
                took = time.monotonic() - started
    assert sorted(r.key for r in results) == [f"job-{n}" for n in range(8)]
    assert all(r.ok and r.polls == 0 for r in results)
    assert took < 2.0  # polling would have waited 60 s
    assert server.requests["query"] + server.requests["list"] == 0
    assert server.requests["apimodels-query"] == 0
    assert server.callbacks_sent and all(to == url for to, _ in server.callbacks_sent)
    answered = [status for _, status in server.callbacks_sent]
    steps = 2 if make is apimodels_client else 1  # identify-face, then lip-sync
    assert answered.count(200) >= 8 * steps
    # An official "processing" callback may beat the submit's answer: a harmless 404.
    assert receiver.counts["accepted"] == answered.count(200)


async def test_a_callback_that_beats_its_submit_answer_finishes_the_task() -> None:
    """The task ends (and is called back) before its submit's answer arrives.

    The callback was about a task no batch tracked yet: answered 404 and dropped, and the task
    waited for PollPolicy.callback_safety_interval (a minute here) before a poll found it ended.
    It is kept a while, and applied when its task is tracked.
    """
    slow_answers = FaultPlan(answer_delay=0.3)
    async with FakeKlingServer(task_duration=0.02, faults=slow_answers) as server:
        async with kling_client(server, poll=SLOW_POLL) as client:
            receiver = CallbackReceiver(client)
            async with TestServer(receiver.aiohttp_app()) as hook_server:
                url = receiver.callback_url(str(hook_server.make_url("/")))
                jobs = [text_job(n, key=f"job-{n}") for n in range(3)]
                with anyio.fail_after(5):
                    results = [r async for r in client.run_batch(jobs, callback_url=url)]
    assert sorted(r.key for r in results) == ["job-0", "job-1", "job-2"]
    assert all(r.ok and r.polls == 0 for r in results), results
    assert server.requests["query"] + server.requests["list"] == 0
    assert receiver.counts["unknown"] >= 3  # each called back before its answer came


SECRET = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
OTHER_SECRET = "whsec_b3RoZXJzZWNyZXRvdGhlcnNlY3JldG90aGVyc2VjcmV0"


def ended(task_id: str) -> ka.TaskSnapshot:
    return ka.TaskSnapshot(
        task_id=task_id, state=ka.TaskState.SUCCEEDED, video_urls=("https://cdn.example/v.mp4",)
    )


async def test_only_accepted_early_callbacks_finish_a_task_once_tracked() -> None:
    """A terminal callback about a task not tracked yet is kept for it, if it passed the
    receiver's checks: a forged token, a missing or foreign signature keep nothing."""
    async with hooks(webhook_secret=SECRET) as h:

        async def signed(body: bytes, secret: str, path: str | None = None) -> int:
            signature = WebhookSecret(secret).headers("msg_1", int(time.time()), body)
            async with h.http.post(
                path or h.receiver.path, data=body, headers={**JSON, **signature}
            ) as answer:
                return answer.status

        forged = "/kling-callback/" + TOKEN[:-1] + "X"
        assert await signed(official("t1"), SECRET, path=forged) == 404
        assert (await h.post(official("t2")))[0] == 401  # unsigned
        assert await signed(official("t3"), OTHER_SECRET) == 401
        assert await signed(official("t4"), SECRET) == 404  # genuine, but not tracked yet
        assert h.receiver.counts["unknown"] == 1
        results = await h.track("t1", "t2", "t3", "t4")
        got = await results.wait()
        assert list(got) == ["t4"] and got["t4"].ok and got["t4"].polls == 0
        await results.nothing_yet()


async def test_early_callbacks_are_kept_in_bounded_number() -> None:
    """A flood of callbacks about tasks nobody tracks grows no memory past the bound: the
    oldest make room (and apply to nothing), the newest still finish their task."""
    flood = [f"flood-{n}" for n in range(EARLY_CALLBACKS + 10)]
    async with hooks() as h:
        for task_id in flood:
            assert not h.client.deliver_callback(ended(task_id))
        results = await h.track(flood[0], flood[9], flood[10], flood[-1])
        got = await results.wait(2)
        assert sorted(got) == sorted([flood[10], flood[-1]])
        await results.nothing_yet()


def test_early_callback_buffer_bounds_and_rules() -> None:
    now = [0.0]
    early = EarlyCallbacks(size=3, seconds=10.0, clock=lambda: now[0])
    early.keep(ka.TaskSnapshot(task_id="a", state=ka.TaskState.PROCESSING))  # not an end
    assert len(early) == 0
    early.keep(ended("a"))
    early.keep(attrs.evolve(ended("a"), state=ka.TaskState.FAILED))  # later news: ignored
    for task_id in "bcd":
        early.keep(ended(task_id))
    assert len(early) == 3  # "a", the oldest, made room
    assert early.take("a") is None
    taken = early.take("b")
    assert taken is not None and taken.state is ka.TaskState.SUCCEEDED
    assert early.take("b") is None  # taken once
    now[0] = 5.0
    early.keep(ended("e"))
    now[0] = 10.5  # "c" and "d" (kept at 0) are too old now; "e" is not
    assert early.take("c") is None and len(early) == 1
    assert early.take("e") is not None
    first = EarlyCallbacks(clock=lambda: now[0])
    first.keep(ended("x"))
    first.keep(attrs.evolve(ended("x"), state=ka.TaskState.FAILED))
    kept = first.take("x")
    assert kept is not None and kept.state is ka.TaskState.SUCCEEDED  # the first end stands
