"""The whole official advanced lip-sync of 2026: audio_id, watermark, identify-face by video_id,
every local rule before any request, and what the server returns (video id, duration,
watermark URL, units) kept on results, in the journal and in the fake server's answers."""

from __future__ import annotations

import json
import sys
from typing import Any

import aiohttp
import anyio
import pytest
from helpers import (
    FAST_POLL,
    FAST_RETRY,
    WAV,
    apimodels_client,
    kling_client,
    requests_sent,
    wav_bytes,
)

import kling_async as ka
from kling_async._signature import WebhookSecret
from kling_async.dialects import KlingDialect
from kling_async.dialects.kling import STAGE_ADVANCED_LIP_SYNC
from kling_async.journal._codec import result_from_json, result_to_json
from kling_async.testing import FakeKlingServer, FaultPlan

VIDEO = "https://example.com/clip.mp4"


def mp3_bytes(frames: int) -> bytes:
    # MPEG-1 layer III, 128 kbit/s, 44.1 kHz, no padding: 417-byte frames of 1152 samples each.
    header = bytes([0xFF, 0xFB, 0x90, 0x00])
    return (header + b"\x00" * 413) * frames


def advanced_job(**extra: Any) -> ka.LipSyncJob:
    fields: dict[str, Any] = {
        "video_url": VIDEO,
        "audio_url": "https://example.com/line.mp3",
        "sound_end_time": 4000,
    }
    fields.update(extra)
    return ka.LipSyncJob.from_audio(**fields)


# -- the job's rules -----------------------------------------------------------------------------


def test_exactly_one_audio_source() -> None:
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_id="tts-123", sound_end_time=3000)
    assert job.audio_id == "tts-123" and job.mode == "audio2video"
    for extra in ({"audio_url": "https://e.com/a.mp3"}, {"audio_file": WAV}):
        with pytest.raises(ka.ValidationError, match="exactly one of audio_url, audio_file"):
            ka.LipSyncJob.from_audio(video_url=VIDEO, audio_id="tts-123", **extra)
    with pytest.raises(ka.ValidationError, match="audio_id: must be a non-blank"):
        ka.LipSyncJob.from_audio(video_url=VIDEO, audio_id="  ")
    with pytest.raises(ka.ValidationError, match="audio_id: a text job takes no audio"):
        ka.LipSyncJob(video_url=VIDEO, text="hi", voice_id="v", audio_id="tts-1")
    with pytest.raises(ka.ValidationError, match="watermark: must be True or False"):
        advanced_job(watermark="yes")


@pytest.mark.parametrize(
    ("extra", "field", "rule"),
    [
        ({"sound_start_time": 1000, "sound_end_time": 62_000}, "sound_end_time", "at most 60 s"),
        ({"sound_start_time": 1000, "sound_end_time": 2999}, "sound_end_time", "at least 2 s"),
        ({"sound_insert_time": -5}, "sound_insert_time", "milliseconds"),
        ({"sound_volume": 2.5}, "sound_volume", "0 to 2"),
        ({"original_audio_volume": -0.1}, "original_audio_volume", "0 to 2"),
    ],
)
def test_trims_and_volumes(extra: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(ka.ValidationError, match=rule) as caught:
        advanced_job(**extra)
    assert caught.value.field == field


def test_trims_must_fall_within_a_local_audio_file() -> None:
    audio = wav_bytes(3.0)
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_file=audio, sound_end_time=3000)
    assert job.audio_seconds() == pytest.approx(3.0)
    with pytest.raises(ka.ValidationError, match=r"within the audio \(3000 ms long\)"):
        ka.LipSyncJob.from_audio(video_url=VIDEO, audio_file=audio, sound_end_time=3500)
    with pytest.raises(ka.ValidationError, match="sound_start_time: must leave at least 2 s"):
        ka.LipSyncJob.from_audio(video_url=VIDEO, audio_file=audio, sound_start_time=1500)
    # Unknown lengths (a URL, a header that cannot be read) pass: the server checks them.
    assert advanced_job(sound_end_time=59_000).audio_seconds() is None
    assert ka.LipSyncJob.from_audio(video_url=VIDEO, audio_file=WAV).audio_seconds() is None


