"""Where a run writes: the results file, the download folder, the journal; checked up front.

:func:`check_paths` looks at every local path a run will write before anything is sent (and
before the sandbox starts), so that a typo costs nothing.  :class:`ResultWriter` appends one JSON
line per result; when a write fails in mid-run (a full disk) it raises :class:`OutputError`
naming the path, after printing the line on stdout so that the paid result is not lost.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from .._results import JobResult, returned_fields
from ._connect import CliError

__all__ = [
    "OutputError",
    "ResultWriter",
    "check_paths",
    "count_note",
    "open_out",
    "result_line",
]


class OutputError(CliError):
    """A local file could not be written in mid-run."""


def result_line(result: JobResult, line: int | None = None) -> dict[str, Any]:
    """The JSON object written to the results file for one job."""
    error = result.error
    return {
        "key": result.key,
        "line": line,
        "task_id": result.task_id,
        "state": result.state.value,
        "ok": result.ok,
        "video_url": result.video_url,
        "error": str(error) if error is not None else None,
        "error_type": type(error).__name__ if error is not None else None,
        "error_code": getattr(error, "code", None),
        "submitted_at": result.submitted_at,
        "finished_at": result.finished_at,
        "polls": result.polls,
        "path": str(result.path) if result.path is not None else None,
        "adopted": result.adopted,
        # What the server returned with the video, and what the task cost.
        **returned_fields(result),
    }


class ResultWriter:
    """Appends one JSON line per result and flushes it, so a crash keeps what was done."""

    def __init__(self, stream: TextIO, lines: dict[str, int], shown: str) -> None:
        self.stream = stream
        self.lines = lines
        self.shown = shown
        self.written = 0

    def write(self, result: JobResult, line: int | None = None) -> None:
        """Write ``result`` (``line``: its line in the job file, found by key when None)."""
        record = result_line(result, line if line is not None else self.lines.get(result.key))
        text = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError as exc:
            if self.stream is not sys.stdout:
                print(text, end="", flush=True)  # the paid result reaches the screen at least
            raise OutputError(
                f"cannot write results to {self.shown}: {exc.strerror or exc}"
                + ("" if self.stream is sys.stdout else f" ({result.key}'s line is on stdout)")
            ) from None
        self.written += 1


@contextlib.contextmanager
def open_out(path: str) -> Iterator[TextIO]:
    """The results stream: stdout for ``-``, else ``path`` opened for appending."""
    if path == "-":
        yield sys.stdout
        return
    try:
        # Not a `with` here: an OSError while writing is no "cannot open".
        stream = Path(path).open("a", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise CliError(f"cannot open {path} for results: {exc.strerror or exc}") from None
    try:
        yield stream
    finally:
        with contextlib.suppress(OSError):  # a full disk fails the last flush again
            stream.close()


def check_paths(
    out: str, download: str | None, journal: str | None, summary: str | None = None
) -> int:
    """Raise :class:`CliError` for a path the run could not write; return --out's line count.

    Nothing is created but the download folder (which the run would create anyway).
    """
    lines = 0
    if out != "-":
        target = Path(out)
        if target.is_dir():
            raise CliError(f"--out {out} is a folder, not a file")
        if target.is_file():
            try:
                with target.open("rb") as existing:
                    chunks = iter(lambda: existing.read(1 << 20), b"")
                    lines = sum(chunk.count(b"\n") for chunk in chunks)
            except OSError as exc:
                raise CliError(f"cannot read --out {out}: {exc.strerror or exc}") from None
        elif not target.exists():
            _check_folder(target.parent, f"--out {out}")
    if download is not None:
        folder = Path(download)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"cannot create --download {download}: {exc.strerror or exc}") from None
        _check_folder(folder, f"--download {download}")
    if summary is not None:
        _check_folder(Path(summary).parent, f"--summary-json {summary}")
    if journal is not None and "://" not in journal:  # (a database URL is checked when opened)
        target = Path(journal)
        if target.is_dir():
            raise CliError(f"--journal {journal} is a folder, not a file")
        # SQLite writes its -wal and -shm files beside the journal.
        _check_folder(target.parent, f"--journal {journal}")
    return lines


def _check_folder(folder: Path, what: str) -> None:
    """Raise :class:`CliError` unless a file can be created in ``folder``."""
    folder = folder if str(folder) else Path(".")
    if not folder.is_dir():
        raise CliError(f"cannot write {what}: no folder {folder}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CliError(f"cannot write {what}: {exc.strerror or exc}") from None


def count_note(lines: int, out: str) -> str:
    """The note for a rerun without a journal that appends to a results file with lines."""
    return (
        f"{out} already holds {lines} result {'line' if lines == 1 else 'lines'}; appending "
        "(without --journal a rerun runs every job again; with it, only what is not done)"
    )
