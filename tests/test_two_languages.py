"""A dubbing studio's day: one clip set dubbed into two languages, one account, 502s in front.

Each language is its own batch (its own journal, or none) on one Kling account served by one
FakeKlingServer; a proxy answers some submits 502 before they reach the service.  Whatever the
order (one batch after the other, or both at once), no result may carry another job's task and
no task may be reported for two jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import API_KEY, FAST_POLL, FAST_RETRY

import kling_async as ka
from kling_async.testing import FakeKlingServer, FaultPlan

pytestmark = pytest.mark.anyio

CLIPS = 10
LANGS = ("fr", "de")


def dub(lang: str, n: int, advanced: bool) -> ka.LipSyncJob:
    video = f"https://example.com/clip-{n}.mp4"
    if advanced:
        return ka.LipSyncJob.from_audio(
            video_url=video,
            audio_url=f"https://example.com/{lang}/line-{n}.mp3",
            sound_end_time=3000,
            key=f"{lang}-{n}",
        )
    return ka.LipSyncJob.from_text(
        video_url=video, text=f"{lang} line {n}", voice_id="v", key=f"{lang}-{n}"
    )


def client_for(server: FakeKlingServer, advanced: bool) -> ka.KlingClient:
    return ka.KlingClient.kling(
        api_key=API_KEY,
        base_url=server.url,
        advanced=advanced,
        poll=FAST_POLL,
        retry=FAST_RETRY,
        max_in_flight=4,
    )


async def dub_all(
    server: FakeKlingServer, lang: str, advanced: bool, journal: Path | None
) -> list[ka.JobResult]:
    jobs = [dub(lang, n, advanced) for n in range(CLIPS)]
    options: dict[str, Any] = {"journal": journal} if journal is not None else {}
    out: list[ka.JobResult] = []
    async with client_for(server, advanced) as client:
        with anyio.fail_after(30):
            async for result in client.run_batch(jobs, **options):
                out.append(result)
    return out


def made_for(server: FakeKlingServer, task_id: str) -> tuple[str, str]:
    """(video, language) the task on the server was made for."""
    task = server.tasks[task_id]
    if task.stage == "advanced-lip-sync":
        assert task.session is not None and task.session.video_url is not None
        audio = task.input["face_choose"][0]["sound_file"]
        return task.session.video_url, audio.split("/")[-2]
    return task.input["input"]["video_url"], task.input["input"]["text"].split()[0]


def check(server: FakeKlingServer, results: dict[str, list[ka.JobResult]]) -> dict[str, int]:
    """No wrong result, no task reported twice; counts of what happened."""
    owners: dict[str, str] = {}
    counts = {"ok": 0, "unknown": 0, "adopted": 0}
    for lang, batch in results.items():
        assert sorted(r.key for r in batch) == sorted(f"{lang}-{n}" for n in range(CLIPS))
        for result in batch:
            if result.task_id is None or result.task_id.startswith("session_"):
                assert isinstance(result.error, ka.SubmitOutcomeUnknownError), result.error
                counts["unknown"] += 1
                continue
            n = result.key.split("-")[1]
            assert made_for(server, result.task_id) == (f"https://example.com/clip-{n}.mp4", lang)
            assert result.task_id not in owners, (result.key, owners.get(result.task_id))
            owners[result.task_id] = result.key
            counts["ok"] += result.ok
            counts["adopted"] += result.adopted
    return counts


@pytest.mark.parametrize("journaled", [True, False], ids=["journal", "no-journal"])
@pytest.mark.parametrize("together", [False, True], ids=["sequential", "concurrent"])
async def test_external_ids_give_every_job_its_own_task(
    tmp_path: Path, journaled: bool, together: bool
) -> None:
    faults = FaultPlan(bad_gateway_rate=0.3, lost_answer_rate=0.1)
    async with FakeKlingServer(task_duration=0.02, faults=faults, seed=7) as server:
        results: dict[str, list[ka.JobResult]] = {}

        async def one(lang: str) -> None:
            journal = tmp_path / f"{lang}.journal" if journaled else None
            results[lang] = await dub_all(server, lang, True, journal)

        if together:
            async with anyio.create_task_group() as group:
                for lang in LANGS:
                    group.start_soon(one, lang)
        else:
            for lang in LANGS:
                await one(lang)
        counts = check(server, results)
    assert server.requests["faulted"] >= 3  # the proxy did strike
    failed = [(r.key, r.state, str(r.error)) for b in results.values() for r in b if not r.ok]
    assert counts["ok"] == 2 * CLIPS and counts["unknown"] == 0, failed
    assert server.tasks_created == 2 * CLIPS  # nothing paid twice


@pytest.mark.parametrize("rate", [0.5, 1.0])
@pytest.mark.parametrize("journaled", [True, False], ids=["journal", "no-journal"])
async def test_without_external_ids_one_after_the_other_nothing_is_misattributed(
    tmp_path: Path, journaled: bool, rate: float
) -> None:
    # Basic lip-sync has no external id: a 502'd "fr" submit created nothing, and the "de"
    # task on the same clip, made before it, must not be taken for it.
    async with FakeKlingServer(task_duration=0.02, seed=3) as server:
        results = {"de": await dub_all(server, "de", False, None)}
        server.faults = FaultPlan(bad_gateway_rate=rate)  # 1.0: the "all met a 502"
        journal = tmp_path / "fr.journal" if journaled else None
        results["fr"] = await dub_all(server, "fr", False, journal)
        counts = check(server, results)
    assert counts["unknown"] >= 1 and counts["adopted"] == 0
    if rate == 1.0:
        assert counts["unknown"] == CLIPS and server.tasks_created == CLIPS  # no fr task at all
    for result in results["fr"]:
        if isinstance(result.error, ka.SubmitOutcomeUnknownError):
            assert result.task_id is None
            assert all(c in {r.task_id for r in results["de"]} for c in result.error.candidates)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("journaled", [True, False], ids=["journal", "no-journal"])
async def test_without_external_ids_both_at_once_nothing_is_misattributed(
    tmp_path: Path, journaled: bool, seed: int
) -> None:
    # Both languages at once, each clip's two submits moments apart: a lone task on a clip next
    # to a 502'd submit is as likely the other language's; nothing but proof is adopted.
    faults = FaultPlan(bad_gateway_rate=0.3, lost_answer_rate=0.1)
    async with FakeKlingServer(task_duration=0.02, faults=faults, seed=seed) as server:
        results: dict[str, list[ka.JobResult]] = {}

        async def one(lang: str) -> None:
            journal = tmp_path / f"{lang}.journal" if journaled else None
            results[lang] = await dub_all(server, lang, False, journal)

        async with anyio.create_task_group() as group:
            for lang in LANGS:
                group.start_soon(one, lang)
        counts = check(server, results)
    assert counts["ok"] + counts["unknown"] == 2 * CLIPS
    assert server.tasks_created <= 2 * CLIPS
