"""How long an audio file plays, read from its header (no decoding, no I/O: bytes in memory).

WAV is read with the standard library's :mod:`wave` (exact: frames / rate).  MP3, M4A and AAC
need their container parsed (MPEG frame headers and Xing/VBRI tables, MP4 atoms, ADTS frames):
that is what mutagen does well, so it is used when installed (the ``audio`` extra,
``pip install 'kling-async[audio]'``).  Without it those formats have no known duration, and
what needs one (an estimate, the "trim ends within the audio" check) treats it as unknown.
"""

from __future__ import annotations

import contextlib
import io
import math
import wave

__all__ = ["audio_seconds"]


def audio_seconds(data: bytes, fmt: str | None) -> float | None:
    """The playing time of ``data`` (an audio file of format ``fmt``) in seconds, or None."""
    if fmt == "wav":
        seconds = _wav_seconds(data)
        if seconds is not None:
            return seconds
    return _mutagen_seconds(data)


def _wav_seconds(data: bytes) -> float | None:
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            frames, rate = reader.getnframes(), reader.getframerate()
    except (wave.Error, EOFError, ValueError):
        return None  # not PCM (wave reads PCM only), or a broken header: try mutagen
    return frames / rate if rate > 0 else None


def _mutagen_seconds(data: bytes) -> float | None:
    try:
        import mutagen
    except ImportError:  # the optional "audio" extra is not installed
        return None
    parsed = None
    with contextlib.suppress(Exception):  # mutagen raises many kinds on broken files
        parsed = mutagen.File(io.BytesIO(data))
    length = getattr(getattr(parsed, "info", None), "length", None)
    if isinstance(length, (int, float)) and math.isfinite(length) and length > 0:
        return float(length)
    return None
