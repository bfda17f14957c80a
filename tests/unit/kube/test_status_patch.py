"""Status patches: API conventions for conditions, drift bookkeeping, patch only what changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from controller.domain.model import (
    Aspect,
    Condition,
    DriftReport,
    Failure,
    Managed,
    Reason,
    StatusUpdate,
)
from controller.domain.outcome import CONDITION_TYPES, failed
from controller.kube.status_patch import (
    build_patch,
    economize,
    managed_of,
    prior_of,
    timestamp,
)

T0 = datetime(2026, 11, 28, 18, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=60)


def synced(**kw: object) -> StatusUpdate:
    defaults: dict[str, object] = {
        "ready": Condition("Ready", True, Reason.SYNCED, "the service holds the spec"),
        "aspects": {
            a: Condition(CONDITION_TYPES[a], True, Reason.SYNCED, "in sync") for a in Aspect
        },
        "checked": True,
        "managed": Managed.of(env=frozenset({"B", "A"}), members=frozenset({"user:x@example.com"})),
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
    assert patch["managed"] == {
        "env": ["A", "B"],
        "invokers": ["user:x@example.com"],
        "invokerRoles": [{"role": "roles/run.invoker", "members": ["user:x@example.com"]}],
    }
    assert patch["drift"] == {
        "count": 0,
        "pending": [],
        "syncedGeneration": {"env": 3, "invokers": 3, "settings": 3},
    }
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
        "syncedGeneration": {"env": 1, "invokers": 1, "settings": 1},
    }
    third = build_patch({**first, **second}, update, 1, T1 + timedelta(seconds=1))
    assert third["drift"]["count"] == 2


def test_diff_against_current_resends_what_the_server_lacks() -> None:
    history = build_patch({}, synced(), 1, T0)
    patch = build_patch(history, synced(), 1, T1, current={})
    assert set(patch) >= {"conditions", "managed", "drift", "observedGeneration"}


def test_a_stale_live_status_does_not_hide_what_our_unseen_patch_changed() -> None:
    """A member pruned by check 2 (its patch not seen back yet) and added again by check 3: the
    live status still shows the member as owned, our unseen patch says it is not; check 3 must
    send managed, or the server keeps the pruned list and a later undeclare leaks the member."""
    owned = synced()
    pruned = synced(managed=Managed.of(env=frozenset({"B", "A"}), members=frozenset()))
    live = build_patch({}, owned, 1, T0)  # what the watch still shows
    ours = build_patch(live, pruned, 2, T1)  # check 2's patch, applied, not seen back
    assert ours["managed"]["invokers"] == []
    history = {**live, **ours}
    later = T1 + timedelta(seconds=1)
    again = build_patch(history, owned, 3, later, current=(live, history))
    assert again["managed"] == {
        "env": ["A", "B"],
        "invokers": ["user:x@example.com"],
        "invokerRoles": [{"role": "roles/run.invoker", "members": ["user:x@example.com"]}],
    }
    # Compared with the stale live view alone, the key would be left out.
    assert "managed" not in build_patch(history, owned, 3, later, current=live)


def test_several_views_leave_out_only_what_all_hold() -> None:
    history = build_patch({}, synced(), 1, T0)
    assert build_patch(history, synced(), 1, T1, current=(history, history)) == {
        "lastSyncTime": "2026-11-28T18:01:00Z"
    }


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
    assert managed_of(status) == Managed.of(
        env=frozenset({"A", "B"}), members=frozenset({"user:x@example.com"})
    )
    assert managed_of(None) == Managed()
    assert managed_of({"managed": {"env": ["A", 3]}}) == Managed(env=frozenset({"A"}))


def test_synced_generation_survives_a_failed_repair_attempt() -> None:
    """An aspect that held the spec at this generation stays synced for the reconcile (a change
    needed there is drift) after a check whose repair of it failed; a new generation is not."""
    first = build_patch({}, synced(), 4, T0)
    invokers_failing = failed(Failure(Reason.UNAVAILABLE, "IAM unavailable"), ())
    update = synced(
        ready=invokers_failing.ready,
        aspects={**synced().aspects, Aspect.INVOKERS: invokers_failing.aspects[Aspect.INVOKERS]},
    )
    second = {**first, **build_patch(first, update, 4, T1)}
    assert prior_of(second, 4).synced == frozenset(Aspect)
    # Even a check that could read nothing (every condition False) keeps it.
    third = {**second, **build_patch(second, invokers_failing, 4, T1)}
    assert prior_of(third, 4).synced == frozenset(Aspect)
    assert third["drift"]["syncedGeneration"] == {"env": 4, "invokers": 4, "settings": 4}
    # A new spec is applied, not repaired, until it has held once.
    assert prior_of(third, 5).synced == frozenset()
    fourth = {**third, **build_patch(third, update, 5, T1)}
    assert prior_of(fourth, 5).synced == {Aspect.ENV, Aspect.SETTINGS}


def test_status_from_before_synced_generation_still_counts_conditions() -> None:
    old = build_patch({}, synced(), 2, T0)
    del old["drift"]["syncedGeneration"]
    assert prior_of(old, 2).synced == frozenset(Aspect)
    after_failure = build_patch(old, failed(Failure(Reason.UNAVAILABLE, "down"), ()), 2, T1)
    assert prior_of({**old, **after_failure}, 2).synced == frozenset(Aspect)
    assert prior_of({"drift": {"syncedGeneration": {"env": "2", "invokers": True}}}, 2).synced == (
        frozenset()
    )


# ---------------------------------------------------------------------- status heartbeat


def test_heartbeat_drops_a_patch_of_only_last_sync_time() -> None:
    first = build_patch({}, synced(), 3, T0)
    steady = build_patch(first, synced(), 3, T1)
    assert economize(steady, first, T1, heartbeat=300) == {}
    # Once the recorded lastSyncTime is a heartbeat old, it is refreshed.
    later = T0 + timedelta(seconds=300)
    assert economize(build_patch(first, synced(), 3, later), first, later, heartbeat=300) == {
        "lastSyncTime": "2026-11-28T18:05:00Z"
    }


def test_heartbeat_never_holds_back_a_change() -> None:
    first = build_patch({}, synced(), 3, T0)
    drifted = synced(
        ready=Condition("Ready", True, Reason.DRIFT_REPAIRED, "repaired"),
        drift=DriftReport(
            detected=("env A missing",), repaired=True, aspects=frozenset({Aspect.ENV})
        ),
    )
    for update, generation in ((drifted, 3), (synced(), 4)):
        patch = build_patch(first, update, generation, T1)
        kept = economize(patch, first, T1, heartbeat=300)
        assert kept == patch
        assert kept["lastSyncTime"] == "2026-11-28T18:01:00Z"  # written with the change


def test_heartbeat_zero_or_no_recorded_time_writes_every_check() -> None:
    first = build_patch({}, synced(), 3, T0)
    steady = build_patch(first, synced(), 3, T1)
    assert economize(steady, first, T1, heartbeat=0) == steady
    for history in ({}, {"lastSyncTime": "garbage"}, {"lastSyncTime": 12}):
        assert economize(steady, history, T1, heartbeat=300) == steady
    # A recorded time in the future (a skewed clock) is refreshed rather than trusted.
    future = {"lastSyncTime": "2027-01-01T00:00:00Z"}
    assert economize(steady, future, T1, heartbeat=300) == steady


def test_a_role_move_replaces_the_recorded_roles_whole() -> None:
    """status.managed.invokerRoles is a list: a JSON merge patch replaces it, so the old role
    does not linger beside the new one (a map would be merged key by key)."""
    old = synced(managed=Managed.of(members=frozenset({"user:x@example.com"})))
    moved = synced(
        managed=Managed.of(role="roles/run.developer", members=frozenset({"user:x@example.com"}))
    )
    first = build_patch({}, old, 1, T0)
    second = build_patch(first, moved, 2, T1)
    assert second["managed"]["invokerRoles"] == [
        {"role": "roles/run.developer", "members": ["user:x@example.com"]}
    ]
    assert managed_of({**first, **second}).grants == {("roles/run.developer", "user:x@example.com")}


def test_a_rollout_under_way_is_read_back_as_rolling_out() -> None:
    """Progressing on Ready or on a service aspect (another failure may own Ready)."""
    on_ready = {"conditions": [{"type": "Ready", "status": "False", "reason": "Progressing"}]}
    on_env = {
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "ServiceAccountNotFound"},
            {"type": "EnvSynced", "status": "True", "reason": "Progressing"},
        ]
    }
    synced = {"conditions": [{"type": "Ready", "status": "True", "reason": "Synced"}]}
    assert prior_of(on_ready, 1).rolling_out
    assert prior_of(on_env, 1).rolling_out
    assert not prior_of(synced, 1).rolling_out
    assert not prior_of(None, 1).rolling_out
