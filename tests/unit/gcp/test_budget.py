"""controller.gcp.budget: budgets are never exceeded in any 60 s window, RetryInfo holds a bucket,
and the effective check period stretches only when a region's budget cannot afford the resync."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.gcp.budget import CHECK_SHARE, READS_PER_CHECK, Bucket, Pacer
from controller.obs import metrics


class FakeTime:
    """A clock that asyncio.sleep (as seen by controller.gcp.budget) advances instantly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTime]:
    clock = FakeTime()
    monkeypatch.setattr("controller.gcp.budget.asyncio.sleep", clock.sleep)
    yield clock


def admitted(bucket: Bucket, clock: FakeTime, calls: int, n: int = 1) -> list[float]:
    """Take ``calls`` times as fast as the bucket allows; the times each take succeeded."""

    async def run() -> list[float]:
        times = []
        for _ in range(calls):
            await bucket.take(n)
            times.extend([clock.now] * n)
        return times

    return asyncio.run(run())


def most_in_a_minute(times: list[float]) -> int:
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 60.0:
            start += 1
        best = max(best, end - start + 1)
    return best


@given(per_minute=st.integers(10, 3000), n=st.sampled_from([1, 2]))
def test_no_minute_holds_more_than_the_budget(per_minute: int, n: int) -> None:
    clock = FakeTime()
    bucket = Bucket(per_minute, clock)
    original = asyncio.sleep
    try:
        asyncio.sleep = clock.sleep  # type: ignore[assignment]  # hypothesis: no fixtures
        times = admitted(bucket, clock, calls=per_minute * 3 // n, n=n)
    finally:
        asyncio.sleep = original
    assert most_in_a_minute(times) <= per_minute
    # ...and it is not stingy either: over three minutes it admits nearly three budgets.
    assert len(times) >= per_minute * 3 // n * n - 1


def test_a_burst_goes_at_once_then_the_rate(fake: FakeTime) -> None:
    bucket = Bucket(600, fake)
    times = admitted(bucket, fake, calls=20)
    assert times[:10] == [1000.0] * 10  # the burst
    assert times[-1] == pytest.approx(1000.0 + 10 / bucket.rate)


def test_retry_info_holds_even_an_unlimited_bucket(fake: FakeTime) -> None:
    bucket = Bucket(None, fake)
    assert admitted(bucket, fake, calls=3) == [1000.0] * 3
    bucket.hold(42)
    assert bucket.delay() == 42
    assert admitted(bucket, fake, calls=1) == [1042.0]


def test_the_period_stretches_only_beyond_the_budget() -> None:
    pacer = Pacer(reads_per_minute=600)
    for i in range(10):
        pacer.enroll(("ns", f"o{i}"), "us-west2", 60.0)
    assert pacer.period("us-west2", 60.0) == 60.0  # 20 reads a minute: plenty of budget

    for i in range(10, 1000):
        pacer.enroll(("ns", f"o{i}"), "us-west2", 60.0)
    rate = pacer._region("us-west2").reads.rate
    want = 1000 * READS_PER_CHECK / (CHECK_SHARE * rate)
    assert pacer.period("us-west2", 60.0) == pytest.approx(want)
    assert 200 < want < 300  # 1,000 checks x 2 reads at ~590 reads/min, 80% of it for checks
    assert pacer.period("europe-west1", 60.0) == 60.0  # another region, another budget
    assert _gauge("us-west2") == pytest.approx(want)

    for i in range(1000):
        pacer.forget(("ns", f"o{i}"))
    assert pacer.period("us-west2", 60.0) == 60.0


def test_enrolling_again_is_idempotent_and_moves_between_regions() -> None:
    pacer = Pacer(reads_per_minute=100)
    pacer.enroll(("ns", "a"), "r1", 10.0)
    pacer.enroll(("ns", "a"), "r1", 10.0)
    assert pacer._region("r1").members == 1
    pacer.enroll(("ns", "a"), "r2", 10.0)
    assert (pacer._region("r1").members, pacer._region("r2").members) == (0, 1)
    assert pacer._region("r1").demand == pytest.approx(0.0)


def test_unlimited_never_stretches() -> None:
    pacer = Pacer(reads_per_minute=None)
    for i in range(5000):
        pacer.enroll(("ns", f"o{i}"), "r", 5.0)
    assert pacer.period("r", 5.0) == 5.0


def _gauge(region: str) -> float:
    for family in metrics.CHECK_PERIOD.collect():
        for sample in family.samples:
            if sample.labels.get("region") == region:
                return float(sample.value)
    raise AssertionError(f"no {metrics.CHECK_PERIOD} sample for {region}")
