"""The official Kling dialect, synchronously, over vendor-shaped samples (tests/samples/kling/)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kling_async as ka
from kling_async._http import HttpResponse
from kling_async.dialects import Dialect, KlingDialect, Submit
from kling_async.dialects.kling import (
    STAGE_ADVANCED_LIP_SYNC,
    STAGE_IDENTIFY_FACE,
    STAGE_LIP_SYNC,
)

SAMPLES = Path(__file__).parent / "samples" / "kling"
VIDEO = "https://example.com/clip.mp4"
AUDIO = "https://example.com/line.mp3"
HOOK = "https://hooks.example.com/kling/secret-path"
TASK_ID = "CjikY2gHPbcAAAAABI5n9g"
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(200))


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text(encoding="utf-8"))


def answer(name_or_body: str | object, status: int = 200) -> HttpResponse:
    if isinstance(name_or_body, str):
        body = (SAMPLES / name_or_body).read_bytes()
    else:
        body = json.dumps(name_or_body).encode()
    return HttpResponse(status=status, body=body, headers={"content-type": "application/json"})


def first_submit(dialect: KlingDialect, job: ka.LipSyncJob, **kw: Any) -> Submit:
    return next(dialect.flow(job, **kw))


def body_of(submit: Submit) -> dict[str, Any]:
    """A submit's JSON body (``HttpRequest.json`` is typed ``object``; the dialect sends a dict)."""
    body = submit.request.json
    assert isinstance(body, dict)
    return body


def no_nones(value: object) -> bool:
    if isinstance(value, dict):
        return all(v is not None and no_nones(v) for v in value.values())
    if isinstance(value, list):
        return all(v is not None and no_nones(v) for v in value)
    return True


# -- attributes -----------------------------------------------------------------------------------


def test_dialect_attributes_follow_the_protocol() -> None:
    basic: Dialect = KlingDialect()
    advanced: Dialect = KlingDialect(advanced=True)
    assert (basic.name, basic.default_stage, basic.list_page_size) == ("kling", "lip-sync", 500)
    assert advanced.default_stage == "advanced-lip-sync"


@pytest.mark.parametrize(
    ("prefix", "path"),
    [
        ("", "/v1/videos/lip-sync"),
        ("/kling", "/kling/v1/videos/lip-sync"),
        ("kling/", "/kling/v1/videos/lip-sync"),
        ("/gw/kling/", "/gw/kling/v1/videos/lip-sync"),
    ],
)
def test_prefix_is_normalised_and_kept(prefix: str, path: str) -> None:
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_url=AUDIO)
    submit = first_submit(KlingDialect(prefix=prefix), job)
    assert submit.request.path == path
    assert submit.request.url("https://www.dmxapi.cn") == "https://www.dmxapi.cn" + path


# -- basic submit bodies --------------------------------------------------------------------------


def test_text_job_body() -> None:
    job = ka.LipSyncJob.from_text(
        video_url=VIDEO,
        text="Hello there",
        voice_id="girlfriend_1_speech02",
        voice_language="en",
        voice_speed=1.2,
    )
    submit = first_submit(KlingDialect(prefix="/kling"), job, callback_url=HOOK)
    assert submit.stage == STAGE_LIP_SYNC
    assert submit.request.method == "POST"
    assert submit.request.path == "/kling/v1/videos/lip-sync"
    assert submit.request.idempotent is False
    assert submit.request.json == {
        "input": {
            "video_url": VIDEO,
            "mode": "text2video",
            "text": "Hello there",
            "voice_id": "girlfriend_1_speech02",
            "voice_language": "en",
            "voice_speed": 1.2,
        },
        "callback_url": HOOK,
    }


def test_text_job_without_language_sends_no_none_fields() -> None:
    job = ka.LipSyncJob.from_text(
        video_id="aeba40f7-473a-47a3-ab85-02dba121970c",
        text="欢迎大家使用 DMXAPI",
        voice_id="girlfriend_1_speech02",
        source_task_id="Cl6kH2gHPegAAAAABJAWDA",
    )
    body = first_submit(KlingDialect(), job).request.json
    assert no_nones(body)
    assert body == {
        "input": {
            "video_id": "aeba40f7-473a-47a3-ab85-02dba121970c",
            "task_id": "Cl6kH2gHPegAAAAABJAWDA",
            "mode": "text2video",
            "text": "欢迎大家使用 DMXAPI",
            "voice_id": "girlfriend_1_speech02",
            "voice_speed": 1.0,
        }
    }


