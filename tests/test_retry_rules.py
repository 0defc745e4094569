"""Retry schedules: exponential with jitter, capped, and a server's Retry-After honoured."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kling_async import RateLimitError, RetryPolicy
from kling_async._backoff import MAX_RETRY_AFTER, retry_delay
from kling_async._http import HttpResponse
from kling_async.dialects import decode_envelope


@given(retry=st.integers(1, 10_000), seed=st.integers(0, 2**32))
def test_delays_stay_within_the_policy(retry: int, seed: int) -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0, jitter=0.5)
    delay = retry_delay(policy, retry, random.Random(seed))
    ideal = min(0.5 * 2.0 ** min(retry - 1, 64), 30.0)
    assert ideal * 0.5 <= delay <= ideal


def test_delays_grow_exponentially_without_jitter() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=100.0, jitter=0.0)
    delays = [retry_delay(policy, n, random.Random(0)) for n in range(1, 6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]


@pytest.mark.parametrize(
    ("hint", "expected"), [(12.0, 12.0), (0.0, 1.0), (10_000.0, MAX_RETRY_AFTER)]
)
def test_retry_after_wins_when_longer(hint: float, expected: float) -> None:
    policy = RetryPolicy(base_delay=1.0, jitter=0.0)
    assert retry_delay(policy, 1, random.Random(0), retry_after=hint) == expected


def test_retry_after_header_reaches_the_error() -> None:
    response = HttpResponse(
        status=429,
        body=b'{"code": 1302, "message": "too fast"}',
        headers={"retry-after": "7"},
    )
    with pytest.raises(RateLimitError) as info:
        decode_envelope(response)
    assert info.value.retry_after == 7.0
