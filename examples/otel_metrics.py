"""A batch's events as OpenTelemetry metrics: ``run_batch(jobs, on_event=...)``.

    pip install 'kling-async[otel]'      # opentelemetry-api; add the SDK and an exporter of yours
    python examples/otel_metrics.py

``otel_metrics(meter)`` returns the ``on_event`` callback.  Without an OpenTelemetry SDK
configured the API's meter records nothing (and costs next to nothing); with one, the counters
and the histogram go wherever its exporter sends them.  The script runs against the sandbox.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from opentelemetry import metrics

import kling_async as ka
from kling_async import events
from kling_async.testing import SANDBOX_API_KEY, FakeKlingServer


def otel_metrics(meter: metrics.Meter | None = None) -> Callable[[events.Event], None]:
    """An ``on_event`` callback that counts jobs, tasks, refusals and requests, and times jobs."""
    meter = meter or metrics.get_meter("kling_async")
    jobs = meter.create_counter("kling.jobs", unit="{job}", description="jobs finished")
    tasks = meter.create_counter("kling.tasks", unit="{task}", description="tasks submitted")
    refused = meter.create_counter("kling.refusals", unit="{refusal}", description="1303/1302")
    requests = meter.create_counter("kling.requests", unit="{request}", description="API calls")
    seconds = meter.create_histogram("kling.job.duration", unit="s", description="submit to end")

    def on_event(event: events.Event) -> None:
        if isinstance(event, events.Finished):
            result = event.result
            jobs.add(1, {"state": result.state.value})
            if result.submitted_at is not None and result.finished_at is not None:
                seconds.record(result.finished_at - result.submitted_at)
        elif isinstance(event, events.Submitted):
            tasks.add(1, {"stage": event.stage})
            requests.add(1)
        elif isinstance(event, events.Refused):
            refused.add(1, {"code": event.code})
            requests.add(1)
        elif isinstance(event, (events.Polled, events.Retried)):
            requests.add(event.requests if isinstance(event, events.Polled) else 1)

    return on_event


async def main() -> None:
    jobs = [
        ka.LipSyncJob.from_audio(
            video_url=f"https://example.com/clip{n}.mp4", audio_url=f"https://example.com/{n}.mp3"
        )
        for n in range(5)
    ]
    async with FakeKlingServer(task_duration=0.05) as server:
        client = ka.KlingClient.kling(
            api_key=SANDBOX_API_KEY,
            base_url=server.url,
            # Poll often: sandbox tasks are short.  Keep the defaults for the real service.
            poll=ka.PollPolicy(first_delay=0.05, max_interval=0.2),
        )
        async with client:
            async for result in client.run_batch(jobs, on_event=otel_metrics()):
                print(result.key, result.state)


if __name__ == "__main__":
    anyio.run(main)
