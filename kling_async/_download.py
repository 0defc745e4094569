"""Saving result videos to disk, behind :meth:`KlingClient.download`.

Result URLs expire (30 days at the official API, 7 days at apimodels; docs/protocol.md, Query one
and apimodels.app), so a batch saves each video while its URL still works.  A download:

* streams into a hidden temporary file in the target directory, fsyncs it, then links it to its
  final name in one step and fsyncs the directory, so a crash never leaves a half-written file
  under a real name, and a power cut after the video is reported does not lose it;
* resumes with a ``Range`` request after a dropped connection, where the server honours ranges
  (``206`` whose ``Content-Range`` starts where the file ends, with the total announced before);
  a server that answers ``200`` instead, or a range of a file of another size, is read again
  from the start;
* takes an empty body for a failure (no video is zero bytes), retried as a dropped connection;
* checks the size against ``Content-Length`` / the ``Content-Range`` total, retrying on a
  mismatch and failing with :class:`DownloadError` when it persists;
* never sends credentials: the video host is a CDN, not the API (see :meth:`Transport.stream`);
* never overwrites a different file: a name already taken gets ``-1``, ``-2``... before its
  extension, and a file already there with the same content is returned as it is.
"""

from __future__ import annotations

import contextlib
import filecmp
import logging
import os
import posixpath
import random
import re
import secrets
import tempfile
import unicodedata
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import anyio
import attrs
from anyio import AsyncFile

from ._backoff import retry_delay
from ._config import RetryPolicy
from ._durable import make_directory, sync_directory
from ._errors import DownloadError, KlingError, LocalWriteError, TransportError, ValidationError
from ._results import JobResult
from ._transport import Stream, Transport
from .events import Downloaded, Event

__all__ = ["BatchSaver", "Downloader", "file_name", "safe_filename", "writable_folder"]

logger = logging.getLogger("kling_async")

#: Bytes read from the network at a time.
CHUNK_BYTES = 256 * 1024
#: Bytes compared at the start of a file already on disk before deciding it is the same video.
HEAD_BYTES = 64 * 1024
#: Longest name stem, in UTF-8 bytes: file systems allow 255, and the suffix, extension and the
#: temporary file's decorations need room.
MAX_NAME_BYTES = 120
#: Most ``-N`` suffixes tried before giving up on a name.
MAX_SUFFIX = 9999

_VIDEO_EXTENSIONS = frozenset((".mp4", ".mov", ".m4v", ".webm", ".mkv"))
_DEFAULT_EXTENSION = ".mp4"
# Characters no file name may hold on some system we may run on (Windows' set is the largest).
_FORBIDDEN = frozenset('/\\<>:"|?*')
# Windows device names, reserved whatever the extension ("con.mp4" opens the console there).
_RESERVED = frozenset(
    ["con", "prn", "aux", "nul", *(f"{port}{i}" for port in ("com", "lpt") for i in range(10))]
)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
# Answers that mean the video is gone (expired URL), not that the host is struggling.
_GONE = frozenset((401, 403, 404, 410))


