"""The single-process tracker under answers the fake server cannot give by itself.

A proxy in front of FakeKlingServer rewrites chosen answers (a list row the client cannot read),
so that the tracker meets them in a real batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import API_KEY, FAST_RETRY, audio_job, kling_client, text_job
from proxy import proxy_app, run_through

import kling_async as ka
from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio


async def test_one_unreadable_list_row_fails_no_other_task() -> None:
    """A list row the client cannot read (an unknown state) concerns its own task only.

    The whole page failed to parse, again and again: every task on it waited for the unreadable
    one's PollPolicy.timeout, and the ones submitted before it timed out, finished and paid for.
    """
    garbled: list[str] = []  # the task whose rows are garbled: job k3's

    def garble(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
        data = body.get("data")
        if request.method == "POST" and b"clip-3.mp4" in sent and isinstance(data, dict):
            garbled.append(str(data["task_id"]))
        if request.method == "GET" and "pageNum" in request.query and isinstance(data, list):
            for row in data:
                if isinstance(row, dict) and row.get("task_id") in garbled:
                    row["task_status"] = "queueing"  # a word the client does not know

    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.05, timeout=5.0)
    jobs = [text_job(n, key=f"k{n}") for n in range(12)]
    async with FakeKlingServer(task_duration=0.3) as fake:
        async with TestServer(proxy_app(fake.url, garble)) as proxy:
            url = str(proxy.make_url("")).rstrip("/")
            async with ka.KlingClient.kling(
                api_key=API_KEY, base_url=url, max_in_flight=12, poll=poll, retry=FAST_RETRY
            ) as client:
                with anyio.fail_after(20):
                    started = anyio.current_time()
                    results = {r.key: r async for r in client.run_batch(jobs)}
                    took = anyio.current_time() - started
    assert garbled and len(results) == 12
    assert fake.requests["list"] >= 1  # the batch used list queries
    assert all(r.ok for r in results.values()), [
        (r.key, r.state.value, str(r.error)) for r in results.values() if not r.ok
    ]
    # Its own query answers it well: the garbled row only has it asked on its own.
    assert results["k3"].task_id == garbled[0]
    assert fake.requests["query"] >= 1
    assert took < 3.5  # nobody waited for the time-out


def nothing(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
    """Leave an answer as it is."""


async def test_a_task_listed_deeper_than_the_pages_read_is_still_polled() -> None:
    """A gateway with larger pages than asked for shows a task at a depth beyond page 5.

    No page that deep is read, and the task was on no page-1 schedule either: it waited for its
    time-out although it had ended.
    """
    durations = iter([1000.0, *[0.01] * 199, 0.3])
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.05, timeout=6.0)
    async with FakeKlingServer(task_duration=lambda rng: next(durations)) as fake:
        async with kling_client(fake) as direct:
            # The long task, then 199 newer ones: it sits at depth 199, on page 7 of 30 rows.
            ids = [(await direct.submit(text_job(n))).task_id for n in range(201)]
        long, short = ids[0], ids[-1]
        async with TestServer(proxy_app(fake.url, nothing, page_size=500)) as proxy:
            url = str(proxy.make_url("")).rstrip("/")
            async with ka.KlingClient.kling(
                api_key=API_KEY, base_url=url, poll=poll, retry=FAST_RETRY
            ) as client:
                with anyio.fail_after(20):
                    async with client.track([long, short]) as results:
                        first = await results.__anext__()
                        assert first.task_id == short and first.ok
                        await anyio.sleep(0.2)
                        fake.finish(long)
                        ended = anyio.current_time()
                        last = await results.__anext__()
                        took = anyio.current_time() - ended
    assert fake.requests["list"] >= 1  # the two were read from a list page first
    assert last.task_id == long and last.ok, last
    assert took < 2.0  # not its time-out


async def test_a_lost_answer_never_adopts_another_jobs_task_by_its_external_id() -> None:
    """Two jobs given the same external id: the second's refusal is lost on its way back.

    The lookup by external id found the first job's task, and the second job reported it as
    its own: one video, two results.  That task belongs to another job: the second one's
    outcome is unknown (it created nothing, or a task no lookup can tell apart).
    """
    advanced_submits: list[int] = []

    def lose_second(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
        if request.method == "POST" and request.path.endswith("/advanced-lip-sync"):
            advanced_submits.append(1)
            if len(advanced_submits) == 2:
                raise web.HTTPGatewayTimeout(text="<html>504 Gateway Time-out</html>")

    jobs = [
        ka.LipSyncJob.from_audio(
            video_url="https://example.com/clip.mp4",
            audio_url=f"https://example.com/line-{key}.mp3",
            sound_end_time=4000,
            external_task_id="scene-12-take-3",  # the same, by mistake
            key=key,
        )
        for key in ("first", "second")
    ]
    async with FakeKlingServer(task_duration=0.05) as fake:
        async with TestServer(proxy_app(fake.url, lose_second)) as proxy:
            url = str(proxy.make_url("")).rstrip("/")
            async with ka.KlingClient.kling(
                api_key=API_KEY,
                base_url=url,
                advanced=True,
                max_in_flight=1,
                poll=ka.PollPolicy(first_delay=0.01, max_interval=0.05, timeout=5.0),
                retry=FAST_RETRY,
            ) as client:
                with anyio.fail_after(20):
                    results = {r.key: r async for r in client.run_batch(jobs)}
    assert len(advanced_submits) >= 2  # the second was sent, and its answer lost
    first, second = results["first"], results["second"]
    assert first.ok and first.task_id is not None
    assert second.task_id != first.task_id, second
    assert not second.ok
    assert isinstance(second.error, ka.SubmitOutcomeUnknownError), second.error
    assert "another job owns" in str(second.error)


async def test_a_refused_list_query_falls_back_to_single_queries() -> None:
    """A server that refuses the list query (a gateway without it, or with its own page limits).

    The refusal (1201) was taken for each task's own: every running job of the batch failed
    with it, its task running on (and paid for).
    """
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.05, timeout=5.0)
    async with FakeKlingServer(task_duration=0.2) as fake:
        fake.script("list", status=400, code=1201, message="pageSize: at most 100", times=10**6)
        async with kling_client(fake, max_in_flight=8, poll=poll) as client:
            with anyio.fail_after(20):
                results = [r async for r in client.run_batch(text_job(n) for n in range(20))]
    assert len(results) == 20
    assert all(r.ok for r in results), {str(r.error) for r in results if not r.ok}
    assert 1 <= fake.requests["list"] <= 2  # refused once (or twice, by workers in flight)
    assert fake.requests["query"] >= 20


async def test_a_list_route_that_keeps_failing_does_not_time_every_task_out() -> None:
    """A list query answering 5xx for good while single queries work (a broken list route).

    Each failed read only postponed the tasks it was for, to the next read, which failed too:
    every task timed out although it had ended.  After failing for ``max_interval`` the tasks
    are queried one by one, and the list is tried again after as long.
    """
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.1, timeout=5.0)
    async with FakeKlingServer(task_duration=0.2) as fake:
        fake.script("list", status=500, code=5000, message="busy", times=10**6)
        async with kling_client(fake, max_in_flight=8, poll=poll) as client:
            with anyio.fail_after(20):
                started = anyio.current_time()
                results = [r async for r in client.run_batch(text_job(n) for n in range(20))]
                took = anyio.current_time() - started
    assert len(results) == 20
    assert all(r.ok for r in results), {r.state.value for r in results}
    assert fake.requests["list"] >= 2  # tried, and tried again
    assert fake.requests["query"] >= 20
    assert took < 4.0  # not the time-out


@pytest.mark.parametrize("code", [1999, 1201])
async def test_a_query_refused_with_an_unexpected_code_is_asked_again(code: int) -> None:
    """A status query answered with a code the client does not expect there (an unknown one, or
    a parameter error from a gateway in trouble) failed the job at once, though its task was
    created and paid for and went on to succeed: a video lost.  It is asked again, as long as
    RetryPolicy.max_attempts allows, and the job ends with the video."""
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.03, list_queries=False, timeout=5.0)
    async with FakeKlingServer(task_duration=0.05) as server:
        server.script("query", status=400, code=code, message="unexpected", times=3)
        async with kling_client(server, poll=poll) as client:
            with anyio.fail_after(10):
                results = [r async for r in client.run_batch([text_job(1)])]
    (result,) = results
    assert result.ok, (result.state, result.error)
    assert server.tasks_created == 1
    assert server.requests["query"] >= 4


# -- unclear submits and one unreadable list row ----------------------------------------------


def line(key: str) -> ka.LipSyncJob:
    """An advanced lip-sync job carrying its own external id (``line-<key>``)."""
    return audio_job(key, sound_end_time=4000, external_task_id=f"line-{key}", key=key)


class LostLookup:
    """A proxy's rewrite: job ``second``'s submit answer is lost (its task is created), the
    single-task query by its external id says "not found" (the list is read instead), and the
    list rows of the tasks in ``garbled`` carry a state word the client does not know."""

    def __init__(self, garble: str) -> None:
        self.garble = garble  # "first" (another job's row) or "second" (the lost job's own)
        self.tasks: dict[str, str] = {}  # job key -> its task id
        self.pages = 0  # list pages rewritten

    def __call__(self, request: web.Request, sent: bytes, body: dict[str, object]) -> None:
        data = body.get("data")
        if request.method == "POST" and request.path.endswith("/advanced-lip-sync"):
            key = "second" if b'"line-second"' in sent else "first"
            if isinstance(data, dict):
                self.tasks[key] = str(data["task_id"])
            if key == "second":
                raise web.HTTPGatewayTimeout(text="<html>504 Gateway Time-out</html>")
        elif request.method == "GET" and request.path.endswith("/line-second"):
            body.clear()
            body.update(code=1203, message="task not found", request_id="r")
        elif request.method == "GET" and "pageNum" in request.query and isinstance(data, list):
            for row in data:
                if isinstance(row, dict) and row.get("task_id") == self.tasks.get(self.garble):
                    row["task_status"] = "queueing"  # a word the client does not know
                    self.pages += 1


async def lost_lookup_batch(garble: str) -> tuple[LostLookup, FakeKlingServer, ka.JobResult]:
    """Jobs ``first`` then ``second`` (one at a time); ``second``'s answer is lost."""
    rewrite = LostLookup(garble)
    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.05, timeout=5.0)
    async with FakeKlingServer(task_duration=0.05) as fake:
        results = await run_through(
            fake,
            proxy_app(fake.url, rewrite),
            [line("first"), line("second")],
            advanced=True,
            max_in_flight=1,
            poll=poll,
        )
    assert rewrite.pages >= 1, "no list page showed the garbled row"
    by_key = {r.key: r for r in results}
    assert by_key["first"].ok, by_key["first"].error
    return rewrite, fake, by_key["second"]


