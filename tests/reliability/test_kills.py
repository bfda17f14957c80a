"""Kills: SIGKILL the controller at random moments, half of them right after an UpdateService
was accepted and before its rollout finished (between a write and its verification). Restarted,
it converges every time, and the Orchestrators get no storm of Events."""

from __future__ import annotations

import random
import time

import pytest

from tests.fixtures.wait import wait_for
from tests.reliability.harness import RUN, Rig, event_counts, knock_out, scaled

KILLS = scaled(5, 20)
ORCHESTRATORS = 3
ROLLOUT_MS = 600  # the window between UpdateService and its verification read
CONVERGE = 60
# Per Orchestrator: one Synced, then per knock-out DriftDetected + DriftRepaired, and room for one
# more pair when a kill interrupted the repair. More than that is a storm.
EVENTS_PER_KILL = 4


@pytest.mark.timeout(120 + KILLS * (CONVERGE + 30))
@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": ROLLOUT_MS}], indirect=True)
def test_sigkill_at_random_moments_then_converges_without_event_storm(rig: Rig) -> None:
    admin = rig.admin
    rng = random.Random(KILLS)
    targets = rig.targets(ORCHESTRATORS, "kill")
    controller = rig.synced(targets, CONVERGE)

    mid_write = 0
    recovery: list[float] = []
    for k in range(KILLS):
        updates = admin.calls().get(f"{RUN}UpdateService", 0)
        for t in targets:
            knock_out(admin, t, rig.canary, k)
        if k % 2 == 0:
            # Right after the controller's UpdateService is accepted: its rollout is pending, the
            # read-back that verifies it (and the status patch) has not happened.
            wait_for(
                lambda n=updates: admin.calls().get(f"{RUN}UpdateService", 0) > n,
                30,
                interval=0.02,
                message="the controller's repair write",
            )
            controller.kill()
            mid_write += any(rig.state(t)["reconciling"] for t in targets)
        else:
            # A random moment within ~1.5 resync periods of the drift: kills spaced at random on
            # purpose, so this is a sleep and not a wait for a condition.
            time.sleep(rng.uniform(0.0, 3.0))
            controller.kill()
        controller.start()
        began = time.monotonic()
        rig.converged(targets, CONVERGE)
        recovery.append(time.monotonic() - began)

    reasons = event_counts(rig.events())
    total = sum(reasons.values())
    starts = sum(1 for line in controller.log_lines() if line.get("event") == "started")
    rig.figures(
        "Kills (SIGKILL, restart)",
        f"{KILLS} kills, {ORCHESTRATORS} Orchestrators",
        f"converged after every restart, in ≤ {max(recovery):.0f} s "
        f"(mean {sum(recovery) / len(recovery):.1f} s); {mid_write} kills landed mid-rollout "
        f"between a write and its verification; {total} Events in all {dict(reasons)}",
    )
    assert starts == KILLS + 1, f"{starts} starts for {KILLS} kills: a restart loop?"
    assert mid_write >= 1, "no kill landed between a write and its verification"
    assert total <= ORCHESTRATORS * (1 + EVENTS_PER_KILL * KILLS), dict(reasons)
