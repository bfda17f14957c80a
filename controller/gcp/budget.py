"""Per-region budgets for the Cloud Run Admin API, and the check period they allow.

Cloud Run counts Admin API requests per minute and per region, reads and writes separately, and
answers RESOURCE_EXHAUSTED beyond the quota. So every call the gateway makes first takes a token
from its region's read or write bucket. A bucket's sustained rate leaves room for its burst, so
no 60-second window ever holds more calls than the budget — which is how Google counts. When
Google refuses anyway (another client shares the quota), its RetryInfo holds the whole bucket:
every caller in that region waits that long, instead of each learning it with a refusal.

The drift loops check at the *effective period*: their resync, stretched when the region's
Orchestrators together would need more reads than the budget gives (two reads a check), so that
checks spread out over the period instead of queueing at the bucket. The period is exported as
``runwarden_effective_check_period_seconds{region}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.obs import metrics

READS_PER_CHECK = 2
# Periodic checks may use this share of the read budget; the rest is headroom for repairs'
# verify reads, woken checks (spec changes, audit events) and retries.
CHECK_SHARE = 0.8
MIN_PER_MINUTE = 10.0

ObjectKey = tuple[str, str]


class Bucket:
    """A token bucket sized so that no 60 s window admits more than ``per_minute`` tokens
    (None: unlimited, but a RetryInfo hold still applies)."""

    def __init__(
        self, per_minute: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute is not None and per_minute < MIN_PER_MINUTE:
            raise ValueError(f"a budget needs at least {MIN_PER_MINUTE:g} calls a minute")
        self.per_minute = per_minute
        self.burst = min(10.0, per_minute / 6) if per_minute else math.inf
        # Tokens per second: what is left of the minute's budget after one burst.
        self.rate = (per_minute - self.burst) / 60 if per_minute else math.inf
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()
        self._held_until = 0.0
        self._lock = asyncio.Lock()  # FIFO: callers are served in the order they came

    @property
    def unlimited(self) -> bool:
        return self.per_minute is None

    def _refill(self, now: float) -> None:
        if not self.unlimited:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def delay(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens could be taken (0 = now)."""
        now = self._clock()
        self._refill(now)
        held = max(0.0, self._held_until - now)
        if self.unlimited:
            return held
        short = (min(n, self.burst) - self._tokens) / self.rate
        # Below a microsecond is rounding (the clock may not even advance by that much).
        return max(short if short > 1e-6 else 0.0, held)

    async def take(self, n: float = 1.0) -> float:
        """Wait for ``n`` tokens and take them; returns the seconds waited."""
        if self.unlimited and self._held_until <= self._clock():
            return 0.0  # the common case without a budget: no lock, no bookkeeping
        waited = 0.0
        async with self._lock:
            while (wait := self.delay(n)) > 0:
                await asyncio.sleep(wait)
                waited += wait
            if not self.unlimited:
                self._tokens -= min(n, self.burst)
        return waited

    def hold(self, seconds: float) -> None:
        """Admit nothing for ``seconds`` (Google's RetryInfo)."""
        self._held_until = max(self._held_until, self._clock() + seconds)


@dataclass
class _Region:
    reads: Bucket
    writes: Bucket
    demand: float = 0.0  # reads per second the region's periodic checks want at their resync
    resync_sum: float = 0.0
    members: int = 0


@dataclass
class Pacer:
    """The read and write budgets of every region, and the Orchestrators sharing them.

    ``reads_per_minute`` / ``writes_per_minute`` of None or 0 mean unlimited.
    """

    reads_per_minute: float | None = None
    writes_per_minute: float | None = None
    clock: Callable[[], float] = time.monotonic
    _regions: dict[str, _Region] = field(default_factory=dict)
    _enrolled: dict[ObjectKey, tuple[str, float]] = field(default_factory=dict)

    def _region(self, region: str) -> _Region:
        found = self._regions.get(region)
        if found is None:
            found = self._regions[region] = _Region(
                reads=Bucket(self.reads_per_minute or None, self.clock),
                writes=Bucket(self.writes_per_minute or None, self.clock),
            )
        return found

    # ------------------------------------------------------------------ calls

    async def take(self, region: str, write: bool, n: int = 1) -> None:
        """Wait for the region's budget to allow ``n`` more reads (or writes)."""
        r = self._region(region)
        waited = await (r.writes if write else r.reads).take(n)
        if waited:
            kind = "write" if write else "read"
            metrics.BUDGET_WAIT.labels(region=region, kind=kind).inc(waited)

    def retry_after(self, region: str, write: bool, seconds: float) -> None:
        """Google refused a call with RetryInfo: hold the region's bucket that long."""
        if seconds > 0:
            r = self._region(region)
            (r.writes if write else r.reads).hold(seconds)

    # ------------------------------------------------------------------ check periods

    def enroll(self, key: ObjectKey, region: str, resync: float) -> None:
        """An Orchestrator checks a service in ``region`` every ``resync`` seconds."""
        if self._enrolled.get(key) == (region, resync):
            return
        self.forget(key)
        self._enrolled[key] = (region, resync)
        r = self._region(region)
        r.demand += READS_PER_CHECK / resync
        r.resync_sum += resync
        r.members += 1
        self._export(region)

    def forget(self, key: ObjectKey) -> None:
        old = self._enrolled.pop(key, None)
        if old is None:
            return
        region, resync = old
        r = self._region(region)
        r.demand = max(0.0, r.demand - READS_PER_CHECK / resync)
        r.resync_sum -= resync
        r.members -= 1
        self._export(region)

    def stretch(self, region: str) -> float:
        """How much the region's budget stretches every resync (1 = not at all)."""
        r = self._region(region)
        if r.reads.unlimited or r.demand <= 0:
            return 1.0
        return max(1.0, r.demand / (CHECK_SHARE * r.reads.rate))

    def period(self, region: str, resync: float) -> float:
        """The effective check period of an Orchestrator with this resync in this region."""
        return resync * self.stretch(region)

    def _export(self, region: str) -> None:
        r = self._region(region)
        if r.members:
            mean = r.resync_sum / r.members * self.stretch(region)
            metrics.CHECK_PERIOD.labels(region=region).set(mean)
        else:
            with contextlib.suppress(KeyError):
                metrics.CHECK_PERIOD.remove(region)