def test_mp3_length_comes_from_mutagen() -> None:
    pytest.importorskip("mutagen")
    audio = mp3_bytes(frames=115)  # 115 * 1152 / 44100 = 3.004 s
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_file=audio)
    assert job.audio_format == "mp3"
    assert job.audio_seconds() == pytest.approx(3.004, abs=0.03)
    with pytest.raises(ka.ValidationError, match="within the audio"):
        ka.LipSyncJob.from_audio(video_url=VIDEO, audio_file=audio, sound_end_time=4000)


def test_only_official_advanced_lip_sync_takes_audio_id_and_watermark() -> None:
    for field, value in (("audio_id", "tts-1"), ("watermark", False)):
        extra = {field: value} if field == "watermark" else {field: value, "audio_url": None}
        job = advanced_job(**extra)
        with pytest.raises(ka.ValidationError, match="advanced=True") as basic:
            KlingDialect().flow(job)
        assert basic.value.field == field
        client = ka.KlingClient.apimodels(api_key="sk", base_url="http://127.0.0.1:9")
        with pytest.raises(ka.ValidationError, match="apimodels does not take it"):
            client.dialect.flow(job)


def test_advanced_request_carries_audio_id_and_watermark_info() -> None:
    job = ka.LipSyncJob.from_audio(
        video_id="kling-video-1", audio_id="tts-9", watermark=True, sound_end_time=4000
    )
    flow = KlingDialect(advanced=True).flow(job)
    identify = next(flow)
    assert identify.request.json == {"video_id": "kling-video-1"}  # identify-face by video_id
    face = ka.Face(face_id="f1", start_ms=0, end_ms=5000)
    found = ka.TaskSnapshot(
        task_id="s1", state=ka.TaskState.SUCCEEDED, session_id="s1", faces=(face,)
    )
    body = flow.send(found).request.json
    assert isinstance(body, dict)  # (HttpRequest.json is typed object)
    assert body["watermark_info"] == {"enabled": True}
    (choice,) = body["face_choose"]
    assert choice["audio_id"] == "tts-9" and "sound_file" not in choice


def test_audio_that_misses_the_face_fails_before_the_billed_task() -> None:
    job = advanced_job(sound_insert_time=4000)  # 4 s of audio at 4-8 s; the face: 0-5 s
    flow = KlingDialect(advanced=True).flow(job)
    next(flow)
    face = ka.Face(face_id="f1", start_ms=0, end_ms=5000)
    found = ka.TaskSnapshot(
        task_id="s1", state=ka.TaskState.SUCCEEDED, session_id="s1", faces=(face,)
    )
    with pytest.raises(StopIteration) as stop:
        flow.send(found)
    verdict: ka.TaskSnapshot = stop.value.value
    assert verdict.state is ka.TaskState.FAILED
    assert "overlaps face 'f1' (visible 0-5000 ms) by 1000 ms" in (verdict.message or "")


# -- end to end against the fake server ----------------------------------------------------------


@pytest.mark.anyio
async def test_advanced_batch_returns_ids_durations_watermarks_and_units() -> None:
    jobs = [
        ka.LipSyncJob.from_audio(
            video_id="kling-video-1",
            audio_id="tts-1",
            sound_end_time=7000,
            watermark=True,
            key="with-watermark",
        ),
        advanced_job(audio_file=wav_bytes(3), audio_url=None, sound_end_time=3000, key="wav"),
        advanced_job(sound_insert_time=4000, key="misses-the-face"),
    ]
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, advanced=True) as client:
            results = {r.key: r async for r in client.run_batch(jobs)}
    marked, plain, missed = results["with-watermark"], results["wav"], results["misses-the-face"]
    assert marked.ok and marked.video_id == f"v{marked.task_id}"
    assert marked.watermark_url == str(marked.video_url).removesuffix(".mp4") + "-wm.mp4"
    assert marked.video_duration == 7.0 and marked.units == 1.0  # two started 5 s steps
    assert plain.ok and plain.watermark_url is None and plain.units == 0.5
    assert plain.video_duration == 3.0
    assert not missed.ok and "overlaps face" in str(missed.error)
    assert server.requests["identify-face"] == 3 and server.requests["advanced-submit"] == 2
    advanced = [t for t in server.tasks.values() if t.stage == "advanced-lip-sync"]
    assert {json.dumps(t.input.get("watermark_info")) for t in advanced} == {
        '{"enabled": true}',
        "null",
    }