def safe_filename(raw: str, *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """``raw`` made safe as one file name in any directory; ``""`` when nothing usable is left.

    Path separators, characters Windows forbids, control and invisible format characters (a
    right-to-left override can disguise an extension) become ``_``; runs of dots shrink to one,
    so no ``..`` remains; leading dots and spaces (hidden files) and trailing ones (dropped by
    Windows) go; Windows device names (``con``, ``nul``...) get a leading ``_``; the result is
    cut to ``max_bytes`` of UTF-8 without splitting a character.  A name without a single
    letter or digit left is no name.
    """
    text = unicodedata.normalize("NFC", raw)
    kept = "".join(
        "_" if ch in _FORBIDDEN or (ch != " " and unicodedata.category(ch)[0] in "CZ") else ch
        for ch in text
    )
    kept = re.sub(r"\.{2,}", ".", kept)
    kept = kept.strip(" .")
    if kept.split(".", 1)[0].rstrip(" ").lower() in _RESERVED:
        kept = "_" + kept
    encoded = kept.encode("utf-8")
    if len(encoded) > max_bytes:
        kept = encoded[:max_bytes].decode("utf-8", errors="ignore")
    kept = kept.rstrip(" .")
    # Nothing but replacement marks and dots ("../.." -> "_"): no name worth keeping.
    return kept if any(ch.isalnum() for ch in kept) else ""


def video_extension(url: str) -> str:
    """The extension of the video at ``url`` (``.mp4`` unless its path names another)."""
    extension = posixpath.splitext(urlsplit(url).path)[1].lower()
    return extension if extension in _VIDEO_EXTENSIONS else _DEFAULT_EXTENSION


def file_name(
    url: str, *, key: str | None = None, task_id: str | None = None, filename: str | None = None
) -> str:
    """The name to save ``url``'s video under: ``filename``, else the job key, else the task id.

    Every candidate goes through :func:`safe_filename`; the video's extension is added unless
    the name already has one.  An explicit ``filename`` with no usable character is an error;
    a key without one falls back to the task id, then to ``"video"``.
    """
    extension = video_extension(url)
    if filename is not None:
        name = safe_filename(filename)
        if not name:
            raise ValidationError("filename", "must hold at least one usable character")
        return name if posixpath.splitext(name)[1] else name + extension
    for candidate in (key, task_id):
        stem = safe_filename(candidate) if candidate else ""
        if stem:
            return stem if stem.lower().endswith(extension) else stem + extension
    return "video" + extension


def _suffixed(name: str, number: int) -> str:
    if number == 0:
        return name
    stem, extension = posixpath.splitext(name)
    return f"{stem}-{number}{extension}"


def _shown(url: str) -> str:
    # Signed CDN URLs carry their signature in the query: keep it out of errors and logs.
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class _Skip(Exception):
    """The video is already on disk at ``path``: stop reading."""

    def __init__(self, path: Path) -> None:
        self.path = path


class _Progress:
    """One download's temporary file and what is known about the bytes in it."""

    def __init__(self, file: AsyncFile[bytes], directory: Path, name: str) -> None:
        self.file = file
        self.directory = directory
        self.name = name
        self.written = 0
        self.total: int | None = None
        self.use_ranges = True

    async def restart(self) -> None:
        if self.written:
            await self.file.seek(0)
            await self.file.truncate(0)
        self.written = 0


class Downloader:
    """Downloads videos through ``transport``, at most ``max_concurrent`` at once.

    Failed attempts are retried as ``retry`` says (``max_attempts`` in a row without progress).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        retry: RetryPolicy,
        rng: random.Random,
        max_concurrent: int = 4,
    ) -> None:
        self._transport = transport
        self._retry = retry
        self._rng = rng
        self.max_concurrent = max_concurrent
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """The bound on downloads at once (made on first use: it needs a running event loop)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_concurrent)
        return self._limiter

    async def download(self, url: str, directory: Path, name: str) -> Path:
        """Save the video at ``url`` as ``directory / name`` (or a free variant); return its path.

        ``name`` must be a single safe file name (see :func:`file_name`).
        """
        if name != safe_filename(name, max_bytes=4 * MAX_NAME_BYTES) or not name:
            raise ValidationError("filename", "must be a plain file name (see safe_filename)")
        if urlsplit(url).scheme.lower() not in ("http", "https"):
            raise DownloadError("a video URL must be http or https", url=_shown(url))
        try:
            return await self._save(url, directory, name)
        except OSError as exc:
            # A local failure (a full disk, a folder gone or not writable): the video is fine.
            raise LocalWriteError(
                f"cannot save {name} in {directory}: {exc.strerror or exc}",
                url=_shown(url),
                path=directory,
            ) from None

    async def _save(self, url: str, directory: Path, name: str) -> Path:
        await anyio.to_thread.run_sync(make_directory, directory)
        async with self.limiter:
            part = directory / f".{name}.{secrets.token_hex(4)}.part"
            file = await anyio.open_file(part, "xb")
            try:
                progress = _Progress(file, directory, name)
                try:
                    await self._fetch(url, progress)
                except _Skip as skip:
                    logger.debug("%s already saved as %s", _shown(url), skip.path)
                    return skip.path
                await file.flush()
                await anyio.to_thread.run_sync(os.fsync, file.wrapped.fileno())
                file.wrapped.close()
                path = await anyio.to_thread.run_sync(_place, part, directory, name, url)
                logger.debug("saved %s (%d bytes) as %s", _shown(url), progress.written, path)
                return path
            finally:
                # Synchronous on purpose: it must run even when the download is cancelled,
                # where an await would not (a close and an unlink take microseconds).
                _discard(file.wrapped, part)

    async def _fetch(self, url: str, progress: _Progress) -> None:
        failures = 0
        best = 0
        while True:
            try:
                await self._attempt(url, progress)
                return
            except TransportError as exc:
                error = DownloadError(str(exc), url=_shown(url), retryable=True)
            except DownloadError as exc:
                error = exc
            if not error.retryable:
                raise error
            if progress.written > best:
                best = progress.written
                failures = 0  # progress was made: a flaky host still gets the file in the end
            failures += 1
            if failures >= self._retry.max_attempts:
                raise error
            delay = retry_delay(self._retry, failures, self._rng, retry_after=error.retry_after)
            logger.debug("download of %s failed (%s); again in %.2f s", _shown(url), error, delay)
            await anyio.sleep(delay)

    async def _attempt(self, url: str, progress: _Progress) -> None:
        headers: dict[str, str] = {}
        if progress.written and progress.use_ranges:
            headers["Range"] = f"bytes={progress.written}-"
        else:
            await progress.restart()
        async with self._transport.stream(url, headers=headers) as answer:
            if answer.status == 416 and progress.written and progress.written == progress.total:
                return  # the previous attempt had everything; only its ending was in doubt
            await self._start(answer, progress, url)
            await self._receive(answer, progress, url)
        if not progress.written:
            # No video is zero bytes: an empty answer is a host's failure, never a file to save.
            raise DownloadError(f"{_shown(url)}: empty body", url=_shown(url), retryable=True)
        if progress.total is not None and progress.written != progress.total:
            raise DownloadError(
                f"{_shown(url)}: got {progress.written} of {progress.total} bytes",
                url=_shown(url),
                retryable=True,
            )

    async def _start(self, answer: Stream, progress: _Progress, url: str) -> None:
        """Check the answer's status and headers; position the file where its body belongs."""
        shown = _shown(url)
        status = answer.status
        if status == 200:
            if progress.written:
                logger.debug("%s ignored the Range request; reading from the start", shown)
                progress.use_ranges = False
                await progress.restart()
            progress.total = _length(answer)
        elif status == 206:
            match = _CONTENT_RANGE.match(answer.headers.get("content-range", ""))
            total = None if match is None or match.group(3) == "*" else int(match.group(3))
            # Bytes of another file than those we have: its size changed since.
            resized = progress.written and total is not None and progress.total not in (None, total)
            if match is None or int(match.group(1)) != progress.written or resized:
                # A range we did not ask for, or of another file: start over without ranges.
                progress.use_ranges = False
                raise DownloadError(
                    f"{shown}: unexpected Content-Range {answer.headers.get('content-range')!r}",
                    url=shown,
                    status=status,
                    retryable=True,
                )
            progress.total = total
        else:
            if status == 416:
                progress.use_ranges = False  # the file on the server is not what we resumed
            raise DownloadError(
                f"{shown}: HTTP {status}"
                + ("; the URL may have expired" if status in _GONE else ""),
                url=shown,
                status=status,
                retryable=status in (408, 416, 425, 429) or status >= 500,
                retry_after=_retry_after(answer),
            )

    async def _receive(self, answer: Stream, progress: _Progress, url: str) -> None:
        if progress.written == 0 and progress.total is not None:
            head = await _read_at_least(answer, min(HEAD_BYTES, progress.total))
            same = await anyio.to_thread.run_sync(
                _already_saved, progress.directory, progress.name, progress.total, head
            )
            if same is not None:
                raise _Skip(same)
            await self._write(progress, head, url)
        while chunk := await answer.read(CHUNK_BYTES):
            await self._write(progress, chunk, url)

    @staticmethod
    async def _write(progress: _Progress, chunk: bytes, url: str) -> None:
        if progress.total is not None and progress.written + len(chunk) > progress.total:
            progress.use_ranges = False
            raise DownloadError(
                f"{_shown(url)}: more bytes than the announced {progress.total}",
                url=_shown(url),
                retryable=True,
            )
        await progress.file.write(chunk)
        progress.written += len(chunk)


