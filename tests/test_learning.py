"""What the tracker learns of task durations: the cohort a model is fitted to, and the fit."""

from __future__ import annotations

import itertools
import math
import random

import pytest

import kling_async as ka
from kling_async._backoff import DurationModel
from kling_async._results import TaskSnapshot, TaskState
from kling_async._watch import _REFIT_GAP, Learner, Watch


def steady_flow(live: int, seconds: float, seed: int = 1) -> tuple[Learner, float]:
    """A large account in steady state: ``live`` tasks running, lognormal(180 s, 0.5) each."""
    rng = random.Random(seed)
    mean = 180 * math.exp(0.5**2 / 2)
    rate = live / mean  # starts per second that keep ``live`` tasks running
    learner = Learner()
    now = seconds
    for n in range(int(seconds * rate)):
        started = n / rate
        watch = Watch(f"t{n}", "lip-sync", started, lambda _: None)
        duration = rng.lognormvariate(math.log(180), 0.5)
        if started + duration <= now:
            watch.ended = duration
        learner.add(watch, live)
    learner.refit(now, 0.0475)
    return learner, now


@pytest.mark.parametrize(("live", "kept"), [(10, 256), (500, 1000), (1500, 3000), (9000, 4096)])
def test_the_cohort_is_twice_the_live_tasks_within_bounds(live: int, kept: int) -> None:
    learner = Learner()
    for n in range(10_000):
        learner.add(Watch(f"t{n}", "s", float(n), lambda _: None), live)
    assert len(learner.cohort) == kept
    assert learner.cohort[-1].task_id == "t9999"  # the newest are kept


@pytest.mark.parametrize("live", [20, 300, 500, 1000])
def test_a_large_account_learns_the_true_durations(live: int) -> None:
    # With 500 live tasks the newest 256 started within the last ~100 s and have barely begun
    # to finish: a fit to them alone found nothing (or kept a stale model). Twice the live tasks
    # reach back far enough for most of them to have ended.
    learner, _ = steady_flow(live, 3000.0)
    model = learner.model
    assert model is not None
    assert model.median == pytest.approx(180, rel=0.12)
    assert model.sigma == pytest.approx(0.5, abs=0.12)


def test_refits_come_at_most_every_refit_gap_once_a_model_exists() -> None:
    """Tasks that end within milliseconds would refit hundreds of times a second."""
    poll = ka.PollPolicy()
    learner = Learner()
    fits: list[float] = []
    for n in range(400):
        now = n * 0.001  # a finish every millisecond
        watch = Watch(f"t{n}", "s", now - 0.01, lambda _: None)
        learner.add(watch, 50)
        before, modelled = learner.fitted_at, learner.model is not None
        ended = TaskSnapshot(task_id=f"t{n}", state=TaskState.SUCCEEDED)
        learner.finished(watch, ended, now, now, poll)
        if modelled and learner.fitted_at != before:
            fits.append(now)
    assert learner.model is not None
    assert learner.model.median == pytest.approx(0.01, rel=0.05)
    gaps = [b - a for a, b in itertools.pairwise(fits)]
    assert gaps and min(gaps) >= _REFIT_GAP - 1e-9, fits
    assert len(fits) <= 0.4 / _REFIT_GAP + 1  # every 8 finishes would be 49


def test_models_of_one_spread_share_their_schedule() -> None:
    first = DurationModel(10.0, 0.5002, 0.05)
    second = DurationModel(30.0, 0.4999, 0.05)
    assert first.sigma == second.sigma == 0.5
    # Times are in medians: the same schedule, scaled.
    first_next = first.next_poll(10.0)
    assert first_next is not None  # (None: the far tail)
    assert second.next_poll(30.0) == pytest.approx(3 * first_next)
