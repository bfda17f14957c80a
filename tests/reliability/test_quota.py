"""Quota: with the emulator's per-minute read quota below what the controller would like to send,
the controller reports QuotaExceeded, slows down, still repairs drift made meanwhile, and after
the first refusal does not keep bursting past the quota (few refused calls).

The demand stays above the quota (resync 2 s), so every Orchestrator must get its share: a
timeout fails the test, naming any Orchestrator that starved (asleep on its own quota backoff for
a minute or more while the others took the quota)."""

from __future__ import annotations

import time

import pytest

from tests.fixtures.wait import wait_for
from tests.reliability.harness import (
    CallSampler,
    NotConverged,
    Rig,
    asleep_on_quota,
    condition,
    knock_out,
    metric_sum,
    reads,
    scaled,
    scrape,
    utc_stamp,
)

ORCHESTRATORS = scaled(3, 8)
RESYNC = 2  # each Orchestrator wants ~2 reads per check: ~60 reads a minute each
READS_PER_MINUTE = scaled(60, 150)
MINUTE = 60.0
# After the first refusal, at most this many refused calls per Orchestrator in the next minute
# (one probe every 7.5 s on average); a controller that ignored the quota would send ~30 each.
REFUSED_PER_ORCHESTRATOR = 8
CONVERGE = 240  # seconds after the first refusal for the drift made then to be repaired
STARVATION = (
    "{names} starved: asleep on their own quota backoff for a minute or more while the other "
    "Orchestrators took the quota (per-region pacing in the gateway is meant to prevent this)"
)


@pytest.mark.timeout(420)
def test_quota_exceeded_reported_slows_down_converges_without_burst(rig: Rig) -> None:
    admin = rig.admin
    targets = rig.targets(ORCHESTRATORS, "quota")
    rig.deploy(targets)
    admin.set_quota(reads_per_minute=READS_PER_MINUTE)
    controller = rig.start_controller(rig.emulator, resync=RESYNC, metrics=True)
    port: int = controller.metrics_port  # type: ignore[attr-defined]

    def refused() -> float:
        return metric_sum(scrape(port), "runwarden_gcp_requests_total", code="RESOURCE_EXHAUSTED")

    with CallSampler(admin, interval=0.25) as sampler:
        rig.apply(targets)
        wait_for(refused, 120, interval=0.1, message="the first refusal")
        first = time.monotonic()
        refused_at_first = refused()

        # Drift made while the quota bites: it must still be repaired.
        since = utc_stamp(round_up=True)
        for i, t in enumerate(targets):
            knock_out(admin, t, rig.canary, i)
        reported = wait_for(
            lambda: [
                t.name
                for t in targets
                if condition(rig.orchestrators().get(t.name)).get("reason") == "QuotaExceeded"
            ],
            30,
            message="QuotaExceeded in a status",
        )
        # The minute after the first refusal, observed to its end.
        wait_for(lambda: time.monotonic() >= first + MINUTE, MINUTE + 5, interval=0.5)
        refused_after = refused() - refused_at_first
    series = sampler.series(reads)

    def sent_between(a: float, b: float) -> int:
        inside = [v for t, v in series if a <= t <= b]
        return inside[-1] - inside[0] if len(inside) >= 2 else 0

    window_before = 10.0
    rate_before = sent_between(first - window_before, first) / window_before * MINUTE
    sent_after = sent_between(first, first + MINUTE)
    scenario = "Quota (per-minute read quota)"
    counts = f"{ORCHESTRATORS} Orchestrators, {READS_PER_MINUTE} reads/min"
    seen = (
        f"QuotaExceeded reported ({len(reported)} of {ORCHESTRATORS}); before the first "
        f"refusal {rate_before:.0f} reads/min, the minute after {sent_after} sent of which "
        f"{refused_after:.0f} refused"
    )
    rig.figures(scenario, counts, seen)
    assert refused_after <= REFUSED_PER_ORCHESTRATOR * ORCHESTRATORS, refused_after
    assert sent_after < 0.75 * rate_before, (sent_after, rate_before)  # it slowed down

    left = CONVERGE - (time.monotonic() - first)
    try:
        rig.converged(targets, left, since=since, together=False)
    except NotConverged as exc:
        rig.figures(scenario, counts, f"{seen}; not converged in {CONVERGE} s")
        starving = asleep_on_quota(controller, exc.laggards, MINUTE)
        if starving:
            exc.add_note(STARVATION.format(names=sorted(starving)))
        raise
    converged = time.monotonic() - first
    rig.figures(
        scenario,
        counts,
        f"{seen}; drift made then repaired {converged:.0f} s after the first refusal",
    )
