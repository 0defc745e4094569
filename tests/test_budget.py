"""Estimates and budgets: ka.estimate against trims, audio files and unknowns; run_batch's budget
stopping submits (with and without a journal, across restarts), against the fake server, whose
tasks charge 0.5 unit per started 5 s (final_unit_deduction)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import kling_client, wav_bytes

import kling_async as ka
from kling_async._cli._journal_cmds import format_status
from kling_async.journal._export import read_status
from kling_async.testing import FakeKlingServer

VIDEO = "https://example.com/clip.mp4"


def job(n: int, **extra: Any) -> ka.LipSyncJob:
    fields: dict[str, Any] = {
        "video_url": VIDEO,
        "audio_url": f"https://example.com/line-{n}.mp3",
        "sound_end_time": 7000,  # estimated 1.0 unit (two started 5 s steps)
        "key": f"k{n}",
    }
    fields.update(extra)
    return ka.LipSyncJob.from_audio(**fields)


# -- estimates ---------------------------------------------------------------------------------


def test_estimates_from_trims_audio_files_and_unknowns() -> None:
    jobs = [
        job(1),  # 7 s trim: 2 steps
        job(2, sound_start_time=1000, sound_end_time=6000),  # exactly 5 s: 1 step
        job(3, audio_url=None, audio_file=wav_bytes(12.5), sound_end_time=None),  # 3 steps
        job(4, sound_end_time=None),  # an audio URL: unknown
        ka.LipSyncJob.from_text(video_url=VIDEO, text="hi", voice_id="v", key="t"),  # unknown
    ]
    found = ka.estimate(jobs)
    assert [(e.key, e.units, e.source) for e in found.jobs] == [
        ("k1", 1.0, "trim"),
        ("k2", 0.5, "trim"),
        ("k3", 1.5, "audio file"),
        ("k4", None, None),
        ("t", None, None),
    ]
    assert found.jobs[2].seconds == pytest.approx(12.5)
    assert (found.total_units, found.unknown) == (3.0, 2)
    assert found.total_usd == pytest.approx(3.0 * 0.14)


def test_every_price_is_overridable() -> None:
    prices = ka.Prices(units_per_5s=1.0, identify_face_units=0.25, usd_per_unit=0.2)
    found = ka.estimate([job(1), job(2)], prices=prices, identify_face=True)
    assert found.total_units == 2.25 + 2.25 and found.prices is prices
    assert ka.estimate([job(1)], identify_face=True).total_units == pytest.approx(1.005)
    for bad in ({"units_per_5s": -1}, {"identify_face_units": float("nan")}, {"usd_per_unit": "1"}):
        with pytest.raises(ka.ValidationError):
            ka.Prices(**bad)
    with pytest.raises(ka.ValidationError, match="prices"):
        ka.estimate([job(1)], prices={"units_per_5s": 1})  # type: ignore[arg-type]
    for units in (-1, float("inf"), "10", True):
        with pytest.raises(ka.ValidationError, match="units"):
            ka.Budget(units=units)  # type: ignore[arg-type]
    with pytest.raises(ka.ValidationError, match="prices"):
        ka.Budget(units=5, prices={"units_per_5s": 1})  # type: ignore[arg-type]


# -- the budget stop -----------------------------------------------------------------------------


async def run(server: FakeKlingServer, jobs: list[ka.LipSyncJob], **options: Any) -> Any:
    async with kling_client(server, max_in_flight=1) as client:
        batch = client.run_batch(jobs, **options)
        results = {r.key: r async for r in batch}
        return results, batch.progress


@pytest.mark.anyio
async def test_submitting_stops_before_the_budget_is_passed() -> None:
    jobs = [job(n) for n in range(1, 9)]
    async with FakeKlingServer(task_duration=0.01) as server:
        results, progress = await run(server, jobs, budget=ka.Budget(units=3.0))
        # Each job reserves 1.0 and is charged 0.5 when it ends: after five jobs 2.5 is spent,
        # and the sixth reservation (3.5) would pass 3.0.
        assert server.tasks_created == 5
        again, _ = await run(server, jobs, budget=ka.Budget(units=3.0))
        assert server.tasks_created == 10  # no journal: a second run starts from nothing
    ok = [key for key, r in results.items() if r.ok]
    stopped = {key: r.error for key, r in results.items() if not r.ok}
    assert sorted(ok) == ["k1", "k2", "k3", "k4", "k5"]
    assert sorted(stopped) == ["k6", "k7", "k8"]
    assert all(isinstance(e, ka.BudgetExceededError) for e in stopped.values())
    assert "would pass the budget of 3 units" in str(stopped["k6"])
    assert all(results[k].task_id is None for k in stopped)
    assert all(results[k].units == 0.5 for k in ok)
    assert progress.units == 2.5 and progress.succeeded == 5 and progress.failed == 3
    assert len(again) == 8


@pytest.mark.anyio
async def test_with_a_journal_the_spend_survives_reruns(tmp_path: Path) -> None:
    journal = str(tmp_path / "dub.journal")
    jobs = [job(n) for n in range(1, 9)]
    async with FakeKlingServer(task_duration=0.01) as server:
        first, _ = await run(server, jobs, budget=ka.Budget(units=2.0), journal=journal)
        assert server.tasks_created == 3  # 1.5 spent; a fourth would reach 2.5
        # The same budget again: 1.5 is spent already, so nothing more fits.
        second, _ = await run(server, jobs, budget=ka.Budget(units=2.0), journal=journal)
        assert server.tasks_created == 3
        # A larger budget goes on from what was spent: 1.5 + two more jobs of 0.5 = 2.5.
        third, _ = await run(server, jobs, budget=ka.Budget(units=3.0), journal=journal)
        assert server.tasks_created == 5
    assert sorted(k for k, r in first.items() if r.ok) == ["k1", "k2", "k3"]
    assert sorted(second) == ["k4", "k5", "k6", "k7", "k8"]  # the rest were reported already
    assert all(isinstance(r.error, ka.BudgetExceededError) for r in second.values())
    assert sorted(k for k, r in third.items() if r.ok) == ["k4", "k5"]
    assert all(isinstance(third[k].error, ka.BudgetExceededError) for k in ("k6", "k7", "k8"))
    status = await read_status(journal)  # what `kling-async status --journal` shows
    assert (status.units_spent, status.units_reserved) == (2.5, 0.0)
    assert "budget: 2.5 units spent, 0 reserved" in format_status(journal, status)


async def finish_everything(server: FakeKlingServer) -> None:
    while True:
        for task in list(server.tasks.values()):
            if not task.terminal:
                server.finish(task.task_id)
        await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_tasks_running_at_a_crash_stay_reserved(tmp_path: Path) -> None:
    journal = str(tmp_path / "dub.journal")
    jobs = [job(n) for n in range(1, 7)]
    async with FakeKlingServer(task_duration=30.0) as server:
        async with kling_client(server, max_in_flight=6) as client:
            results = client.run_batch(jobs[:4], budget=ka.Budget(units=100), journal=journal)
            async with results:
                for _ in range(500):
                    if server.tasks_created == 4:
                        break
                    await anyio.sleep(0.01)
                # Leaving now, as a crash would: four tasks run on, reserved 1.0 each.
        assert server.tasks_created == 4
        got: dict[str, ka.JobResult] = {}
        async with kling_client(server, max_in_flight=6) as client:
            results = client.run_batch(jobs, budget=ka.Budget(units=5.0), journal=journal)
            async with results, anyio.create_task_group() as group:
                with anyio.fail_after(5):
                    async for result in results:
                        got[result.key] = result
                        if result.key == "k6":  # refused at once: 4.0 held + 1.0 (k5) = 5.0
                            group.start_soon(finish_everything, server)
                group.cancel_scope.cancel()
    assert server.tasks_created == 5  # the four resumed tasks were tracked, not submitted again
    assert isinstance(got["k6"].error, ka.BudgetExceededError)
    assert "(5 already spent or reserved)" in str(got["k6"].error)
    assert (await read_status(journal)).units_spent == 5 * 0.5
    assert all(got[f"k{n}"].ok for n in range(1, 6))


# -- the ledger's rules, one result at a time --------------------------------------------------


@pytest.mark.anyio
async def test_what_replaces_a_reservation() -> None:
    from kling_async._budget import BudgetLedger

    ledger = BudgetLedger(ka.Budget(units=100), identify_face=False)
    for n in range(1, 7):
        await ledger.reserve(f"k{n}", job(n))
    assert (ledger.spent, ledger.reserved) == (0.0, 6.0)

    def result(key: str, state: ka.TaskState, **extra: Any) -> ka.JobResult:
        return ka.JobResult(key=key, task_id="t-" + key, state=state, **extra)

    ledger.settle(result("k1", ka.TaskState.SUCCEEDED, units=0.5))  # what the server said
    ledger.settle(result("k2", ka.TaskState.SUCCEEDED))  # said nothing: the estimate stands
    failed = ka.TaskFailedError("no face", task_id="t-k3")
    ledger.settle(result("k3", ka.TaskState.FAILED, error=failed))  # a failed task costs nothing
    unknown = ka.SubmitOutcomeUnknownError("lip-sync")
    ledger.settle(result("k4", ka.TaskState.FAILED, error=unknown))  # may exist: stays
    ledger.settle(result("k5", ka.TaskState.TIMED_OUT))  # still running: stays
    ledger.settle(result("k6", ka.TaskState.CANCELLED))  # still running: stays
    ledger.settle(result("never-reserved", ka.TaskState.SUCCEEDED, units=9.0))
    assert (ledger.spent, ledger.reserved) == (1.5, 3.0)
    ledger.settle(result("k1", ka.TaskState.SUCCEEDED, units=0.5))  # a second report: no change
    assert ledger.spent == 1.5


@pytest.mark.anyio
async def test_unknown_lengths_reserve_the_longest_audio() -> None:
    from kling_async._budget import BudgetLedger

    ledger = BudgetLedger(ka.Budget(units=6.0), identify_face=False)
    await ledger.reserve("a", job(1, sound_end_time=None))  # 60 s: 12 steps of 0.5
    assert ledger.reserved == 6.0
    with pytest.raises(ka.BudgetExceededError):
        await ledger.reserve("b", job(2, sound_end_time=3000))
    two_step = BudgetLedger(ka.Budget(units=6.0), identify_face=True)
    with pytest.raises(ka.BudgetExceededError):  # 6.0 plus an identify-face call
        await two_step.reserve("a", job(1, sound_end_time=None))
    with pytest.raises(ka.ValidationError, match="budget"):
        BudgetLedger(5.0, identify_face=False)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_an_identify_face_charge_counts_for_its_job_and_the_budget() -> None:
    # The official flow's first step, identify-face, says what it cost: the job's units (and
    # the batch's, and the budget's) include it, also when the lip-sync step then fails.
    async with FakeKlingServer(task_duration=0.01, identify_face_units=0.05) as server:
        server.script("advanced-submit", status=400, code=1201, message="bad face", times=1)
        async with kling_client(server, max_in_flight=1, advanced=True) as client:
            batch = client.run_batch([job(1), job(2)], budget=ka.Budget(units=3.0))
            results = {r.key: r async for r in batch}
            progress = batch.progress
    failed, ok = results["k1"], results["k2"]
    assert isinstance(failed.error, ka.InvalidRequestError)  # the lip-sync step was refused
    assert failed.units == pytest.approx(0.05)  # the identify-face call was paid
    assert ok.ok and ok.units == pytest.approx(1.0 + 0.05)  # 7 s: two started 5 s steps
    assert progress.units == pytest.approx(1.1)
