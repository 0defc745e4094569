"""The fake server's external task ids and identity faults, seen by a plain aiohttp client."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio

KEY = {"Authorization": "Bearer sk-sandbox"}
BASE = "/v1/videos"


async def call(http: aiohttp.ClientSession, method: str, url: str, body: object = None) -> Any:
    async with http.request(method, url, json=body, headers=KEY) as answer:
        return answer.status, await answer.json(content_type=None)


async def advanced_body(http: aiohttp.ClientSession, url: str, external: str | None) -> Any:
    video = {"video_url": "https://cdn.example.com/clip.mp4"}
    _, found = await call(http, "POST", f"{url}{BASE}/identify-face", video)
    choice = {
        "face_id": found["data"]["face_data"][0]["face_id"],
        "sound_file": "https://cdn.example.com/a.mp3",
        "sound_start_time": 0,
        "sound_end_time": 3000,
        "sound_insert_time": 0,
    }
    body: dict[str, Any] = {"session_id": found["data"]["session_id"], "face_choose": [choice]}
    if external is not None:
        body["external_task_id"] = external
    return body


async def test_external_id_is_echoed_unique_and_queryable() -> None:
    async with FakeKlingServer(task_duration=10) as server, aiohttp.ClientSession() as http:
        body = await advanced_body(http, server.url, "fr-job-1")
        status, answer = await call(http, "POST", f"{server.url}{BASE}/advanced-lip-sync", body)
        assert status == 200
        task_id = answer["data"]["task_id"]
        assert answer["data"]["task_info"]["external_task_id"] == "fr-job-1"
        # The single-task path takes either id.
        for ident in (task_id, "fr-job-1"):
            _, one = await call(http, "GET", f"{server.url}{BASE}/advanced-lip-sync/{ident}")
            assert one["data"]["task_id"] == task_id
            assert one["data"]["task_info"]["external_task_id"] == "fr-job-1"
        _, listed = await call(http, "GET", f"{server.url}{BASE}/advanced-lip-sync?pageSize=5")
        assert listed["data"][0]["task_info"]["external_task_id"] == "fr-job-1"
        # A second task with the same external id is refused and creates nothing.
        again = await advanced_body(http, server.url, "fr-job-1")
        status, refused = await call(http, "POST", f"{server.url}{BASE}/advanced-lip-sync", again)
        assert (status, refused["code"]) == (400, 1201)
        assert "external_task_id" in refused["message"]
        assert server.tasks_created == 1
        # An unknown external id is not found; a basic lip-sync path does not take one.
        _, missing = await call(http, "GET", f"{server.url}{BASE}/advanced-lip-sync/de-job-1")
        assert missing["code"] == 1203
        _, basic = await call(http, "GET", f"{server.url}{BASE}/lip-sync/fr-job-1")
        assert basic["code"] == 1203
        # Without an external id the answer's task_info says so.
        plain = await advanced_body(http, server.url, None)
        _, answer = await call(http, "POST", f"{server.url}{BASE}/advanced-lip-sync", plain)
        assert answer["data"]["task_info"]["external_task_id"] is None


async def test_bad_gateway_creates_nothing() -> None:
    plan = FaultPlan(bad_gateway_rate=1.0)
    async with FakeKlingServer(faults=plan) as server, aiohttp.ClientSession() as http:
        async with http.post(
            f"{server.url}{BASE}/lip-sync",
            json={"input": {"video_url": "https://cdn.example.com/c.mp4"}},
            headers=KEY,
        ) as answer:
            assert answer.status == 502
            assert answer.content_type == "text/html"
        assert server.tasks_created == 0
        assert server.requests["faulted"] == 1


async def test_lost_answer_creates_the_task_first() -> None:
    async with FakeKlingServer(task_duration=10) as server, aiohttp.ClientSession() as http:
        body = await advanced_body(http, server.url, "job-lost")
        server.faults = FaultPlan(lost_answer_rate=1.0)
        async with http.post(
            f"{server.url}{BASE}/advanced-lip-sync", json=body, headers=KEY
        ) as answer:
            assert answer.status == 200
            text = await answer.text()
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        assert server.tasks_created == 1
        (task,) = server.tasks.values()
        server.faults = FaultPlan()
        _, one = await call(http, "GET", f"{server.url}{BASE}/advanced-lip-sync/job-lost")
        assert one["data"]["task_id"] == task.task_id
