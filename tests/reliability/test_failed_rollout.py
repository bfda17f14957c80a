"""Failed rollout: the emulator's failNextRevision makes the revision a spec change creates fail.
The Orchestrator says RevisionFailed, the previous revision keeps serving, the controller retries
with backoff while it keeps failing, and recovers once the fault is gone."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.fixtures.wait import wait_for
from tests.reliability.harness import RUN, Rig, Target, condition, event_counts, gaps, scaled

FAILURES = scaled(3, 5)
ROLLOUT = {"rollout_ms": 200}


def broken_rollout(rig: Rig, target: Target) -> dict[str, Any]:
    """A synced Orchestrator, then a spec change whose revision fails. Returns the service as it
    was before the change."""
    rig.synced([target])
    before = rig.state(target)
    rig.admin.set_faults(fail_next_revision=True)
    target.declare_env(sorted(target.env)[0], rig.canary.value("new-release"))
    rig.apply([target])
    return before


def updates(rig: Rig) -> int:
    return rig.admin.calls().get(f"{RUN}UpdateService", 0)


@pytest.mark.parametrize("fresh_emulator", [ROLLOUT], indirect=True)
def test_failed_revision_is_reported_and_the_previous_one_keeps_serving(rig: Rig) -> None:
    (target,) = rig.targets(1, "roll")
    before = broken_rollout(rig, target)

    def revision_failed() -> dict[str, Any] | None:
        obj = rig.orchestrators()[target.name]
        return obj if condition(obj).get("reason") == "RevisionFailed" else None

    obj = wait_for(revision_failed, 30, message="Ready=False RevisionFailed")
    assert condition(obj)["status"] == "False"
    assert condition(obj, "EnvSynced")["reason"] == "RevisionFailed"
    svc = rig.state(target)
    assert svc["ready"] == "CONDITION_FAILED"
    assert svc["latestReadyRevision"] == before["latestReadyRevision"], "old revision replaced"
    assert svc["latestCreatedRevision"] != before["latestReadyRevision"]
    assert obj["status"]["latestReadyRevision"] == before["latestReadyRevision"].rsplit("/")[-1]
    reasons = event_counts(rig.events())
    assert reasons["UpdateFailed"] >= 1, dict(reasons)
    rig.figures(
        "Failed rollout: reported",
        "1 failed revision",
        "Ready=False RevisionFailed, previous revision still serving, Warning UpdateFailed",
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fresh_emulator", [ROLLOUT], indirect=True)
def test_failed_rollout_is_retried_with_backoff_and_recovers_once_cleared(rig: Rig) -> None:
    admin = rig.admin
    (target,) = rig.targets(1, "retry")
    broken_rollout(rig, target)
    attempts: list[float] = []
    claimed_ready_while_failed: list[str] = []

    def failed_attempt(seen: int) -> bool:
        obj = rig.orchestrators()[target.name]
        failed = rig.state(target)["ready"] == "CONDITION_FAILED"
        ready = condition(obj)
        # A Ready condition of the previous generation says nothing about this spec's rollout:
        # until the check that writes the new spec ends, it is the last sync's (and the revision
        # may fail before that check can say so).
        current = ready.get("observedGeneration") == obj["metadata"]["generation"]
        if failed and current and ready.get("status") == "True":
            claimed_ready_while_failed.append(str(ready.get("reason")))
        return updates(rig) > seen and failed

    seen = updates(rig) - 1  # the spec change's write may have happened already
    for attempt in range(FAILURES):
        wait_for(
            lambda s=seen: failed_attempt(s) or claimed_ready_while_failed,
            60,
            interval=0.1,
            message=f"failed attempt {attempt + 1}",
        )
        assert not claimed_ready_while_failed, (
            f"Ready=True ({claimed_ready_while_failed[0]}) while the latest revision had failed"
        )
        attempts.append(time.monotonic())
        seen = updates(rig)
        if attempt + 1 < FAILURES:
            admin.set_faults(fail_next_revision=True)  # still broken: the retry fails too
    admin.clear_faults()
    began = time.monotonic()
    rig.converged([target], 120)
    svc = rig.state(target)
    assert svc["latestReadyRevision"] == svc["latestCreatedRevision"]
    intervals = gaps(attempts)
    assert intervals[-1] > 1.5 * intervals[0], f"no backoff between attempts: {intervals}"
    rig.figures(
        "Failed rollout: retried and recovered",
        f"{FAILURES} failed attempts",
        f"retry intervals {[round(i, 1) for i in intervals]} s; recovered "
        f"{time.monotonic() - began:.1f} s after the fault was cleared",
    )