def test_audio_file_job_body_is_base64_of_the_bytes() -> None:
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_file=MP3)
    body = first_submit(KlingDialect(prefix="/kling"), job).request.json
    assert no_nones(body)
    assert body == {
        "input": {
            "video_url": VIDEO,
            "mode": "audio2video",
            "audio_type": "file",
            "audio_file": base64.b64encode(MP3).decode("ascii"),
        }
    }
    assert base64.b64decode(body["input"]["audio_file"]) == MP3


def test_audio_file_from_path(tmp_path: Path) -> None:
    path = tmp_path / "line.mp3"
    path.write_bytes(MP3)
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_file=path)
    body = body_of(first_submit(KlingDialect(), job))
    assert base64.b64decode(body["input"]["audio_file"]) == MP3


def test_audio_url_job_body() -> None:
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_url=AUDIO)
    body = first_submit(KlingDialect(), job).request.json
    assert body == {
        "input": {
            "video_url": VIDEO,
            "mode": "audio2video",
            "audio_type": "url",
            "audio_url": AUDIO,
        }
    }


def test_no_std_or_pro_mode_ever_sent() -> None:
    jobs = [
        ka.LipSyncJob.from_audio(video_url=VIDEO, audio_url=AUDIO),
        ka.LipSyncJob.from_text(video_url=VIDEO, text="hi", voice_id="v"),
    ]
    modes = {body_of(first_submit(KlingDialect(), j))["input"]["mode"] for j in jobs}
    assert modes == {"audio2video", "text2video"}


@pytest.mark.parametrize(
    ("job_hook", "flow_hook", "expected"),
    [
        (None, None, None),
        ("https://job.example.com/cb", None, "https://job.example.com/cb"),
        ("https://job.example.com/cb", HOOK, HOOK),
        (None, HOOK, HOOK),
    ],
)
def test_callback_url_precedence(
    job_hook: str | None, flow_hook: str | None, expected: str | None
) -> None:
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_url=AUDIO, callback_url=job_hook)
    body = body_of(first_submit(KlingDialect(), job, callback_url=flow_hook))
    assert body.get("callback_url") == expected
    assert "callback_url" not in body["input"]
    assert ("callback_url" in body) is (expected is not None)


def test_basic_flow_returns_the_terminal_snapshot() -> None:
    dialect = KlingDialect(prefix="/kling")
    gen = dialect.flow(ka.LipSyncJob.from_audio(video_url=VIDEO, audio_url=AUDIO))
    next(gen)
    final = dialect.parse_query(STAGE_LIP_SYNC, TASK_ID, answer("query_object.json"))
    with pytest.raises(StopIteration) as stop:
        gen.send(final)
    assert stop.value.value is final


# -- parsing answers ------------------------------------------------------------------------------


def test_parse_submit() -> None:
    snap = KlingDialect().parse_submit(STAGE_LIP_SYNC, answer("submit.json"))
    assert snap == ka.TaskSnapshot(
        task_id="CjikY2gHPbcAAAAABI5n9g",
        state=ka.TaskState.SUBMITTED,
        created_at=1746773850.59,
        updated_at=1746773850.59,
    )


def test_parse_submit_numeric_id_and_missing_status() -> None:
    snap = KlingDialect().parse_submit(STAGE_LIP_SYNC, answer("submit_numeric_id.json"))
    assert (snap.task_id, snap.state) == ("817067112967086149", ka.TaskState.SUBMITTED)
    body = sample("submit_numeric_id.json")
    body["data"]["task_id"] = 817067112967086149  # some gateways send the id as a number
    del body["data"]["task_status"]
    snap = KlingDialect().parse_submit(STAGE_LIP_SYNC, answer(body))
    assert (snap.task_id, snap.state) == ("817067112967086149", ka.TaskState.SUBMITTED)


