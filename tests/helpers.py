"""Small builders shared by the engine tests (no mocks: everything talks to FakeKlingServer)."""

from __future__ import annotations

import io
import wave
from typing import Any

import kling_async as ka
from kling_async._batch import Batch
from kling_async.testing import ROUTES, FakeKlingServer

API_KEY = "sk-sandbox"

#: Polling fast enough for tests: the fake server's tasks take tens of milliseconds.
FAST_POLL = ka.PollPolicy(first_delay=0.01, max_interval=0.03, multiplier=1.5, timeout=10.0)
FAST_RETRY = ka.RetryPolicy(
    max_attempts=6, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01
)

#: A few bytes that sniff as WAV audio.
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 32


def text_job(n: int, **extra: Any) -> ka.LipSyncJob:
    return ka.LipSyncJob.from_text(
        video_url=f"https://example.com/clip-{n}.mp4",
        text=f"line {n}",
        voice_id="girlfriend_1_speech02",
        voice_language="en",
        **extra,
    )


def journal_job(video_url: str | None, n: int = 0) -> ka.LipSyncJob:
    """A text job of ``video_url`` (None: of a Kling video id), as journal tests record them."""
    if video_url is None:
        return ka.LipSyncJob(
            video_id=f"video-{n}", text=f"line {n}", voice_id="girlfriend_1_speech02"
        )
    return ka.LipSyncJob.from_text(
        video_url=video_url, text=f"line {n}", voice_id="girlfriend_1_speech02"
    )


def audio_job(n: int | str, **extra: Any) -> ka.LipSyncJob:
    return ka.LipSyncJob.from_audio(
        video_url=f"https://example.com/clip-{n}.mp4",
        audio_url=f"https://example.com/line-{n}.mp3",
        **extra,
    )


def kling_client(server: FakeKlingServer, **options: Any) -> ka.KlingClient:
    options.setdefault("poll", FAST_POLL)
    options.setdefault("retry", FAST_RETRY)
    return ka.KlingClient.kling(api_key=API_KEY, base_url=server.url, **options)


#: The fake server's sandbox JWT credentials (``ka.KlingClient.kling(**JWT, ...)``).
JWT = {"access_key": "ak-sandbox", "secret_key": "sk-sandbox-secret-for-hs256-tokens"}


def jwt_client(server: FakeKlingServer, **options: Any) -> ka.KlingClient:
    """An official client of ``server`` signing its requests with the sandbox JWT credentials."""
    return ka.KlingClient.kling(**{**JWT, **options}, base_url=server.url)


def dmx_client(server: FakeKlingServer, **options: Any) -> ka.KlingClient:
    options.setdefault("poll", FAST_POLL)
    options.setdefault("retry", FAST_RETRY)
    return ka.KlingClient.dmxapi(api_key=API_KEY, base_url=server.url, **options)


def apimodels_client(server: FakeKlingServer, **options: Any) -> ka.KlingClient:
    options.setdefault("poll", FAST_POLL)
    options.setdefault("retry", FAST_RETRY)
    return ka.KlingClient.apimodels(api_key=API_KEY, base_url=server.url, **options)


def engine(results: ka.BatchIterator) -> Batch:
    """The batch engine behind ``results``, for tests that read its internals.

    (The iterator holds it as a ``BatchControl``, the consumer's narrow view of it.)
    """
    batch = results._batch
    assert isinstance(batch, Batch)
    return batch


def requests_sent(server: FakeKlingServer) -> int:
    """Requests the server received, over every route (tallies such as "rejected" left out)."""
    return sum(server.requests[route] for route in ROUTES)


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    """A silent 16-bit mono WAV file of ``seconds`` (a local audio file for jobs)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(b"\x00\x00" * int(seconds * rate))
    return buffer.getvalue()
