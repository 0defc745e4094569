"""Lip-sync jobs: what a user asks for, checked against every documented rule before any request.

The rules come from docs/protocol.md (the Submit table, Advanced lip-sync and apimodels.app).
Each is enforced here so that a bad job fails at once with a :class:`ValidationError` naming the
field, instead of costing a request (or a task) later.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import attrs

from ._audio import audio_seconds
from ._errors import ValidationError
from ._http import check_http_url
from ._identity import check_external_id

__all__ = ["AUDIO_FORMATS", "MAX_AUDIO_BYTES", "MAX_TEXT_LENGTH", "LipSyncJob"]

#: Audio formats the service accepts (docs/protocol.md, Submit: ``input.audio_file``).
AUDIO_FORMATS = ("mp3", "wav", "m4a", "aac")
#: Largest audio file the service accepts, in bytes.
MAX_AUDIO_BYTES = 5 * 1024 * 1024
#: Longest text a text2video job may speak, in characters.
MAX_TEXT_LENGTH = 120
#: Shortest stretch of audio advanced lip-sync accepts, in milliseconds.
MIN_SOUND_MS = 2000
#: Longest stretch of audio advanced lip-sync accepts, in milliseconds.
MAX_SOUND_MS = 60_000
#: Slack allowed when checking a trim against an audio length read from a header (ms).
LENGTH_SLACK_MS = 50

Mode = Literal["text2video", "audio2video"]
VoiceLanguage = Literal["zh", "en"]


def sniff_audio_format(data: bytes) -> str | None:
    """Guess an audio container from its first bytes: one of :data:`AUDIO_FORMATS`, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[4:8] == b"ftyp":
        return "m4a"
    if data[:3] == b"ID3":
        return "mp3"
    if len(data) >= 2 and data[0] == 0xFF:
        # MPEG frame sync: 11 set bits.  Layer bits 00 mark ADTS (AAC), others MPEG audio (MP3).
        if data[1] & 0xF6 == 0xF0:
            return "aac"
        if data[1] & 0xE0 == 0xE0:
            return "mp3"
    return None


def _check_url(field: str, value: str | None) -> None:
    if value is not None:
        check_http_url(field, value)


