"""The apimodels.app dialect, driven by hand over vendor-shaped samples.

The samples follow docs/protocol.md, apimodels.app.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kling_async._errors import (
    AccountError,
    APIError,
    AuthenticationError,
    InvalidRequestError,
    MalformedResponseError,
    NotFoundError,
    ServerError,
    ValidationError,
)
from kling_async._http import HttpResponse
from kling_async._jobs import LipSyncJob
from kling_async._results import Face, TaskSnapshot, TaskState
from kling_async.dialects import ApimodelsDialect, Dialect, LipSyncFlow, Submit

SAMPLES = Path(__file__).parent / "samples" / "apimodels"
VIDEO = "https://example.com/video.mp4"
AUDIO = "https://example.com/line.mp3"
MP3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(range(256))

dialect = ApimodelsDialect()


def sample(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SAMPLES / f"{name}.json").read_text())
    return loaded


def answer(name: str, status: int = 200) -> HttpResponse:
    return HttpResponse(status=status, body=(SAMPLES / f"{name}.json").read_bytes())


def answer_of(body: object, status: int = 200) -> HttpResponse:
    return HttpResponse(status=status, body=json.dumps(body).encode())


def query(name: str, stage: str = "identify-face") -> TaskSnapshot:
    task_id = sample(name)["data"]["taskId"]
    return dialect.parse_query(stage, task_id, answer(name))


def start(flow: LipSyncFlow) -> Submit:
    return next(flow)


def finish(flow: LipSyncFlow, snapshot: TaskSnapshot) -> TaskSnapshot:
    with pytest.raises(StopIteration) as stop:
        flow.send(snapshot)
    result: TaskSnapshot = stop.value.value
    return result


def audio_job(**options: Any) -> LipSyncJob:
    options.setdefault("audio_url", AUDIO)
    return LipSyncJob.from_audio(video_url=VIDEO, **options)


# --- the protocol and its constants -----------------------------------------------------------


def test_is_a_dialect_without_list_query() -> None:
    as_protocol: Dialect = dialect
    assert as_protocol.name == "apimodels"
    assert dialect.default_stage == "advanced-lip-sync"
    assert dialect.list_page_size == 0
    assert dialect.list_request("advanced-lip-sync", 1, 30) is None
    with pytest.raises(NotImplementedError):
        dialect.parse_list("advanced-lip-sync", answer("query_failed"))


@pytest.mark.parametrize("stage", ["identify-face", "advanced-lip-sync"])
def test_query_request_is_the_same_for_both_stages(stage: str) -> None:
    request = dialect.query_request(stage, "clx7identify0001")
    assert request.method == "GET"
    assert request.path == "/api/v1/audio/generations"
    assert request.params == (("task_id", "clx7identify0001"),)
    assert request.idempotent
    assert request.url("https://apimodels.app") == (
        "https://apimodels.app/api/v1/audio/generations?task_id=clx7identify0001"
    )


def test_query_request_refuses_an_empty_task_id() -> None:
    with pytest.raises(ValidationError) as caught:
        dialect.query_request("advanced-lip-sync", "")
    assert caught.value.field == "task_id"


# --- jobs it cannot run -----------------------------------------------------------------------


def test_text_job_is_refused() -> None:
    job = LipSyncJob.from_text(video_url=VIDEO, text="Hello", voice_id="voice-1")
    with pytest.raises(ValidationError) as caught:
        dialect.check_job(job)
    assert caught.value.field == "text"
    assert "audio, not text" in str(caught.value)
    with pytest.raises(ValidationError):
        dialect.flow(job)  # at once, not at the first next()


def test_video_id_job_is_refused() -> None:
    job = LipSyncJob.from_audio(video_id="kling-video-1", audio_url=AUDIO)
    with pytest.raises(ValidationError) as caught:
        dialect.flow(job)
    assert caught.value.field == "video_id"


def test_audio_url_job_is_accepted() -> None:
    dialect.check_job(audio_job())


# --- the flow ---------------------------------------------------------------------------------


def test_identify_face_request() -> None:
    step = start(dialect.flow(audio_job()))
    assert step.stage == "identify-face"
    assert step.final is False  # the video comes from the next step
    assert step.request.method == "POST"
    assert step.request.path == "/api/v1/audio/generations"
    assert step.request.idempotent is False
    assert step.request.json == {"model": "kling-identify-face", "video_url": VIDEO}


def test_full_flow_by_index_with_audio_url() -> None:
    flow = dialect.flow(audio_job(sound_insert_time=500, sound_volume=1.5))
    start(flow)
    lip_sync = flow.send(query("query_identify_face_completed"))
    assert lip_sync.stage == "advanced-lip-sync"
    assert lip_sync.final is True
    assert lip_sync.request.method == "POST"
    assert lip_sync.request.path == "/api/v1/audio/generations"
    assert lip_sync.request.idempotent is False
    # No None fields: sound_end_time is left out when the job sets none.
    assert lip_sync.request.json == {
        "model": "kling-advanced-lip-sync",
        "session_id": "session_abc123",
        "face_choose": [
            {
                "face_id": "face_001",
                "sound_file": AUDIO,
                "sound_start_time": 0,
                "sound_insert_time": 500,
                "sound_volume": 1.5,
                "original_audio_volume": 1.0,
            }
        ],
    }
    done = query("query_advanced_lip_sync_completed", "advanced-lip-sync")
    assert finish(flow, done) == done


def test_sound_end_time_is_sent_when_set() -> None:
    flow = dialect.flow(audio_job(sound_start_time=1000, sound_end_time=4000))
    start(flow)
    body = flow.send(query("query_identify_face_completed")).request.json
    assert isinstance(body, dict)
    (choice,) = body["face_choose"]
    assert choice["sound_start_time"] == 1000
    assert choice["sound_end_time"] == 4000


def test_audio_file_is_sent_as_base64() -> None:
    flow = dialect.flow(LipSyncJob.from_audio(video_url=VIDEO, audio_file=MP3))
    start(flow)
    body = flow.send(query("query_identify_face_completed")).request.json
    assert isinstance(body, dict)
    sound_file = body["face_choose"][0]["sound_file"]
    assert sound_file == base64.b64encode(MP3).decode("ascii")
    assert base64.b64decode(sound_file) == MP3


@pytest.mark.parametrize("options", [{"face_index": 1}, {"face_id": "face_002"}])
def test_face_chosen_by_index_or_id(options: dict[str, Any]) -> None:
    flow = dialect.flow(audio_job(**options))
    start(flow)
    body = flow.send(query("query_identify_face_completed_two_faces")).request.json
    assert isinstance(body, dict)
    assert body["session_id"] == "session_def456"
    assert [choice["face_id"] for choice in body["face_choose"]] == ["face_002"]


def test_face_id_wins_over_face_index() -> None:
    flow = dialect.flow(audio_job(face_id="face_001", face_index=1))
    start(flow)
    body = flow.send(query("query_identify_face_completed_two_faces")).request.json
    assert isinstance(body, dict)
    assert body["face_choose"][0]["face_id"] == "face_001"


@pytest.mark.parametrize("index", [1, 2])
def test_missing_face_index_fails_without_a_second_submit(index: int) -> None:
    flow = dialect.flow(audio_job(face_index=index))
    start(flow)
    identified = query("query_identify_face_completed")
    result = finish(flow, identified)
    assert result.state is TaskState.FAILED
    assert result.task_id == identified.task_id == "clx7identify0001"
    assert result.message == f"no face with index {index}: the video has 1 face"
    assert result.faces == identified.faces  # kept, so the user can pick another


def test_missing_face_id_fails_naming_the_faces() -> None:
    flow = dialect.flow(audio_job(face_id="face_009"))
    start(flow)
    result = finish(flow, query("query_identify_face_completed_two_faces"))
    assert result.state is TaskState.FAILED
    assert result.task_id == "clx7identify0002"
    assert result.message == (
        "no face with id 'face_009': the video has 2 faces: 'face_001', 'face_002'"
    )


def test_no_faces_at_all() -> None:
    body = sample("query_identify_face_completed")
    body["data"]["faceData"]["face_list"] = []
    flow = dialect.flow(audio_job())
    start(flow)
    result = finish(flow, dialect.parse_query("identify-face", "clx7identify0001", answer_of(body)))
    assert result.state is TaskState.FAILED
    assert result.message == "no face with index 0: the video has 0 faces"


def test_failed_identify_face_ends_the_flow() -> None:
    flow = dialect.flow(audio_job())
    start(flow)
    failed = query("query_failed")
    result = finish(flow, failed)
    assert result is failed
    assert result.message == "Face detection failed: no faces found"


def test_failed_lip_sync_is_the_result() -> None:
    flow = dialect.flow(audio_job())
    start(flow)
    flow.send(query("query_identify_face_completed"))
    failed = dialect.parse_callback((SAMPLES / "callback_failed.json").read_bytes())
    assert finish(flow, failed) is failed


@pytest.mark.parametrize(
    ("argument", "on_job", "expected"),
    [
        ("https://hooks.example.com/a", None, "https://hooks.example.com/a"),
        (
            "https://hooks.example.com/a",
            "https://hooks.example.com/b",
            "https://hooks.example.com/a",
        ),
        (None, "https://hooks.example.com/b", "https://hooks.example.com/b"),
    ],
)
def test_callback_url_in_both_bodies(
    argument: str | None, on_job: str | None, expected: str
) -> None:
    flow = dialect.flow(audio_job(callback_url=on_job), callback_url=argument)
    first = start(flow).request.json
    second = flow.send(query("query_identify_face_completed")).request.json
    assert isinstance(first, dict)
    assert isinstance(second, dict)
    assert first["callback_url"] == expected
    assert second["callback_url"] == expected


# --- parsing answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stage"),
    [
        ("create_identify_face", "identify-face"),
        ("create_advanced_lip_sync", "advanced-lip-sync"),
    ],
)
def test_parse_submit(name: str, stage: str) -> None:
    snapshot = dialect.parse_submit(stage, answer(name))
    assert snapshot.task_id == sample(name)["data"]["taskId"]
    assert snapshot.state is TaskState.SUBMITTED
    assert snapshot.video_urls == ()


def test_parse_submit_needs_a_task_id() -> None:
    body = sample("create_identify_face")
    del body["data"]["taskId"]
    with pytest.raises(MalformedResponseError, match=r"data\.taskId"):
        dialect.parse_submit("identify-face", answer_of(body))


def test_parse_submit_without_state_keeps_the_task() -> None:
    body = sample("create_identify_face")
    del body["data"]["state"]
    snapshot = dialect.parse_submit("identify-face", answer_of(body))
    assert snapshot.state is TaskState.SUBMITTED
    assert snapshot.task_id == "clx7identify0001"


def test_parse_query_processing() -> None:
    snapshot = query("query_identify_face_processing")
    assert snapshot.state is TaskState.PROCESSING
    assert snapshot.task_id == "clx7identify0001"


def test_parse_query_identify_face_completed() -> None:
    snapshot = query("query_identify_face_completed")
    assert snapshot.state is TaskState.SUCCEEDED
    assert snapshot.session_id == "session_abc123"
    assert snapshot.faces == (
        Face(face_id="face_001", image_url="https://r2.apimodels.app/faces/face_001_thumbnail.jpg"),
    )
    assert snapshot.video_urls == ()


@pytest.mark.parametrize(
    "name", ["query_advanced_lip_sync_completed", "query_advanced_lip_sync_completed_duration"]
)
def test_parse_query_lip_sync_completed(name: str) -> None:
    snapshot = query(name, "advanced-lip-sync")
    assert snapshot.state is TaskState.SUCCEEDED
    assert snapshot.video_urls == tuple(sample(name)["data"]["resultUrls"])
    assert snapshot.video_url is not None
    assert snapshot.video_url.endswith(".mp4")
    assert snapshot.session_id is None
    assert snapshot.faces == ()


@pytest.mark.parametrize(
    ("name", "code"), [("query_failed", None), ("query_failed_with_code", "FACE_NOT_FOUND")]
)
def test_parse_query_failed(name: str, code: str | None) -> None:
    snapshot = query(name)
    assert snapshot.state is TaskState.FAILED
    assert snapshot.message == "Face detection failed: no faces found"
    assert snapshot.error_code == code


def test_the_model_decides_the_stage() -> None:
    # get_task() passes the default stage; an identify-face answer must still parse as one.
    snapshot = query("query_identify_face_completed", "advanced-lip-sync")
    assert snapshot.session_id == "session_abc123"


def test_times_are_seconds() -> None:
    body = sample("query_advanced_lip_sync_completed")
    body["data"].update(createTime=1705123450000, completeTime=1705123500000)
    snapshot = dialect.parse_query("advanced-lip-sync", "clx7lipsync00001", answer_of(body))
    assert snapshot.created_at == 1705123450.0
    assert snapshot.updated_at == 1705123500.0


def test_query_answer_about_another_task() -> None:
    with pytest.raises(MalformedResponseError, match="another task"):
        dialect.parse_query("identify-face", "someone-else", answer("query_failed"))


def test_query_answer_without_task_id_is_about_the_asked_task() -> None:
    body = sample("query_failed")
    del body["data"]["taskId"]
    snapshot = dialect.parse_query("identify-face", "asked", answer_of(body))
    assert snapshot.task_id == "asked"


@pytest.mark.parametrize(
    ("name", "field", "expected"),
    [
        ("query_advanced_lip_sync_completed", "resultUrls", "resultUrls"),
        ("query_identify_face_completed", "faceData", "faceData"),
    ],
)
def test_completed_without_its_product_is_malformed(name: str, field: str, expected: str) -> None:
    body = sample(name)
    del body["data"][field]
    with pytest.raises(MalformedResponseError, match=expected):
        dialect.parse_query("advanced-lip-sync", body["data"]["taskId"], answer_of(body))


def test_completed_lip_sync_with_empty_result_urls_is_malformed() -> None:
    body = sample("query_advanced_lip_sync_completed")
    body["data"]["resultUrls"] = []
    with pytest.raises(MalformedResponseError, match="resultUrls"):
        dialect.parse_query("advanced-lip-sync", "clx7lipsync00001", answer_of(body))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"state": "done"}, "unknown task state 'done'"),
        ({"state": None}, r"data\.state"),
        ({"taskId": 12345}, r"expected a string @ data\.taskId"),
        ({"resultUrls": "https://x/a.mp4"}, r"expected a list @ data\.resultUrls"),
        ({"resultUrls": [1]}, r"data\.resultUrls\[0\]"),
        ({"faceData": "face_001"}, r"expected a JSON object @ data\.faceData"),
        ({"faceData": {"face_list": []}}, r"required field missing @ data\.faceData\.session_id"),
        (
            {"faceData": {"session_id": "s", "face_list": [{"face_reference": "u"}]}},
            r"data\.faceData\.face_list\[0\]\.face_id",
        ),
        ({"failCode": [1]}, r"data\.failCode"),
        ({"createTime": "yesterday"}, r"expected a number @ data\.createTime"),
        ({"createTime": True}, r"data\.createTime"),
    ],
)
def test_ill_typed_fields_are_named(change: dict[str, Any], named: str) -> None:
    body = sample("query_identify_face_processing")
    body["data"].update(change)
    with pytest.raises(MalformedResponseError, match=named) as caught:
        dialect.parse_query("identify-face", "clx7identify0001", answer_of(body))
    assert caught.value.status == 200


@pytest.mark.parametrize("data", [None, [], "pending", 7])
def test_data_that_is_not_an_object(data: object) -> None:
    with pytest.raises(MalformedResponseError, match="data is missing or not a JSON object"):
        dialect.parse_query(
            "identify-face", "t", answer_of({"code": 200, "msg": "success", "data": data})
        )


# --- error answers ----------------------------------------------------------------------------


def parse_as_submit(response: HttpResponse) -> TaskSnapshot:
    return dialect.parse_submit("identify-face", response)


def parse_as_query(response: HttpResponse) -> TaskSnapshot:
    return dialect.parse_query("advanced-lip-sync", "clx7lipsync00001", response)


@pytest.mark.parametrize("parse", [parse_as_submit, parse_as_query])
@pytest.mark.parametrize(
    ("name", "status", "error"),
    [
        ("error_400", 400, InvalidRequestError),
        ("error_401", 401, AuthenticationError),
        ("error_402", 402, AccountError),
        ("error_404", 404, NotFoundError),
        ("error_500", 500, ServerError),
    ],
)
def test_error_bodies(
    name: str, status: int, error: type[APIError], parse: Callable[[HttpResponse], TaskSnapshot]
) -> None:
    with pytest.raises(error) as caught:
        parse(answer(name, status))
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.code == status
    assert caught.value.message == sample(name)["msg"]


def test_error_code_with_http_200() -> None:
    # Some gateways answer business errors with HTTP 200 and only the body code
    # (docs/protocol.md, Business codes).
    with pytest.raises(AccountError):
        dialect.parse_submit("identify-face", answer("error_402", 200))


def test_html_error_page() -> None:
    page = HttpResponse(status=502, body=b"<html><body>Bad Gateway</body></html>")
    with pytest.raises(ServerError) as caught:
        dialect.parse_query("identify-face", "t", page)
    assert caught.value.status == 502


@pytest.mark.parametrize("body", [b"<html>OK</html>", b"\xff\xfe\x00garbage", b'{"code": 200,'])
def test_garbage_with_http_200(body: bytes) -> None:
    with pytest.raises(MalformedResponseError) as caught:
        dialect.parse_submit("identify-face", HttpResponse(status=200, body=body))
    assert caught.value.status == 200


def test_empty_body_with_http_200() -> None:
    with pytest.raises(MalformedResponseError):
        dialect.parse_query("identify-face", "t", HttpResponse(status=200, body=b""))


# --- callbacks --------------------------------------------------------------------------------


def callback(name: str) -> bytes:
    return (SAMPLES / f"{name}.json").read_bytes()


def test_callback_completed() -> None:
    snapshot = dialect.parse_callback(callback("callback_completed"))
    assert snapshot.task_id == "clx7lipsync00001"
    assert snapshot.state is TaskState.SUCCEEDED
    assert snapshot.video_urls == ("https://r2.apimodels.app/videos/lip_synced.mp4",)
    assert snapshot.message is None
    assert snapshot.error_code is None
    assert snapshot.created_at == 1705123450.0
    assert snapshot.updated_at == 1705123500.0


@pytest.mark.parametrize("name", ["callback_failed", "callback_failed_empty_result"])
def test_callback_failed(name: str) -> None:
    data = sample(name)["data"]
    snapshot = dialect.parse_callback(callback(name))
    assert snapshot.task_id == data["taskId"]
    assert snapshot.state is TaskState.FAILED
    assert snapshot.message == "Face detection failed: no faces found"
    assert snapshot.error_code == data["failCode"]
    assert snapshot.video_urls == ()


def test_callback_of_identify_face_keeps_video_and_faces() -> None:
    face_data = {"session_id": "session_abc123", "face_list": [{"face_id": "face_001"}]}
    body = {
        "code": 200,
        "msg": "success",
        "data": {
            "taskId": "clx7identify0001",
            "model": "kling-video/kling-identify-face",
            "state": "completed",
            "param": json.dumps({"model": "kling-identify-face", "video_url": VIDEO}),
            "resultJson": json.dumps({"faceData": face_data}),
            "failCode": None,
            "failMsg": None,
        },
    }
    snapshot = dialect.parse_callback(json.dumps(body).encode())
    assert snapshot.parent_video_url == VIDEO
    assert snapshot.session_id == "session_abc123"
    assert snapshot.faces == (Face(face_id="face_001"),)


def test_callback_with_decoded_result_object_is_accepted() -> None:
    body = sample("callback_completed")
    body["data"]["resultJson"] = {"resultUrls": ["https://r2.apimodels.app/videos/x.mp4"]}
    snapshot = dialect.parse_callback(json.dumps(body).encode())
    assert snapshot.video_urls == ("https://r2.apimodels.app/videos/x.mp4",)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("param", "{not json", r"not valid JSON.*@ data\.param"),
        ("param", "[1, 2]", r"expected a JSON object.*@ data\.param"),
        ("resultJson", '{"resultUrls": ', r"not valid JSON.*@ data\.resultJson"),
        ("resultJson", '{"resultUrls": "x"}', r"@ data\.resultJson\.resultUrls"),
        ("state", "queued", "unknown task state"),
    ],
)
def test_broken_callback_fields(field: str, value: str, named: str) -> None:
    body = sample("callback_completed")
    body["data"][field] = value
    with pytest.raises(MalformedResponseError, match=named):
        dialect.parse_callback(json.dumps(body).encode())


def test_completed_callback_without_result_is_malformed() -> None:
    body = sample("callback_completed")
    body["data"]["resultJson"] = None
    with pytest.raises(MalformedResponseError, match="resultUrls"):
        dialect.parse_callback(json.dumps(body).encode())


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"[1, 2]", b'{"code": 200}', b'{"data": {"state": "failed"}}']
)
def test_unreadable_callback_bodies(body: bytes) -> None:
    with pytest.raises(MalformedResponseError):
        dialect.parse_callback(body)


@pytest.mark.parametrize(
    ("duration", "expected"),
    [(8, 8.0), ("8.04", 8.04), ("8", 8.0), ("eight", None), (None, None), ([8], None)],
)
def test_video_duration_is_read_leniently(duration: object, expected: float | None) -> None:
    """A figure beside the result never makes a completed (paid-for) task unreadable."""
    body = sample("query_advanced_lip_sync_completed")
    body["data"]["videoDuration"] = duration
    snapshot = dialect.parse_query("advanced-lip-sync", "clx7lipsync00001", answer_of(body))
    assert snapshot.state is TaskState.SUCCEEDED and snapshot.video_urls
    got = snapshot.returned.video_duration if snapshot.returned else None
    assert got == expected


def test_times_sent_as_numeric_strings_are_read() -> None:
    body = sample("query_advanced_lip_sync_completed")
    body["data"].update(createTime="1705123450000", completeTime="1705123500000.0")
    snapshot = dialect.parse_query("advanced-lip-sync", "clx7lipsync00001", answer_of(body))
    assert (snapshot.created_at, snapshot.updated_at) == (1705123450.0, 1705123500.0)


def test_callback_figures_sent_as_strings_are_read() -> None:
    body = sample("callback_completed")
    body["data"]["resultJson"] = json.dumps(
        {"resultUrls": ["https://r2.apimodels.app/videos/x.mp4"], "videoDuration": "8.0"}
    )
    body["data"]["completeTime"] = "1705123500000"
    snapshot = dialect.parse_callback(json.dumps(body).encode())
    assert snapshot.video_urls == ("https://r2.apimodels.app/videos/x.mp4",)
    assert snapshot.returned is not None and snapshot.returned.video_duration == 8.0
    assert snapshot.updated_at == 1705123500.0


def test_identify_face_with_null_face_list_finds_no_face() -> None:
    """``face_list: null`` is no face: the job fails at once, naming that; the completed
    identify-face answer was unreadable, and the job waited for its time-out."""
    body = sample("query_identify_face_completed")
    body["data"]["faceData"]["face_list"] = None
    snapshot = dialect.parse_query("identify-face", body["data"]["taskId"], answer_of(body))
    assert snapshot.state is TaskState.SUCCEEDED and snapshot.faces == ()
    assert snapshot.session_id == body["data"]["faceData"]["session_id"]


def test_parse_submit_with_an_empty_task_id_is_malformed() -> None:
    body = sample("create_identify_face")
    body["data"]["taskId"] = ""
    with pytest.raises(MalformedResponseError, match="taskId is missing"):
        dialect.parse_submit("identify-face", answer_of(body))
