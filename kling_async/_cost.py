"""What jobs will cost, estimated before anything is sent: a price table and :func:`estimate`.

Kling bills resource-pack units (or cash at about $0.14 a unit), and every finished task says
what it cost (``final_unit_deduction``, kept as :attr:`JobResult.units`).  No official
per-second lip-sync price is published, so every figure here is a documented, overridable
default (docs/protocol.md, Costs):

* ``units_per_5s = 0.5``: third-party resellers of Kling lip-sync charge per 5 s of output
  (fal: $0.014 a second in 5 s steps, i.e. $0.07 per 5 s, which is 0.5 unit at $0.14 a unit);
  a started 5 s step counts whole.
* ``identify_face_units = 0.005``: apimodels.app sells identify-face at $0.0007 a call, which is
  0.005 unit at $0.14; charged once per job in the two-step flows (official advanced lip-sync,
  apimodels).  The official page prices no identify-face call: set it to 0 if yours is free.
* ``unknown_seconds = 60``: what a budget reserves for a job whose length cannot be told
  locally (a text job, an audio URL): the longest audio advanced lip-sync takes.  An estimate
  shows such jobs as unknown instead.

A job's length is its trim (``sound_end_time - sound_start_time``) or, failing that, its local
audio file's length read from the header (WAV always; MP3/M4A/AAC with the ``audio`` extra).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from ._errors import ValidationError
from ._jobs import LipSyncJob
from ._prices import PRICE_DEFAULTS

__all__ = ["DEFAULT_PRICES", "Estimate", "JobEstimate", "Prices", "estimate", "estimate_job"]


def _price(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value >= 0):
        raise ValidationError(attribute.name, "must be a finite number of at least 0")


@attrs.frozen(kw_only=True)
class Prices:
    """The price table estimates and budgets use; see the module docstring for each default."""

    #: Units charged per started 5 s of output video.
    units_per_5s: float = attrs.field(default=PRICE_DEFAULTS["units_per_5s"], validator=_price)
    #: Units charged per identify-face call (two-step flows only).
    identify_face_units: float = attrs.field(
        default=PRICE_DEFAULTS["identify_face_units"], validator=_price
    )
    #: Seconds a budget assumes for a job whose length is unknown.
    unknown_seconds: float = attrs.field(
        default=PRICE_DEFAULTS["unknown_seconds"], validator=_price
    )
    #: US dollars per unit, for showing a total in money (list price of a unit).
    usd_per_unit: float = attrs.field(default=PRICE_DEFAULTS["usd_per_unit"], validator=_price)

    def units_for(self, seconds: float, *, identify_face: bool = False) -> float:
        """Units for a video of ``seconds`` (started 5 s steps), plus an identify-face call."""
        steps = math.ceil(seconds / 5 - 1e-9)  # 10.0 s is two steps, not three
        units = self.units_per_5s * max(steps, 1)
        return units + (self.identify_face_units if identify_face else 0.0)


#: The defaults, as documented in the module docstring.
DEFAULT_PRICES = Prices()


@attrs.frozen(kw_only=True)
class JobEstimate:
    """One job's estimate: its key, output ``seconds`` and ``units`` (None when unknown).

    ``source`` says where the length came from: ``"trim"``, ``"audio file"`` or None.
    """

    key: str | None
    seconds: float | None
    units: float | None
    source: str | None = None


@attrs.frozen(kw_only=True)
class Estimate:
    """Estimates of many jobs: each one, the total of those known, and how many are unknown."""

    jobs: tuple[JobEstimate, ...]
    total_units: float
    unknown: int
    prices: Prices = DEFAULT_PRICES

    @property
    def total_usd(self) -> float:
        """:attr:`total_units` in US dollars at ``prices.usd_per_unit``."""
        return self.total_units * self.prices.usd_per_unit


def job_seconds(job: LipSyncJob) -> tuple[float | None, str | None]:
    """How long ``job``'s video will be, as far as can be told locally, and from what."""
    if job.sound_end_time is not None:
        return (job.sound_end_time - job.sound_start_time) / 1000, "trim"
    seconds = job.audio_seconds()
    if seconds is not None:
        return max(seconds - job.sound_start_time / 1000, 0.0), "audio file"
    return None, None


def estimate_job(
    job: LipSyncJob, prices: Prices = DEFAULT_PRICES, *, identify_face: bool = False
) -> JobEstimate:
    """The estimate of one job (units None when its length cannot be told locally)."""
    seconds, source = job_seconds(job)
    units = None if seconds is None else prices.units_for(seconds, identify_face=identify_face)
    return JobEstimate(key=job.key, seconds=seconds, units=units, source=source)


def estimate(
    jobs: Iterable[LipSyncJob],
    prices: Prices = DEFAULT_PRICES,
    *,
    identify_face: bool = False,
) -> Estimate:
    """Estimate what ``jobs`` will cost, in units, before anything is sent.

    ``identify_face`` adds an identify-face call per job (the two-step flows: official
    advanced lip-sync, apimodels).  Jobs whose length cannot be told are counted in
    ``unknown`` and left out of the total.
    """
    if not isinstance(prices, Prices):
        raise ValidationError("prices", "must be a kling_async.Prices")
    each = tuple(estimate_job(job, prices, identify_face=identify_face) for job in jobs)
    known = [one.units for one in each if one.units is not None]
    return Estimate(
        jobs=each,
        total_units=sum(known),
        unknown=len(each) - len(known),
        prices=prices,
    )
