"""One journaled batch in its own process, for test_journal.py's crash tests (killed on purpose).

Usage: python journal_worker.py SERVER_URL JOURNAL RESULTS COUNT MAX_IN_FLIGHT
       [--resubmit-unknown] [--advanced]

Runs COUNT text jobs (keys ``job-N``, video ``https://example.com/crash-N.mp4``) against the
fake server the test process runs, and appends one JSON line per result to RESULTS, flushed at
once, so the file shows exactly what the consumer had received when the process died.  With
``--advanced`` the jobs are audio jobs on official advanced lip-sync (external task ids).
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

import anyio

import kling_async as ka

POLL = ka.PollPolicy(first_delay=0.01, max_interval=0.03, multiplier=1.5, timeout=30.0)
RETRY = ka.RetryPolicy(max_attempts=6, base_delay=0.005, max_delay=0.05, concurrency_delay=0.01)


def write_result(out: TextIO, result: ka.JobResult) -> None:
    """Append ``result`` as one JSON line and flush it (what the consumer had when killed)."""
    line = {
        "key": result.key,
        "task_id": result.task_id,
        "state": result.state.value,
        "error": None if result.error is None else repr(result.error),
        "candidates": list(getattr(result.error, "candidates", ())),
        "adopted": result.adopted,
    }
    out.write(json.dumps(line) + "\n")
    out.flush()


def crash_job(n: int, advanced: bool = False) -> ka.LipSyncJob:
    if advanced:
        return ka.LipSyncJob.from_audio(
            video_url=f"https://example.com/crash-{n}.mp4",
            audio_url=f"https://example.com/line-{n}.mp3",
            sound_end_time=3000,
            key=f"job-{n}",
        )
    return ka.LipSyncJob.from_text(
        video_url=f"https://example.com/crash-{n}.mp4",
        text=f"line {n}",
        voice_id="girlfriend_1_speech02",
        voice_language="en",
        key=f"job-{n}",
    )


async def main(argv: list[str], out: TextIO) -> None:
    url, journal, _, count, in_flight = argv[:5]
    resubmit = "--resubmit-unknown" in argv[5:]
    advanced = "--advanced" in argv[5:]
    jobs = [crash_job(n, advanced) for n in range(int(count))]
    client = ka.KlingClient.kling(
        api_key="sk-sandbox",
        base_url=url,
        advanced=advanced,
        max_in_flight=int(in_flight),
        poll=POLL,
        retry=RETRY,
    )
    async with client:
        batch = client.run_batch(jobs, journal=journal, resubmit_unknown=resubmit)
        async with batch:
            async for result in batch:
                write_result(out, result)


if __name__ == "__main__":
    with open(sys.argv[3], "a", encoding="utf-8") as results:
        anyio.run(main, sys.argv[1:], results)
