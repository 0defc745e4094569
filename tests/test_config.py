"""PollPolicy and RetryPolicy: real-world defaults, every field validated, frozen, keyword-only."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kling_async import KlingError, PollPolicy, RetryPolicy, ValidationError

SETTINGS = settings(max_examples=50, deadline=None)
Policy = type[PollPolicy] | type[RetryPolicy]

# What each kind of field accepts and refuses.
KINDS: dict[str, tuple[list[Any], list[Any]]] = {
    "positive": ([0.001, 1, 2.5, 86400], [0, -1, -0.5, math.inf, math.nan, True, "1", None]),
    "non_negative": ([0, 0.0, 0.001, 3, 60.5], [-0.001, -1, math.inf, math.nan, True, "0", None]),
    "growth": ([1, 1.0, 1.5, 2, 10], [0.99, 0, -2, math.inf, math.nan, True, "2", None]),
    "fraction": ([0, 0.0, 0.25, 1, 1.0], [-0.01, 1.01, 2, math.nan, math.inf, True, "0.1", None]),
    "count": ([1, 2, 100], [0, -1, 1.0, 2.5, True, "3", None]),
    "flag": ([True, False], [0, 1, "yes", None, "False"]),
}

FIELDS: list[tuple[Policy, str, str]] = [
    (PollPolicy, "first_delay", "non_negative"),
    (PollPolicy, "max_interval", "positive"),
    (PollPolicy, "multiplier", "growth"),
    (PollPolicy, "jitter", "fraction"),
    (PollPolicy, "timeout", "positive"),
    (PollPolicy, "adaptive", "flag"),
    (PollPolicy, "list_queries", "flag"),
    (PollPolicy, "max_concurrent_queries", "count"),
    (PollPolicy, "callback_safety_interval", "positive"),
    (PollPolicy, "lag_share", "positive"),
    (PollPolicy, "list_yield", "positive"),
    (PollPolicy, "list_min_interval", "positive"),
    (RetryPolicy, "max_attempts", "count"),
    (RetryPolicy, "base_delay", "non_negative"),
    (RetryPolicy, "max_delay", "non_negative"),
    (RetryPolicy, "multiplier", "growth"),
    (RetryPolicy, "jitter", "fraction"),
    (RetryPolicy, "concurrency_delay", "non_negative"),
    (RetryPolicy, "max_slot_wait", "positive"),
]
IDS = [f"{cls.__name__}.{name}" for cls, name, _ in FIELDS]


def test_every_field_has_a_rule_here() -> None:
    # A new policy field must be added to FIELDS, so that its validation is tested too.
    for cls in (PollPolicy, RetryPolicy):
        declared = {f.name for f in attrs.fields(cls)}
        assert declared == {name for c, name, _ in FIELDS if c is cls}


@pytest.mark.parametrize(("cls", "name", "kind"), FIELDS, ids=IDS)
def test_field_accepts(cls: Policy, name: str, kind: str) -> None:
    for value in KINDS[kind][0]:
        assert getattr(cls(**{name: value}), name) == value


@pytest.mark.parametrize(("cls", "name", "kind"), FIELDS, ids=IDS)
def test_field_refuses(cls: Policy, name: str, kind: str) -> None:
    for value in KINDS[kind][1]:
        with pytest.raises(ValidationError) as info:
            cls(**{name: value})
        err = info.value
        assert isinstance(err, ValueError)
        assert isinstance(err, KlingError)
        assert err.field == name, value
        assert str(err).startswith(f"{name}:")


@pytest.mark.parametrize(("cls", "name", "kind"), FIELDS, ids=IDS)
def test_evolve_revalidates(cls: Policy, name: str, kind: str) -> None:
    policy = cls()
    with pytest.raises(ValidationError) as info:
        attrs.evolve(policy, **{name: KINDS[kind][1][0]})
    assert info.value.field == name


@SETTINGS
@given(seconds=st.floats(min_value=0, max_value=1e9))
def test_any_non_negative_delay(seconds: float) -> None:
    assert PollPolicy(first_delay=seconds).first_delay == seconds
    assert RetryPolicy(base_delay=seconds, max_delay=seconds).max_delay == seconds


@SETTINGS
@given(seconds=st.floats(max_value=0, allow_nan=False).filter(lambda s: s <= 0))
def test_timeout_must_be_positive(seconds: float) -> None:
    with pytest.raises(ValidationError) as info:
        PollPolicy(timeout=seconds)
    assert info.value.field == "timeout"


@SETTINGS
@given(jitter=st.floats(allow_nan=False).filter(lambda j: not 0 <= j <= 1))
def test_jitter_outside_0_to_1(jitter: float) -> None:
    for cls in (PollPolicy, RetryPolicy):
        with pytest.raises(ValidationError) as info:
            cls(jitter=jitter)
        assert info.value.field == "jitter"


@SETTINGS
@given(attempts=st.integers(max_value=0))
def test_max_attempts_at_least_one(attempts: int) -> None:
    with pytest.raises(ValidationError) as info:
        RetryPolicy(max_attempts=attempts)
    assert info.value.field == "max_attempts"


def test_poll_defaults_are_real_world() -> None:
    poll = PollPolicy()
    # Lip-sync takes ~3 minutes with long tails (docs/protocol.md, Timing).
    assert poll.timeout >= 3600
    assert 0 < poll.first_delay <= 60
    assert poll.first_delay <= poll.max_interval <= 120
    assert poll.multiplier >= 1
    assert 0 <= poll.jitter <= 1
    assert poll.adaptive is True
    assert poll.list_queries is True
    assert poll.max_concurrent_queries >= 1


def test_retry_defaults_are_real_world() -> None:
    retry = RetryPolicy()
    assert retry.max_attempts >= 2  # at least one retry
    assert 0 < retry.base_delay <= retry.max_delay
    assert retry.multiplier > 1
    assert 0 <= retry.jitter <= 1
    # 1303 asks for a back-off of at least 1 s (docs/protocol.md, Business codes).
    assert retry.concurrency_delay >= 1


@pytest.mark.parametrize("cls", [PollPolicy, RetryPolicy])
def test_frozen_keyword_only_and_value_semantics(cls: Policy) -> None:
    policy = cls()
    first = attrs.fields(cls)[0].name
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(policy, first, 1)
    with pytest.raises(TypeError):
        cls(1)  # type: ignore[call-arg]  # positional on purpose
    with pytest.raises(TypeError):
        cls(no_such_option=1)  # type: ignore[call-arg]
    assert cls() == policy
    assert hash(cls()) == hash(policy)
    assert len({cls(), cls()}) == 1


def test_policies_differ_by_value() -> None:
    assert PollPolicy(timeout=60) != PollPolicy()
    assert RetryPolicy(max_attempts=1) != RetryPolicy()
    assert "timeout=60" in repr(PollPolicy(timeout=60))
