"""``kling-async status`` and ``kling-async fake-server``: look tasks up; serve the sandbox."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import anyio

from .._errors import KlingError
from .._results import TaskSnapshot
from . import _interrupt, _loop
from ._connect import make_client
from ._sandbox import sandbox_server

__all__ = ["fake_server_command", "snapshot_line", "status_command"]

# Status queries in flight at once: enough to look up hundreds of ids quickly, few enough to
# stay far from any gateway's rate limit.
LOOKUPS_AT_ONCE = 8


def snapshot_line(snapshot: TaskSnapshot) -> dict[str, Any]:
    """The JSON object ``status`` prints for one task."""
    return {
        "task_id": snapshot.task_id,
        "state": snapshot.state.value,
        "message": snapshot.message,
        "error_code": snapshot.error_code,
        "video_url": snapshot.video_url,
        "created_at": snapshot.created_at,
        "updated_at": snapshot.updated_at,
    }


def status_command(args: argparse.Namespace) -> int:
    """Print one JSON line per task id, in the order given; 1 when a lookup failed."""
    lines = _interrupt.run(_lookup, args)
    for line in lines:
        print(json.dumps(line, ensure_ascii=False), flush=True)
    return 1 if any("error" in line for line in lines) else 0


async def _lookup(args: argparse.Namespace) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = [{} for _ in args.task_ids]
    fatal: list[KlingError] = []
    limiter = anyio.CapacityLimiter(LOOKUPS_AT_ONCE)
    async with make_client(args) as client:

        async def one(index: int, task_id: str) -> None:
            async with limiter:
                try:
                    lines[index] = snapshot_line(await client.get_task(task_id))
                except KlingError as exc:
                    if exc.fatal:  # a bad key fails every lookup alike: stop at the first
                        fatal.append(exc)
                        group.cancel_scope.cancel()
                    error = {"error": str(exc), "error_type": type(exc).__name__}
                    lines[index] = {"task_id": task_id, **error}

        async with anyio.create_task_group() as group:
            for index, task_id in enumerate(args.task_ids):
                group.start_soon(one, index, task_id)
    if fatal:
        raise fatal[0]
    return lines


def fake_server_command(args: argparse.Namespace) -> int:
    """Run the sandbox server until Ctrl-C (or SIGTERM)."""
    _loop.run(_serve, args)
    return 0


async def _serve(args: argparse.Namespace) -> None:
    from ..testing import FaultPlan  # only the sandbox needs the fake server's package

    server = sandbox_server(
        duration=args.task_duration,
        task_limit=args.task_limit,
        host=args.host,
        port=args.port,
        seed=args.seed,
        faults=FaultPlan(data_as_list=args.data_as_list, errors_as_http_200=args.errors_as_200),
        webhook_secret=args.webhook_secret,
    )
    async with server:
        from ..testing import SANDBOX_API_KEY, SANDBOX_JWT_CREDENTIALS

        access_key, secret_key = next(iter(SANDBOX_JWT_CREDENTIALS.items()))
        print(f"FakeKlingServer listening on {server.url}", flush=True)
        if not args.quiet:
            limit = args.task_limit or "no"
            print(
                f"  official format at {server.url} and {server.url}/kling, apimodels at "
                f"{server.url}/api/v1/audio/generations; {limit} concurrent tasks\n"
                f"  API key: {SANDBOX_API_KEY}   JWT: access key {access_key}, "
                f"secret {secret_key}  (public test keys)\n"
                f"  try:  KLING_API_KEY={SANDBOX_API_KEY} kling-async run "
                f"examples/jobs.jsonl --out results.jsonl --base-url {server.url}\n"
                "  Ctrl-C stops it.",
                flush=True,
            )
        await _until_stopped()
    if not args.quiet:
        print("FakeKlingServer stopped", file=sys.stderr)


async def _until_stopped() -> None:
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return
    except NotImplementedError:  # Windows: Ctrl-C arrives as KeyboardInterrupt instead
        await anyio.sleep_forever()