def test_journal_keeps_what_the_server_returned() -> None:
    result = ka.JobResult(
        key="k",
        task_id="t",
        state=ka.TaskState.SUCCEEDED,
        video_urls=("https://cdn/v.mp4",),
        video_id="v1",
        video_duration=5.1,
        watermark_url="https://cdn/v-wm.mp4",
        units=0.5,
        balance_deduction=ka.BalanceDeduction(quota=0.07, list_price=0.14),
    )
    assert result_from_json(result_to_json(result)) == result
    old = json.loads(result_to_json(result))
    for name in ("video_id", "video_duration", "watermark_url", "units", "balance_deduction"):
        del old[name]  # a journal written before these fields existed
    assert result_from_json(json.dumps(old)).units is None


def test_query_answers_keep_units_and_cash_deductions() -> None:
    dialect = KlingDialect(advanced=True)
    task = {
        "task_id": "t1",
        "task_status": "succeed",
        "task_result": {
            "videos": [
                {"id": "v1", "url": "https://cdn/v.mp4", "watermark_url": "https://cdn/w.mp4"},
                {"id": "v2", "url": "https://cdn/v2.mp4", "duration": "bad"},
            ]
        },
        "final_unit_deduction": "1.5",
        "final_balance_deduction": {"quota": "0.2", "list_price": 0.21},
    }
    for data in (task, {**task, "created_at": "1746773850590"}):  # fast and strict paths
        body = json.dumps({"code": 0, "message": "SUCCEED", "data": data}).encode()
        snap = dialect.parse_query(STAGE_ADVANCED_LIP_SYNC, "t1", ka_response(body))
        assert (snap.video_id, snap.watermark_url, snap.units) == ("v1", "https://cdn/w.mp4", 1.5)
        assert snap.video_duration is None
        assert snap.balance_deduction == ka.BalanceDeduction(quota=0.2, list_price=0.21)


def ka_response(body: bytes) -> Any:
    from kling_async._http import HttpResponse

    return HttpResponse(status=200, headers={}, body=body)


# -- the fake server -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_fake_server_speaks_2026() -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        headers = {"Authorization": "Bearer sk-sandbox"}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(server.url + "/v1/videos/no-such-thing") as answer:
                assert answer.status == 404
                assert (await answer.json())["code"] == 1202  # JSON, as the real API answers
            # "video_id": "" beside a video_url is taken as absent (gateway samples send it).
            body = {"input": {"video_id": "", "video_url": VIDEO, "mode": "audio2video"}}
            body["input"] |= {"audio_type": "url", "audio_url": "https://example.com/a.mp3"}
            async with http.post(server.url + "/v1/videos/lip-sync", json=body) as answer:
                assert (await answer.json())["code"] == 0
            # identify-face by video_id, then an audio_id with a bad watermark_info: refused.
            async with http.post(
                server.url + "/v1/videos/identify-face", json={"video_id": "kv-1"}
            ) as answer:
                found = (await answer.json())["data"]
            choice = {"face_id": found["face_data"][0]["face_id"], "audio_id": "tts-1"}
            choice |= {"sound_start_time": 0, "sound_end_time": 3000, "sound_insert_time": 0}
            bad = {"session_id": found["session_id"], "face_choose": [choice]}
            for extra, field in (
                ({"watermark_info": {"enabled": "yes"}}, "watermark_info"),
                ({"face_choose": [{**choice, "sound_end_time": 61_000}]}, "sound_end_time"),
                ({"face_choose": [{**choice, "sound_insert_time": 4000}]}, "sound_insert_time"),
            ):
                async with http.post(
                    server.url + "/v1/videos/advanced-lip-sync", json={**bad, **extra}
                ) as answer:
                    refusal = await answer.json()
                assert refusal["code"] == 1201 and field in refusal["message"]
    assert server.requests["unknown-path"] == 1