EXPECTED_SUCCESS = ka.TaskSnapshot(
    task_id="CjikY2gHPbcAAAAABI5n9g",
    state=ka.TaskState.SUCCEEDED,
    video_urls=("https://cdn.klingai.com/bs2/upload-kling-api/lipsync/0f8e3c2a.mp4",),
    created_at=1746773850.59,
    updated_at=1746774021.873,
    parent_video_url="https://cdn.klingai.com/bs2/upload-kling-api/parent/aeba40f7.mp4",
    returned=ka.Returned(
        video_id="0f8e3c2a-6f54-4c0e-9d57-6c6f1f0a2b11",  # usable as a later job's video_id
        video_duration=5.1,  # "5.1" on the wire: a string of seconds
    ),
)


@pytest.mark.parametrize("name", ["query_object.json", "query_list_quirk.json"])
def test_parse_query_object_or_one_element_list(name: str) -> None:
    snap = KlingDialect().parse_query(STAGE_LIP_SYNC, "CjikY2gHPbcAAAAABI5n9g", answer(name))
    assert snap == EXPECTED_SUCCESS
    assert snap.video_url == EXPECTED_SUCCESS.video_urls[0]
    assert snap.message is None  # the wire's empty task_status_msg


def test_parse_query_picks_the_matching_item_of_a_list() -> None:
    snap = KlingDialect().parse_query(STAGE_LIP_SYNC, "Cl6kH2gHPegAAAAABJAWDA", answer("list.json"))
    assert (snap.task_id, snap.state) == ("Cl6kH2gHPegAAAAABJAWDA", ka.TaskState.FAILED)


def test_parse_query_list_without_the_task_is_malformed() -> None:
    with pytest.raises(ka.MalformedResponseError, match="none of them 999") as info:
        KlingDialect().parse_query(STAGE_LIP_SYNC, "999", answer("query_list_quirk.json"))
    assert info.value.status == 200


def test_parse_query_object_about_another_task_is_malformed() -> None:
    with pytest.raises(ka.MalformedResponseError, match="answered about task"):
        KlingDialect().parse_query(STAGE_LIP_SYNC, "other", answer("query_object.json"))


def test_failed_task_carries_the_reason() -> None:
    snap = KlingDialect().parse_query(
        STAGE_LIP_SYNC, "Cl6kH2gHPegAAAAABJAWDA", answer("query_failed.json")
    )
    assert snap.state is ka.TaskState.FAILED
    assert snap.message == "there is no human in the video"
    assert snap.video_urls == ()
    assert snap.updated_at == 1746775032.954


@pytest.mark.parametrize(
    ("raw", "state"),
    [
        ("submitted", ka.TaskState.SUBMITTED),
        ("processing", ka.TaskState.PROCESSING),
        ("succeed", ka.TaskState.SUCCEEDED),
        ("succeeded", ka.TaskState.SUCCEEDED),
        ("success", ka.TaskState.SUCCEEDED),
        ("failed", ka.TaskState.FAILED),
    ],
)
def test_state_mapping(raw: str, state: ka.TaskState) -> None:
    body = sample("query_object.json")
    body["data"]["task_status"] = raw
    snap = KlingDialect().parse_query(STAGE_LIP_SYNC, "CjikY2gHPbcAAAAABI5n9g", answer(body))
    assert snap.state is state


def test_query_request_paths() -> None:
    dialect = KlingDialect(prefix="/kling")
    request = dialect.query_request(STAGE_LIP_SYNC, "CjikY2gHPbcAAAAABI5n9g")
    assert (request.method, request.path, request.params, request.json) == (
        "GET",
        "/kling/v1/videos/lip-sync/CjikY2gHPbcAAAAABI5n9g",
        (),
        None,
    )
    assert request.idempotent is True
    advanced = dialect.query_request(STAGE_ADVANCED_LIP_SYNC, "858402133346770989")
    assert advanced.path == "/kling/v1/videos/advanced-lip-sync/858402133346770989"
    assert dialect.query_request(STAGE_LIP_SYNC, "a/b+c").path.endswith("/lip-sync/a%2Fb%2Bc")
    with pytest.raises(ka.ValidationError, match="stage"):
        dialect.query_request(STAGE_IDENTIFY_FACE, "858401628226748502")
    with pytest.raises(ka.ValidationError, match="stage"):
        dialect.query_request("text-to-video", "x")
    with pytest.raises(ka.ValidationError, match="task_id"):
        dialect.query_request(STAGE_LIP_SYNC, "")


