"""A batch's budget: each submit reserves its estimate first, actual charges replace it.

``run_batch(jobs, budget=Budget(units=200))``: before a job's first submit, its estimated
cost (:mod:`._cost`; a job of unknown length as ``Prices.unknown_seconds``) is reserved.  When
that reservation would pass ``units``, submitting stops: that job and every later one end as
values with :class:`~kling_async.BudgetExceededError`, while tasks already running finish.  As
each task ends, what the server says it cost (``final_unit_deduction``) replaces the
reservation; a success without a figure keeps the estimate, a task that failed or a submit that
created nothing costs 0, and a task still running (timed out, cancelled, outcome unknown) stays
reserved.

With a journal the reservations and charges are kept in it, so that a rerun after a crash (or
with a larger budget) starts from what was spent.  A resumed job whose task may already exist
is never refused: it is being paid for anyway.

With a PostgreSQL journal the budget is the batch's, shared by every worker: each reservation
is checked against, and added to, the total of all workers' in one transaction
(:class:`SharedChargeStore`), so that workers together never pass ``units`` (give each the
same budget: each checks the total against its own).  A job taken over from a dead worker
replaces that worker's reservation; it is not counted twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NoReturn, Protocol, runtime_checkable

import attrs

from ._cost import DEFAULT_PRICES, Prices, estimate_job
from ._errors import (
    BudgetExceededError,
    JournalError,
    SubmitOutcomeUnknownError,
    ValidationError,
)
from ._jobs import LipSyncJob
from ._results import JobResult, TaskState

__all__ = ["Budget", "BudgetLedger", "ChargeStore", "SharedChargeStore"]

logger = logging.getLogger("kling_async")


def _units(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value >= 0):
        raise ValidationError("units", "must be a finite number of units, at least 0")


def _prices(instance: object, attribute: attrs.Attribute[Prices], value: Prices) -> None:
    if not isinstance(value, Prices):
        raise ValidationError("prices", "must be a kling_async.Prices")


@attrs.frozen(kw_only=True)
class Budget:
    """The most a batch may spend, in units, and the prices its reservations use."""

    units: float = attrs.field(validator=_units)
    prices: Prices = attrs.field(default=DEFAULT_PRICES, validator=_prices)


@runtime_checkable
class ChargeStore(Protocol):
    """Where reservations and charges survive a restart (the SQLite journal is one)."""

    def charges(self) -> dict[str, tuple[float, bool]]:
        """Every job's recorded ``(units, settled)``."""
        ...

    def charge(self, key: str, units: float, settled: bool) -> None:
        """Record ``key``'s reservation (``settled`` False) or actual charge (True)."""
        ...


@runtime_checkable
class SharedChargeStore(Protocol):
    """Where every worker of a batch reserves from one budget (the PostgreSQL journal is one)."""

    async def reserve_charge(
        self, key: str, units: float, *, limit: float, force: bool
    ) -> tuple[bool, float]:
        """Make ``units`` ``key``'s reservation unless the batch's total would pass ``limit``.

        Returns whether it did (always, when ``force``) and the batch's total.
        """
        ...

    def charge(self, key: str, units: float, settled: bool) -> None:
        """Record ``key``'s actual charge (``settled`` True) with its result."""
        ...


class _Record(Protocol):
    @property
    def may_have_task(self) -> bool: ...


class _Journal(Protocol):
    def job(self, key: str) -> _Record | None: ...


class _Resumed(Protocol):
    # What the ledger asks of a batch's Resume: its journal (narrow, so no import circle).
    @property
    def journal(self) -> _Journal: ...