def _length(answer: Stream) -> int | None:
    # A compressed body's length is not the file's: then the size cannot be checked.
    if answer.headers.get("content-encoding", "identity").lower() != "identity":
        return None
    raw = answer.headers.get("content-length", "")
    return int(raw) if raw.isdigit() else None


def _retry_after(answer: Stream) -> float | None:
    raw = answer.headers.get("retry-after", "")
    return float(raw) if raw.isdigit() else None


async def _read_at_least(answer: Stream, size: int) -> bytes:
    chunks: list[bytes] = []
    have = 0
    while have < size:
        chunk = await answer.read(size - have)
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


class BatchSaver:
    """A batch's ``download_to``: saves each successful result's video, says a local failure once.

    ``download`` is the client's (:meth:`KlingClient.download <kling_async.KlingClient.download>`).
    A failure leaves the result ``ok`` with ``error`` set; a :class:`LocalWriteError` (the same
    for every video after it: a full disk, a folder gone) is logged once, other failures per job.
    """

    def __init__(
        self, download: Callable[[JobResult, Path], Awaitable[Path]], directory: Path
    ) -> None:
        self._download = download
        self._directory = directory
        self._local_failure = False

    async def save(self, result: JobResult, emit: Callable[[Event], None] | None) -> JobResult:
        """``result`` with its video saved (``path`` set), or with the failure as ``error``."""
        try:
            path = await self._download(result, self._directory)
        except KlingError as exc:
            if not isinstance(exc, LocalWriteError):
                logger.warning("download of %s failed: %s", result.key, exc)
            elif not self._local_failure:
                self._local_failure = True
                logger.warning("%s (the results keep their video URLs)", exc)
            return attrs.evolve(result, error=exc)
        if emit is not None:
            emit(Downloaded(key=result.key, path=path))
        return attrs.evolve(result, path=path)