def test_list_request() -> None:
    dialect = KlingDialect(prefix="/kling")
    request = dialect.list_request(STAGE_LIP_SYNC, 3, 500)
    assert request is not None
    assert (request.method, request.path) == ("GET", "/kling/v1/videos/lip-sync")
    assert request.url("https://h") == "https://h/kling/v1/videos/lip-sync?pageNum=3&pageSize=500"
    advanced = dialect.list_request(STAGE_ADVANCED_LIP_SYNC, 1, 30)
    assert advanced is not None
    assert advanced.path == "/kling/v1/videos/advanced-lip-sync"
    assert dialect.list_request(STAGE_IDENTIFY_FACE, 1, 30) is None


@pytest.mark.parametrize(("page", "size"), [(0, 30), (1001, 30), (1, 0), (1, 501)])
def test_list_request_bounds(page: int, size: int) -> None:
    with pytest.raises(ka.ValidationError):
        KlingDialect().list_request(STAGE_LIP_SYNC, page, size)


def test_parse_list() -> None:
    snaps = KlingDialect().parse_list(STAGE_LIP_SYNC, answer("list.json"))
    assert [(s.task_id, s.state) for s in snaps] == [
        ("817067112967086149", ka.TaskState.PROCESSING),
        ("Cl6kH2gHPegAAAAABJAWDA", ka.TaskState.FAILED),
        ("CjikY2gHPbcAAAAABI5n9g", ka.TaskState.SUCCEEDED),
    ]
    assert snaps[1].message == "there is no human in the video"
    assert snaps[2] == EXPECTED_SUCCESS


def test_parse_list_empty_and_wrong_shapes() -> None:
    dialect = KlingDialect()
    assert dialect.parse_list(STAGE_LIP_SYNC, answer({"code": 0, "data": []})) == []
    assert dialect.parse_list(STAGE_LIP_SYNC, answer({"code": 0, "data": None})) == []
    with pytest.raises(ka.MalformedResponseError, match="not a JSON list"):
        dialect.parse_list(STAGE_LIP_SYNC, answer("query_object.json"))


def test_parse_list_page_parses_only_the_wanted_rows() -> None:
    dialect = KlingDialect()
    every = dialect.parse_list(STAGE_LIP_SYNC, answer("list.json"))
    for wanted in [set(), {"CjikY2gHPbcAAAAABI5n9g"}, {s.task_id for s in every}, {"other"}]:
        rows, found = dialect.parse_list_page(STAGE_LIP_SYNC, answer("list.json"), wanted)
        assert rows == len(every)
        assert found == [(i, s) for i, s in enumerate(every) if s.task_id in wanted]


def test_parse_list_page_skips_rows_it_does_not_follow_unread() -> None:
    # A row of some other task that would not parse does not fail the page: it is not read.
    good = json.loads((SAMPLES / "list.json").read_text())["data"][2]
    body = {"code": 0, "data": [{"task_id": "x", "task_status": "??"}, 7, good]}
    rows, found = KlingDialect().parse_list_page(STAGE_LIP_SYNC, answer(body), {good["task_id"]})
    assert rows == 3
    assert found == [(2, EXPECTED_SUCCESS)]
    with pytest.raises(ka.MalformedResponseError):  # a followed row that does not parse does
        KlingDialect().parse_list_page(STAGE_LIP_SYNC, answer(body), {"x"})
    with pytest.raises(ka.MalformedResponseError, match="not a JSON list"):
        KlingDialect().parse_list_page(STAGE_LIP_SYNC, answer("query_object.json"), {"x"})
    assert KlingDialect().parse_list_page(STAGE_LIP_SYNC, answer({"code": 0}), {"x"}) == (0, [])


# -- errors ---------------------------------------------------------------------------------------

# docs/protocol.md, Business codes: code -> (class, documented HTTP status).
BUSINESS_CODES: list[tuple[int, type[ka.APIError], int]] = [
    (1000, ka.AuthenticationError, 401),
    (1001, ka.AuthenticationError, 401),
    (1002, ka.AuthenticationError, 401),
    (1003, ka.AuthenticationError, 401),
    (1004, ka.AuthenticationError, 401),
    (1100, ka.AccountError, 429),
    (1101, ka.AccountError, 429),
    (1102, ka.AccountError, 429),
    (1103, ka.PermissionDeniedError, 403),
    (1200, ka.InvalidRequestError, 400),
    (1201, ka.InvalidRequestError, 400),
    (1202, ka.InvalidRequestError, 404),
    (1203, ka.NotFoundError, 404),
    (1300, ka.ContentPolicyError, 400),
    (1301, ka.ContentPolicyError, 400),
    (1302, ka.RateLimitError, 429),
    (1303, ka.ConcurrencyLimitError, 429),
    (1304, ka.PermissionDeniedError, 429),
    (5000, ka.ServerError, 500),
    (5001, ka.ServerError, 503),
    (5002, ka.ServerError, 504),
]


