"""Where a run writes: the results file, the download folder, the journal; checked up front.

:func:`check_paths` looks at every local path a run will write before anything is sent (and
before the sandbox starts), so that a typo costs nothing.  :class:`ResultWriter` appends one JSON
line per result; when a write fails in mid-run (a full disk) it raises :class:`OutputError`
naming the path, after printing the line on stdout so that the paid result is not lost.  A
results file never keeps half a line: a failed write is cut off again, and a file that ends
in one anyway (a crash in mid-write) gets a line break before the next run appends, so that
no result line of that run is glued to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .._results import JobResult, returned_fields
from ._connect import CliError

__all__ = [
    "OutputError",
    "ResultWriter",
    "check_paths",
    "count_note",
    "open_out",
    "result_line",
    "same_file",
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


class LineSink(Protocol):
    """Where result lines go: the results file, or stdout."""

    #: Whether the lines go to stdout (then a failed line cannot be shown there instead).
    is_stdout: bool

    def write_line(self, text: str) -> None:
        """Write ``text`` (one line, with its line break) whole, or raise :class:`OSError`."""


class _Stdout:
    is_stdout = True

    def write_line(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()


class _AppendFile:
    """A results file opened for appending, written one whole line at a time, unbuffered."""

    is_stdout = False

    def __init__(self, path: str) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        self._fd = os.open(path, flags, 0o666)
        # A pipe or a device has no end to cut back to, nor a last line to finish.
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        if self._regular and not _ends_a_line(path):
            try:
                self._write(b"\n")  # half a line left by a crash: it stays one line of its own
            except OSError:
                os.close(self._fd)
                raise

    def write_line(self, text: str) -> None:
        start = os.lseek(self._fd, 0, os.SEEK_END) if self._regular else None
        try:
            self._write(text.encode("utf-8"))
        except OSError:
            # No half line left behind (a full disk takes what fits): the next run appends
            # whole lines after whole lines.
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
            raise

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        os.close(self._fd)


class ResultWriter:
    """Appends one JSON line per result, written through at once, so a crash keeps what was done."""

    def __init__(self, sink: LineSink, lines: dict[str, int], shown: str) -> None:
        self.sink = sink
        self.lines = lines
        self.shown = shown
        self.written = 0

    def write(self, result: JobResult, line: int | None = None) -> None:
        """Write ``result`` (``line``: its line in the job file, found by key when None)."""
        record = result_line(result, line if line is not None else self.lines.get(result.key))
        text = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            self.sink.write_line(text)
        except OSError as exc:
            shown = False
            if not self.sink.is_stdout:
                # The paid result reaches the screen at least (when stdout can take it).
                with contextlib.suppress(OSError):
                    print(text, end="", flush=True)
                    shown = True
            if shown:
                where = f" ({result.key}'s line is on stdout)"
            else:  # the task id at least, on stderr: a paid result is found again by it
                where = f" ({result.key}'s task: {result.task_id}; see `kling-async status`)"
            raise OutputError(
                f"cannot write results to {self.shown}: {exc.strerror or exc}{where}"
            ) from None
        self.written += 1


@contextlib.contextmanager
def open_out(path: str) -> Iterator[LineSink]:
    """Where results go: stdout for ``-``, else ``path`` opened for appending."""
    if path == "-":
        yield _Stdout()
        return
    try:
        sink = _AppendFile(path)
    except OSError as exc:
        raise CliError(f"cannot open {path} for results: {exc.strerror or exc}") from None
    try:
        yield sink
    finally:
        sink.close()


def _ends_a_line(path: str) -> bool:
    """Whether the file at ``path`` is empty or ends with a line break (unreadable: say yes)."""
    try:
        with open(path, "rb") as existing:
            if existing.seek(0, os.SEEK_END) == 0:
                return True
            existing.seek(-1, os.SEEK_END)
            return existing.read(1) == b"\n"
    except OSError:
        return True


def check_paths(
    out: str,
    download: str | None,
    journal: str | None,
    summary: str | None = None,
    jobs: str | None = None,
) -> int:
    """Raise :class:`CliError` for a path the run could not write; return --out's line count.

    Nothing is created but the download folder (which the run would create anyway).  Two of
    the files (and the job file ``jobs``) may not be one: results appended to the job file are
    read back as jobs without end, and a results or summary file written over the journal
    destroys it (a rerun would then pay for every job again).
    """
    _distinct(
        {
            "JOBS": jobs,
            "--out": out if out != "-" else None,
            "--journal": journal if journal is not None and "://" not in journal else None,
            "--summary-json": summary,
        }
    )
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


def _distinct(paths: dict[str, str | None]) -> None:
    """Raise :class:`CliError` when two of ``paths`` (option -> path) name the same file."""
    seen: list[tuple[str, str, Path]] = []
    for option, path in paths.items():
        if path is None:
            continue
        where = Path(path)
        for other, other_path, other_where in seen:
            if same_file(where, other_where):
                raise CliError(
                    f"{option} {path} is the same file as {other} {other_path}: give each its own"
                )
        seen.append((option, path, where))


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (links and different spellings alike)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


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
