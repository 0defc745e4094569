"""What a run shows while it works: a live bar on a terminal, plain periodic lines elsewhere.

The bar is tqdm's (one small pure-Python dependency; its bar already shows count, rate and ETA,
and ``set_postfix`` carries the rest).  Without a terminal (CI logs, ``nohup``, a pipe) a line
such as ``12/40 done, 1 failed, 5 running, 0.8 jobs/s, ETA 0:35`` is written every few seconds
and once at the end, so that a log file stays readable.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import anyio
from tqdm import tqdm

from .._iterator import BatchIterator

__all__ = ["Progress", "TqdmLogHandler"]


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TqdmLogHandler(logging.Handler):
    """Writes log records to stderr through ``tqdm.write``, which keeps a live bar intact."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write one formatted record."""
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class Progress:
    """Counts of a run and their display.

    ``mode`` is ``"bar"`` (a live tqdm bar), ``"lines"`` (a plain line every ``interval``
    seconds and at the end) or ``"quiet"`` (nothing).  Once :meth:`watch` is given the batch,
    ``submitted`` and ``running`` are the batch's own counts of tasks submitted and running on
    the server; before that, jobs taken up and not yet done.
    """

    def __init__(
        self,
        total: int,
        *,
        mode: str,
        interval: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total = total
        self.mode = mode
        self.interval = interval
        self.stream = stream or sys.stderr
        self.submitted = 0
        self.done = 0
        self.failed = 0
        self._started = time.monotonic()
        self._bar: tqdm[Any] | None = None
        self._batch: BatchIterator | None = None

    def watch(self, results: BatchIterator) -> None:
        """Read submitted and running task counts from this batch from now on."""
        self._batch = results

    def start(self) -> None:
        """Start the clock (and show the bar): the batch begins now."""
        self._started = time.monotonic()
        if self.mode == "bar" and self._bar is None:
            self._bar = tqdm(
                total=self.total,
                unit="job",
                file=self.stream,
                dynamic_ncols=True,
                smoothing=0.1,
                mininterval=0.2,
            )
            self._postfix()

    @classmethod
    def choose(cls, total: int, *, quiet: bool, stream: TextIO | None = None) -> Progress:
        """A bar when ``stream`` (stderr) is a terminal, plain lines otherwise."""
        stream = stream or sys.stderr
        if quiet:
            return cls(total, mode="quiet", stream=stream)
        return cls(total, mode="bar" if stream.isatty() else "lines", stream=stream)

    @property
    def running(self) -> int:
        """Tasks running on the server (before :meth:`watch`: jobs taken up, not done)."""
        if self._batch is not None:
            return self._batch.progress.running
        return max(0, self.submitted - self.done)

    @property
    def tasks_submitted(self) -> int:
        """Tasks submitted so far (before :meth:`watch`: jobs taken up)."""
        return self._batch.progress.submitted if self._batch is not None else self.submitted

    @property
    def units(self) -> float:
        """Units the server says the batch's finished tasks cost (0 before :meth:`watch`)."""
        return self._batch.progress.units if self._batch is not None else 0.0

    @property
    def elapsed(self) -> float:
        """Seconds since the display was made."""
        return time.monotonic() - self._started

    def job_submitted(self) -> None:
        """The batch took up one more job."""
        self.submitted += 1
        self._postfix()

    def job_finished(self, ok: bool) -> None:
        """One job ended (``ok`` False for a failure)."""
        self.done += 1
        self.failed += not ok
        if self._bar is not None:
            self._postfix()
            self._bar.update(1)

    def line(self) -> str:
        """The plain progress line: done, failed, running, rate and ETA."""
        rate = self.done / self.elapsed if self.elapsed > 0 else 0.0
        text = (
            f"{self.done}/{self.total} done, {self.failed} failed, {self.running} running, "
            f"{rate:.2g} jobs/s"
        )
        left = self.total - self.done
        if left > 0 and rate > 0:
            text += f", ETA {_clock(left / rate)}"
        return text

    async def tick(self) -> None:
        """Refresh the display until cancelled (the counts move between results too)."""
        if self.mode == "quiet":
            return
        period = 0.5 if self._bar is not None else self.interval
        while True:
            await anyio.sleep(period)
            if self._bar is not None:
                self._postfix()
                self._bar.refresh()
            else:
                self._print(self.line())

    def close(self, *, summary: bool = True) -> None:
        """End the display: close the bar, or write the final line (unless not ``summary``)."""
        if self._bar is not None:
            self._postfix()
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and summary:
            self._print(self.line())

    def _postfix(self) -> None:
        if self._bar is not None:
            counts = {
                "submitted": self.tasks_submitted,
                "running": self.running,
                "failed": self.failed,
            }
            self._bar.set_postfix(counts, refresh=False)  # a dict keeps this order

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
