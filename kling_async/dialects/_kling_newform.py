"""The callback body of Kling's newer APIs, ``{id, status, outputs, billing}``, as a snapshot.

APIs of the newer design (model version in the path) POST this form instead of the task object;
the console's "send test callback" uses it too (docs/protocol.md, Callbacks).  Its wire
structures live here, structured by the official format's converter (:mod:`._kling_wire`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from .._errors import MalformedResponseError
from .._results import TaskSnapshot, TaskState
from ._kling_wire import lenient_number, make_returned, map_state, seconds, structure

__all__ = ["new_form_snapshot"]


@attrs.frozen
class _Output:
    url: str | None = None
    type: str | None = None
    id: str | None = None
    watermark_url: str | None = None
    duration: Any = None


@attrs.frozen
class _Charge:
    charge_type: str | None = None
    amount: Any = None
    list_price: Any = None


@attrs.frozen
class _NewForm:
    # The callback body of Kling's newer APIs (docs/protocol.md, Callbacks).
    id: str
    status: str
    message: str | None = None
    create_time: float | None = None
    update_time: float | None = None
    external_id: str | None = None
    # null is an empty list (docs/protocol.md, Callbacks: the test callback has no outputs).
    outputs: list[_Output] | None = None
    billing: list[_Charge] | None = None


def new_form_snapshot(raw: object, *, where: str) -> TaskSnapshot:
    """The snapshot of a newer-design callback body ``{id, status, outputs, billing, ...}``.

    The console's "send test callback" uses this form (``status: submitted``, no outputs).
    Units are the ``amount`` of ``unit`` charges; a ``cash`` charge is a balance deduction.
    """
    body = structure(raw, _NewForm, where=where, status=None)
    if not body.id.strip():
        raise MalformedResponseError(f"{where}.id is empty")
    state = map_state(body.status, where=where, status=None)
    outputs, billing = body.outputs or [], body.billing or []
    videos = [out for out in outputs if out.url and out.type in (None, "video")]
    if state is TaskState.SUCCEEDED and not videos:
        raise MalformedResponseError(f"{where}: task {body.id} succeeded without outputs[].url")
    units = _total(c.amount for c in billing if c.charge_type == "unit")
    cash = [c for c in billing if c.charge_type == "cash"]
    balance = None
    if cash:
        balance = {"quota": _total(c.amount for c in cash)}
        balance["list_price"] = _total(c.list_price for c in cash)
    first = videos[0] if videos else None
    return TaskSnapshot(
        task_id=body.id,
        state=state,
        message=body.message or None,
        video_urls=tuple(out.url for out in videos if out.url),
        created_at=seconds(body.create_time),
        updated_at=seconds(body.update_time),
        external_task_id=body.external_id or None,
        returned=make_returned(
            first.id if first else None,
            first.duration if first else None,
            first.watermark_url if first else None,
            units,
            balance,
        ),
    )


def _total(amounts: Iterable[object]) -> float | None:
    """The sum of billing amounts; None when there are none or one is unreadable."""
    numbers = [lenient_number(amount) for amount in amounts]
    if not numbers or None in numbers:
        return None
    return sum(number for number in numbers if number is not None)
