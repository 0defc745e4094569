"""A batch's events as Prometheus metrics, in a few lines (``pip install prometheus-client``).

    python examples/prometheus_metrics.py

``start_http_server(9464)`` would serve them for Prometheus to scrape; this script prints them.
"""

from __future__ import annotations

import anyio
from prometheus_client import CollectorRegistry, Counter, generate_latest

import kling_async as ka
from kling_async import events
from kling_async.testing import SANDBOX_API_KEY, FakeKlingServer

REGISTRY = CollectorRegistry()
JOBS = Counter("kling_jobs", "Jobs finished, by state", ["state"], registry=REGISTRY)
TASKS = Counter("kling_tasks_submitted", "Tasks created", registry=REGISTRY)
REFUSALS = Counter("kling_refusals", "Submits refused for now (1303, 1302)", registry=REGISTRY)


def on_event(event: events.Event) -> None:
    if isinstance(event, events.Finished):
        JOBS.labels(event.result.state.value).inc()
    elif isinstance(event, events.Submitted):
        TASKS.inc()
    elif isinstance(event, events.Refused):
        REFUSALS.inc()


async def main() -> None:
    jobs = [
        ka.LipSyncJob.from_audio(
            video_url=f"https://example.com/clip{n}.mp4", audio_url=f"https://example.com/{n}.mp3"
        )
        for n in range(6)
    ]
    async with FakeKlingServer(task_duration=0.05, task_limit=3) as server:
        client = ka.KlingClient.kling(
            api_key=SANDBOX_API_KEY,
            base_url=server.url,
            # Poll often: sandbox tasks are short.  Keep the defaults for the real service.
            poll=ka.PollPolicy(first_delay=0.05, max_interval=0.2),
        )
        async with client:
            async for _ in client.run_batch(jobs, on_event=on_event):
                pass
    print(generate_latest(REGISTRY).decode())


if __name__ == "__main__":
    anyio.run(main)
