"""Quirks of the wire in real batches: answers the vendors' pages allow but FakeKlingServer does
not give by itself, made by a proxy that rewrites its answers (figures sent as strings, nulls
where lists are expected).
"""

from __future__ import annotations

import anyio
import pytest
from aiohttp import web
from helpers import audio_job
from proxy import proxy_app, run_through

import kling_async as ka
from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio

POLL = ka.PollPolicy(first_delay=0.01, max_interval=0.05, timeout=3.0)


def _apimodels_job(n: int) -> ka.LipSyncJob:
    return audio_job(n, key=f"k{n}")


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
        app = proxy_app(fake.url, stringify)
        got = await run_through(fake, app, jobs, make=ka.KlingClient.apimodels, poll=POLL)
    results = {r.key: r for r in got}
    assert len(results) == 3
    for result in results.values():
        assert result.ok, (result.key, result.state.value, str(result.error))
        assert result.video_url is not None
        assert result.video_duration == 5.0
    assert "videoDuration" in rewritten and "completeTime" in rewritten


def _null_videos(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
    """Every task object answered carries ``task_result: {"videos": null}`` unless finished."""
    data = body.get("data")
    for row in data if isinstance(data, list) else [data]:
        if isinstance(row, dict) and row.get("task_status") in (
            "submitted",
            "processing",
            "failed",
        ):
            row["task_result"] = {"videos": None}


@pytest.mark.parametrize("list_queries", [True, False])
async def test_failed_tasks_with_null_videos_fail_at_once(list_queries: bool) -> None:
    """A failed task answered with ``videos: null`` (an empty list as Go servers write it) ends
    its job as failed with the server's reason; its answers were unreadable, and every such
    job waited for its time-out (holding its task slot) to end as timed out."""
    poll = ka.PollPolicy(
        first_delay=0.01, max_interval=0.05, timeout=3.0, list_queries=list_queries
    )
    jobs = [
        ka.LipSyncJob.from_text(
            video_url=f"https://example.com/clip-{n}.mp4", text="hi", voice_id="v1", key=f"k{n}"
        )
        for n in range(4)
    ]
    faults = FaultPlan(task_failure_rate=1.0)
    async with FakeKlingServer(task_duration=0.05, faults=faults) as fake:
        started = anyio.current_time()
        results = await run_through(fake, proxy_app(fake.url, _null_videos), jobs, poll=poll)
        took = anyio.current_time() - started
    assert len(results) == 4
    for result in results:
        assert result.state is ka.TaskState.FAILED, (result.key, result.state, result.error)
        assert isinstance(result.error, ka.TaskFailedError) and str(result.error)
    assert took < 2.5  # nobody waited for the time-out


async def test_identify_face_with_null_face_data_fails_the_job_without_lip_sync() -> None:
    """Official advanced lip-sync: ``face_data: null`` is a video without faces.  The job fails
    naming that, and no lip-sync task is created (it was an unreadable answer to a submit)."""

    def no_faces(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
        data = body.get("data")
        if request.path.endswith("/identify-face") and isinstance(data, dict):
            data["face_data"] = None

    job = audio_job(1, sound_end_time=3000, key="k1")
    async with FakeKlingServer(task_duration=0.05) as fake:
        app = proxy_app(fake.url, no_faces)
        results = await run_through(fake, app, [job], poll=POLL, advanced=True)
    (result,) = results
    assert result.state is ka.TaskState.FAILED, (result.state, result.error)
    assert "0 faces" in str(result.error)
    assert fake.requests["identify-face"] == 1
    assert fake.requests["advanced-submit"] == 0


def _blank_ids(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
    """Submit answers name their new task with an empty id."""
    data = body.get("data")
    if request.method == "POST" and isinstance(data, dict):
        for field in ("task_id", "taskId"):
            if field in data:
                data[field] = ""


async def test_a_submit_answered_with_an_empty_task_id_is_looked_for() -> None:
    """A submit answered "code 0" with an empty ``task_id`` created a task it does not name.

    The empty id was tracked: its query could not even be built, and the ValidationError
    escaped from the batch's task group, ending the whole batch with an ExceptionGroup and no
    task ids of what it had paid for.  Now the answer is unclear and the task is looked for.
    """
    jobs = [
        ka.LipSyncJob.from_text(
            video_url=f"https://example.com/clip-{n}.mp4", text="hi", voice_id="v1", key=f"k{n}"
        )
        for n in range(2)
    ]
    async with FakeKlingServer(task_duration=0.05) as fake:
        results = await run_through(fake, proxy_app(fake.url, _blank_ids), jobs, poll=POLL)
    assert len(results) == 2
    for result in results:
        assert result.ok and result.adopted, (result.key, result.state, str(result.error))
    assert fake.tasks_created == 2  # found, never paid twice
    assert len({r.task_id for r in results}) == 2


async def test_an_apimodels_create_answered_with_an_empty_task_id_ends_its_job_only() -> None:
    """apimodels has no list to look in: the job ends "outcome unknown", as a value."""
    async with FakeKlingServer(task_duration=0.05) as fake:
        app = proxy_app(fake.url, _blank_ids)
        jobs = [_apimodels_job(1)]
        results = await run_through(fake, app, jobs, make=ka.KlingClient.apimodels, poll=POLL)
    (result,) = results
    assert isinstance(result.error, ka.SubmitOutcomeUnknownError), repr(result.error)
    assert fake.tasks_created == 1  # not sent again blindly


async def test_an_answer_with_a_number_python_cannot_convert_fails_no_batch() -> None:
    """A query answer holding a number of more than 4300 digits (a broken gateway) made
    ``json.loads`` raise a plain ValueError, which ended the whole batch with an ExceptionGroup.
    It is a malformed answer now: queried again, and the job ends well."""
    spoilt: list[int] = []

    def huge_number(request: web.Request, raw: bytes) -> bytes:
        if request.method == "GET" and len(spoilt) < 2:
            spoilt.append(1)
            return raw.replace(b'"created_at":', b'"created_at":1' + b"0" * 5000 + b', "x":', 1)
        return raw

    jobs = [
        ka.LipSyncJob.from_text(
            video_url=f"https://example.com/clip-{n}.mp4", text="hi", voice_id="v1", key=f"k{n}"
        )
        for n in range(2)
    ]
    async with FakeKlingServer(task_duration=0.05) as fake:
        results = await run_through(fake, proxy_app(fake.url, raw=huge_number), jobs, poll=POLL)
    assert len(spoilt) == 2
    assert all(r.ok for r in results), [(r.key, str(r.error)) for r in results]
    assert fake.tasks_created == 2