async def test_an_unreadable_row_does_not_hide_a_task_found_by_its_external_id() -> None:
    """A lost submit's task is on the list page, readable, found by its external id; another
    task's row on that page cannot be read (an unknown state word).

    The whole page failed to parse, so the lookup failed: the job ended "outcome unknown" with
    its task (paid for) running on.  A positive match by external id is safe whatever the other
    rows say (the server keeps external ids unique): the job takes its task.
    """
    rewrite, fake, second = await lost_lookup_batch(garble="first")
    assert second.ok and second.adopted, second.error
    assert second.task_id == rewrite.tasks["second"]
    assert fake.tasks_created == 2


async def test_an_unreadable_row_never_makes_an_external_id_absent() -> None:
    """The lost submit's own row is the unreadable one: no readable row carries its external
    id, which proves nothing (that row may be its task).  The job is not sent again (a second
    task), and its outcome is unknown, saying why."""
    rewrite, fake, second = await lost_lookup_batch(garble="second")
    assert isinstance(second.error, ka.SubmitOutcomeUnknownError), second.error
    assert "1 row of the task list could not be read" in str(second.error)
    assert "may be its task" in str(second.error)
    assert second.task_id != rewrite.tasks["second"] and not second.adopted  # (the session id)
    assert fake.tasks_created == 2
    assert fake.requests["advanced-submit"] == 2  # not sent again