@pytest.mark.parametrize(("code", "cls", "documented"), BUSINESS_CODES)
@pytest.mark.parametrize("status", ["documented", 429, 200])
def test_business_codes_map_to_error_classes(
    code: int, cls: type[ka.APIError], documented: int, status: int | str
) -> None:
    http = documented if status == "documented" else int(status)
    body = sample("error_1303.json") | {"code": code, "message": f"error {code}"}
    for parse in (
        lambda r: KlingDialect().parse_submit(STAGE_LIP_SYNC, r),
        lambda r: KlingDialect().parse_query(STAGE_LIP_SYNC, "x", r),
        lambda r: KlingDialect().parse_list(STAGE_LIP_SYNC, r),
        lambda r: KlingDialect(advanced=True).parse_submit(STAGE_IDENTIFY_FACE, r),
    ):
        with pytest.raises(ka.APIError) as info:
            parse(answer(body, http))
        assert type(info.value) is cls
        assert (info.value.code, info.value.status) == (code, http)
        assert info.value.request_id == "CjQ2mWgHPbcAAAAABMx1aQ"
        assert info.value.message == f"error {code}"


@pytest.mark.parametrize(
    ("name", "status", "cls"),
    [
        ("error_1303.json", 429, ka.ConcurrencyLimitError),
        ("error_1303.json", 200, ka.ConcurrencyLimitError),
        ("error_1102.json", 429, ka.AccountError),
        ("error_1201.json", 400, ka.InvalidRequestError),
        ("error_1203.json", 404, ka.NotFoundError),
    ],
)
def test_error_samples(name: str, status: int, cls: type[ka.APIError]) -> None:
    with pytest.raises(cls) as info:
        KlingDialect().parse_submit(STAGE_LIP_SYNC, answer(name, status))
    assert info.value.message == sample(name)["message"]
    assert info.value.retryable is (cls is ka.ConcurrencyLimitError)


def test_retry_after_is_kept() -> None:
    response = HttpResponse(
        status=429, body=(SAMPLES / "error_1303.json").read_bytes(), headers={"retry-after": "3"}
    )
    with pytest.raises(ka.ConcurrencyLimitError) as info:
        KlingDialect().parse_submit(STAGE_LIP_SYNC, response)
    assert info.value.retry_after == 3.0


def test_html_error_page_is_a_server_error() -> None:
    page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    for status in (500, 502):
        with pytest.raises(ka.ServerError) as info:
            KlingDialect().parse_query(STAGE_LIP_SYNC, "x", HttpResponse(status=status, body=page))
        assert info.value.status == status


@pytest.mark.parametrize(
    "body",
    [b"<html>maintenance</html>", b"not json", b'{"code": 0, "data": ', b"[1, 2]", b'"ok"'],
)
def test_http_200_garbage_is_malformed(body: bytes) -> None:
    with pytest.raises(ka.MalformedResponseError) as info:
        KlingDialect().parse_submit(STAGE_LIP_SYNC, HttpResponse(status=200, body=body))
    assert info.value.status == 200


def mutate(name: str, path: list[str], value: object = ...) -> HttpResponse:
    body = sample(name)
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return answer(body)


