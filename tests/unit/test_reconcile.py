"""The reconcile's decisions with a fake gateway: verification, partial failure, write budget."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from controller.domain.model import (
    Aspect,
    EnvValue,
    Managed,
    Observed,
    Plan,
    Retry,
    Rollout,
    RolloutState,
    ServiceRef,
)
from controller.domain.outcome import Prior
from controller.domain.plan import simulate
from controller.domain.spec import parse
from controller.gcp.errors import RevisionFailed, Unavailable
from controller.kube.status_patch import build_patch, managed_of, prior_of
from controller.reconcile import reconcile

REF = ServiceRef("my-project", "us-west2", "svc")
SPEC = {
    "service": {"project": REF.project, "region": REF.region, "name": REF.name},
    "env": [{"name": "A", "value": "1"}],
    "invokers": {"members": ["user:a@example.com"]},
}


class FakeGateway:
    """Holds one service in memory; writes can be made to fail or to silently not stick."""

    def __init__(
        self,
        *,
        sticky: bool = True,
        iam_error: Exception | None = None,
        update_error: Exception | None = None,
    ) -> None:
        self.state = Observed(ref=REF, container="", env={}, settings={}, bindings={})
        self.sticky = sticky
        self.iam_error = iam_error
        self.update_error = update_error
        self.calls: list[str] = []
        self.updates: list[Plan] = []

    async def observe(self, ref: ServiceRef, container: str) -> Observed:
        self.calls += ["GetService", "GetIamPolicy"]
        return self.state

    async def refresh_service(self, observed: Observed, container: str) -> Observed:
        self.calls.append("GetService")
        return replace(observed, env=self.state.env, settings=self.state.settings)

    async def refresh_iam(self, observed: Observed) -> Observed:
        self.calls.append("GetIamPolicy")
        return replace(observed, bindings=self.state.bindings)

    async def update_service(self, observed: Observed, plan: Plan) -> Observed:
        self.calls.append("UpdateService")
        self.updates.append(plan)
        if self.update_error is not None:
            raise self.update_error
        if self.sticky:
            self.state = simulate(
                self.state, replace(plan, invokers_add=frozenset(), invokers_remove=frozenset())
            )
        return self.state

    async def set_invokers(
        self, observed: Observed, role: str, add: Any, remove: Any, grants_remove: Any = frozenset()
    ) -> bytes:
        self.calls.append("SetIamPolicy")
        if self.iam_error is not None:
            raise self.iam_error
        p = Plan(role=role, invokers_add=add, invokers_remove=remove, grants_remove=grants_remove)
        self.state = simulate(self.state, p)
        return b"etag"

    async def service_account_exists(self, email: str) -> bool:
        return True


async def test_write_that_does_not_stick_is_verification_failed() -> None:
    gw = FakeGateway(sticky=False)
    update = await reconcile(gw, parse(SPEC), Managed(), Prior())  # type: ignore[arg-type]
    assert update.aspects[Aspect.ENV].reason == "VerificationFailed"
    assert update.aspects[Aspect.INVOKERS].status  # that one did stick
    assert not update.ready.status and update.ready.reason == "VerificationFailed"
    assert "VerificationFailed" in [e.reason for e in update.events]
    assert gw.calls.count("UpdateService") == 1 and gw.calls.count("SetIamPolicy") == 1


async def test_iam_failure_keeps_env_repair_and_owned_names() -> None:
    gw = FakeGateway(iam_error=Unavailable("IAM policy of service x unavailable"))
    gw.state = replace(gw.state, bindings={"roles/run.invoker": frozenset({"user:old@x.com"})})
    owned = Managed.of(members=frozenset({"user:old@x.com"}))
    update = await reconcile(gw, parse(SPEC), owned, Prior())  # type: ignore[arg-type]
    assert update.aspects[Aspect.ENV].status
    assert update.aspects[Aspect.INVOKERS].reason == "Unavailable"
    assert update.ready.reason == "Unavailable"
    assert gw.state.env == {"A": EnvValue.literal("1")}
    # The member that was to be pruned is still owned, so the next check still prunes it.
    assert update.managed is not None
    assert "user:old@x.com" in update.managed.invokers
    assert [e.reason for e in update.events] == ["UpdateFailed"]
    assert update.failure is not None and update.failure.reason == "Unavailable"


async def test_spec_change_is_synced_not_drift_and_drift_is_counted() -> None:
    gw = FakeGateway()
    first = await reconcile(gw, parse(SPEC), Managed(), Prior())  # type: ignore[arg-type]
    assert first.ready.reason == "Synced" and not first.drift.repaired
    assert [e.reason for e in first.events] == ["Synced"]
    gw.state = replace(gw.state, env={})  # someone wipes it
    prior = Prior(synced=frozenset(Aspect), ready=True)
    second = await reconcile(gw, parse(SPEC), first.managed or Managed(), prior)  # type: ignore[arg-type]
    assert second.ready.reason == "DriftRepaired"
    assert second.drift.repaired and second.drift.aspects == {Aspect.ENV}
    assert second.drift.detected == ("env A missing",)


FAILED_ROLLOUT = Rollout(RolloutState.FAILED, "svc-00002-abc", attempt=1)


def holding_the_spec(rollout: Rollout, **kw: Any) -> FakeGateway:
    """A service whose template holds SPEC, with ``rollout`` as its rollout state."""
    gw = FakeGateway(**kw)
    gw.state = replace(
        gw.state,
        env={"A": EnvValue.literal("1")},
        bindings={"roles/run.invoker": frozenset({"user:a@example.com"})},
        rollout=rollout,
    )
    return gw


SYNCED = Prior(synced=frozenset(Aspect), ready=True)
OWNED = Managed.of(env=frozenset({"A"}), members=frozenset({"user:a@example.com"}))


async def test_failed_rollout_is_retried_in_one_update_and_recovers() -> None:
    gw = holding_the_spec(FAILED_ROLLOUT)
    update = await reconcile(gw, parse(SPEC), OWNED, SYNCED)  # type: ignore[arg-type]
    assert gw.calls.count("UpdateService") == 1 and "SetIamPolicy" not in gw.calls
    (written,) = gw.updates
    assert written.rollout_retry is not None and written.rollout_retry.attempt == 2
    assert update.ready.status and update.failure is None, update.ready
    assert update.wrote.generation is not None
    assert gw.state.rollout.state is RolloutState.READY
    gw.calls.clear()
    again = await reconcile(gw, parse(SPEC), OWNED, SYNCED)  # type: ignore[arg-type]
    assert again.ready.reason == "Synced" and gw.calls == ["GetService", "GetIamPolicy"]


async def test_failed_rollout_whose_retry_fails_is_revision_failed_with_slow_backoff() -> None:
    error = RevisionFailed("revision svc-00003-def of service x failed to become ready")
    gw = holding_the_spec(FAILED_ROLLOUT, update_error=error)
    update = await reconcile(gw, parse(SPEC), OWNED, SYNCED)  # type: ignore[arg-type]
    assert gw.calls.count("UpdateService") == 1
    assert not update.ready.status and update.ready.reason == "RevisionFailed"
    assert "svc-00003-def" in update.ready.message
    for aspect in (Aspect.ENV, Aspect.SETTINGS):
        assert update.aspects[aspect].reason == "RevisionFailed"
    assert update.aspects[Aspect.INVOKERS].status
    assert update.failure is not None and update.failure.retry is Retry.SLOWLY
    assert [e.reason for e in update.events] == ["UpdateFailed"]
    assert update.managed == OWNED  # nothing given up


async def test_rollout_in_progress_is_not_failed() -> None:
    gw = holding_the_spec(Rollout(RolloutState.IN_PROGRESS, "svc-00002-abc"))
    update = await reconcile(gw, parse(SPEC), OWNED, SYNCED)  # type: ignore[arg-type]
    assert update.ready.status and update.ready.reason == "Synced"
    assert gw.calls == ["GetService", "GetIamPolicy"]


async def test_failed_rollout_in_observe_mode_is_reported_not_retried() -> None:
    gw = holding_the_spec(FAILED_ROLLOUT)
    spec = {**SPEC, "policy": {"mode": "Observe"}}
    update = await reconcile(gw, parse(spec), OWNED, SYNCED)  # type: ignore[arg-type]
    assert gw.calls == ["GetService", "GetIamPolicy"]
    assert not update.ready.status and update.ready.reason == "RevisionFailed"
    assert "svc-00002-abc" in update.ready.message
    assert update.pending == ("rollout retry (revision svc-00002-abc failed)",)
    assert update.drift.detected == () and update.events == ()  # not drift


async def test_repair_after_a_failed_attempt_is_still_drift() -> None:
    """Drift whose first repair fails is still drift at the next check (the status between the
    checks is what status.build_patch / prior_of make of it): DriftRepaired, counted."""
    now = datetime(2026, 11, 28, 18, 0, tzinfo=UTC)
    gw = FakeGateway()
    history: dict[str, Any] = {}

    async def check() -> Any:
        nonlocal history
        update = await reconcile(
            gw,  # type: ignore[arg-type]
            parse(SPEC),
            managed_of(history),
            prior_of(history, 1),
        )
        history = {**history, **build_patch(history, update, 1, now)}
        return update

    first = await check()
    assert first.ready.reason == "Synced"
    gw.state = replace(gw.state, bindings={})  # someone removes the member ...
    gw.iam_error = Unavailable("IAM policy of service x unavailable")  # ... and IAM is down
    failing = await check()
    assert failing.aspects[Aspect.INVOKERS].reason == "Unavailable"
    assert [e.reason for e in failing.events] == ["DriftDetected", "UpdateFailed"]
    assert failing.drift.detected == ("invoker user:a@example.com missing",)
    assert not failing.drift.repaired
    gw.iam_error = None
    repaired = await check()
    assert repaired.ready.reason == "DriftRepaired"
    assert repaired.aspects[Aspect.INVOKERS].reason == "DriftRepaired"
    assert repaired.drift.repaired and repaired.drift.aspects == {Aspect.INVOKERS}
    assert repaired.drift.detected == ("invoker user:a@example.com missing",)
    assert "DriftRepaired" in [e.reason for e in repaired.events]
    assert "Synced" not in [e.reason for e in repaired.events]
    assert history["drift"]["count"] == 1
    assert history["drift"]["last"] == ["invoker user:a@example.com missing"]


# ---------------------------------------------------------------------- one owner per service

ME = "default/team-a/orch"
OTHER = "default/team-b/orch"


def owned_by(owner: str) -> FakeGateway:
    gw = FakeGateway()
    gw.state = replace(gw.state, owner=owner)
    return gw


async def test_service_claimed_elsewhere_gets_no_write() -> None:
    gw = owned_by(OTHER)
    update = await reconcile(gw, replace(parse(SPEC), owner=ME), Managed(), Prior())  # type: ignore[arg-type]
    assert gw.calls == ["GetService", "GetIamPolicy"]
    assert not update.ready.status and update.ready.reason == "OwnedElsewhere"
    assert OTHER in update.ready.message
    assert update.checked and update.failure is not None
    assert [e.reason for e in update.events] == ["OwnedElsewhere"]


async def test_first_write_claims_and_records_the_owned_names() -> None:
    gw = owned_by("")
    update = await reconcile(gw, replace(parse(SPEC), owner=ME), Managed(), Prior())  # type: ignore[arg-type]
    assert update.ready.status, update.ready
    (written,) = gw.updates
    assert written.claim is not None and written.claim.owner == ME
    assert written.claim.owned == Managed.of(
        frozenset({"A"}), members=frozenset({"user:a@example.com"})
    )
    assert gw.state.owner == ME
    gw.calls.clear()
    again = await reconcile(gw, replace(parse(SPEC), owner=ME), update.managed or Managed(), SYNCED)  # type: ignore[arg-type]
    assert again.ready.reason == "Synced" and gw.calls == ["GetService", "GetIamPolicy"]


async def test_an_iam_only_write_claims_with_an_annotation_only_update_first() -> None:
    gw = owned_by("")
    gw.state = replace(gw.state, env={"A": EnvValue.literal("1")})
    await reconcile(gw, replace(parse(SPEC), owner=ME), Managed(), Prior())  # type: ignore[arg-type]
    assert [c for c in gw.calls if c in ("UpdateService", "SetIamPolicy")] == [
        "UpdateService",
        "SetIamPolicy",
    ]
    (written,) = gw.updates
    assert not (written.env_set or written.env_remove or written.settings_set)
    assert written.claim is not None and gw.state.owner == ME


async def test_a_claim_lost_to_a_conflict_writes_nothing_else() -> None:
    from controller.gcp.errors import Conflict

    gw = owned_by("")
    gw.update_error = Conflict("service x was modified concurrently", "ABORTED")
    update = await reconcile(gw, replace(parse(SPEC), owner=ME), Managed(), Prior())  # type: ignore[arg-type]
    assert "SetIamPolicy" not in gw.calls
    assert update.aspects[Aspect.INVOKERS].reason == "Conflict"


async def test_take_over_claims_and_says_so() -> None:
    gw = owned_by(OTHER)
    gw.state = replace(
        gw.state,
        env={"A": EnvValue.literal("1")},
        bindings={"roles/run.invoker": frozenset({"user:a@example.com"})},
    )
    spec = {**SPEC, "policy": {"takeOver": True}}
    update = await reconcile(gw, replace(parse(spec), owner=ME), Managed(), Prior())  # type: ignore[arg-type]
    assert update.ready.status
    assert update.events[0].reason == "TakenOver"
    assert OTHER in update.events[0].message
    assert gw.state.owner == ME and "SetIamPolicy" not in gw.calls


async def test_role_edit_moves_the_grant_and_status_records_the_role() -> None:
    gw = FakeGateway()
    first = await reconcile(gw, parse(SPEC), Managed(), Prior())  # type: ignore[arg-type]
    assert first.managed is not None
    patch = build_patch({}, first, 1, datetime(2026, 11, 28, tzinfo=UTC))
    assert patch["managed"]["invokerRoles"] == [
        {"role": "roles/run.invoker", "members": ["user:a@example.com"]}
    ]
    edited = {
        **SPEC,
        "invokers": {"role": "roles/run.developer", "members": ["user:a@example.com"]},
    }
    # A new generation: the status as written is read back with the roles it recorded.
    moved = await reconcile(gw, parse(edited), managed_of(patch, "roles/run.developer"), Prior())  # type: ignore[arg-type]
    assert moved.ready.status, moved.ready
    assert gw.state.bindings == {"roles/run.developer": frozenset({"user:a@example.com"})}
    assert moved.managed is not None and moved.managed.grants == {
        ("roles/run.developer", "user:a@example.com")
    }


async def test_a_service_drift_names_the_services_last_modifier_an_iam_drift_does_not() -> None:
    gw = holding_the_spec(Rollout())
    gw.state = replace(gw.state, env={}, last_modifier="deployer@example.com")
    env = await reconcile(gw, parse(SPEC), OWNED, SYNCED)  # type: ignore[arg-type]
    assert env.drift.by == "deployer@example.com"
    detected = [e.message for e in env.events if e.reason == "DriftDetected"]
    assert detected == [
        "drift: env A missing (the service was last changed by deployer@example.com)"
    ]
    # SetIamPolicy does not change the Service: its last_modifier says nothing of an IAM drift.
    gw.state = replace(gw.state, bindings={})
    iam = await reconcile(gw, parse(SPEC), OWNED, SYNCED)  # type: ignore[arg-type]
    assert iam.drift.repaired and iam.drift.by == ""
    assert [e.message for e in iam.events if e.reason == "DriftDetected"] == [
        "drift: invoker user:a@example.com missing"
    ]
