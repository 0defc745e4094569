"""Where the ``kling_async`` logger's records go while a command runs: text or JSON lines.

Text (the default) is one line per record through the progress bar's writer (the bar stays
intact); ``--log-format json`` writes one JSON object per record instead, for log collectors:
``{"time": ..., "level": "WARNING", "logger": "kling_async", "message": ...}``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = ["LOG_FORMATS", "JsonFormatter", "TolerantStream", "configure_logging"]

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (the traceback, when there is one, under ``exc_info``)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(prog: str, *, verbose: bool, log_format: str = "text") -> None:
    """Send ``kling_async`` records to stderr: all of them when ``verbose``, else warnings."""
    from ._progress import TqdmLogHandler  # (tqdm: imported when a command runs, not for --help)

    logger = logging.getLogger("kling_async")
    for handler in list(logger.handlers):
        if isinstance(handler, TqdmLogHandler):
            logger.removeHandler(handler)
    handler = TqdmLogHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{prog}: warning: %(message)s"))
    if not verbose:
        # Errors reach the user as the command's own one-line message; warnings pass as is.
        handler.addFilter(lambda record: record.levelno < logging.ERROR)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False


class TolerantStream:
    """A stream (stderr) that falls silent once it cannot be written, instead of raising.

    Progress lines, notes and log records are for a human: a closed pipe (a log shipper that
    died, ``| head``) or a full disk under the log must not stop a batch of paid tasks in the
    middle, nor keep its results file, summary and exit status from being written.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        """Write ``text``; once a write has failed, drop it."""
        if not self.broken:
            try:
                return self.stream.write(text)
            except (OSError, ValueError):  # (ValueError: the stream was closed)
                self.broken = True
        return len(text)

    def flush(self) -> None:
        """Flush, unless the stream is broken."""
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