@pytest.mark.parametrize(
    ("response", "words"),
    [
        (answer({"code": 0, "message": "SUCCEED"}), "no data"),
        (mutate("query_object.json", ["data", "task_id"]), "task_id"),
        (mutate("query_object.json", ["data", "task_status"]), "task_status is missing"),
        (mutate("query_object.json", ["data", "task_status"], "queued"), "'queued'"),
        (mutate("query_object.json", ["data", "task_status"], None), "task_status is missing"),
        (mutate("query_object.json", ["data", "created_at"], "yesterday"), "created_at"),
        (mutate("query_object.json", ["data", "created_at"], True), "created_at"),
        (mutate("query_object.json", ["data", "task_id"], None), "task_id"),
        (mutate("query_object.json", ["data", "task_info"], "oops"), "task_info"),
        (mutate("query_object.json", ["data", "task_result", "videos"], []), "succeeded without"),
        (mutate("query_object.json", ["data", "task_result"]), "succeeded without"),
        (answer({"code": 0, "data": "CjikY2gHPbcAAAAABI5n9g"}), "not a JSON object"),
    ],
)
def test_missing_or_ill_typed_fields_are_malformed(response: HttpResponse, words: str) -> None:
    with pytest.raises(ka.MalformedResponseError) as info:
        KlingDialect().parse_query(STAGE_LIP_SYNC, "CjikY2gHPbcAAAAABI5n9g", response)
    assert words in str(info.value)


def test_malformed_messages_stay_short() -> None:
    huge = "x" * 100_000
    for response in (
        mutate("query_object.json", ["data", "task_status"], huge),
        mutate("query_object.json", ["data", "created_at"], huge),
    ):
        with pytest.raises(ka.MalformedResponseError) as info:
            KlingDialect().parse_query(STAGE_LIP_SYNC, "CjikY2gHPbcAAAAABI5n9g", response)
        assert len(str(info.value)) < 300


# -- advanced lip-sync (official) -----------------------------------------------------------------


def advanced_job(**kw: Any) -> ka.LipSyncJob:
    options: dict[str, Any] = {"video_url": VIDEO, "audio_url": AUDIO, "sound_end_time": 5000}
    return ka.LipSyncJob.from_audio(**(options | kw))


def test_advanced_flow_by_hand() -> None:
    dialect = KlingDialect(prefix="/kling", advanced=True)
    job = advanced_job(
        face_index=1,
        sound_start_time=500,
        sound_insert_time=1200,
        sound_volume=1.5,
        original_audio_volume=0.2,
    )
    gen = dialect.flow(job, callback_url=HOOK)

    step1 = next(gen)
    assert step1.stage == STAGE_IDENTIFY_FACE
    assert step1.final is False
    assert (step1.request.method, step1.request.path) == ("POST", "/kling/v1/videos/identify-face")
    assert step1.request.json == {"video_url": VIDEO}
    assert step1.request.idempotent is False

    found = dialect.parse_submit(STAGE_IDENTIFY_FACE, answer("identify_face.json"))
    assert found.state is ka.TaskState.SUCCEEDED
    assert (found.task_id, found.session_id) == ("858401628226748502", "858401628226748502")
    assert found.faces == (
        ka.Face(
            face_id="0",
            image_url="https://cdn.klingai.com/bs2/upload-kling-api/face/858401628226748502-0.png",
            start_ms=0,
            end_ms=5200,
        ),
        ka.Face(
            face_id="1",
            image_url="https://cdn.klingai.com/bs2/upload-kling-api/face/858401628226748502-1.png",
            start_ms=1300,
            end_ms=9800,
        ),
    )

    step2 = gen.send(found)
    assert step2.stage == STAGE_ADVANCED_LIP_SYNC
    assert step2.final is True
    assert step2.request.path == "/kling/v1/videos/advanced-lip-sync"
    assert step2.request.idempotent is False
    assert step2.request.json == {
        "session_id": "858401628226748502",
        "face_choose": [
            {
                "face_id": "1",
                "sound_file": AUDIO,
                "sound_start_time": 500,
                "sound_end_time": 5000,
                "sound_insert_time": 1200,
                "sound_volume": 1.5,
                "original_audio_volume": 0.2,
            }
        ],
        "callback_url": HOOK,
    }

    submitted = dialect.parse_submit(STAGE_ADVANCED_LIP_SYNC, answer("advanced_submit.json"))
    assert (submitted.task_id, submitted.state) == ("858402133346770989", ka.TaskState.SUBMITTED)
    assert submitted.external_task_id is None
    done = dialect.parse_query(
        STAGE_ADVANCED_LIP_SYNC, "858402133346770989", answer("advanced_query.json")
    )
    assert done.state is ka.TaskState.SUCCEEDED
    assert done.external_task_id == "ep1-line3"
    assert done.video_url == (
        "https://cdn.klingai.com/bs2/upload-kling-api/advanced-lipsync/c3f1a2b4.mp4"
    )
    with pytest.raises(StopIteration) as stop:
        gen.send(done)
    assert stop.value.value is done


