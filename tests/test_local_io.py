"""Local write failures during a batch: a bad download folder is a ValidationError up front, and
a folder that goes away in mid-run costs one warning, never a result."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import anyio
import pytest
from helpers import kling_client, requests_sent, text_job

import kling_async as ka
from kling_async.testing import FakeKlingServer


@pytest.mark.anyio
async def test_a_download_folder_that_cannot_be_made_is_a_validation_error(
    tmp_path: Path,
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    async with FakeKlingServer() as server, kling_client(server) as client:
        with pytest.raises(ka.ValidationError, match="download_to") as caught:
            async for _ in client.run_batch(map(text_job, range(3)), download_to=a_file / "v"):
                pass
        assert str(a_file) in str(caught.value)
        assert requests_sent(server) == 0


@pytest.mark.anyio
async def test_a_download_folder_gone_in_mid_run_is_one_warning_and_no_lost_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "videos"
    caplog.set_level(logging.WARNING, logger="kling_async")
    results: list[ka.JobResult] = []
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=2) as client:
            async for result in client.run_batch(map(text_job, range(6)), download_to=folder):
                results.append(result)
                if len(results) == 1:
                    # The folder is replaced by a file: nothing can be saved there any more.
                    # (Moved away in one step: a download in flight may be writing in it.)
                    folder.rename(tmp_path / "moved")
                    folder.write_text("in the way")
    assert len(results) == 6 and all(r.ok and r.video_url for r in results)
    assert results[0].path is not None and results[0].error is None
    failed = [r for r in results if r.error is not None]
    # (A video or two may have been saved while the first result was on its way to us.)
    assert len(failed) >= 3
    assert all(isinstance(r.error, ka.LocalWriteError) and r.path is None for r in failed)
    assert all(isinstance(r.error, ka.DownloadError) for r in failed)  # a kind of it
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(folder) in warnings[0]


@pytest.mark.anyio
async def test_a_rerun_with_the_journal_saves_the_videos_a_local_failure_left_unsaved(
    tmp_path: Path,
) -> None:
    folder, journal = tmp_path / "videos", tmp_path / "dub.journal"
    jobs = [text_job(n) for n in range(5)]
    first: list[ka.JobResult] = []
    async with FakeKlingServer(task_duration=0.02) as server:
        async with kling_client(server, max_in_flight=2) as client:
            batch = client.run_batch(jobs, download_to=folder, journal=journal)
            async for result in batch:
                first.append(result)
                if len(first) == 1:  # the disk "fills up": nothing more can be saved there
                    folder.rename(tmp_path / "moved")
                    folder.write_text("in the way")
        unsaved = {r.key for r in first if r.path is None}
        assert len(unsaved) >= 3 and all(r.ok for r in first)
        assert all(isinstance(r.error, ka.LocalWriteError) for r in first if r.key in unsaved)
        created = server.tasks_created
        # Space freed, folder back: the same batch again saves what was not saved, and only
        # that, without a new task.
        folder.unlink()
        (tmp_path / "moved").rename(folder)
        async with kling_client(server, max_in_flight=2) as client:
            again = [r async for r in client.run_batch(jobs, download_to=folder, journal=journal)]
            # A third run has nothing left to report.
            third = [r async for r in client.run_batch(jobs, download_to=folder, journal=journal)]
        assert server.tasks_created == created and third == []
    assert {r.key for r in again} == unsaved
    assert all(r.ok and r.error is None and r.path is not None for r in again)
    assert sorted(p.name for p in folder.glob("*.mp4")) == [f"{n}.mp4" for n in range(5)]


async def _slow_videos(
    session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestStartParams
) -> None:
    if "/videos/" in params.url.path:
        await anyio.sleep(0.5)  # a slow CDN: each video takes half a second


@pytest.mark.anyio
async def test_a_stopped_batch_names_the_paid_tasks_whose_videos_were_still_downloading(
    tmp_path: Path,
) -> None:
    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(_slow_videos)
    taken: list[ka.JobResult] = []
    async with FakeKlingServer(task_duration=0.02) as server:
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            # One download at a time: the tasks that end meanwhile wait for theirs.
            async with kling_client(
                server, max_in_flight=6, max_downloads=1, session=session
            ) as client:
                results = client.run_batch(map(text_job, range(6)), download_to=tmp_path / "v")
                async with results:
                    async for result in results:
                        taken.append(result)
                        break  # (Ctrl-C, say) while the other videos are on their way
                left = set(results.running_task_ids)
        assert len(server.tasks) == 6
    # No paid task is both unreported and unnamed: what was not handed over is named.
    assert len(taken) == 1 and taken[0].task_id not in left
    assert {r.task_id for r in taken} | left == set(server.tasks)