async def test_an_unreadable_row_leaves_a_match_by_video_unknown_and_says_why() -> None:
    """Without external ids (matching by video and time) an unreadable row may be the job's own
    task, or another client's on its video: nothing is adopted, as before, but the reason now
    names the unreadable row (it said "listing recent tasks failed: MalformedResponseError")
    and the readable candidate is named."""
    garbled: list[str] = []

    def garble(request: web.Request, sent: bytes, body: dict[str, object]) -> None:
        data = body.get("data")
        if request.method == "POST" and isinstance(data, dict) and not garbled:
            garbled.append(str(data["task_id"]))  # the first job's task
        if request.method == "GET" and "pageNum" in request.query and isinstance(data, list):
            for row in data:
                if isinstance(row, dict) and row.get("task_id") in garbled:
                    row["task_status"] = "queueing"

    poll = ka.PollPolicy(first_delay=0.01, max_interval=0.05, timeout=5.0)
    async with FakeKlingServer(task_duration=0.02) as fake:

        async def jobs() -> AsyncIterator[ka.LipSyncJob]:
            yield text_job(0, key="k0")
            await anyio.sleep(0.1)  # its answer calibrates the server's clock
            fake.faults = FaultPlan(lost_answer_rate=1.0)  # created, the answer cut off
            yield text_job(1, key="k1")

        async with TestServer(proxy_app(fake.url, garble)) as proxy:
            url = str(proxy.make_url("")).rstrip("/")
            async with ka.KlingClient.kling(
                api_key=API_KEY, base_url=url, poll=poll, retry=FAST_RETRY
            ) as client:
                with anyio.fail_after(20):
                    results = {r.key: r async for r in client.run_batch(jobs())}
    assert results["k0"].ok, results["k0"].error
    lost = results["k1"]
    assert isinstance(lost.error, ka.SubmitOutcomeUnknownError), lost.error
    assert "1 row of the task list could not be read" in str(lost.error)
    own = [
        t
        for t, task in fake.tasks.items()
        if task.input["input"]["video_url"].endswith("clip-1.mp4")
    ]
    assert lost.error.candidates == tuple(own) and len(own) == 1
    assert lost.task_id is None and not lost.adopted
    assert fake.tasks_created == 2