def identified() -> ka.TaskSnapshot:
    return KlingDialect(advanced=True).parse_submit(
        STAGE_IDENTIFY_FACE, answer("identify_face.json")
    )


def test_advanced_face_by_id_and_audio_file() -> None:
    job = advanced_job(audio_url=None, audio_file=MP3, face_id="0", face_index=1)
    gen = KlingDialect(advanced=True).flow(job)
    assert next(gen).request.path == "/v1/videos/identify-face"
    body = body_of(gen.send(identified()))
    assert body["face_choose"][0]["face_id"] == "0"  # face_id wins over face_index
    assert base64.b64decode(body["face_choose"][0]["sound_file"]) == MP3
    assert "callback_url" not in body
    assert no_nones(body)


def test_advanced_video_id_is_sent_to_identify_face() -> None:
    job = advanced_job(video_url=None, video_id="827964097668337738")
    step = next(KlingDialect(advanced=True).flow(job))
    assert step.request.json == {"video_id": "827964097668337738"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"face_index": 2}, "no face with index 2: the video has 2 faces"),
        ({"face_id": "7"}, "no face with id '7': the video has 2 faces: '0', '1'"),
    ],
)
def test_advanced_missing_face_fails_the_job(options: dict[str, Any], message: str) -> None:
    gen = KlingDialect(advanced=True).flow(advanced_job(**options))
    next(gen)
    with pytest.raises(StopIteration) as stop:
        gen.send(identified())
    result = stop.value.value
    assert result.state is ka.TaskState.FAILED
    assert result.message == message
    assert result.task_id == "858401628226748502"  # the identify-face "task" decided the job


def test_advanced_no_faces_at_all() -> None:
    body = sample("identify_face.json")
    body["data"]["face_data"] = []
    found = KlingDialect(advanced=True).parse_submit(STAGE_IDENTIFY_FACE, answer(body))
    gen = KlingDialect(advanced=True).flow(advanced_job())
    next(gen)
    with pytest.raises(StopIteration) as stop:
        gen.send(found)
    assert stop.value.value.message == "no face with index 0: the video has 0 faces"


def test_advanced_identify_face_failure_is_returned() -> None:
    failed = ka.TaskSnapshot(task_id="s1", state=ka.TaskState.FAILED, message="no face found")
    gen = KlingDialect(advanced=True).flow(advanced_job())
    next(gen)
    with pytest.raises(StopIteration) as stop:
        gen.send(failed)
    assert stop.value.value is failed


def test_identify_face_without_session_is_malformed() -> None:
    body = sample("identify_face.json")
    del body["data"]["session_id"]
    with pytest.raises(ka.MalformedResponseError, match="session_id"):
        KlingDialect(advanced=True).parse_submit(STAGE_IDENTIFY_FACE, answer(body))


def test_advanced_checks_jobs_before_any_request() -> None:
    dialect = KlingDialect(advanced=True)
    text_job = ka.LipSyncJob.from_text(video_url=VIDEO, text="hi", voice_id="v")
    with pytest.raises(ka.ValidationError) as info:
        dialect.flow(text_job)  # raised at once, not at next()
    assert info.value.field == "text"
    with pytest.raises(ka.ValidationError) as info:
        dialect.check_job(ka.LipSyncJob.from_audio(video_url=VIDEO, audio_url=AUDIO))
    assert info.value.field == "sound_end_time"
    KlingDialect().check_job(text_job)  # the basic dialect runs it
    dialect.check_job(advanced_job())


# -- callbacks ------------------------------------------------------------------------------------


def test_parse_callback_task_object() -> None:
    snap = KlingDialect().parse_callback((SAMPLES / "callback.json").read_bytes())
    assert snap == EXPECTED_SUCCESS


def test_parse_callback_in_an_envelope() -> None:
    task = sample("callback.json")
    dialect = KlingDialect()
    for envelope in (
        {"code": 0, "message": "SUCCEED", "request_id": "r", "data": task},
        {"code": 0, "data": [task]},
        {"data": task},
    ):
        assert dialect.parse_callback(json.dumps(envelope).encode()) == EXPECTED_SUCCESS


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html></html>",
        b"[]",
        b'{"code": 1303, "message": "busy", "data": null}',
        json.dumps({"task_id": "x"}).encode(),  # no task_status: a callback must say it
        "\xff".encode("latin-1"),
    ],
)
def test_bad_callbacks_are_malformed(body: bytes) -> None:
    with pytest.raises(ka.MalformedResponseError) as info:
        KlingDialect().parse_callback(body)
    assert info.value.status is None


