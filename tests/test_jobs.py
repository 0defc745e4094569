"""Every input rule of LipSyncJob (docs/protocol.md: the Submit table, Advanced lip-sync)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kling_async import KlingError, LipSyncJob, ValidationError
from kling_async._jobs import AUDIO_FORMATS, MAX_AUDIO_BYTES, MAX_TEXT_LENGTH, sniff_audio_format

VIDEO = "https://cdn.example.com/clips/face.mp4"
AUDIO = "https://cdn.example.com/audio/line.mp3"

# Tiny headers that look like the real containers' first bytes.
WAV = b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + bytes(24)
MP3_ID3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(16)
MP3_FRAME = b"\xff\xfb\x90\x64" + bytes(16)  # MPEG-1 layer III frame sync
MP3_MPEG25 = b"\xff\xe3\x18\xc4" + bytes(16)  # MPEG-2.5 layer III
M4A = b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + bytes(8)
AAC = b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(16)  # ADTS, MPEG-4, no CRC
AAC_MPEG2 = b"\xff\xf9\x50\x80\x02\x1f\xfc" + bytes(16)  # ADTS, MPEG-2, no CRC

SETTINGS = settings(max_examples=60, deadline=None)


def assert_invalid(field: str, build: Callable[[], object]) -> ValidationError:
    """Build must raise a ValidationError that is a ValueError and a KlingError naming field."""
    with pytest.raises(ValidationError) as info:
        build()
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, KlingError)
    assert err.field == field, str(err)
    assert str(err).startswith(f"{field}:"), str(err)
    assert err.rule
    return err


def text_job(**overrides: Any) -> LipSyncJob:
    kwargs: dict[str, Any] = {"video_url": VIDEO, "text": "Hello there", "voice_id": "voice-1"}
    kwargs.update(overrides)
    return LipSyncJob.from_text(**kwargs)


def audio_job(**overrides: Any) -> LipSyncJob:
    kwargs: dict[str, Any] = {"video_url": VIDEO, "audio_url": AUDIO}
    kwargs.update(overrides)
    return LipSyncJob.from_audio(**kwargs)


# --- valid jobs -------------------------------------------------------------------------------


def test_text_job_keeps_its_fields() -> None:
    job = text_job(voice_language="en", voice_speed=1.5, key="ep1-line3")
    assert job.mode == "text2video"
    assert (job.video_url, job.video_id) == (VIDEO, None)
    assert (job.text, job.voice_id, job.voice_language, job.voice_speed) == (
        "Hello there",
        "voice-1",
        "en",
        1.5,
    )
    assert job.key == "ep1-line3"
    assert job.audio_url is None
    assert job.audio_file is None


def test_audio_job_by_url_and_by_video_id() -> None:
    job = LipSyncJob.from_audio(video_id="8603283743127425093", audio_url=AUDIO)
    assert job.mode == "audio2video"
    assert job.video_id == "8603283743127425093"
    assert job.video_url is None
    assert job.audio_url == AUDIO
    assert job.audio_file is None


def test_pass_through_options_are_kept() -> None:
    job = audio_job(
        source_task_id="task-9",
        callback_url="https://hooks.example.com/kling?secret=x",
        sound_start_time=500,
        sound_end_time=2500,
        sound_insert_time=100,
        sound_volume=2,
        original_audio_volume=0,
        face_index=3,
        face_id="face-1",
        key="k",
    )
    assert job.source_task_id == "task-9"
    assert job.callback_url == "https://hooks.example.com/kling?secret=x"
    assert (job.sound_start_time, job.sound_end_time, job.sound_insert_time) == (500, 2500, 100)
    assert (job.sound_volume, job.original_audio_volume) == (2, 0)
    assert (job.face_index, job.face_id) == (3, "face-1")


def test_defaults() -> None:
    job = audio_job()
    assert job.voice_speed == 1.0
    assert job.voice_language is None
    assert (job.sound_start_time, job.sound_end_time, job.sound_insert_time) == (0, None, 0)
    assert (job.sound_volume, job.original_audio_volume, job.face_index) == (1.0, 1.0, 0)
    assert job.face_id is None
    assert job.key is None
    assert job.callback_url is None


@pytest.mark.parametrize("url", ["http://example.com/a.mp4", "HTTPS://EXAMPLE.COM/a.mov",
                                 "https://127.0.0.1:8080/x", "https://[::1]/x",
                                 "https://user@host.example/a.mp4"])  # fmt: skip
def test_valid_urls(url: str) -> None:
    job = LipSyncJob.from_audio(video_url=url, audio_url=url, callback_url=url)
    assert job.video_url == job.audio_url == job.callback_url == url


# --- video ------------------------------------------------------------------------------------


def test_video_needs_exactly_one_source() -> None:
    assert_invalid("video_url", lambda: LipSyncJob.from_audio(audio_url=AUDIO))
    assert_invalid(
        "video_url",
        lambda: LipSyncJob.from_audio(video_url=VIDEO, video_id="123", audio_url=AUDIO),
    )
    assert_invalid("video_url", lambda: LipSyncJob.from_text(text="hi", voice_id="v"))


@pytest.mark.parametrize("video_id", ["", "   ", 123])
def test_video_id_must_be_non_blank_string(video_id: object) -> None:
    assert_invalid("video_id", lambda: LipSyncJob.from_audio(video_id=video_id, audio_url=AUDIO))  # type: ignore[arg-type]


BAD_URLS: list[object] = [
    "",
    "cdn.example.com/a.mp4",
    "/relative/a.mp4",
    "ftp://example.com/a.mp4",
    "file:///tmp/a.mp4",
    "https://",
    "https:///a.mp4",
    "https://:80/a.mp4",
    "https://user@/a.mp4",
    "http://[::1/a.mp4",
    "https://host:99999/a.mp4",
    "https://host:port/a.mp4",
    "data:audio/mp3;base64,AAAA",
    123,
    b"https://example.com/a.mp4",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_video_url_must_be_http_with_host(url: object) -> None:
    assert_invalid("video_url", lambda: audio_job(video_url=url))


@pytest.mark.parametrize("url", BAD_URLS)
def test_audio_url_must_be_http_with_host(url: object) -> None:
    assert_invalid("audio_url", lambda: audio_job(audio_url=url))


@pytest.mark.parametrize("url", BAD_URLS)
def test_callback_url_must_be_http_with_host(url: object) -> None:
    assert_invalid("callback_url", lambda: text_job(callback_url=url))
    assert_invalid("callback_url", lambda: audio_job(callback_url=url))


@SETTINGS
@given(scheme=st.text(alphabet="abcdefghijklmnopqrstuvwxyz+", min_size=1, max_size=8))
def test_only_http_schemes(scheme: str) -> None:
    url = f"{scheme}://example.com/a.mp4"
    if scheme in ("http", "https"):
        assert audio_job(video_url=url).video_url == url
    else:
        assert_invalid("video_url", lambda: audio_job(video_url=url))


# --- text jobs --------------------------------------------------------------------------------


@SETTINGS
@given(text=st.text(min_size=1, max_size=MAX_TEXT_LENGTH).filter(lambda t: t.strip()))
def test_any_non_blank_text_up_to_120_characters_is_valid(text: str) -> None:
    job = text_job(text=text)
    assert job.text == text
    assert job.mode == "text2video"


@SETTINGS
@given(text=st.text(min_size=MAX_TEXT_LENGTH + 1, max_size=500))
def test_text_over_120_characters_is_refused(text: str) -> None:
    assert_invalid("text", lambda: text_job(text=text))


@SETTINGS
@given(text=st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000", max_size=MAX_TEXT_LENGTH))
def test_blank_text_is_refused(text: str) -> None:
    assert_invalid("text", lambda: text_job(text=text))


def test_text_boundaries() -> None:
    assert text_job(text="x").text == "x"
    assert text_job(text="字" * 120).text == "字" * 120
    assert_invalid("text", lambda: text_job(text="字" * 121))


@pytest.mark.parametrize("text", [None, 42, b"hello"])
def test_text_must_be_a_string(text: object) -> None:
    assert_invalid("text", lambda: text_job(text=text))


@pytest.mark.parametrize("voice_id", [None, "", "   ", 7])
def test_text_job_needs_a_voice(voice_id: object) -> None:
    assert_invalid("voice_id", lambda: text_job(voice_id=voice_id))


@pytest.mark.parametrize("language", ["zh", "en", None])
def test_voice_language_zh_or_en(language: str | None) -> None:
    assert text_job(voice_language=language).voice_language == language


@pytest.mark.parametrize("language", ["fr", "ZH", "EN", "", "zh-CN", 1])
def test_other_voice_languages_are_refused(language: object) -> None:
    assert_invalid("voice_language", lambda: text_job(voice_language=language))


@SETTINGS
@given(tenths=st.integers(min_value=8, max_value=20))
def test_any_speed_in_tenths_from_08_to_20_is_valid(tenths: int) -> None:
    assert text_job(voice_speed=tenths / 10).voice_speed == tenths / 10


@pytest.mark.parametrize("speed", [1, 2, 0.8, 2.0, 1.1, 1.7, 0.9])
def test_speed_examples(speed: float) -> None:
    assert text_job(voice_speed=speed).voice_speed == speed


@SETTINGS
@given(
    speed=st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda s: math.isnan(s) or not 0.8 <= s <= 2.0
    )
)
def test_speed_outside_the_range_is_refused(speed: float) -> None:
    assert_invalid("voice_speed", lambda: text_job(voice_speed=speed))


@SETTINGS
@given(hundredths=st.integers(min_value=80, max_value=200).filter(lambda h: h % 10))
def test_speed_with_two_decimals_is_refused(hundredths: int) -> None:
    assert_invalid("voice_speed", lambda: text_job(voice_speed=hundredths / 100))


@pytest.mark.parametrize("speed", [True, "1.0", None, 0.79, 2.01, 1.05])
def test_speed_odd_values(speed: object) -> None:
    assert_invalid("voice_speed", lambda: text_job(voice_speed=speed))


def test_text_job_takes_no_audio() -> None:
    assert_invalid("audio_url", lambda: text_job(audio_url=AUDIO))
    assert_invalid("audio_file", lambda: text_job(audio_file=MP3_ID3))


def test_audio_job_takes_no_voice() -> None:
    assert_invalid(
        "voice_id", lambda: LipSyncJob(video_url=VIDEO, audio_url=AUDIO, voice_id="voice-1")
    )


# --- audio jobs: url or bytes -----------------------------------------------------------------


def test_audio_needs_exactly_one_source() -> None:
    assert_invalid("audio_url", lambda: LipSyncJob.from_audio(video_url=VIDEO))
    assert_invalid("audio_url", lambda: audio_job(audio_file=MP3_ID3))


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (WAV, "wav"),
        (MP3_ID3, "mp3"),
        (MP3_FRAME, "mp3"),
        (MP3_MPEG25, "mp3"),
        (M4A, "m4a"),
        (AAC, "aac"),
        (AAC_MPEG2, "aac"),
    ],
)
def test_audio_bytes_format_is_sniffed(data: bytes, fmt: str) -> None:
    assert sniff_audio_format(data) == fmt
    job = LipSyncJob.from_audio(video_url=VIDEO, audio_file=data)
    assert job.audio_file == data
    assert job.audio_format == fmt
    assert job.audio_url is None
    assert job.mode == "audio2video"


@pytest.mark.parametrize(
    "data",
    [
        b"OggS\x00\x02" + bytes(20),  # Ogg Vorbis
        b"fLaC" + bytes(20),
        b"RIFF\x24\x00\x00\x00AVI LIST",  # RIFF, but a video
        b"<html>not audio</html>",
        b"\xff",
        b"\xff\x00\x00\x00",
        b"\x00" * 32,
    ],
)
def test_unknown_audio_bytes_are_refused(data: bytes) -> None:
    assert sniff_audio_format(data) is None
    assert_invalid("audio_file", lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=data))


@SETTINGS
@given(data=st.binary(max_size=64))
def test_sniffing_never_raises(data: bytes) -> None:
    assert sniff_audio_format(data) in (*AUDIO_FORMATS, None)


def test_explicit_audio_format_is_trusted_and_checked() -> None:
    job = LipSyncJob.from_audio(video_url=VIDEO, audio_file=b"\x01\x02\x03", audio_format="aac")
    assert job.audio_format == "aac"
    assert_invalid(
        "audio_file",
        lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=MP3_ID3, audio_format="ogg"),
    )


@pytest.mark.parametrize("data", [b"", bytearray(MP3_ID3), memoryview(MP3_ID3), 12, ["x"]])
def test_audio_file_must_be_bytes_or_path(data: object) -> None:
    assert_invalid(
        "audio_file",
        lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=data),  # type: ignore[arg-type]
    )


def test_audio_bytes_size_limit() -> None:
    at_limit = MP3_ID3 + bytes(MAX_AUDIO_BYTES - len(MP3_ID3))
    assert len(LipSyncJob.from_audio(video_url=VIDEO, audio_file=at_limit).audio_file or b"") == (
        MAX_AUDIO_BYTES
    )
    assert_invalid(
        "audio_file",
        lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=at_limit + b"\x00"),
    )


# --- audio jobs: a path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "fmt"),
    [
        ("line.mp3", MP3_ID3, "mp3"),
        ("line.wav", WAV, "wav"),
        ("line.m4a", M4A, "m4a"),
        ("line.aac", AAC, "aac"),
        ("LINE.MP3", MP3_FRAME, "mp3"),
    ],
)
def test_audio_path_is_read_once_with_format_from_suffix(
    tmp_path: Path, name: str, data: bytes, fmt: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    job = LipSyncJob.from_audio(video_url=VIDEO, audio_file=path)
    assert job.audio_file == data
    assert job.audio_format == fmt
    path.unlink()  # the job holds the bytes, not the path
    assert job.audio_file == data
    assert str(tmp_path) not in repr(job)  # the bytes are kept, not the path


def test_audio_path_as_str(tmp_path: Path) -> None:
    path = tmp_path / "line.wav"
    path.write_bytes(WAV)
    job = LipSyncJob.from_audio(video_url=VIDEO, audio_file=str(path))
    assert (job.audio_file, job.audio_format) == (WAV, "wav")


@pytest.mark.parametrize("name", ["line.ogg", "line.flac", "line", "line.mp3.txt", "line.mp4"])
def test_audio_path_needs_a_known_suffix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(MP3_ID3)
    assert_invalid("audio_file", lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=path))


def test_audio_path_size_limit(tmp_path: Path) -> None:
    ok = tmp_path / "ok.mp3"
    ok.write_bytes(MP3_ID3 + bytes(MAX_AUDIO_BYTES - len(MP3_ID3)))
    assert LipSyncJob.from_audio(video_url=VIDEO, audio_file=ok).audio_format == "mp3"
    big = tmp_path / "big.mp3"
    big.write_bytes(MP3_ID3 + bytes(MAX_AUDIO_BYTES - len(MP3_ID3) + 1))
    err = assert_invalid(
        "audio_file", lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=big)
    )
    assert "5 MB" in str(err)


def test_missing_audio_path(tmp_path: Path) -> None:
    err = assert_invalid(
        "audio_file",
        lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=tmp_path / "missing.mp3"),
    )
    assert "cannot be read" in str(err)


def test_directory_as_audio_path(tmp_path: Path) -> None:
    folder = tmp_path / "folder.mp3"
    folder.mkdir()
    assert_invalid("audio_file", lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=folder))


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="root (or Windows) reads any file"
)
def test_unreadable_audio_path(tmp_path: Path) -> None:
    path = tmp_path / "secret.wav"
    path.write_bytes(WAV)
    path.chmod(0)
    try:
        assert_invalid(
            "audio_file", lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=path)
        )
    finally:
        path.chmod(0o600)


def test_empty_audio_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp3"
    path.write_bytes(b"")
    assert_invalid("audio_file", lambda: LipSyncJob.from_audio(video_url=VIDEO, audio_file=path))


# --- advanced lip-sync fields -----------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["sound_start_time", "sound_end_time", "sound_insert_time"]
)  # fmt: skip
@pytest.mark.parametrize("value", [-1, 1.5, 2000.0, "2000", True])
def test_timings_are_non_negative_whole_milliseconds(field: str, value: object) -> None:
    assert_invalid(field, lambda: audio_job(**{field: value}))


@SETTINGS
@given(start=st.integers(0, 10**8), length=st.integers(2000, 60_000), insert=st.integers(0, 10**8))
def test_two_to_sixty_seconds_of_audio_is_valid(start: int, length: int, insert: int) -> None:
    job = audio_job(sound_start_time=start, sound_end_time=start + length, sound_insert_time=insert)
    assert job.sound_end_time is not None
    assert job.sound_end_time - job.sound_start_time == length


@SETTINGS
@given(start=st.integers(0, 10**8), length=st.integers(60_001, 10**8))
def test_more_than_sixty_seconds_of_audio_is_refused(start: int, length: int) -> None:
    end = start + length
    assert_invalid("sound_end_time", lambda: audio_job(sound_start_time=start, sound_end_time=end))


@SETTINGS
@given(start=st.integers(0, 10**8), length=st.integers(-(10**8), 1999))
def test_less_than_two_seconds_of_audio_is_refused(start: int, length: int) -> None:
    # A negative end breaks the "at least 0" rule, any other the "2 s after start" rule: both
    # name sound_end_time.
    end = start + length
    assert_invalid("sound_end_time", lambda: audio_job(sound_start_time=start, sound_end_time=end))


def test_sound_end_time_boundaries() -> None:
    assert audio_job(sound_end_time=2000).sound_end_time == 2000
    assert_invalid("sound_end_time", lambda: audio_job(sound_end_time=1999))
    assert_invalid("sound_end_time", lambda: audio_job(sound_end_time=0))
    assert_invalid("sound_end_time", lambda: audio_job(sound_start_time=5000, sound_end_time=5000))
    assert_invalid("sound_end_time", lambda: audio_job(sound_start_time=5000, sound_end_time=4000))


@pytest.mark.parametrize("field", ["sound_volume", "original_audio_volume"])
@SETTINGS
@given(volume=st.floats(min_value=0, max_value=2))
def test_volumes_from_0_to_2_are_valid(field: str, volume: float) -> None:
    assert getattr(audio_job(**{field: volume}), field) == volume


@pytest.mark.parametrize("field", ["sound_volume", "original_audio_volume"])
@pytest.mark.parametrize(
    "volume", [-0.01, 2.01, -1, 3, math.nan, math.inf, -math.inf, True, "1", None]
)
def test_volumes_outside_0_to_2_are_refused(field: str, volume: object) -> None:
    assert_invalid(field, lambda: audio_job(**{field: volume}))


@pytest.mark.parametrize("index", [-1, 1.0, True, "0", None])
def test_face_index_is_a_whole_number_at_least_0(index: object) -> None:
    assert_invalid("face_index", lambda: audio_job(face_index=index))


@SETTINGS
@given(index=st.integers(min_value=0, max_value=10**6))
def test_any_non_negative_face_index_is_valid(index: int) -> None:
    assert audio_job(face_index=index).face_index == index


@pytest.mark.parametrize("face_id", ["", "  ", 5])
def test_face_id_must_be_non_blank(face_id: object) -> None:
    assert_invalid("face_id", lambda: audio_job(face_id=face_id))


# --- key --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   ", "\n", 7])
def test_key_must_be_non_blank(key: object) -> None:
    assert_invalid("key", lambda: text_job(key=key))
    assert_invalid("key", lambda: audio_job(key=key))


# --- value semantics --------------------------------------------------------------------------


def test_repr_hides_audio_bytes() -> None:
    data = WAV + bytes(1000)
    text = repr(LipSyncJob.from_audio(video_url=VIDEO, audio_file=data))
    assert f"audio_file=<{len(data)} bytes>" in text
    assert "RIFF" not in text
    assert "\\x00" not in text
    assert "audio_file=None" in repr(audio_job())


def test_jobs_are_frozen() -> None:
    job = text_job()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        job.text = "changed"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        job.audio_format = "mp3"  # type: ignore[misc]
    assert job.text == "Hello there"


def test_jobs_are_equal_and_hashable_by_value() -> None:
    a = LipSyncJob.from_audio(video_url=VIDEO, audio_file=WAV, key="k")
    b = LipSyncJob.from_audio(video_url=VIDEO, audio_file=bytes(WAV), key="k")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, text_job(), text_job()}) == 2
    assert a != LipSyncJob.from_audio(video_url=VIDEO, audio_file=WAV, key="other")
    assert text_job(voice_speed=1.0) == text_job(voice_speed=1)
    assert text_job() != text_job(voice_language="en")


def test_evolve_revalidates() -> None:
    job = text_job()
    assert attrs.evolve(job, text="Goodbye").text == "Goodbye"
    assert_invalid("text", lambda: attrs.evolve(job, text=""))


def test_construction_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        LipSyncJob(VIDEO)  # type: ignore[call-arg]  # positional on purpose
    with pytest.raises(TypeError):
        LipSyncJob.from_text("hi", "voice")  # type: ignore[call-arg]  # positional on purpose


@pytest.mark.parametrize(
    ("field", "value"), [("voice_language", "en"), ("voice_language", "fr"), ("voice_speed", 1.5)]
)
def test_audio_jobs_refuse_voice_options(field: str, value: object) -> None:
    # A voice option on an audio job would be silently ignored: say so instead.
    option: dict[str, Any] = {field: value}  # a voice option: from_audio's ``**options: Any``
    with pytest.raises(ValidationError) as info:
        LipSyncJob.from_audio(
            video_url="https://example.com/v.mp4",
            audio_url="https://example.com/a.mp3",
            **option,
        )
    assert info.value.field == field