def writable_folder(directory: Path) -> None:
    """Create ``directory`` if missing; raise :class:`ValidationError` unless files fit in it."""
    try:
        make_directory(directory)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ValidationError(
            "download_to", f"cannot save videos in {directory}: {exc.strerror or exc}"
        ) from None


def _discard(file: IO[bytes], part: Path) -> None:
    # After a failed write (a full disk) the buffer still holds bytes, and closing fails to
    # write them again; the file is closed all the same.
    with contextlib.suppress(OSError):
        file.close()
    part.unlink(missing_ok=True)  # the partial file's space is given back


def _already_saved(directory: Path, name: str, size: int, head: bytes) -> Path | None:
    """A file of the chain ``name``, ``name-1``... with this size that starts with ``head``."""
    for number in range(MAX_SUFFIX + 1):
        path = directory / _suffixed(name, number)
        try:
            if path.stat().st_size == size:
                with path.open("rb") as existing:
                    if existing.read(len(head)) == head:
                        return path
        except FileNotFoundError:
            return None
        except OSError:
            continue  # a directory or unreadable file of that name: not ours, try the next
    return None


def _place(part: Path, directory: Path, name: str, url: str) -> Path:
    """Give ``part`` the first free name of the chain, or return an identical file's path."""
    for number in range(MAX_SUFFIX + 1):
        path = directory / _suffixed(name, number)
        if path.exists() or path.is_symlink():
            if path.is_file() and filecmp.cmp(path, part, shallow=False):
                return path
            continue
        try:
            # A hard link fails if the name was taken meanwhile, where a rename would clobber.
            os.link(part, path)
        except FileExistsError:
            if path.is_file() and filecmp.cmp(path, part, shallow=False):
                return path
            continue
        except OSError:
            # No hard links on this file system: rename, which is atomic but may replace a
            # file created in the instant since the check above.
            os.replace(part, path)
        # The file's bytes were fsynced; its new name lasts a power cut once the folder is too
        # (before the video is reported, and so before a journal counts it done).
        sync_directory(directory)
        return path
    raise DownloadError(f"no free file name like {name!r} in {directory}", url=_shown(url))