# -- nulls where lists are expected ---------------------------------------------------------------


@pytest.mark.parametrize(
    "result",
    [{"videos": None}, {"videos": [{"id": None, "url": None}]}, {"videos": [{"url": ""}]}],
)
def test_a_failed_task_without_videos_reads_as_failed(result: object) -> None:
    """A failed task whose ``videos`` is null (an empty list as Go servers write it), or holds a
    placeholder without a URL, is failed: it was unreadable, and its job waited for the time-out.
    """
    body = sample("query_failed.json")
    body["data"]["task_result"] = result
    task_id = body["data"]["task_id"]
    parsers: tuple[Callable[[], ka.TaskSnapshot], ...] = (
        lambda: KlingDialect().parse_query(STAGE_LIP_SYNC, task_id, answer(body)),
        lambda: KlingDialect().parse_list(STAGE_LIP_SYNC, answer({**body, "data": [body["data"]]}))[
            0
        ],
        lambda: KlingDialect().parse_callback(json.dumps(body["data"]).encode()),
    )
    for parse in parsers:
        snapshot = parse()
        assert snapshot.state is ka.TaskState.FAILED
        assert snapshot.message == "there is no human in the video"
        assert snapshot.video_urls == ()


def test_a_running_task_with_null_videos_is_running() -> None:
    body = sample("query_failed.json")
    body["data"].update(task_status="processing", task_result={"videos": None})
    snapshot = KlingDialect().parse_query(STAGE_LIP_SYNC, body["data"]["task_id"], answer(body))
    assert snapshot.state is ka.TaskState.PROCESSING


def test_a_success_with_null_videos_is_still_malformed() -> None:
    body = sample("query_failed.json")
    body["data"].update(task_status="succeed", task_result={"videos": None})
    with pytest.raises(ka.MalformedResponseError, match="succeeded without"):
        KlingDialect().parse_query(STAGE_LIP_SYNC, body["data"]["task_id"], answer(body))


def test_identify_face_with_null_face_data_finds_no_face() -> None:
    """``face_data: null`` is a video without faces: the job fails naming that, before a
    lip-sync task; it was a malformed answer to a submit that may have been billed."""
    body = sample("identify_face.json")
    body["data"]["face_data"] = None
    dialect = KlingDialect(advanced=True)
    job = ka.LipSyncJob.from_audio(video_url=VIDEO, audio_url=AUDIO, sound_end_time=4000)
    flow = dialect.flow(job)
    next(flow)
    found = dialect.parse_submit(STAGE_IDENTIFY_FACE, answer(body))
    assert found.faces == () and found.session_id == "858401628226748502"
    with pytest.raises(StopIteration) as stopped:
        flow.send(found)
    ended = stopped.value.value
    assert ended.state is ka.TaskState.FAILED and "0 faces" in (ended.message or "")


def test_new_form_callback_with_null_lists() -> None:
    body = {"id": "t1", "status": "failed", "message": "policy", "outputs": None, "billing": None}
    snapshot = KlingDialect().parse_callback(json.dumps(body).encode())
    assert (snapshot.state, snapshot.message, snapshot.units) == (
        ka.TaskState.FAILED,
        "policy",
        None,
    )


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_task_id_is_malformed(empty: str) -> None:
    """An empty id names no task: a submit so answered is unclear, never a task to poll."""
    dialect = KlingDialect()
    body = sample("submit.json")
    body["data"]["task_id"] = empty
    with pytest.raises(ka.MalformedResponseError, match=r"data\.task_id is empty"):
        dialect.parse_submit(STAGE_LIP_SYNC, answer(body))
    task = sample("query_failed.json")["data"]
    task["task_id"] = empty
    with pytest.raises(ka.MalformedResponseError, match="task_id is empty"):
        dialect.parse_callback(json.dumps(task).encode())
    with pytest.raises(ka.MalformedResponseError, match=r"callback\.id is empty"):
        dialect.parse_callback(json.dumps({"id": empty, "status": "submitted"}).encode())
