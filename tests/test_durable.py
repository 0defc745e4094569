"""Names that survive a power cut: folders synced after a download's rename and a journal's opening.

A power cut itself cannot be staged here.  What can be checked for real: the helper syncs a real
folder, ignores a folder the system refuses to sync (``/proc`` answers EINVAL) and nothing else,
and, watched with ``strace`` where it is installed, a batch really fsyncs the download folder
after linking a video into it and the journal's folder after opening the journal.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import kling_client, text_job

from kling_async._durable import make_directory, sync_directory
from kling_async.testing import FakeKlingServer, video_bytes

pytestmark = pytest.mark.anyio

LINUX_PROC = sys.platform.startswith("linux") and os.path.isdir("/proc/self")


@pytest.mark.skipif(not LINUX_PROC, reason="needs Linux's /proc, which refuses fsync")
def test_a_folder_that_cannot_be_synced_is_tolerated() -> None:
    fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError, match="Invalid argument") as refused:
            os.fsync(fd)  # the refusal is real...
    finally:
        os.close(fd)
    assert refused.value.errno == errno.EINVAL
    sync_directory("/proc")  # ...and ignored: nothing raised


def test_other_failures_are_raised(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sync_directory(tmp_path / "gone")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        sync_directory(tmp_path / "file")


def test_make_directory_makes_every_missing_folder(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    make_directory(deep)
    make_directory(deep)  # (there already: nothing to do)
    assert deep.is_dir() and sorted(os.listdir(tmp_path)) == ["a"]


async def test_a_video_saved_into_a_new_folder_is_whole_with_no_part_left(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "videos"
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server) as client:
            results = [r async for r in client.run_batch([text_job(1)], download_to=folder)]
    [result] = results
    assert result.ok and result.path is not None and result.task_id is not None
    assert result.path.read_bytes() == video_bytes(result.task_id)
    assert os.listdir(folder) == [result.path.name]  # the .part file is gone


SCRIPT = """
import anyio, sys
sys.path.insert(0, {tests!r})
from helpers import kling_client, text_job
from kling_async.testing import FakeKlingServer

async def main():
    async with FakeKlingServer(task_duration=0.01) as server:
        async with kling_client(server) as client:
            results = client.run_batch(
                [text_job(1, key="clip")], download_to={videos!r}, journal={journal!r}
            )
            async for result in results:
                assert result.ok and result.path is not None, result
                print("SAVED", result.path)

anyio.run(main)
"""


OPENED = re.compile(r'(\d+) +openat\(AT_FDCWD, "([^"]*)", [^)]*O_DIRECTORY[^)]*\) = (\d+)')
CLOSED = re.compile(r"(\d+) +close\((\d+)\)")
SYNCED = re.compile(r"(\d+) +fsync\((\d+)\) += 0")


def folder_syncs(trace: str, folder: Path) -> list[int]:
    """Line numbers of each fsync of ``folder`` in ``trace`` (strace -f, one thread id a line)."""
    opened: dict[tuple[str, str], str] = {}  # (thread, fd) -> path
    synced = []
    for number, line in enumerate(trace.splitlines()):
        if m := OPENED.match(line):
            opened[m[1], m[3]] = m[2]
        elif m := CLOSED.match(line):
            opened.pop((m[1], m[2]), None)
        elif (m := SYNCED.match(line)) and Path(opened.get((m[1], m[2]), "")) == folder:
            synced.append(number)
    return synced


def test_the_folders_are_synced_after_the_video_is_linked_and_the_journal_opened(
    tmp_path: Path,
) -> None:
    videos, books = tmp_path / "videos", tmp_path / "journals"
    books.mkdir()
    script = tmp_path / "run.py"
    tests = str(Path(__file__).parent)
    journal = str(books / "dub.journal")
    script.write_text(SCRIPT.format(tests=tests, videos=str(videos), journal=journal))
    # (CI installs strace: missing, this fails rather than skip; see .ci/run.)
    assert shutil.which("strace"), "strace is not installed (Debian package strace)"
    trace = tmp_path / "trace.txt"
    calls = "openat,close,fsync,link,linkat,rename,renameat,renameat2"
    command = ["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={calls}"]
    done = subprocess.run(
        [*command, sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert "SAVED" in done.stdout
    lines = trace.read_text()
    video = str(videos / "clip.mp4")
    placed = [
        n
        for n, line in enumerate(lines.splitlines())
        if re.search(r"(link|rename)(at2?)?\(.*\.part\", .*\"" + re.escape(video) + '"', line)
    ]
    assert placed, "the video was not linked into its folder"
    assert [n for n in folder_syncs(lines, videos) if n > placed[0]], "no fsync of the folder"
    wal = [n for n, line in enumerate(lines.splitlines()) if f'"{journal}-wal", ' in line]
    assert wal, "the journal's WAL was not opened"
    # After the WAL's creation (each opening makes it anew): its name lasts a power cut too.
    assert [n for n in folder_syncs(lines, books) if n > wal[0]], "no fsync of the journal's folder"
