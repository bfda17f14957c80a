"""Status patches: API conventions for conditions, drift bookkeeping, patch only what changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from controller.model import (
    Aspect,
    Condition,
    DriftReport,
    Failure,
    Managed,
    Reason,
    StatusUpdate,
)
from controller.reconcile import CONDITION_TYPES, failed
from controller.status import build_patch, managed_of, prior_of, timestamp

T0 = datetime(2026, 11, 28, 18, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=60)


def synced(**kw: object) -> StatusUpdate:
    defaults: dict[str, object] = {
        "ready": Condition("Ready", True, Reason.SYNCED, "the service holds the spec"),
        "aspects": {
            a: Condition(CONDITION_TYPES[a], True, Reason.SYNCED, "in sync") for a in Aspect
        },
        "checked": True,
        "managed": Managed(env=frozenset({"B", "A"}), invokers=frozenset({"user:x@example.com"})),
        "uri": "https://svc.run.app",
        "latest_ready_revision": "svc-00001-abc",
        "pending": (),
    }
    defaults.update(kw)
    return StatusUpdate(**defaults)  # type: ignore[arg-type]


def test_first_patch_has_everything() -> None:
    patch = build_patch({}, synced(), 3, T0)
    assert patch["observedGeneration"] == 3
    assert patch["lastSyncTime"] == "2026-11-28T18:00:00Z"
    assert patch["managed"] == {"env": ["A", "B"], "invokers": ["user:x@example.com"]}
    assert patch["drift"] == {"count": 0, "pending": []}
    assert [c["type"] for c in patch["conditions"]] == [
        "Ready",
        "EnvSynced",
        "InvokersSynced",
        "SettingsSynced",
    ]
    for c in patch["conditions"]:
        assert c["lastTransitionTime"] == "2026-11-28T18:00:00Z"
        assert c["observedGeneration"] == 3


def test_unchanged_check_patches_only_last_sync_time() -> None:
    first = build_patch({}, synced(), 3, T0)
    second = build_patch(first, synced(), 3, T1)
    assert second == {"lastSyncTime": "2026-11-28T18:01:00Z"}


def test_transition_time_moves_only_when_status_flips() -> None:
    first = build_patch({}, synced(), 3, T0)
    # Same status, another reason: the transition time stays.
    repaired = synced(ready=Condition("Ready", True, Reason.DRIFT_REPAIRED, "repaired"))
    second = build_patch(first, repaired, 3, T1)
    ready = next(c for c in second["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "DriftRepaired"
    assert ready["lastTransitionTime"] == timestamp(T0)
    # Status flips: it moves.
    down = failed(Failure(Reason.SERVICE_NOT_FOUND, "service p/r/s not found"), ())
    third = build_patch({**first, **second}, down, 3, T1 + timedelta(seconds=5))
    ready = next(c for c in third["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ServiceNotFound")
    assert ready["lastTransitionTime"] == "2026-11-28T18:01:05Z"
    assert "lastSyncTime" not in third  # a failed check is not a completed one
    assert "managed" not in third  # unknown: left as it is


def test_repair_counts_and_records_names() -> None:
    first = build_patch({}, synced(), 1, T0)
    update = synced(
        drift=DriftReport(
            detected=("env A missing",), repaired=True, aspects=frozenset({Aspect.ENV})
        )
    )
    second = build_patch(first, update, 1, T1)
    assert second["drift"] == {
        "count": 1,
        "pending": [],
        "lastDetectedTime": timestamp(T1),
        "lastRepairedTime": timestamp(T1),
        "last": ["env A missing"],
    }
    third = build_patch({**first, **second}, update, 1, T1 + timedelta(seconds=1))
    assert third["drift"]["count"] == 2


def test_diff_against_current_resends_what_the_server_lacks() -> None:
    history = build_patch({}, synced(), 1, T0)
    patch = build_patch(history, synced(), 1, T1, current={})
    assert set(patch) >= {"conditions", "managed", "drift", "observedGeneration"}


def test_foreign_conditions_survive() -> None:
    first = build_patch({}, synced(), 1, T0)
    first["conditions"].append({"type": "DriftFight", "status": "False"})
    second = build_patch(first, synced(), 2, T1)
    assert second["conditions"][-1] == {"type": "DriftFight", "status": "False"}


def test_prior_and_managed_read_back() -> None:
    status = build_patch({}, synced(), 4, T0)
    prior = prior_of(status, 4)
    assert prior.synced == frozenset(Aspect) and prior.ready
    assert prior_of(status, 5).synced == frozenset()  # a new generation: not drift
    assert managed_of(status) == Managed(
        env=frozenset({"A", "B"}), invokers=frozenset({"user:x@example.com"})
    )
    assert managed_of(None) == Managed()
    assert managed_of({"managed": {"env": ["A", 3]}}) == Managed(env=frozenset({"A"}))
