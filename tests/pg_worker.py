"""One worker of a shared PostgreSQL journal, in its own process (test_journal_workers.py).

Usage: python pg_worker.py SERVER_URL JOURNAL_URL RESULTS COUNT MAX_IN_FLIGHT LEASE

Runs COUNT audio jobs on official advanced lip-sync (keys ``job-N``, video
``https://example.com/w-N.mp4``; external task ids make an unanswered submit exactly
resolvable) on the journal, as every worker of the batch does, and appends one JSON line per
result it reports to RESULTS, flushed at once (what the worker had reported when it died).
"""

from __future__ import annotations

import sys
from typing import TextIO

import anyio

# The crash tests' worker writes result lines the same way (run as a script: tests/ is on path).
from journal_worker import RETRY, write_result

import kling_async as ka
from kling_async.journal import PostgresJournal

POLL = ka.PollPolicy(first_delay=0.01, max_interval=0.03, multiplier=1.5, timeout=60.0)


def worker_job(n: int) -> ka.LipSyncJob:
    return ka.LipSyncJob.from_audio(
        video_url=f"https://example.com/w-{n}.mp4",
        audio_url=f"https://example.com/line-{n}.mp3",
        sound_end_time=3000,
        key=f"job-{n}",
    )


async def main(argv: list[str], out: TextIO) -> None:
    url, journal_url, _, count, in_flight, lease = argv[:6]
    journal = PostgresJournal(
        url=journal_url, lease=float(lease), renew=float(lease) / 5, claim_poll=0.02
    )
    jobs = [worker_job(n) for n in range(int(count))]
    client = ka.KlingClient.kling(
        api_key="sk-sandbox",
        base_url=url,
        advanced=True,
        max_in_flight=int(in_flight),
        poll=POLL,
        retry=RETRY,
    )
    async with client:
        # resubmit_unknown: an identify-face call (no task, nothing paid) the dead worker had
        # in flight is sent again; a lip-sync submit carries its external id, so the taker
        # finds its task by that id, or resends the same id (a duplicate would be refused).
        async with client.run_batch(jobs, journal=journal, resubmit_unknown=True) as batch:
            async for result in batch:
                write_result(out, result)


if __name__ == "__main__":
    with open(sys.argv[3], "a", encoding="utf-8") as results:
        anyio.run(main, sys.argv[1:], results)
