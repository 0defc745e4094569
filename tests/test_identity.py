"""Exact task identity: external task ids, and unclear submits resolved with and without them."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import API_KEY, FAST_POLL, FAST_RETRY, kling_client

import kling_async as ka
from kling_async._identity import MAX_EXTERNAL_ID_LENGTH, derive_external_id
from kling_async._reconcile import ClockOffset
from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio


def dub_job(n: int, lang: str = "fr", **extra: Any) -> ka.LipSyncJob:
    """One line of clip ``n`` dubbed into ``lang`` (official advanced lip-sync needs the trim)."""
    return ka.LipSyncJob.from_audio(
        video_url=f"https://example.com/clip-{n}.mp4",
        audio_url=f"https://example.com/{lang}/line-{n}.mp3",
        sound_end_time=3000,
        key=f"{lang}-{n}",
        **extra,
    )


def advanced_client(server: FakeKlingServer, **options: Any) -> ka.KlingClient:
    return kling_client(server, advanced=True, **options)


async def run(
    client: ka.KlingClient,
    jobs: Iterable[ka.LipSyncJob] | AsyncIterable[ka.LipSyncJob],
    **options: Any,
) -> list[ka.JobResult]:
    out = []
    with anyio.fail_after(20):
        async for result in client.run_batch(jobs, **options):
            out.append(result)
    return out


def external_of(server: FakeKlingServer, task_id: str | None) -> str | None:
    assert task_id is not None
    value = server.tasks[task_id].input.get("external_task_id")
    return value if isinstance(value, str) else None


# -- the job field -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "non-empty"),
        ("x" * (MAX_EXTERNAL_ID_LENGTH + 1), "at most 64"),
        ("has space", "may use only"),
        ("ünïcode", "may use only"),
        (12, "non-empty string"),
    ],
)
def test_external_task_id_is_validated(value: object, rule: str) -> None:
    with pytest.raises(ka.ValidationError, match=rule) as caught:
        dub_job(1, external_task_id=value)
    assert caught.value.field == "external_task_id"


def test_only_official_advanced_lip_sync_takes_an_external_id() -> None:
    job = dub_job(1, external_task_id="mine-1")
    assert job.external_task_id == "mine-1"
    basic = ka.KlingClient.kling(api_key="k")
    with pytest.raises(ka.ValidationError, match="only official advanced"):
        basic.dialect.check_job(job)
    with pytest.raises(ka.ValidationError, match="apimodels takes no external"):
        ka.KlingClient.apimodels(api_key="k").dialect.check_job(job)
    ka.KlingClient.kling(api_key="k", advanced=True).dialect.check_job(job)


def test_derived_ids_are_stable_safe_and_distinct() -> None:
    assert derive_external_id("0123abcd", "fr-1") == derive_external_id("0123abcd", "fr-1")
    names = ["fr-1", "fr-2", "a/b", "é" * 80, "x" * 200, "h" + "0" * 24]
    ids = [derive_external_id("0123abcd0123abcd", name) for name in names]
    assert len(set(ids)) == len(ids)
    for ident in ids:
        dub_job(1, external_task_id=ident)  # passes the job's own rule
    assert derive_external_id("a", "fr-1") != derive_external_id("b", "fr-1")


def test_clock_offset_narrows_from_answers_and_restarts_when_the_clock_jumps() -> None:
    offset = ClockOffset()
    assert offset.bounds() == (-60.0, 60.0)  # nothing known yet
    offset.observe(sent=100.0, received=100.2, created=105.1)  # server 5 s ahead
    lo, hi = offset.bounds()
    assert lo == pytest.approx(4.9) and hi == pytest.approx(5.101)
    offset.observe(sent=200.0, received=200.05, created=205.02)
    assert offset.width < 0.1
    offset.observe(sent=300.0, received=300.01, created=250.0)  # jumped: start again
    assert offset.bounds()[1] < 0


# -- batches on the official advanced API --------------------------------------------------


async def test_every_job_gets_its_own_external_id_and_results_are_not_adopted() -> None:
    jobs = [dub_job(n) for n in range(4)] + [dub_job(9, external_task_id="my-own-9")]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with advanced_client(server) as client:
            results = await run(client, jobs)
    assert all(r.ok and not r.adopted for r in results), [str(r.error) for r in results]
    ids = {r.key: external_of(server, r.task_id) for r in results}
    assert ids["fr-9"] == "my-own-9"
    derived = [ids[f"fr-{n}"] for n in range(4)]
    assert all(i is not None and i.startswith("ka-") for i in derived)
    assert len(set(derived)) == 4


async def test_lost_answers_are_found_by_external_id_without_a_journal() -> None:
    jobs = [dub_job(n) for n in range(6)]
    async with FakeKlingServer(task_duration=0.02, faults=FaultPlan(lost_answer_rate=0.5)) as s:
        async with advanced_client(s) as client:
            results = await run(client, jobs)
    assert all(r.ok for r in results), [str(r.error) for r in results]
    assert s.requests["faulted"] >= 1
    assert any(r.adopted for r in results)
    assert s.tasks_created == 6  # no job paid twice
    assert len({r.task_id for r in results}) == 6
    for result in results:  # each result's task is its own: its clip, its audio
        n = result.key.removeprefix("fr-")
        task = s.tasks[result.task_id or ""]
        assert task.session is not None
        assert task.session.video_url == f"https://example.com/clip-{n}.mp4"
        assert task.input["face_choose"][0]["sound_file"].endswith(f"/fr/line-{n}.mp3")


async def test_a_502_before_the_service_is_sent_again_with_the_same_external_id(
    tmp_path: Path,
) -> None:
    jobs = [dub_job(n) for n in range(6)]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with advanced_client(server) as client:
            server.script("advanced-submit", status=502, code=5000, times=3)
            results = await run(client, jobs, journal=tmp_path / "fr.journal")
    assert all(r.ok and not r.adopted for r in results), [str(r.error) for r in results]
    assert server.tasks_created == 6
    assert server.requests["advanced-submit"] == 6 + 3


async def test_a_slow_service_duplicate_refusal_proves_the_first_send(tmp_path: Path) -> None:
    # The submit times out before its task exists: the lookup finds nothing, the resend is
    # refused (the id is taken), and the task, once there, is the job's.
    retry = ka.RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.4)
    async with FakeKlingServer(task_duration=0.02) as server:
        timeouts = ka.Timeouts(total=0.1)
        async with advanced_client(server, timeouts=timeouts, retry=retry) as client:
            # The first answer shows that the server keeps external ids (the journal keeps it).
            (warm,) = await run(client, [dub_job(0)], journal=tmp_path / "j")
            server.faults = FaultPlan(create_delay=0.3)
            (result,) = await run(client, [dub_job(0), dub_job(1)], journal=tmp_path / "j")
    assert warm.ok
    assert result.ok and result.adopted, str(result.error)
    assert server.tasks_created == 2
    assert server.requests["rejected"] >= 1  # the duplicate refusal


async def test_an_absent_external_id_is_not_resent_until_the_server_echoes_one() -> None:
    # A gateway might drop external_task_id silently: until some answer echoed one, "no task
    # carries it" proves nothing, and the job is not sent again.
    async with FakeKlingServer(task_duration=0.02) as server:
        async with advanced_client(server) as client:
            server.script("advanced-submit", status=502, code=5000)
            (result,) = await run(client, [dub_job(1)])
    assert isinstance(result.error, ka.SubmitOutcomeUnknownError), result.error
    assert "has not shown" in str(result.error)
    assert server.tasks_created == 0
    assert server.requests["advanced-submit"] == 1


async def test_an_unclear_first_submit_waits_for_the_others_answers_however_slow() -> None:
    # The first submit meets a 502 before any answer has shown that external ids are kept; the
    # other submits are slower than any fixed wait for them would guess (0.4 s against the old
    # bound of 2 x max_delay = 0.1 s).  Their echoes confirm the ids: the job is sent again and
    # gets its own task, instead of ending unknown.
    async with FakeKlingServer(task_duration=0.02, faults=FaultPlan(create_delay=0.4)) as server:
        async with advanced_client(server) as client:
            server.script("advanced-submit", status=502, code=5000)
            results = await run(client, [dub_job(n) for n in range(4)])
    assert all(r.ok and not r.adopted for r in results), [str(r.error) for r in results]
    assert server.tasks_created == 4


async def test_a_rerun_resolving_an_earlier_unclear_submit_waits_for_its_own_answers(
    tmp_path: Path,
) -> None:
    # The first run's only submit met a 502 before any answer had shown that external ids are
    # kept: unknown.  The rerun looks it up before sending anything for it, while one other
    # job's (slow) submit is on its way, whose echo confirms the ids: the job is sent again,
    # once.  Before the fix the rerun waited only while two others were on their way.
    journal = tmp_path / "fr.journal"
    async with FakeKlingServer(task_duration=0.02) as server:
        async with advanced_client(server) as client:
            server.script("advanced-submit", status=502, code=5000)
            (lost,) = await run(client, [dub_job(0)], journal=journal)
            server.faults = FaultPlan(create_delay=0.3)
            results = await run(client, [dub_job(0), dub_job(1)], journal=journal)
    assert isinstance(lost.error, ka.SubmitOutcomeUnknownError), lost.error
    assert sorted(r.key for r in results) == ["fr-0", "fr-1"]
    assert all(r.ok and not r.adopted for r in results), [str(r.error) for r in results]
    assert server.tasks_created == 2
    assert server.requests["advanced-submit"] == 1 + 2


async def test_someone_elses_task_with_my_external_id_is_not_taken() -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        async with advanced_client(server) as client:
            (first,) = await run(client, [dub_job(1, external_task_id="shared-1")])
            (second,) = await run(client, [dub_job(2, external_task_id="shared-1")])
    assert first.ok
    assert isinstance(second.error, ka.InvalidRequestError)
    assert second.task_id != first.task_id and not second.adopted  # (the session id)
    assert server.tasks_created == 1


async def test_journaled_external_ids_survive_a_rerun(tmp_path: Path) -> None:
    journal = tmp_path / "fr.journal"
    jobs = [dub_job(n) for n in range(3)]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with advanced_client(server) as client:
            first = await run(client, jobs[:1], journal=journal)
            rest = await run(client, jobs, journal=journal)
    assert [r.key for r in first] == ["fr-0"] and sorted(r.key for r in rest) == ["fr-1", "fr-2"]
    stems = {(external_of(server, r.task_id) or "").rsplit("-k", 1)[0] for r in first + rest}
    assert len(stems) == 1  # one batch id, kept in the journal


# -- without external ids: provable adoption -----------------------------------------------


def text_job(n: int, video: str | None = None) -> ka.LipSyncJob:
    return ka.LipSyncJob.from_text(
        video_url=video or f"https://example.com/clip-{n}.mp4",
        text=f"line {n}",
        voice_id="v",
        key=f"k{n}",
    )


async def test_without_a_journal_a_lost_answer_is_adopted_or_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kling_async")
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            batch = [text_job(0)] + [text_job(n) for n in range(1, 6)]

            async def jobs() -> AsyncIterator[ka.LipSyncJob]:
                yield batch[0]
                await anyio.sleep(0.05)  # the first answer calibrates the server's clock
                server.faults = FaultPlan(lost_answer_rate=1.0)
                for job in batch[1:]:
                    yield job

            results = await run(client, jobs())
    assert all(r.ok for r in results), [str(r.error) for r in results]
    assert sum(r.adopted for r in results) == 5
    assert server.tasks_created == 6
    assert len({r.task_id for r in results}) == 6
    for result in results:  # the log names the adopted task's id, not the whole task
        if result.adopted:
            assert f"adopted task {result.task_id}:" in caplog.text
    assert "TaskSnapshot(" not in caplog.text


async def test_without_a_journal_two_lost_answers_on_one_video_stay_unknown() -> None:
    shared = "https://example.com/shared.mp4"
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=2) as client:
            (warm,) = await run(client, [text_job(0)])
            server.faults = FaultPlan(lost_answer_rate=1.0)
            results = await run(client, [text_job(1, shared), text_job(2, shared)])
    assert warm.ok
    on_video = {t.task_id for t in server.tasks.values() if t.input["input"]["video_url"] == shared}
    assert len(on_video) == 2
    for result in results:
        assert isinstance(result.error, ka.SubmitOutcomeUnknownError), result.error
        assert result.task_id is None and not result.adopted
        assert set(result.error.candidates) <= on_video and result.error.candidates


async def test_an_older_task_on_the_video_is_never_adopted() -> None:
    # Someone else's task on the same video, created before this submit: a 502 in front of the
    # service created nothing, and that task is not taken for this job's.
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            (other,) = await run(client, [text_job(3)])
            server.script("submit", status=502, code=5000)
            (mine,) = await run(client, [text_job(3)])
    assert other.ok
    assert isinstance(mine.error, ka.SubmitOutcomeUnknownError), mine.error
    assert mine.task_id is None
    assert mine.error.candidates == (other.task_id,)
    assert server.tasks_created == 1


def cut_off_submits(target: str, answered: int, rival: bool) -> web.Application:
    """A front for ``target`` that passes the first ``answered`` lip-sync submits on, and
    answers each later one HTTP 200 with a cut-off body without passing it on (nothing is
    created: a gateway's refusal sent with HTTP 200, cut off).  With ``rival`` it
    first submits another client's request on the same video (a task inside the submit's
    window that is not its own).  Every other request is forwarded."""
    seen = [0]

    async def send(method: str, url: str, headers: dict[str, str], body: bytes) -> web.Response:
        async with aiohttp.ClientSession() as http:
            async with http.request(method, url, headers=headers, data=body or None) as answer:
                content = await answer.read()
                status = answer.status
        return web.Response(body=content, status=status, content_type="application/json")

    async def forward(request: web.Request) -> web.Response:
        headers = {"Authorization": request.headers.get("Authorization", "")}
        body = await request.read()
        if body:
            headers["Content-Type"] = "application/json"
        url = target + request.path_qs
        if request.method == "POST" and request.path.endswith("/lip-sync"):
            seen[0] += 1
            if seen[0] > answered:
                if rival:
                    other = json.loads(body)
                    other["input"]["text"] = "someone else's line"
                    await send("POST", url, headers, json.dumps(other).encode())
                cut = b'{"code": 0, "message": "SUCCEED", "data": {"task_id": "1'
                return web.Response(body=cut, content_type="application/json")
        return await send(request.method, url, headers, body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


@pytest.mark.parametrize("calibrated", [False, True])
async def test_a_gateways_cut_off_answer_never_adopts_another_clients_task(
    calibrated: bool,
) -> None:
    # Found by tests/soak.py (seed 700, round 27): a job's submit was answered HTTP 200 with a
    # cut-off body and created nothing, and the job was reported with another client's task on
    # the same video: a cut-off 2xx was taken as proof that the job's task exists, so the one
    # unowned task on the video in its window was adopted.  A gateway may send a refusal with
    # HTTP 200 (docs/protocol.md, Business codes), so from a gateway that proves nothing.
    # Uncalibrated (no submit answered yet) the window is a minute either way: an older task of
    # another client was taken; calibrated, one another client created meanwhile.
    async with FakeKlingServer(task_duration=0.02) as server:
        theirs = None
        if not calibrated:
            async with kling_client(server) as other:
                (theirs,) = await run(other, [text_job(3)])
        front = TestServer(cut_off_submits(server.url, int(calibrated), rival=calibrated))
        await front.start_server()
        try:
            base = str(front.make_url("")).rstrip("/")
            gateway = ka.KlingClient.dmxapi(
                api_key=API_KEY, base_url=base, poll=FAST_POLL, retry=FAST_RETRY, max_in_flight=1
            )
            async with gateway:
                jobs = [text_job(1), text_job(3)] if calibrated else [text_job(3)]
                mine = (await run(gateway, jobs))[-1]
        finally:
            await front.close()
    on_video = {
        task.task_id
        for task in server.tasks.values()
        if task.input["input"]["video_url"].endswith("clip-3.mp4")
    }
    assert len(on_video) == 1  # another client's: this job's submit created nothing
    assert theirs is None or on_video == {theirs.task_id}
    assert mine.key == "k3" and not mine.adopted and mine.task_id is None, mine
    assert isinstance(mine.error, ka.SubmitOutcomeUnknownError), mine.error
    assert mine.error.candidates == tuple(on_video)


async def test_a_retried_failure_gets_a_fresh_external_id(tmp_path: Path) -> None:
    journal = tmp_path / "fr.journal"
    async with FakeKlingServer(task_duration=0.02) as server:
        async with advanced_client(server) as client:
            server.faults = FaultPlan(task_failure_rate=1.0)
            (failed,) = await run(client, [dub_job(1)], journal=journal)
            server.faults = FaultPlan()
            (again,) = await run(client, [dub_job(1)], journal=journal, retry_failed=True)
    assert isinstance(failed.error, ka.TaskFailedError)
    assert again.ok and not again.adopted, str(again.error)
    assert again.task_id != failed.task_id
    old, new = external_of(server, failed.task_id), external_of(server, again.task_id)
    assert old and new and old != new
    assert server.tasks_created == 2


async def test_resends_are_bounded_and_end_unknown() -> None:
    retry = ka.RetryPolicy(max_attempts=3, base_delay=0.005, max_delay=0.02)
    async with FakeKlingServer(task_duration=0.02) as server:
        async with advanced_client(server, retry=retry) as client:

            async def jobs() -> AsyncIterator[ka.LipSyncJob]:
                yield dub_job(0)  # answered: shows that external ids are echoed
                await anyio.sleep(0.1)
                server.faults = FaultPlan(bad_gateway_rate=1.0)
                yield dub_job(1)

            results = {r.key: r for r in await run(client, jobs())}
    assert results["fr-0"].ok
    error = results["fr-1"].error
    assert isinstance(error, ka.SubmitOutcomeUnknownError), error
    assert "sent 3 times" in str(error)
    assert server.requests["advanced-submit"] == 1 + 3
    assert server.tasks_created == 1
