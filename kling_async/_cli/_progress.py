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

from .._results import JobResult
from ..events import Event, Finished, Resumed
from ._tally import Tally, resume_note

__all__ = ["Progress", "TqdmLogHandler"]

#: Results of this run before the plain progress line shows an ETA.
ETA_AFTER = 10


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
    """The display of a run's :class:`~._tally.Tally`.

    ``mode`` is ``"bar"`` (a live tqdm bar), ``"lines"`` (a plain line every ``interval``
    seconds and at the end) or ``"quiet"`` (nothing).  The batch's events reach :meth:`on_event`
    (the batch's ``on_event`` callback): the tally counts them, the bar moves with each result.
    """

    def __init__(
        self,
        tally: Tally,
        *,
        mode: str,
        interval: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.tally = tally
        self.total = tally.total
        self.mode = mode
        self.interval = interval
        self.stream = stream or sys.stderr
        self._bar: tqdm[Any] | None = None
        self._shown = 0  # results the bar shows

    @classmethod
    def choose(cls, tally: Tally, *, quiet: bool, stream: TextIO | None = None) -> Progress:
        """A bar when ``stream`` (stderr) is a terminal, plain lines otherwise."""
        stream = stream or sys.stderr
        if quiet:
            return cls(tally, mode="quiet", stream=stream)
        return cls(tally, mode="bar" if stream.isatty() else "lines", stream=stream)

    def start(self) -> None:
        """Start the clock (and show the bar): the batch begins now."""
        self.tally.started = time.monotonic()
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

    def on_event(self, event: Event) -> None:
        """Count ``event`` and move the bar (the batch's ``on_event`` callback)."""
        self.tally.on_event(event)
        if isinstance(event, Resumed):
            if self.mode != "quiet" and self.tally.resumed:
                tally = self.tally
                self.note(resume_note(len(tally.resumed), self.total, tally.resumed_failed))
            self._advance()
        elif isinstance(event, Finished):
            self._advance()

    def job_finished(self, result: JobResult) -> None:
        """A result the batch did not make (the job file changed since it was checked)."""
        self.tally.finished(result)
        self._advance()

    def note(self, text: str) -> None:
        """A message above the bar (or a line of its own without one), even when quiet."""
        if self._bar is not None:
            self._bar.write(f"kling-async: {text}", file=self.stream)
        else:
            self._print(f"kling-async: {text}")

    def line(self) -> str:
        """The plain progress line: done, failed, running, rate and ETA."""
        tally = self.tally
        now = len(tally.results)  # the rate counts this run's results only
        elapsed = tally.elapsed
        rate = now / elapsed if elapsed > 0 else 0.0
        text = (
            f"{tally.done}/{self.total} done, {tally.failed} failed, "
            f"{len(tally.running)} running, {rate:.2g} jobs/s"
        )
        left = self.total - tally.done
        # No ETA from the first few results: one result after a 10 s first poll is no rate.
        if left > 0 and rate > 0 and now >= ETA_AFTER:
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

    def _advance(self) -> None:
        if self._bar is not None:
            done = self.tally.done
            self._postfix()
            self._bar.update(done - self._shown)
            self._shown = done

    def _postfix(self) -> None:
        if self._bar is not None:
            tally = self.tally
            counts = {
                "submitted": tally.submitted,
                "running": len(tally.running),
                "failed": tally.failed,
            }
            self._bar.set_postfix(counts, refresh=False)  # a dict keeps this order

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