class BudgetLedger:
    """One batch's spending against its :class:`Budget`; see the module docstring.

    ``identify_face`` adds an identify-face call to each estimate (two-step dialects).
    """

    def __init__(self, budget: Budget, *, identify_face: bool) -> None:
        if not isinstance(budget, Budget):
            raise ValidationError("budget", "must be a kling_async.Budget")
        self.budget = budget
        self._identify_face = identify_face
        self._held: dict[str, float] = {}  # reserved, not yet settled
        self._settled: dict[str, float] = {}
        self._spent = 0.0
        self._store: ChargeStore | SharedChargeStore | None = None
        self._shared: SharedChargeStore | None = None
        self._shared_total = 0.0  # the batch's total as the last shared reservation saw it
        self._attached = False
        self.stopped = False

    @property
    def spent(self) -> float:
        """Units charged by tasks that have ended (this worker's, with a shared journal)."""
        return self._spent

    @property
    def reserved(self) -> float:
        """Units reserved for tasks not yet ended."""
        return sum(self._held.values())

    def _attach(self, resume: _Resumed | None) -> None:
        self._attached = True
        journal = resume.journal if resume is not None else None
        if isinstance(journal, SharedChargeStore):
            self._store = self._shared = journal  # the totals live in the database
            return
        if not isinstance(journal, ChargeStore):
            return  # no journal, or one that keeps no charges: spending lives in memory only
        self._store = journal
        for key, (units, settled) in journal.charges().items():
            if settled:
                self._settled[key] = units
                self._spent += units
            else:
                self._held[key] = units
        logger.info(
            "budget: %.4g units spent and %.4g reserved before this run", self.spent, self.reserved
        )

    async def reserve(self, key: str, job: LipSyncJob, resume: _Resumed | None = None) -> None:
        """Reserve ``job``'s estimate before its first submit, or raise BudgetExceededError."""
        if not self._attached:
            self._attach(resume)
        if key in self._held:
            return  # reserved by an earlier run, whose task is tracked again now
        record = resume.journal.job(key) if resume is not None else None
        paid = record is not None and record.may_have_task
        self._spent -= self._settled.pop(key, 0.0)  # settled but run again: reserve anew
        prices = self.budget.prices
        units = estimate_job(job, prices, identify_face=self._identify_face).units
        if units is None:
            units = prices.units_for(prices.unknown_seconds, identify_face=self._identify_face)
        limit = self.budget.units * (1 + 1e-12)  # (sums of floats: a rounding is no excess)
        if self._shared is not None:
            if self.stopped and not paid:
                self._refuse(key, units, self._shared_total)
            first = not self._shared_total
            granted, self._shared_total = await self._shared.reserve_charge(
                key, units, limit=limit, force=paid
            )
            if not granted:
                self._refuse(key, units, self._shared_total)
            if first:
                logger.info("budget: %.4g units spent or reserved by the batch", self._shared_total)
            self._held[key] = units
            return
        total = self._spent + self.reserved
        if not paid and (self.stopped or total + units > limit):
            self._refuse(key, units, total)
        self._held[key] = units
        # Not waited for: the submit's own journal write, next, commits it too.
        self._record(key, units, False)

    def _refuse(self, key: str, units: float, total: float) -> NoReturn:
        """Stop submitting (once said in the log) and raise for ``key``."""
        if not self.stopped:
            logger.warning(
                "budget: stopping submits; %s would add %.4g units to %.4g (budget %.4g)",
                key,
                units,
                total,
                self.budget.units,
            )
        self.stopped = True
        raise BudgetExceededError(units=units, spent=total, limit=self.budget.units)

    def settle(self, result: JobResult) -> None:
        """Replace ``result``'s reservation with what its task cost, once the task has ended."""
        key = result.key
        held = self._held.get(key)
        if held is None:
            return  # never reserved: refused by the budget, or invalid
        ended = result.state is TaskState.SUCCEEDED or (
            result.state is TaskState.FAILED
            and not isinstance(result.error, SubmitOutcomeUnknownError)
        )
        if not ended:
            # May still run (timed out, cancelled, outcome unknown): stays reserved, even when
            # an earlier step's charge (identify-face) is known.
            return
        if result.units is not None:
            actual = result.units  # (a two-step job's: both steps' charges)
        elif result.state is TaskState.SUCCEEDED:
            actual = held  # the server said nothing: the estimate stands
        else:
            actual = 0.0  # a failed task, or a submit that created nothing
        del self._held[key]
        self._settled[key] = actual
        self._spent += actual
        self._record(key, actual, True)

    def _record(self, key: str, units: float, settled: bool) -> None:
        if self._store is None:
            return
        # A journal that can no longer be written stops the batch at its own next write (the
        # submit's intent, the job's result), which raises this same error.
        with contextlib.suppress(JournalError):
            self._store.charge(key, units, settled)