@pytest.mark.anyio
async def test_fake_server_command_options() -> None:
    secret = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
    command = [sys.executable, "-m", "kling_async", "fake-server", "--port", "0", "-q"]
    command += ["--data-as-list", "--errors-as-200", "--webhook-secret", secret]
    async with await anyio.open_process(command) as process:
        assert process.stdout is not None
        first = b""
        with anyio.fail_after(10):
            while b"\n" not in first:
                first += await process.stdout.receive()
        url = first.decode().split()[-1]
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": "Bearer sk-sandbox"}
            body = {"input": {"video_url": VIDEO, "mode": "text2video"}}
            async with http.post(url + "/v1/videos/lip-sync", json=body, headers=headers) as a:
                refused = (a.status, await a.json())
            job = {"video_url": VIDEO, "mode": "text2video", "text": "hi", "voice_id": "v"}
            async with http.post(
                url + "/v1/videos/lip-sync", json={"input": job}, headers=headers
            ) as answer:
                task_id = (await answer.json())["data"]["task_id"]
            async with http.get(url + f"/v1/videos/lip-sync/{task_id}", headers=headers) as a:
                listed = (await a.json())["data"]
        process.terminate()
        with anyio.fail_after(10):
            await process.wait()
    assert refused[0] == 200 and refused[1]["code"] == 1201  # an error with HTTP 200
    assert isinstance(listed, list) and listed[0]["task_id"] == task_id  # DMXAPI's quirk
    assert repr(WebhookSecret(secret))  # the secret given is a valid one


@pytest.mark.anyio
async def test_gateway_quirks_are_spoken_by_the_client() -> None:
    faults = FaultPlan(data_as_list=True, errors_as_http_200=True)
    async with FakeKlingServer(task_duration=0.02, faults=faults) as server:
        async with kling_client(server) as client:
            job = ka.LipSyncJob.from_text(video_url=VIDEO, text="hi", voice_id="v", key="a")
            results = [r async for r in client.run_batch([job])]
        assert results[0].ok and results[0].units == 0.5
        server.set_account_error(1102)
        async with kling_client(server, poll=FAST_POLL, retry=FAST_RETRY) as client:
            with pytest.raises(ka.AccountError):
                await client.submit(job)
    assert requests_sent(server) >= 2


@pytest.mark.anyio
async def test_apimodels_results_keep_the_video_duration() -> None:
    async with FakeKlingServer(task_duration=0.02) as server:
        async with apimodels_client(server) as client:
            job = advanced_job(sound_end_time=None, key="a")
            (result,) = [r async for r in client.run_batch([job])]
    assert result.ok and result.video_duration == 5.0


def test_journals_written_before_the_new_fields_still_recognise_their_jobs() -> None:
    from kling_async.journal._codec import request_hash

    job = advanced_job(key="k")
    # The hash this job had before audio_id and watermark existed (kling_async.job.v1).
    assert request_hash(job) == "d3a2dc6dbe1004eb2d1629397eae4d4bce2ebbd02652e5076d9c2a5089d5c93b"
    assert request_hash(job) != request_hash(advanced_job(watermark=False))
    with_id = advanced_job(audio_url=None, audio_id="tts-1")
    assert request_hash(with_id) != request_hash(advanced_job(audio_url=None, audio_id="tts-2"))


def test_garbled_extras_never_lose_a_finished_video() -> None:
    dialect = KlingDialect(advanced=True)
    video = {"id": "v1", "url": "https://cdn/v.mp4", "watermark_url": 7, "duration": "n/a"}
    task = {"task_id": "t1", "task_status": "succeed", "task_result": {"videos": [video]}}
    task |= {"final_unit_deduction": "lots", "final_balance_deduction": "cash"}
    body = json.dumps({"code": 0, "message": "SUCCEED", "data": task}).encode()
    snap = dialect.parse_query(STAGE_ADVANCED_LIP_SYNC, "t1", ka_response(body))
    assert snap.video_url == "https://cdn/v.mp4" and snap.video_id == "v1"
    assert (snap.watermark_url, snap.video_duration, snap.units) == (None, None, None)
    assert snap.balance_deduction is None