def _check_ms(field: str, value: int | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValidationError(field, "must be a whole number of milliseconds, at least 0")


def _check_volume(field: str, value: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and 0 <= value <= 2):
        raise ValidationError(field, "must be a number from 0 to 2")


def _audio_repr(value: bytes | None) -> str:
    return "None" if value is None else f"<{len(value)} bytes>"


@attrs.frozen(kw_only=True)
class LipSyncJob:
    """One "make this face say this" job.

    Build it with :meth:`from_text` or :meth:`from_audio`; the constructor checks every rule and
    raises :class:`ValidationError` (a ``ValueError``) naming the field and the rule.

    The face comes from ``video_url`` (an .mp4/.mov reachable over http(s)) or ``video_id`` (a
    Kling-generated video), exactly one of them.  A text job speaks ``text`` with ``voice_id``; an
    audio job lip-syncs ``audio_url``, the raw bytes of ``audio_file`` or, in official advanced
    lip-sync, ``audio_id`` (an audio made by Kling's text-to-speech).  The ``sound_*``,
    ``face_*`` and volume fields only matter to advanced lip-sync (apimodels, or the official
    advanced API), in milliseconds; ``watermark`` (official advanced lip-sync) asks for a
    watermarked copy as well (``True``) or explicitly none (``False``).  ``key`` names the job
    in results, journals and file names.  ``external_task_id`` is your own unique name for the
    task (official advanced lip-sync only: at most 64 ASCII letters, digits, ``-``, ``_`` or
    ``.``, unique on the account); without one, a batch derives one where the dialect supports
    it (see the README's "Guarantees").
    """

    video_url: str | None = None
    video_id: str | None = None
    source_task_id: str | None = None
    text: str | None = None
    voice_id: str | None = None
    voice_language: VoiceLanguage | None = None
    voice_speed: float = 1.0
    audio_url: str | None = None
    audio_file: bytes | None = attrs.field(default=None, repr=_audio_repr)
    audio_format: str | None = None
    audio_id: str | None = None
    watermark: bool | None = None
    sound_start_time: int = 0
    sound_end_time: int | None = None
    sound_insert_time: int = 0
    sound_volume: float = 1.0
    original_audio_volume: float = 1.0
    face_index: int = 0
    face_id: str | None = None
    callback_url: str | None = None
    key: str | None = None
    external_task_id: str | None = None

    def __attrs_post_init__(self) -> None:
        self._check_video()
        if self.text is not None:
            self._check_text()
        else:
            self._check_audio()
        self._check_advanced()
        _check_url("callback_url", self.callback_url)
        if self.external_task_id is not None:
            check_external_id(self.external_task_id)
        if self.key is not None and (not isinstance(self.key, str) or not self.key.strip()):
            raise ValidationError("key", "must be a non-blank string")

    @property
    def mode(self) -> Mode:
        """``text2video`` when the job speaks text, ``audio2video`` when it brings audio."""
        return "text2video" if self.text is not None else "audio2video"

    @classmethod
    def from_text(
        cls,
        *,
        text: str,
        voice_id: str,
        video_url: str | None = None,
        video_id: str | None = None,
        voice_language: VoiceLanguage | None = None,
        voice_speed: float = 1.0,
        **options: Any,
    ) -> LipSyncJob:
        """A job whose face speaks ``text`` (1-120 characters) in voice ``voice_id``.

        ``voice_language`` is ``"zh"`` or ``"en"`` and must match the voice (the server's
        default is ``"zh"``); ``voice_speed`` runs from 0.8 to 2.0 with one decimal place.
        Other keyword options (``key``, ``callback_url``, ``source_task_id``) pass through.
        """
        if text is None:
            raise ValidationError("text", "is required for a text job")
        return cls(
            video_url=video_url,
            video_id=video_id,
            text=text,
            voice_id=voice_id,
            voice_language=voice_language,
            voice_speed=voice_speed,
            **options,
        )

    @classmethod
    def from_audio(
        cls,
        *,
        video_url: str | None = None,
        video_id: str | None = None,
        audio_url: str | None = None,
        audio_file: bytes | str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> LipSyncJob:
        """A job whose face lip-syncs to audio: ``audio_url``, or ``audio_file`` as bytes or a path.

        The audio must be .mp3, .wav, .m4a or .aac and at most 5 MB; a path is read here, once.
        Advanced lip-sync options (``sound_start_time``, ``sound_end_time``,
        ``sound_insert_time``, ``sound_volume``, ``original_audio_volume``, ``face_index`` or
        ``face_id``, ``audio_id`` instead of ``audio_url`` / ``audio_file``, ``watermark``) and
        ``key``, ``callback_url``, ``source_task_id``, ``external_task_id`` pass through.
        """
        data: bytes | None
        fmt: str | None = options.pop("audio_format", None)
        if audio_file is None or isinstance(audio_file, bytes):
            data = audio_file
        elif isinstance(audio_file, (os.PathLike, str)):
            data, fmt = _read_audio_path(Path(audio_file))
        else:
            raise ValidationError("audio_file", "must be bytes or a filesystem path")
        return cls(
            video_url=video_url,
            video_id=video_id,
            audio_url=audio_url,
            audio_file=data,
            audio_format=fmt,
            **options,
        )

    def _check_video(self) -> None:
        if (self.video_url is None) == (self.video_id is None):
            raise ValidationError("video_url", "give exactly one of video_url and video_id")
        _check_url("video_url", self.video_url)
        video_id = self.video_id
        if video_id is not None and (not isinstance(video_id, str) or not video_id.strip()):
            raise ValidationError("video_id", "must be a non-blank string")

    def _check_text(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValidationError("text", "must be a non-blank string")
        if len(self.text) > MAX_TEXT_LENGTH:
            raise ValidationError("text", f"must be at most {MAX_TEXT_LENGTH} characters")
        if not isinstance(self.voice_id, str) or not self.voice_id.strip():
            raise ValidationError("voice_id", "is required for a text job")
        if self.voice_language not in (None, "zh", "en"):
            raise ValidationError("voice_language", "must be 'zh' or 'en'")
        speed = self.voice_speed
        if (
            not isinstance(speed, (int, float))
            or isinstance(speed, bool)
            or not math.isfinite(speed)
        ):
            raise ValidationError("voice_speed", "must be a number from 0.8 to 2.0")
        if not 0.8 <= speed <= 2.0:
            raise ValidationError("voice_speed", "must be from 0.8 to 2.0")
        if abs(speed * 10 - round(speed * 10)) > 1e-9:
            raise ValidationError("voice_speed", "must have at most one decimal place")
        for field in ("audio_url", "audio_file", "audio_id"):
            if getattr(self, field) is not None:
                raise ValidationError(field, "a text job takes no audio")

    def _check_audio(self) -> None:
        if self.voice_id is not None:
            raise ValidationError("voice_id", "only a text job takes a voice")
        if self.voice_language is not None:
            raise ValidationError("voice_language", "only a text job takes a voice language")
        if self.voice_speed != 1.0:
            raise ValidationError("voice_speed", "only a text job takes a voice speed")
        sources = [self.audio_url, self.audio_file, self.audio_id]
        if sum(source is not None for source in sources) != 1:
            raise ValidationError(
                "audio_url", "give exactly one of audio_url, audio_file and audio_id"
            )
        _check_url("audio_url", self.audio_url)
        audio_id = self.audio_id
        if audio_id is not None and (not isinstance(audio_id, str) or not audio_id.strip()):
            raise ValidationError("audio_id", "must be a non-blank string")
        if self.audio_file is None:
            return
        if not isinstance(self.audio_file, bytes) or not self.audio_file:
            raise ValidationError("audio_file", "must be non-empty bytes or a path")
        if len(self.audio_file) > MAX_AUDIO_BYTES:
            raise ValidationError("audio_file", "must be at most 5 MB")
        fmt = self.audio_format or sniff_audio_format(self.audio_file)
        if fmt not in AUDIO_FORMATS:
            raise ValidationError("audio_file", "must be .mp3, .wav, .m4a or .aac audio")
        if self.audio_format is None:
            object.__setattr__(self, "audio_format", fmt)

    def audio_seconds(self) -> float | None:
        """How long ``audio_file`` plays, read from its header; None when it cannot be told.

        WAV always; MP3, M4A and AAC with the ``audio`` extra (mutagen) installed.  An
        ``audio_url`` or ``audio_id`` is not fetched: None.
        """
        if self.audio_file is None:
            return None
        return audio_seconds(self.audio_file, self.audio_format)

    def _check_advanced(self) -> None:
        # docs/protocol.md, Advanced lip-sync: times in ms, what is left after trimming
        # 2-60 s and within the audio, volumes 0-2.
        _check_ms("sound_start_time", self.sound_start_time)
        _check_ms("sound_end_time", self.sound_end_time, optional=True)
        _check_ms("sound_insert_time", self.sound_insert_time)
        if self.watermark is not None and not isinstance(self.watermark, bool):
            raise ValidationError("watermark", "must be True or False")
        if self.sound_end_time is not None:
            if self.sound_end_time <= self.sound_start_time:
                raise ValidationError("sound_end_time", "must be after sound_start_time")
            if self.sound_end_time - self.sound_start_time < MIN_SOUND_MS:
                raise ValidationError(
                    "sound_end_time", "must leave at least 2 s (2000 ms) of audio"
                )
            if self.sound_end_time - self.sound_start_time > MAX_SOUND_MS:
                raise ValidationError("sound_end_time", "must leave at most 60 s of audio")
        if self.sound_end_time is not None or self.sound_start_time:
            self._check_trim_within_audio()
        _check_volume("sound_volume", self.sound_volume)
        _check_volume("original_audio_volume", self.original_audio_volume)
        index = self.face_index
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValidationError("face_index", "must be a whole number, at least 0")
        face_id = self.face_id
        if face_id is not None and (not isinstance(face_id, str) or not face_id.strip()):
            raise ValidationError("face_id", "must be a non-blank string")

    def _check_trim_within_audio(self) -> None:
        seconds = self.audio_seconds()
        if seconds is None:
            return  # an URL, an audio_id, or a format whose header cannot be read here
        length = seconds * 1000 + LENGTH_SLACK_MS
        if self.sound_end_time is not None and self.sound_end_time > length:
            raise ValidationError(
                "sound_end_time", f"must be within the audio ({seconds * 1000:.0f} ms long)"
            )
        if self.sound_start_time + MIN_SOUND_MS > length:
            raise ValidationError(
                "sound_start_time",
                f"must leave at least 2 s of the audio ({seconds * 1000:.0f} ms long)",
            )


def _read_audio_path(path: Path) -> tuple[bytes, str]:
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in AUDIO_FORMATS:
        raise ValidationError("audio_file", "must be a .mp3, .wav, .m4a or .aac file")
    try:
        size = path.stat().st_size
        if size > MAX_AUDIO_BYTES:
            raise ValidationError("audio_file", "must be at most 5 MB")
        return path.read_bytes(), suffix
    except OSError as exc:
        raise ValidationError("audio_file", f"cannot be read ({exc.strerror})") from None
