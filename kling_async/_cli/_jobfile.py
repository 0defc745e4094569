"""Job files: JSONL or CSV records turned into :class:`LipSyncJob` objects, line by line.

A file is read twice.  :func:`survey` builds (and drops) every job once, so that a bad line is
reported with its line number before any request is sent; the run then reads the file again
with :meth:`JobFile.jobs`, building each job only when the batch asks for it, so that a big
file of audio jobs never sits in memory at once.
"""

from __future__ import annotations

import csv
import difflib
import json
import typing
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import attrs

from .._errors import ValidationError
from .._jobs import LipSyncJob
from ._connect import CliError

__all__ = ["JOB_FIELDS", "JobFile", "JobFileError", "Record", "Survey", "survey"]


def _field_kinds() -> dict[str, type]:
    """Each LipSyncJob field and the scalar type a CSV cell is parsed into (str, bool, int...)."""
    hints = typing.get_type_hints(LipSyncJob)
    kinds: dict[str, type] = {}
    for field in attrs.fields(LipSyncJob):
        options = typing.get_args(hints[field.name]) or (hints[field.name],)
        kinds[field.name] = next((t for t in (bool, int, float) if t in options), str)
    return kinds


_KINDS = _field_kinds()
#: The names a job file may use: exactly the fields of :class:`LipSyncJob`.
JOB_FIELDS = tuple(_KINDS)


class JobFileError(CliError):
    """The file as a whole cannot be read (missing, not UTF-8, a bad CSV header)."""


@attrs.frozen
class Record:
    """One job as read from the file: its line number and fields, or why it is unusable."""

    line: int
    fields: dict[str, Any] = attrs.field(factory=dict)
    problem: str | None = None


@attrs.define
class Survey:
    """What the validation pass found: usable jobs, bad lines, and each job's key."""

    valid: int = 0
    problems: list[tuple[int, str]] = attrs.field(factory=list)
    lines: dict[str, int] = attrs.field(factory=dict)  # job key -> its line

    @property
    def invalid_lines(self) -> frozenset[int]:
        """Line numbers of the bad lines."""
        return frozenset(line for line, _ in self.problems)


class JobFile:
    """A JSONL or CSV job file; ``shown`` is how messages name it (as the user typed it)."""

    def __init__(self, path: Path, shown: str | None = None) -> None:
        self.path = path
        self.shown = shown if shown is not None else str(path)
        self.csv = path.suffix.lower() == ".csv"

    def records(self) -> Generator[Record, None, None]:
        """Every non-blank record, in file order."""
        try:
            with self.path.open(encoding="utf-8-sig", newline="") as stream:
                yield from self._csv(stream) if self.csv else self._jsonl(stream)
        except UnicodeDecodeError:
            raise JobFileError(f"{self.shown}: not UTF-8 text") from None
        except OSError as exc:
            raise JobFileError(f"cannot read {self.shown}: {exc.strerror or exc}") from None

    def jobs(self, skip: frozenset[int] = frozenset()) -> Iterator[tuple[int, LipSyncJob | str]]:
        """``(line, job)`` for each record not in ``skip``; ``(line, problem)`` for a bad one."""
        for record in self.records():
            if record.line in skip:
                continue
            yield record.line, self.build(record)

    def build(self, record: Record) -> LipSyncJob | str:
        """The job a record describes, or the problem (``"field: rule"``) that prevents it."""
        if record.problem is not None:
            return record.problem
        fields = dict(record.fields)
        fields.setdefault("key", f"line-{record.line}")
        audio = fields.get("audio_file")
        if isinstance(audio, str):
            # A relative path means "next to the jobs file", wherever the command runs from.
            fields["audio_file"] = self.path.parent / Path(audio).expanduser()
        try:
            if "text" in fields:
                text = fields.pop("text")
                voice_id = fields.pop("voice_id", None)
                return LipSyncJob.from_text(text=text, voice_id=voice_id, **fields)
            return LipSyncJob.from_audio(**fields)
        except ValidationError as exc:
            return str(exc)
        except (TypeError, ValueError) as exc:  # a value of a type no rule expected
            return f"invalid job ({exc})"

    # -- formats -------------------------------------------------------------------------

    def _jsonl(self, stream: typing.TextIO) -> Iterator[Record]:
        for number, raw in enumerate(stream, 1):
            text = raw.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                hint = " (a CSV file? name it *.csv)" if number == 1 and "," in text else ""
                yield Record(number, problem=f"not valid JSON: {exc.msg}{hint}")
                continue
            if not isinstance(value, dict):
                kind = type(value).__name__
                yield Record(number, problem=f"must be a JSON object of job fields, not {kind}")
                continue
            problem = _unknown(value)
            if problem:
                yield Record(number, problem=problem)
                continue
            fields = {name: v for name, v in value.items() if v is not None}
            key = fields.get("key")
            if isinstance(key, int) and not isinstance(key, bool):
                fields["key"] = str(key)  # {"key": 17} means the name "17"
            yield Record(number, fields)

    def _csv(self, stream: typing.TextIO) -> Iterator[Record]:
        reader = csv.reader(stream)
        header: list[str] | None = None
        end = 0
        for row in reader:
            line, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = self._header(row, line)
                continue
            if len(row) > len(header):
                yield Record(line, problem=f"{len(row)} cells, but the header names {len(header)}")
                continue
            fields: dict[str, Any] = {}
            problem = None
            for name, cell in zip(header, row, strict=False):
                cell = cell.strip()
                if not cell:
                    continue  # an empty cell: the field is absent
                if not name:
                    problem = f"a value ({cell!r}) in a column without a name"
                    break
                try:
                    fields[name] = _parse_cell(name, cell)
                except ValidationError as exc:
                    problem = str(exc)
                    break
            yield Record(line, fields, problem)

    def _header(self, row: list[str], line: int) -> list[str]:
        header = [cell.strip() for cell in row]
        named = [name for name in header if name]
        for name in named:
            if name not in _KINDS:
                raise JobFileError(f"{self.shown}:{line}: {_unknown({name: None})}")
        duplicates = sorted({name for name in named if named.count(name) > 1})
        if duplicates:
            raise JobFileError(f"{self.shown}:{line}: {duplicates[0]}: column named twice")
        return header


def _unknown(fields: dict[str, Any]) -> str | None:
    for name in fields:
        if name not in _KINDS:
            close = difflib.get_close_matches(str(name), JOB_FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "not a LipSyncJob field"
            return f"{name}: unknown field ({hint})"
    return None


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _parse_cell(name: str, cell: str) -> object:
    kind = _KINDS[name]
    if kind is bool:  # watermark
        try:
            return _BOOLEANS[cell.lower()]
        except KeyError:
            raise ValidationError(name, f"must be true or false, not {cell!r}") from None
    if kind is int:
        try:
            return int(cell)
        except ValueError:
            raise ValidationError(name, f"must be a whole number, not {cell!r}") from None
    if kind is float:
        try:
            return float(cell)
        except ValueError:
            raise ValidationError(name, f"must be a number, not {cell!r}") from None
    return cell


def survey(jobs: JobFile) -> Survey:
    """Build every job once and note the bad lines (duplicate keys included)."""
    found = Survey()
    for record in jobs.records():
        job = jobs.build(record)
        if isinstance(job, str):
            found.problems.append((record.line, job))
            continue
        key = job.key or ""
        if key in found.lines:
            found.problems.append(
                (record.line, f"key: {key!r} is already used on line {found.lines[key]}")
            )
            continue
        found.lines[key] = record.line
        found.valid += 1
    return found
