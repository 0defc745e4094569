"""The command line's event loop: uvloop where installed, asyncio's own when declined."""

from __future__ import annotations

import asyncio

import pytest

from kling_async._cli import _loop


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_declined_uvloop_means_asyncio() -> None:
    assert _loop.loop_factory({_loop.LOOP_ENV: "asyncio"}) is None
    assert _loop.loop_factory({_loop.LOOP_ENV: " AsyncIO "}) is None


def test_uvloop_by_default_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    assert _loop.loop_factory({}) is uvloop.new_event_loop
    monkeypatch.delenv(_loop.LOOP_ENV, raising=False)
    assert _loop.run(_loop_module).startswith("uvloop")


def test_run_on_asyncio_when_declined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_loop.LOOP_ENV, "asyncio")
    assert _loop.run(_loop_module).startswith("asyncio")
