"""When the next check is due: the resync with jitter, backoff by retry class, streaks. Pure."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from controller.domain.model import Failure, Retry

# Backoff after failures: (first delay, cap) in seconds.
TRANSIENT_BACKOFF = (1.0, 60.0)
# Cloud Run's quotas are per minute: waiting longer than one window after a refusal gains
# nothing and starves the Orchestrator while others take the budget.
QUOTA_BACKOFF = (5.0, 60.0)
SLOW_CAP = 3600.0
MAX_WAIT = 86400.0  # a wait timer's longest sleep (an infinite delay wakes daily to re-check)


@dataclass(frozen=True)
class Streak:
    """Failed checks in a row of one retry class: the backoff's attempt number.

    Each class keeps its own count, so the first quota refusal after a run of outages backs off
    as a first quota refusal, not as the n-th failure of any kind. A success or a failure of
    another class starts over.
    """

    retry: Retry | None = None  # the class of the failures counted; None after a success
    count: int = 0
    # For Retry.UNVERIFIED: the failure counted (reason, message). Only the same verification
    # failure again continues the streak: a different one is news and starts over.
    key: tuple[str, str] | None = None

    def after(self, failure: Failure | None) -> Streak:
        """The streak once a check has ended with ``failure`` (None: it succeeded)."""
        if failure is None:
            return Streak()
        key = (failure.reason, failure.message) if failure.retry is Retry.UNVERIFIED else None
        if failure.retry is self.retry and key == self.key:
            return Streak(failure.retry, self.count + 1, key)
        return Streak(failure.retry, 1, key)


def next_delay(
    resync: float,
    failure: Failure | None,
    attempt: int,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the next check.

    Healthy: resync, jittered ±10% so loops started together drift apart. Transient failures:
    capped exponential backoff with jitter, never longer than the resync (the regular check would
    come then anyway) nor than the cap. Quota: harder backoff, may exceed the resync — extra
    reads would only burn more quota. A write that keeps failing for good (a failed rollout), and
    what only someone else can fix (ServiceNotFound, ServiceAccountNotFound, PermissionDenied),
    and the same verification failure again and again (each retry would be one more revision):
    from the resync up, doubling per failure in a row, up to an hour (a success or a spec
    change starts over; the spec change also wakes the loop at once). A spec that can only be
    fixed by a new spec: never (the spec change wakes the loop). A standing state that is not
    this Orchestrator's to fix and costs only reads (OwnedElsewhere): the resync, as if healthy,
    so that a released claim is taken at the next check.
    """
    uniform = rng.uniform if rng is not None else random.uniform
    if failure is None or failure.retry is Retry.STEADY:
        return resync * uniform(0.9, 1.1)
    if failure.retry is Retry.SPEC_CHANGE:
        return math.inf
    if failure.retry in (Retry.SLOWLY, Retry.RESYNC, Retry.UNVERIFIED):
        # Resync-scale and rarely correlated across Orchestrators (a failed rollout, a missing
        # service or account, a denied permission: someone has to act): jittered like the
        # resync, so that each retry comes clearly later than the one before (x1.6 at least;
        # 0.5..1 jitter could make two in a row nearly equal).
        slow: float = min(max(resync, SLOW_CAP), resync * 2.0 ** max(0, attempt - 1))
        return slow * uniform(0.9, 1.1)
    if failure.retry is Retry.QUOTA:
        first, cap = QUOTA_BACKOFF
    else:
        first, cap = TRANSIENT_BACKOFF[0], min(resync, TRANSIENT_BACKOFF[1])
    base: float = min(cap, first * 2.0 ** max(0, attempt - 1))
    return max(0.05, base * uniform(0.5, 1.0))


def first_delay(resync: float, rng: random.Random | None = None) -> float:
    """The first drift check after the initial sync: anywhere in one period, so a restart with
    many Orchestrators does not check them all at the same moment."""
    uniform = rng.uniform if rng is not None else random.uniform
    return resync * uniform(0.5, 1.0)
