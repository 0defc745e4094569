"""The fake server speaks the documented wire format: talked to with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kling_async.testing import (
    CONTENT_POLICY_REASON,
    NO_HUMAN_REASON,
    FakeKlingServer,
    FaultPlan,
    video_bytes,
)

pytestmark = pytest.mark.anyio

KEY = {"Authorization": "Bearer sk-sandbox"}
LIP_SYNC = "/v1/videos/lip-sync"
APIMODELS = "/api/v1/audio/generations"
CLIP = "https://cdn.example.com/clip.mp4"


def text_body(**changes: Any) -> dict[str, Any]:
    fields = {
        "video_url": CLIP,
        "mode": "text2video",
        "text": "Hello there",
        "voice_id": "girlfriend_1_speech02",
        "voice_language": "en",
        "voice_speed": 1.0,
    }
    fields.update(changes)
    return {"input": {k: v for k, v in fields.items() if v is not None}}


def make_jwt(
    access_key: str = "ak-sandbox",
    secret: str = "sk-sandbox-secret-for-hs256-tokens",
    *,
    expires_in: float = 1800,
    not_before: float = -5,
) -> dict[str, str]:
    now = time.time()
    claims = {"iss": access_key, "exp": int(now + expires_in), "nbf": int(now + not_before)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)  # short sandbox secret
        token = jwt.encode(claims, secret, algorithm="HS256", headers={"typ": "JWT"})
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def running(**options: Any) -> AsyncIterator[tuple[FakeKlingServer, aiohttp.ClientSession]]:
    async with FakeKlingServer(**options) as server, aiohttp.ClientSession() as http:
        yield server, http


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with http.request(
        method, url, json=body, headers=KEY if headers is None else headers
    ) as r:
        return r.status, await r.json(content_type=None)


async def submit(server: FakeKlingServer, http: aiohttp.ClientSession, **changes: Any) -> str:
    status, answer = await call(http, "POST", server.url + LIP_SYNC, text_body(**changes))
    assert (status, answer["code"]) == (200, 0), answer
    return str(answer["data"]["task_id"])


@pytest.mark.parametrize("prefix", ["", "/kling"])
@pytest.mark.parametrize("auth", ["bearer", "jwt"])
async def test_official_round_trip(prefix: str, auth: str) -> None:
    async with running(task_duration=0.3, processing_after=0.1) as (server, http):
        headers = KEY if auth == "bearer" else make_jwt()
        base = server.url + prefix + LIP_SYNC
        status, answer = await call(http, "POST", base, text_body(), headers)
        assert status == 200
        assert answer["code"] == 0
        assert answer["message"] == "SUCCEED"
        assert answer["request_id"]
        data = answer["data"]
        task_id = data["task_id"]
        assert isinstance(task_id, str)
        assert len(task_id) == 18
        assert task_id.isdigit()
        assert data["task_status"] == "submitted"
        assert abs(data["created_at"] / 1000 - time.time()) < 5
        seen = []
        for pause in (0.15, 0.2, 0):  # processing from 0.1 s, done at 0.3 s
            status, answer = await call(http, "GET", f"{base}/{task_id}", headers=headers)
            assert status == 200
            seen.append(answer["data"]["task_status"])
            await asyncio.sleep(pause)
        assert seen == ["submitted", "processing", "succeed"]
        task = answer["data"]
        assert task["task_info"]["parent_video"]["url"] == CLIP
        video = task["task_result"]["videos"][0]
        assert video["url"] == f"{server.url}/videos/{task_id}.mp4"
        assert isinstance(video["duration"], str)
        assert task["updated_at"] > task["created_at"]
        status, answer = await call(http, "GET", f"{base}?pageNum=1&pageSize=10", headers=headers)
        assert status == 200
        assert [t["task_id"] for t in answer["data"]] == [task_id]
        assert server.tasks[task_id].state == "succeed"
        assert server.requests["submit"] == 1
        assert server.requests["query"] == 3


async def test_list_is_newest_first_and_paged() -> None:
    async with running(task_duration=10) as (server, http):
        ids = [await submit(server, http) for _ in range(3)]
        url = server.url + LIP_SYNC
        _, first = await call(http, "GET", f"{url}?pageNum=1&pageSize=2")
        _, second = await call(http, "GET", f"{url}?pageNum=2&pageSize=2")
        assert [t["task_id"] for t in first["data"]] == [ids[2], ids[1]]
        assert [t["task_id"] for t in second["data"]] == [ids[0]]
        for query, field in [
            ("pageSize=501", "pageSize"),
            ("pageNum=0", "pageNum"),
            ("pageNum=1001", "pageNum"),
            ("pageSize=many", "pageSize"),
        ]:
            status, answer = await call(http, "GET", f"{url}?{query}")
            assert (status, answer["code"]) == (400, 1201)
            assert field in answer["message"]


async def test_unknown_task_is_1203() -> None:
    async with running() as (server, http):
        status, answer = await call(http, "GET", server.url + LIP_SYNC + "/123456789012345678")
        assert (status, answer["code"]) == (404, 1203)


@pytest.mark.parametrize(
    ("auth", "status", "code"),
    [
        ({}, 401, 1001),
        ({"Authorization": "Bearer sk-wrong"}, 401, 1000),
        ({"Authorization": "Basic c2stc2FuZGJveA=="}, 401, 1002),
        # Anything else is make_jwt()'s keyword arguments: tokens are minted as the test runs.
        ({"expires_in": -60}, 401, 1004),
        ({"not_before": 60}, 401, 1003),
        ({"secret": "not-the-secret"}, 401, 1000),
        ({"access_key": "ak-unknown"}, 401, 1000),
        ({"expires_in": -2}, 200, 0),  # inside the 5 s leeway
    ],
)
async def test_official_auth(auth: dict[str, Any], status: int, code: int) -> None:
    headers = auth if not auth or "Authorization" in auth else make_jwt(**auth)
    async with running() as (server, http):
        got = await call(http, "POST", server.url + LIP_SYNC, text_body(), headers)
        assert (got[0], got[1]["code"]) == (status, code)
        assert server.tasks_created == (1 if code == 0 else 0)


async def test_apimodels_auth_takes_keys_only() -> None:
    async with running() as (server, http):
        body = {"model": "kling-identify-face", "video_url": CLIP}
        for headers in ({"Authorization": "Bearer sk-wrong"}, make_jwt(), {}):
            status, answer = await call(http, "POST", server.url + APIMODELS, body, headers)
            assert status == 401
            assert answer["code"] == 401
            assert answer["msg"]
        assert server.tasks_created == 0
        assert server.requests["rejected"] == 3


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"mode": "std"}, "input.mode"),
        ({"video_id": "827964097668337738"}, "input.video_id"),
        ({"video_url": None}, "input.video_id"),
        ({"video_url": "ftp://host/clip.mp4"}, "input.video_url"),
        ({"text": "x" * 121}, "input.text"),
        ({"text": None}, "input.text"),
        ({"voice_id": None}, "input.voice_id"),
        ({"voice_speed": 2.5}, "input.voice_speed"),
        ({"voice_language": "fr"}, "input.voice_language"),
        ({"mode": "audio2video"}, "input.audio_type"),
        ({"mode": "audio2video", "audio_type": "file", "audio_file": "not base64!"}, "audio_file"),
        ({"mode": "audio2video", "audio_type": "url"}, "input.audio_url"),
    ],
)
async def test_official_validation(changes: dict[str, Any], field: str) -> None:
    async with running() as (server, http):
        status, answer = await call(http, "POST", server.url + LIP_SYNC, text_body(**changes))
        assert (status, answer["code"]) == (400, 1201)
        assert field in answer["message"]
        assert server.tasks_created == 0


async def test_official_validation_of_bodies_and_audio() -> None:
    async with running() as (server, http):
        url = server.url + LIP_SYNC
        assert (await call(http, "POST", url, {"callback_url": "nope", **text_body()}))[0] == 400
        status, answer = await call(http, "POST", url, {"no_input": True})
        assert (status, answer["code"]) == (400, 1201)
        assert "input" in answer["message"]
        async with http.post(url, data=b"{broken", headers=KEY) as r:
            assert r.status == 400
            assert (await r.json())["code"] == 1200
        # Large bodies go as file-like objects: aiohttp warns about big raw bytes.
        async with http.post(url, data=io.BytesIO(b"x" * (9 << 20)), headers=KEY) as r:
            assert r.status == 413
        audio = {"mode": "audio2video", "audio_type": "file", "text": None, "voice_id": None}
        too_big = base64.b64encode(b"\0" * (5 * 1024 * 1024 + 1)).decode()
        raw = json.dumps(text_body(**audio, audio_file=too_big)).encode()
        headers = {**KEY, "Content-Type": "application/json"}
        async with http.post(url, data=io.BytesIO(raw), headers=headers) as r:
            answer = await r.json()
            assert r.status == 400
            assert "5 MB" in answer["message"]
        assert server.tasks_created == 0
        await submit(server, http, **audio, audio_file=base64.b64encode(b"ID3 audio").decode())
        audio.update(audio_type="url", audio_url="https://cdn.example.com/a.mp3")
        await submit(server, http, **audio)
        await submit(server, http, video_url=None, video_id="827964097668337738")
        assert server.tasks_created == 3


@pytest.mark.parametrize("as_http_200", [False, True])
async def test_task_limit(as_http_200: bool) -> None:
    faults = FaultPlan(errors_as_http_200=as_http_200)
    async with running(task_duration=10, task_limit=2, faults=faults) as (server, http):
        first = await submit(server, http)
        await submit(server, http)
        status, answer = await call(http, "POST", server.url + LIP_SYNC, text_body())
        assert (status, answer["code"]) == (200 if as_http_200 else 429, 1303)
        assert "concurrent" in answer["message"]
        body = {"model": "kling-identify-face", "video_url": CLIP}
        status, answer = await call(http, "POST", server.url + APIMODELS, body)
        assert (status, answer["code"]) == (200 if as_http_200 else 429, 429)
        assert server.tasks_created == 2
        assert server.requests["limited"] == 2
        server.finish(first, "failed", "boom")
        assert server.running == 1
        await submit(server, http)
        assert server.max_running_seen == 2
        assert server.tasks_created == 3


async def test_http_500_fault_comes_before_acting() -> None:
    async with running(faults=FaultPlan(http_500_rate=1.0)) as (server, http):
        async with http.post(server.url + LIP_SYNC, json=text_body(), headers=KEY) as r:
            assert r.status == 500
            assert r.content_type == "text/html"
        assert server.tasks_created == 0
        assert server.requests["faulted"] == 1
        assert server.faults_hit == {"http_500": 1}


async def test_faults_change_mid_run_and_queries_break_after_acting() -> None:
    async with running(task_duration=10) as (server, http):
        task_id = await submit(server, http)
        server.faults = FaultPlan(malformed_json_rate=1.0)
        for method, path, body in [
            ("GET", f"{LIP_SYNC}/{task_id}", None),
            ("POST", LIP_SYNC, text_body()),
        ]:
            async with http.request(method, server.url + path, json=body, headers=KEY) as r:
                assert r.status == 200
                with pytest.raises(json.JSONDecodeError):
                    json.loads(await r.read())
        assert server.tasks_created == 2  # the submit's task exists: its answer broke after
        assert server.faults_hit == {"malformed_json": 2}
        # Only a gateway that sends refusals with HTTP 200 cuts a submit off before acting.
        server.faults = FaultPlan(malformed_json_rate=1.0, errors_as_http_200=True)
        async with http.post(server.url + LIP_SYNC, json=text_body(), headers=KEY) as r:
            assert r.status == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(await r.read())
        assert server.tasks_created == 2
        assert server.faults_hit == {"malformed_json": 3}
        server.faults = FaultPlan(query_error_rate=1.0)
        status, answer = await call(http, "GET", f"{server.url}{LIP_SYNC}/{task_id}")
        assert (status, answer["code"]) == (500, 5000)
        status, answer = await call(http, "GET", f"{server.url}{APIMODELS}?task_id=x")
        assert (status, answer["code"]) == (500, 500)
        await submit(server, http)  # submits are no queries
        assert server.faults_hit == {"malformed_json": 3, "query_error": 2}


async def test_data_as_list() -> None:
    async with running(faults=FaultPlan(data_as_list=True)) as (server, http):
        task_id = await submit(server, http)
        _, answer = await call(http, "GET", f"{server.url}/kling{LIP_SYNC}/{task_id}")
        assert isinstance(answer["data"], list)
        assert answer["data"][0]["task_id"] == task_id


async def test_task_failure_rate_and_no_human() -> None:
    faults = FaultPlan(task_failure_rate=1.0)
    async with running(task_duration=0.0, faults=faults) as (server, http):
        policy = await submit(server, http)
        no_human = await submit(server, http, video_url="https://x.example/no-human.mp4")
        _, answer = await call(http, "GET", f"{server.url}{LIP_SYNC}/{policy}")
        assert answer["data"]["task_status"] == "failed"
        assert answer["data"]["task_status_msg"] == CONTENT_POLICY_REASON
        assert answer["data"]["task_result"]["videos"] == []
        assert server.tasks[no_human].reason == NO_HUMAN_REASON


async def test_answer_delay_creates_the_task_first() -> None:
    # The delay is long and the wait for the task polls: a loaded machine (CI) may take a while
    # to get the request to the server, and what counts is the order, not the time.
    async with running(faults=FaultPlan(answer_delay=1.0)) as (server, http):
        pending = asyncio.ensure_future(submit(server, http))
        for _ in range(90):
            if server.tasks_created:
                break
            await asyncio.sleep(0.01)
        assert server.tasks_created == 1
        assert not pending.done()
        assert await pending in server.tasks


async def test_script_and_account_error() -> None:
    async with running() as (server, http):
        server.script("submit", times=2)
        server.script("query", status=503, code=5001, as_http_200=True)
        server.script("apimodels-submit")
        url = server.url + LIP_SYNC
        for _ in range(2):
            status, answer = await call(http, "POST", url, text_body())
            assert (status, answer["code"]) == (429, 1303)
        task_id = await submit(server, http)
        status, answer = await call(http, "GET", f"{url}/{task_id}")
        assert (status, answer["code"]) == (200, 5001)
        status, answer = await call(http, "POST", server.url + APIMODELS, {"model": "x"})
        assert (status, answer["code"]) == (429, 429)
        with pytest.raises(ValueError, match="unknown route"):
            server.script("sumbit")
        server.set_account_error(1101)
        status, answer = await call(http, "GET", f"{url}/{task_id}")
        assert (status, answer["code"]) == (429, 1101)
        status, answer = await call(http, "POST", server.url + APIMODELS, {"model": "x"})
        assert (status, answer["code"]) == (402, 402)
        server.set_account_error(None)
        assert (await call(http, "GET", f"{url}/{task_id}"))[0] == 200
        assert server.tasks_created == 1


@asynccontextmanager
async def receiver() -> AsyncIterator[tuple[str, list[Any]]]:
    received: list[Any] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    async with TestServer(app) as hook_server:
        yield str(hook_server.make_url("/hook")), received


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs.

    Bound, never listening: a port merely closed again could be picked as the source port of
    the very connection made to it, which then connects to itself (TCP simultaneous open) and
    hangs until its time-out instead of being refused (seen once in CI).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def wait_for(predicate: Callable[[], bool], seconds: float = 2.0) -> None:
    # The server's callbacks_sent record has no event to wait on: poll it briefly.
    with anyio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_official_callbacks() -> None:
    with refusing_port() as refusing:
        async with receiver() as (hook, received), running(task_duration=0.1) as (server, http):
            body = {**text_body(), "callback_url": hook}
            _status, answer = await call(http, "POST", server.url + "/kling" + LIP_SYNC, body)
            task_id = answer["data"]["task_id"]
            dead = {**text_body(), "callback_url": f"http://127.0.0.1:{refusing}/hook"}
            assert (await call(http, "POST", server.url + LIP_SYNC, dead))[0] == 200
            with anyio.move_on_after(5):  # (4 deliveries take about 0.1 s; what came if not)
                while len(server.callbacks_sent) < 4:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert len(server.callbacks_sent) == 4, server.callbacks_sent
            assert [c["task_status"] for c in received] == ["processing", "succeed"]
            assert received[1]["task_id"] == task_id
            assert received[1]["task_result"]["videos"][0]["url"].endswith(f"/{task_id}.mp4")
            assert server.callbacks_sent.count((hook, 200)) == 2
            assert {outcome for url, outcome in server.callbacks_sent if url != hook} == {
                "ClientConnectorError"
            }


async def test_forced_finish_reports_each_state_once() -> None:
    options = {"task_duration": 0.2, "processing_after": 0.1}
    async with receiver() as (hook, received), running(**options) as (server, http):
        body = {**text_body(), "callback_url": hook}
        _, answer = await call(http, "POST", server.url + LIP_SYNC, body)
        task_id = answer["data"]["task_id"]
        server.finish(task_id, "failed", "stopped by the test")
        await wait_for(lambda: len(received) == 1)
        await asyncio.sleep(0.25)  # past the task's own processing and end times
        assert [(c["task_status"], c["task_status_msg"]) for c in received] == [
            ("failed", "stopped by the test")
        ]


async def test_apimodels_two_step_flow_with_callbacks() -> None:
    async with receiver() as (hook, received), running(task_duration=0.05) as (server, http):
        url = server.url + APIMODELS
        body = {"model": "kling-identify-face", "video_url": CLIP, "callback_url": hook}
        status, answer = await call(http, "POST", url, body)
        assert status == 200
        assert answer["code"] == 200
        assert answer["msg"] == "success"
        assert answer["data"]["state"] == "pending"
        identify = answer["data"]["taskId"]
        face_choose = [{"face_id": "?", "sound_file": "https://cdn.example.com/a.mp3"}]
        lip_sync = {"model": "kling-advanced-lip-sync", "face_choose": face_choose}
        status, answer = await call(http, "POST", url, {**lip_sync, "session_id": "session_x"})
        assert status == 400
        assert "session_id" in answer["msg"]
        await asyncio.sleep(0.07)
        _, answer = await call(http, "GET", f"{url}?task_id={identify}")
        assert answer["data"]["state"] == "completed"
        face_data = answer["data"]["faceData"]
        lip_sync["session_id"] = face_data["session_id"]
        status, answer = await call(http, "POST", url, {**lip_sync, "callback_url": hook})
        assert status == 400
        assert "face_id" in answer["msg"]
        face_choose[0]["face_id"] = face_data["face_list"][0]["face_id"]
        status, answer = await call(http, "POST", url, {**lip_sync, "callback_url": hook})
        assert status == 200
        video_task = answer["data"]["taskId"]
        await asyncio.sleep(0.07)
        _, answer = await call(http, "GET", f"{url}?task_id={video_task}")
        assert answer["data"]["state"] == "completed"
        assert answer["data"]["resultUrls"] == [f"{server.url}/videos/{video_task}.mp4"]
        await wait_for(lambda: len(received) == 2)
        callback = received[1]["data"]
        assert callback["taskId"] == video_task
        assert callback["state"] == "completed"
        assert json.loads(callback["param"])["session_id"] == face_data["session_id"]
        assert json.loads(callback["resultJson"])["resultUrls"] == answer["data"]["resultUrls"]


async def test_apimodels_failures_and_errors() -> None:
    async with running(task_duration=0.0) as (server, http):
        url = server.url + APIMODELS
        no_face = {"model": "kling-identify-face", "video_url": "https://x.example/no-face.mp4"}
        _, answer = await call(http, "POST", url, no_face)
        _, answer = await call(http, "GET", f"{url}?task_id={answer['data']['taskId']}")
        assert answer["data"]["state"] == "failed"
        assert answer["data"]["failMsg"] == "Face detection failed: no faces found"
        for body in ({"model": "kling-v9"}, {"model": "kling-identify-face"}):
            status, answer = await call(http, "POST", url, body)
            assert (status, answer["code"]) == (400, 400)
        assert (await call(http, "GET", f"{url}?task_id=nope"))[1]["code"] == 404
        assert (await call(http, "GET", url))[0] == 400
        official_id = await submit(server, http)
        assert (await call(http, "GET", f"{url}?task_id={official_id}"))[0] == 404


async def test_official_advanced_lip_sync() -> None:
    async with running(task_duration=10) as (server, http):
        base = server.url + "/kling/v1/videos"
        two = {"video_url": "https://x.example/two-faces.mp4"}
        status, answer = await call(http, "POST", f"{base}/identify-face", two)
        assert status == 200
        assert len(answer["data"]["face_data"]) == 2
        # A session, not a task: the server's record names it and its video.
        session = server.sessions[answer["data"]["session_id"]]
        assert (session.video_url, session.identify_task_id) == (two["video_url"], None)
        assert server.tasks_created == 0
        face = answer["data"]["face_data"][0]
        assert {"face_id", "face_image", "start_time", "end_time"} <= face.keys()
        choice = {
            "face_id": face["face_id"],
            "sound_file": "https://cdn.example.com/a.mp3",
            "sound_start_time": 0,
            "sound_end_time": 3000,
            "sound_insert_time": 0,
        }
        body: dict[str, Any] = {
            "session_id": answer["data"]["session_id"],
            "face_choose": [choice],
            "external_task_id": "job-1",
        }
        status, answer = await call(http, "POST", f"{base}/advanced-lip-sync", body)
        assert status == 200
        task_id = answer["data"]["task_id"]
        _, answer = await call(http, "GET", f"{base}/advanced-lip-sync/{task_id}")
        assert answer["data"]["task_info"]["external_task_id"] == "job-1"
        _, listed = await call(http, "GET", f"{base}/advanced-lip-sync?pageSize=5")
        assert [t["task_id"] for t in listed["data"]] == [task_id]
        assert (await call(http, "GET", f"{base}/lip-sync/{task_id}"))[1]["code"] == 1203
        cases: list[tuple[dict[str, Any], str]] = [
            ({"external_task_id": "job-1"}, "external_task_id"),
            ({"session_id": "session_unknown"}, "session_id"),
            ({"face_choose": [{**choice, "face_id": "face_other"}]}, "face_id"),
            ({"face_choose": [{**choice, "sound_end_time": None}]}, "sound_end_time"),
            ({"face_choose": [choice, choice]}, "face_choose"),
        ]
        for broken, field in cases:
            status, answer = await call(
                http, "POST", f"{base}/advanced-lip-sync", {**body, **broken}
            )
            assert (status, answer["code"]) == (400, 1201)
            assert field in answer["message"]
        none = {"video_url": "https://x.example/no-face.mp4"}
        assert (await call(http, "POST", f"{base}/identify-face", none))[1]["data"][
            "face_data"
        ] == []
        assert server.tasks_created == 1


async def test_result_video_download_with_range() -> None:
    async with running(task_duration=10) as (server, http):
        task_id = await submit(server, http)
        video = f"{server.url}/videos/{task_id}.mp4"
        async with http.get(video) as r:
            assert r.status == 404  # no video before the task succeeds
        server.finish(task_id)
        expected = video_bytes(task_id)
        async with http.get(video) as r:
            assert r.status == 200
            assert r.content_type == "video/mp4"
            assert await r.read() == expected
        for header, status, content_range, part in [
            ("bytes=0-99", 206, f"bytes 0-99/{len(expected)}", expected[:100]),
            ("bytes=-10", 206, f"bytes {len(expected) - 10}-{len(expected) - 1}/", expected[-10:]),
            ("bytes=100-", 206, f"bytes 100-{len(expected) - 1}/", expected[100:]),
            (f"bytes={len(expected)}-", 416, f"bytes */{len(expected)}", b""),
        ]:
            async with http.get(video, headers={"Range": header}) as r:
                assert r.status == status
                assert r.headers["Content-Range"].startswith(content_range)
                assert await r.read() == part


async def test_lifecycle_and_reproducible_ids() -> None:
    server = FakeKlingServer(seed=7, task_duration=lambda rng: rng.uniform(0.0, 0.01))
    with pytest.raises(RuntimeError):
        _ = server.url
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            first = await submit(server, http)
    finally:
        await server.close()
        await server.close()
    async with running(seed=7) as (again, http):
        assert await submit(again, http) == first
