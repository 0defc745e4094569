"""Running a subcommand's event loop so that Ctrl-C means the same on every Python.

``anyio.run`` turns Ctrl-C into a cancellation of the main task and, once that task has unwound,
into a ``KeyboardInterrupt`` again.  Telling the two apart needs ``Task.uncancel``, which came
with Python 3.11: on 3.10 the interrupted run ends in a bare ``CancelledError`` (a traceback
and exit status 1 instead of "interrupted" and 130).  :func:`run` therefore takes Ctrl-C itself,
with a signal receiver in the loop: the work is cancelled (its ``finally`` blocks and context
managers run as usual) and :class:`Interrupted` is raised once it has stopped.  A second Ctrl-C
while the work winds down is Python's own ``KeyboardInterrupt``.

SIGTERM (what ``kill``, ``timeout``, systemd and container runtimes send to stop a process) is
taken the same way: without it the process would die on the spot, leaving paid tasks that no
journal records unnamed and no ``--summary-json``.  Its exit status is 143 (128 + 15), as a
shell reports a process SIGTERM ended; a second SIGTERM while winding down ends it at once.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from . import _loop

__all__ = ["Interrupted", "exit_status", "run", "stop_word"]

T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM: ``signum``) stopped the work; raised once it has unwound."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__()
        self.signum = signum


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The exit status of a run stopped by ``interrupt``: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + int(getattr(interrupt, "signum", signal.SIGINT))


def stop_word(interrupt: KeyboardInterrupt) -> str:
    """What a stop by ``interrupt`` is called: ``"interrupted"`` or ``"terminated"``."""
    return "terminated" if exit_status(interrupt) == 128 + signal.SIGTERM else "interrupted"


def run(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``func(*args)`` on the command's loop (:mod:`._loop`); :class:`Interrupted` on Ctrl-C."""
    interrupted: int | None = None  # the signal that stopped the work

    async def main() -> T:
        done: list[T] = []
        failed: list[Exception] = []
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal interrupted
                try:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            interrupted = signum
                            group.cancel_scope.cancel()
                            return
                except NotImplementedError:  # Windows: anyio.run's own Ctrl-C handling stays
                    return

            group.start_soon(watch)
            try:
                done.append(await func(*args))
            except Exception as exc:
                # Raised below, once the group is closed: raised through it, the error would
                # come out wrapped in an ExceptionGroup.
                failed.append(exc)
            finally:
                group.cancel_scope.cancel()  # the watcher is done too
        if failed:
            raise failed[0]
        if interrupted is not None or not done:
            raise Interrupted(interrupted or signal.SIGINT)
        return done[0]

    return _loop.run(main)
