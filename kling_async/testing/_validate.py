"""Request checks the real servers make, as 1201 refusals whose message names the field.

The rules are those of docs/protocol.md (the Submit table, Advanced lip-sync, and apimodels.app
for apimodels).  They are written out here again on purpose: the fake server is the other side of
the wire and must catch mistakes in the dialect modules, so it shares none of their code.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

from .._jobs import MAX_AUDIO_BYTES, MAX_TEXT_LENGTH
from ._state import FaceSession
from ._wire import Refusal

__all__ = [
    "check_callback_url",
    "check_face_choose",
    "check_lip_sync",
    "check_video_source",
    "check_watermark",
    "is_http_url",
]

MODES = ("text2video", "audio2video")
# Volumes of advanced lip-sync run from 0 to 2 (docs/protocol.md, Advanced lip-sync).
MAX_VOLUME = 2.0
# What is left of the audio after trimming: 2 to 60 s, in ms; it must overlap the face's
# lip-sync interval by 2 s (docs/protocol.md, Advanced lip-sync).
MIN_SOUND_MS, MAX_SOUND_MS, MIN_OVERLAP_MS = 2000, 60_000, 2000


def _fail(field: str, rule: str) -> NoReturn:
    raise Refusal(1201, f"{field}: {rule}")


def is_http_url(value: object) -> bool:
    """Whether ``value`` is an http(s) URL with a host."""
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_blank(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_callback_url(body: Mapping[str, Any]) -> str | None:
    """The top-level ``callback_url``, checked; None when absent."""
    url = body.get("callback_url")
    if url is None:
        return None
    if not is_http_url(url):
        _fail("callback_url", "must be an http(s) URL")
    return str(url)


def check_video_source(fields: Mapping[str, Any], where: str = "") -> None:
    """Exactly one of ``video_id`` / ``video_url``, each well-formed (``""`` counts as absent)."""
    video_id, video_url = fields.get("video_id"), fields.get("video_url")
    if video_id == "":
        video_id = None  # gateway samples send "video_id": "" beside a video_url
    if (video_id is None) == (video_url is None):
        _fail(f"{where}video_id", f"give exactly one of {where}video_id and {where}video_url")
    if video_url is not None and not is_http_url(video_url):
        _fail(f"{where}video_url", "must be an http(s) URL")
    if video_id is not None and not _non_blank(video_id):
        _fail(f"{where}video_id", "must be a non-empty string")


def check_lip_sync(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """Check an official lip-sync submit body; return its ``input`` object."""
    fields = body.get("input")
    if not isinstance(fields, dict):
        _fail("input", "is required and must be an object")
    mode = fields.get("mode")
    if mode not in MODES:
        _fail("input.mode", "must be text2video or audio2video")
    check_video_source(fields, "input.")
    if mode == "text2video":
        _check_text(fields)
    else:
        _check_audio(fields)
    check_callback_url(body)
    return fields


def _check_text(fields: Mapping[str, Any]) -> None:
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        _fail("input.text", "is required for text2video")
    if len(text) > MAX_TEXT_LENGTH:
        _fail("input.text", f"must be at most {MAX_TEXT_LENGTH} characters")
    if not _non_blank(fields.get("voice_id")):
        _fail("input.voice_id", "is required for text2video")
    if fields.get("voice_language") not in (None, "zh", "en"):
        _fail("input.voice_language", "must be zh or en")
    speed = fields.get("voice_speed", 1.0)
    if not _is_number(speed) or not 0.8 <= speed <= 2.0:
        _fail("input.voice_speed", "must be a number from 0.8 to 2.0")


def _check_audio(fields: Mapping[str, Any]) -> None:
    audio_type = fields.get("audio_type")
    if audio_type == "url":
        if not is_http_url(fields.get("audio_url")):
            _fail("input.audio_url", "is required for audio_type url and must be an http(s) URL")
        return
    if audio_type != "file":
        _fail("input.audio_type", "must be file or url for audio2video")
    raw = fields.get("audio_file")
    if not isinstance(raw, str) or not raw.strip():
        _fail("input.audio_file", "is required for audio_type file")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        _fail("input.audio_file", "must be valid base64")
    if len(data) > MAX_AUDIO_BYTES:
        _fail("input.audio_file", "must be at most 5 MB")


def check_face_choose(
    body: Mapping[str, Any], session: FaceSession, *, official: bool
) -> list[Mapping[str, Any]]:
    """Check ``face_choose`` against ``session``'s faces; return the list.

    The official API takes one face, each with ``audio_id`` or ``sound_file`` and all three
    times in ms; apimodels takes several faces and needs ``sound_file`` (docs/protocol.md,
    Advanced lip-sync and apimodels.app).
    """
    choices = body.get("face_choose")
    if not isinstance(choices, list) or not choices:
        _fail("face_choose", "is required and must be a non-empty list")
    if official and len(choices) != 1:
        _fail("face_choose", "must hold exactly one face")
    known = {face.face_id: face for face in session.faces}
    for index, choice in enumerate(choices):
        where = f"face_choose[{index}]"
        if not isinstance(choice, dict):
            _fail(where, "must be an object")
        face = known.get(choice.get("face_id"))  # type: ignore[arg-type]
        if face is None:
            _fail(f"{where}.face_id", "is not a face of this session")
        _check_sound(choice, where, official=official)
        if official:
            _check_trim(choice, where, face.start_ms, face.end_ms)
    return choices


def check_watermark(body: Mapping[str, Any]) -> bool:
    """``watermark_info``: absent, or ``{"enabled": true|false}``; whether a copy is wanted."""
    info = body.get("watermark_info")
    if info is None:
        return False
    if not isinstance(info, dict) or not isinstance(info.get("enabled"), bool):
        _fail("watermark_info", 'must be {"enabled": true} or {"enabled": false}')
    return bool(info["enabled"])


def _check_trim(choice: Mapping[str, Any], where: str, face_start: int, face_end: int) -> None:
    start, end = choice["sound_start_time"], choice["sound_end_time"]
    if not MIN_SOUND_MS <= end - start <= MAX_SOUND_MS:
        _fail(f"{where}.sound_end_time", "must leave 2 to 60 s of audio after trimming")
    insert = choice["sound_insert_time"]
    overlap = min(insert + end - start, face_end) - max(insert, face_start)
    if overlap < MIN_OVERLAP_MS:
        _fail(f"{where}.sound_insert_time", "must overlap the face's interval by at least 2 s")


def _check_sound(choice: Mapping[str, Any], where: str, *, official: bool) -> None:
    sound_file, audio_id = choice.get("sound_file"), choice.get("audio_id")
    if official:
        if (sound_file is None) == (audio_id is None):
            _fail(f"{where}.sound_file", "give exactly one of audio_id and sound_file")
        if audio_id is not None and not _non_blank(audio_id):
            _fail(f"{where}.audio_id", "must be a non-empty string")
    elif sound_file is None:
        _fail(f"{where}.sound_file", "is required")
    if sound_file is not None and not _non_blank(sound_file):
        _fail(f"{where}.sound_file", "must be a URL or base64 audio")
    for name in ("sound_start_time", "sound_end_time", "sound_insert_time"):
        value = choice.get(name)
        if value is None and not official:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(f"{where}.{name}", "must be a whole number of ms, at least 0")
    start, end = choice.get("sound_start_time"), choice.get("sound_end_time")
    if isinstance(start, int) and isinstance(end, int) and end <= start:
        _fail(f"{where}.sound_end_time", "must be after sound_start_time")
    for name in ("sound_volume", "original_audio_volume"):
        volume = choice.get(name)
        if volume is not None and not (_is_number(volume) and 0 <= volume <= MAX_VOLUME):
            _fail(f"{where}.{name}", "must be a number from 0 to 2")
