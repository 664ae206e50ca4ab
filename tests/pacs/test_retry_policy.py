"""The delivery retry policy: capped exponential backoff with jitter, driven by a seeded RNG."""

from __future__ import annotations

import random

import pytest

from app.pacs.delivery import RetryPolicy, deliver_with_retries
from app.pacs.results import PermanentDeliveryError, ResultObject, TransientDeliveryError, backoff_delay
from app.settings import Settings


def test_waits_double_until_the_cap_and_stay_within_the_jitter_band() -> None:
    policy = RetryPolicy(max_attempts=12, base_s=0.5, cap_s=8.0)
    rng = random.Random(7)
    ceilings = [policy.ceiling_s(n) for n in range(1, 12)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    delays = [policy.delay_s(n, rng) for n in range(1, 12)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert delay is not None
        assert ceiling / 2 <= delay <= ceiling
    # before the cap, every wait is longer than the one before (the lower bound of each is the previous ceiling)
    uncapped = [d for d, c in zip(delays, ceilings, strict=True) if d is not None and c < 8.0]
    assert uncapped == sorted(uncapped) and len(set(uncapped)) == len(uncapped)


def test_jitter_comes_from_the_rng() -> None:
    policy = RetryPolicy(max_attempts=10, base_s=1.0, cap_s=60.0)
    first = [policy.delay_s(n, random.Random(42)) for n in range(1, 10)]
    again = [policy.delay_s(n, random.Random(42)) for n in range(1, 10)]
    other = [policy.delay_s(n, random.Random(43)) for n in range(1, 10)]
    assert first == again
    assert first != other
    # the same attempt waits differently for different jobs: failures that happened together spread out
    rng = random.Random(1)
    spread = {policy.delay_s(6, rng) or 0.0 for _ in range(50)}
    assert len(spread) == 50
    assert min(spread) >= 16.0 and max(spread) <= 32.0
    assert max(spread) - min(spread) > 8.0


def test_no_wait_is_left_after_the_last_attempt() -> None:
    policy = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=10.0)
    rng = random.Random(0)
    assert policy.delay_s(1, rng) is not None
    assert policy.delay_s(2, rng) is not None
    assert policy.delay_s(3, rng) is None
    assert policy.delay_s(4, rng) is None
    assert RetryPolicy(max_attempts=1).delay_s(1, rng) is None
    transient, permanent = TransientDeliveryError("503"), PermanentDeliveryError("400")
    assert policy.should_retry(1, transient) and policy.should_retry(2, transient)
    assert not policy.should_retry(3, transient)
    assert not policy.should_retry(1, permanent)


def test_the_policy_waits_are_the_worker_backoff() -> None:
    policy = RetryPolicy(max_attempts=9, base_s=0.5, cap_s=4.0)
    ours = [policy.delay_s(n, random.Random(5)) for n in range(1, 9)]
    workers = [backoff_delay(n, base_s=0.5, cap_s=4.0, rng=random.Random(5)) for n in range(1, 9)]
    assert ours == workers


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    policy = RetryPolicy(max_attempts=100_000, base_s=1.0, cap_s=30.0)
    assert policy.ceiling_s(5_000) == 30.0
    delay = policy.delay_s(5_000, random.Random(3))
    assert delay is not None and 15.0 <= delay <= 30.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"base_s": 0.0}, "base_s"),
        ({"base_s": 5.0, "cap_s": 1.0}, "cap_s"),
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_settings_make_the_policy() -> None:
    settings = Settings(delivery_max_attempts=4, delivery_backoff_s=0.25, delivery_backoff_max_s=2.0)
    assert RetryPolicy.from_settings(settings) == RetryPolicy(max_attempts=4, base_s=0.25, cap_s=2.0)
    defaults = RetryPolicy.from_settings(Settings())
    assert defaults == RetryPolicy()
    assert defaults.max_attempts == Settings().delivery_max_attempts == 8
    # a cap below the base means "no growth": every wait is the base
    flat = RetryPolicy.from_settings(Settings(delivery_backoff_s=3.0, delivery_backoff_max_s=1.0))
    assert flat.ceiling_s(1) == flat.ceiling_s(9) == 3.0


class FlakyDelivery:
    """Fails with the given errors in turn, then succeeds; counts the calls."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def describe(self) -> str:
        return "flaky"

    def deliver(self, result: ResultObject) -> None:
        self.deliver_bytes(result.part10)

    def deliver_bytes(self, data: bytes, study_instance_uid: str | None = None) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


def test_transient_failures_are_retried_with_the_policy_waits() -> None:
    policy = RetryPolicy(max_attempts=5, base_s=1.0, cap_s=3.0)
    delivery = FlakyDelivery(
        TransientDeliveryError("down"), TransientDeliveryError("down"), TransientDeliveryError("5xx")
    )
    waits: list[float] = []
    attempts = deliver_with_retries(delivery, b"x", policy, sleep=waits.append, rng=random.Random(11))
    assert attempts == delivery.calls == 4
    expected_rng = random.Random(11)
    assert waits == [policy.delay_s(n, expected_rng) for n in (1, 2, 3)]


def test_a_permanent_failure_is_not_retried() -> None:
    delivery = FlakyDelivery(TransientDeliveryError("down"), PermanentDeliveryError("HTTP 400: refused"))
    waits: list[float] = []
    with pytest.raises(PermanentDeliveryError, match="refused"):
        deliver_with_retries(
            delivery, b"x", RetryPolicy(max_attempts=10), sleep=waits.append, rng=random.Random(0)
        )
    assert delivery.calls == 2 and len(waits) == 1


def test_retries_stop_at_max_attempts() -> None:
    delivery = FlakyDelivery(*[TransientDeliveryError(f"down {n}") for n in range(10)])
    waits: list[float] = []
    with pytest.raises(TransientDeliveryError, match="down 2"):
        deliver_with_retries(
            delivery, b"x", RetryPolicy(max_attempts=3), sleep=waits.append, rng=random.Random(0)
        )
    assert delivery.calls == 3 and len(waits) == 2
