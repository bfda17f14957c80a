"""The reconcile use-case against the Cloud Run + IAM emulator, without Kubernetes.

Fast and precise: these count the emulator's calls and look at what the service holds after
each reconcile. The full path through kopf and the apiserver is in test_controller.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from cloudrun_emulator.testing import EmulatorProcess
from controller.domain.model import Aspect, Desired, Managed, RolloutState, StatusUpdate
from controller.domain.outcome import Prior
from controller.domain.plan import plan
from controller.domain.spec import parse
from controller.gcp.clients import make_clients
from controller.gcp.gateway import Gateway
from controller.reconcile import reconcile, revoke
from tests.fixtures.orch import deploy_service
from tests.fixtures.wait import wait_until

PROJECT = "runwarden-test"
REGION = "us-west2"
SA = "pusher@runwarden-test.iam.gserviceaccount.com"
MEMBER = f"serviceAccount:{SA}"
FOREIGN = "user:someone@example.com"
OTHER_ROLE = "roles/run.developer"
RUN = "google.cloud.run.v2.Services/"
WRITES = (f"{RUN}UpdateService", f"{RUN}SetIamPolicy", f"{RUN}CreateService")


@pytest.fixture
async def gateway(emulator: EmulatorProcess) -> AsyncIterator[Gateway]:
    clients = make_clients(emulator.grpc_endpoint)
    try:
        yield Gateway(clients, rollout_timeout=30)
    finally:
        await clients.close()


def spec(name: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "service": {"project": PROJECT, "region": REGION, "name": name},
        "env": [{"name": "GCP_PROJECT_ID", "value": PROJECT}, {"name": "MODE", "value": "prod"}],
        "invokers": {"members": [MEMBER]},
        "settings": {"maxInstances": 7, "labels": {"team": "data"}},
    }
    body.update(extra)
    return body


def prior_after(update: StatusUpdate) -> Prior:
    """The Prior the next reconcile sees once ``update`` is in status (same generation)."""
    return Prior(
        synced=frozenset(a for a, c in update.aspects.items() if c.status),
        ready=update.ready.status,
        pending=update.pending or (),
        rolling_out=update.rolling_out,
        repaired=frozenset(a for a, c in update.aspects.items() if c.reason == "DriftRepaired"),
    )


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
    }


async def converge(gw: Gateway, desired: Desired) -> tuple[StatusUpdate, Managed]:
    update = await reconcile(gw, desired, Managed(), Prior())
    assert update.ready.status, update.ready
    assert update.managed is not None
    return update, update.managed


@pytest.fixture
def service(emulator: EmulatorProcess, unique_name: Callable[[str], str]) -> str:
    return deploy_service(emulator, unique_name("rec"), project=PROJECT, sa=SA, foreign="x")


async def test_first_sync_then_no_drift_costs_one_get_each(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service))
    update, managed = await converge(gateway, desired)
    assert update.ready.reason == "Synced"
    assert [e.reason for e in update.events] == ["Synced"]
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["env"] == {"FOREIGN": "x", "GCP_PROJECT_ID": PROJECT, "MODE": "prod"}
    assert sorted(got["iam"]["roles/run.invoker"]) == sorted([FOREIGN, MEMBER])
    assert got["iam"][OTHER_ROLE] == [FOREIGN]
    assert got["settings"]["maxInstances"] == 7
    assert managed == Managed.of(
        env=frozenset({"GCP_PROJECT_ID", "MODE"}), members=frozenset({MEMBER})
    )

    before = emulator.admin.calls()
    again = await reconcile(gateway, desired, managed, prior_after(update))
    assert again.ready.status and again.ready.reason == "Synced" and again.events == ()
    assert delta(before, emulator.admin.calls()) == {
        f"{RUN}GetService": 1,
        f"{RUN}GetIamPolicy": 1,
    }


async def test_drift_repaired_in_one_update_and_one_set_iam(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service))
    update, managed = await converge(gateway, desired)
    # Someone redeploys with --set-env-vars (full template) and drops our member.
    emulator.admin.put_service(
        PROJECT,
        REGION,
        service,
        env={"OTHER": "y"},
        settings={"maxInstances": 3},
        invokers={"roles/run.invoker": [FOREIGN]},
    )
    before = emulator.admin.calls()
    repaired = await reconcile(gateway, desired, managed, prior_after(update))
    calls = delta(before, emulator.admin.calls())
    assert calls.get(f"{RUN}UpdateService") == 1
    assert calls.get(f"{RUN}SetIamPolicy") == 1
    assert repaired.ready.status and repaired.ready.reason == "DriftRepaired"
    assert repaired.drift.repaired
    assert set(repaired.drift.detected) == {
        "env GCP_PROJECT_ID missing",
        "env MODE missing",
        f"invoker {MEMBER} missing",
        "setting maxInstances changed",
    }
    assert [e.reason for e in repaired.events] == ["DriftDetected", "DriftRepaired"]
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["env"] == {"OTHER": "y", "GCP_PROJECT_ID": PROJECT, "MODE": "prod"}
    assert sorted(got["iam"]["roles/run.invoker"]) == sorted([FOREIGN, MEMBER])
    assert got["iam"][OTHER_ROLE] == [FOREIGN]
    assert repaired.wrote.generation == got["generation"]


async def test_removed_from_spec_is_pruned_foreign_stays(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    _, managed = await converge(gateway, parse(spec(service)))
    smaller = parse(
        spec(service, env=[{"name": "GCP_PROJECT_ID", "value": PROJECT}], invokers={"members": []})
    )
    update = await reconcile(gateway, smaller, managed, Prior(ready=True))
    assert update.ready.status, update.ready
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["env"] == {"FOREIGN": "x", "GCP_PROJECT_ID": PROJECT}
    assert got["iam"]["roles/run.invoker"] == [FOREIGN]
    assert update.managed == Managed(env=frozenset({"GCP_PROJECT_ID"}))


async def test_observe_mode_writes_nothing(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service, policy={"mode": "Observe"}))
    before = emulator.admin.calls()
    update = await reconcile(gateway, desired, Managed(), Prior())
    assert not any(delta(before, emulator.admin.calls()).get(w) for w in WRITES)
    assert update.ready.reason == "DriftDetected" and not update.ready.status
    assert update.pending and "env MODE missing" in update.pending
    assert update.managed is None
    assert [e.reason for e in update.events] == ["DriftDetected"]
    # Same drift again: no new Event.
    again = await reconcile(gateway, desired, Managed(), prior_after(update))
    assert again.events == ()


async def test_authoritative_removes_foreign_but_not_other_roles(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service, policy={"env": "Authoritative", "invokers": "Authoritative"}))
    await converge(gateway, desired)
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["env"] == {"GCP_PROJECT_ID": PROJECT, "MODE": "prod"}
    assert got["iam"]["roles/run.invoker"] == [MEMBER]
    assert got["iam"][OTHER_ROLE] == [FOREIGN]


async def test_missing_service_account_named_rest_applied(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    ghost = "serviceAccount:ghost@runwarden-test.iam.gserviceaccount.com"
    desired = parse(spec(service, invokers={"members": [MEMBER, ghost]}))
    update = await reconcile(gateway, desired, Managed(), Prior())
    assert update.ready.reason == "ServiceAccountNotFound"
    assert ghost in update.aspects[Aspect.INVOKERS].message
    assert update.aspects[Aspect.ENV].status
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert MEMBER in got["iam"]["roles/run.invoker"]
    assert ghost not in got["iam"]["roles/run.invoker"]


async def test_service_not_found(gateway: Gateway, unique_name: Callable[[str], str]) -> None:
    update = await reconcile(gateway, parse(spec(unique_name("nope"))), Managed(), Prior())
    assert not update.ready.status and update.ready.reason == "ServiceNotFound"
    assert not update.checked


async def test_iam_conflict_rereads_and_keeps_the_concurrent_change(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service))
    observed = await gateway.observe(desired.ref, "")
    late = "user:late@example.com"
    emulator.admin.put_service(
        PROJECT, REGION, service, invokers={"roles/run.invoker": [FOREIGN, late]}
    )
    await gateway.set_invokers(observed, "roles/run.invoker", frozenset({MEMBER}), frozenset())
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert sorted(got["iam"]["roles/run.invoker"]) == sorted([FOREIGN, late, MEMBER])


async def test_revoke_removes_owned_only(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service))
    _, managed = await converge(gateway, desired)
    removed = await revoke(gateway, desired, managed)
    assert set(removed) == {
        "env GCP_PROJECT_ID no longer declared",
        "env MODE no longer declared",
        f"invoker {MEMBER} no longer declared",
    }
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["env"] == {"FOREIGN": "x"}
    assert got["iam"]["roles/run.invoker"] == [FOREIGN]
    assert got["iam"][OTHER_ROLE] == [FOREIGN]


class Rollouts:
    """The gateway's on_rollout: which rollouts (by service name) have ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    def __call__(self, ref: Any) -> None:
        self.ended.append(ref.name)

    async def wait(self, n: int) -> None:
        await wait_until(lambda: len(self.ended) >= n, 30, message=f"rollout {n} never ended")


@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": 100}], indirect=True)
async def test_failed_rollout_is_revision_failed(fresh_emulator: EmulatorProcess) -> None:
    """The write does not wait for the rollout: Progressing; its end wakes the next check,
    which says RevisionFailed without writing again (the retry comes after the backoff)."""
    admin = fresh_emulator.admin
    admin.put_service_account(SA)
    admin.put_service(PROJECT, REGION, "rollout", env={})
    admin.set_faults(fail_next_revision=True)
    clients = make_clients(fresh_emulator.grpc_endpoint)
    rollouts = Rollouts()
    desired = parse(spec("rollout"))
    try:
        gw = Gateway(clients, rollout_timeout=30, on_rollout=rollouts)
        first = await reconcile(gw, desired, Managed(), Prior())
        assert first.rolling_out and first.ready.reason == "Progressing", first.ready
        assert not first.ready.status
        assert first.aspects[Aspect.ENV].status  # the template holds the spec (read back)
        await rollouts.wait(1)
        before = admin.calls()
        update = await reconcile(gw, desired, first.managed or Managed(), prior_after(first))
        assert writes_in(delta(before, admin.calls())) == {}
    finally:
        await clients.close()
    assert update.aspects[Aspect.ENV].reason == "RevisionFailed", update.aspects
    assert not update.ready.status and not update.rolling_out
    assert update.failure is not None and update.failure.retry.value == "slowly"
    assert "UpdateFailed" in [e.reason for e in update.events]


def writes_in(calls: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in calls.items() if k in WRITES}


@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": 100}], indirect=True)
async def test_failed_rollout_is_retried_with_a_new_revision_until_it_serves(
    fresh_emulator: EmulatorProcess,
) -> None:
    admin = fresh_emulator.admin
    admin.put_service_account(SA)
    admin.put_service(PROJECT, REGION, "retry", env={})
    desired = parse(spec("retry"))
    clients = make_clients(fresh_emulator.grpc_endpoint)
    try:
        rollouts = Rollouts()
        gw = Gateway(clients, rollout_timeout=30, on_rollout=rollouts)
        admin.set_faults(fail_next_revision=True)
        wrote = await reconcile(gw, desired, Managed(), Prior())
        assert wrote.ready.reason == "Progressing", wrote.ready
        await rollouts.wait(1)
        first = await reconcile(gw, desired, Managed(), prior_after(wrote))
        svc = admin.get_service(PROJECT, REGION, "retry")
        assert first.ready.reason == "RevisionFailed", first.ready
        assert svc["latestCreatedRevision"] in first.ready.message
        assert first.managed is not None

        # Still broken: the template holds the spec, yet the next check retries the rollout in
        # one UpdateService that makes a new revision (which fails too).
        admin.set_faults(fail_next_revision=True)
        before = admin.calls()
        retried = await reconcile(gw, desired, first.managed, prior_after(first))
        assert writes_in(delta(before, admin.calls())) == {f"{RUN}UpdateService": 1}
        assert retried.ready.reason == "Progressing", retried.ready
        await rollouts.wait(2)
        second = await reconcile(gw, desired, first.managed, prior_after(retried))
        after = admin.get_service(PROJECT, REGION, "retry")
        assert writes_in(delta(before, admin.calls())) == {f"{RUN}UpdateService": 1}
        assert not second.ready.status and second.ready.reason == "RevisionFailed"
        assert second.aspects[Aspect.ENV].reason == "RevisionFailed"
        assert after["latestCreatedRevision"] not in (svc["latestCreatedRevision"], None)
        assert after["latestCreatedRevision"] in second.ready.message
        assert after["latestReadyRevision"] == svc["latestReadyRevision"]  # the old one serves
        assert second.latest_ready_revision == svc["latestReadyRevision"]

        admin.clear_faults()
        writing = await reconcile(gw, desired, first.managed, prior_after(second))
        assert writing.ready.reason == "Progressing", writing.ready
        await rollouts.wait(3)
        third = await reconcile(gw, desired, first.managed, prior_after(writing))
        served = admin.get_service(PROJECT, REGION, "retry")
        assert third.ready.status, third.ready
        assert served["latestReadyRevision"] == served["latestCreatedRevision"]
        assert served["ready"] == "CONDITION_SUCCEEDED"
        assert served["env"] == {"GCP_PROJECT_ID": PROJECT, "MODE": "prod"}
        assert third.latest_ready_revision == served["latestReadyRevision"]

        before = admin.calls()
        fourth = await reconcile(gw, desired, first.managed, prior_after(third))
        assert fourth.ready.reason == "Synced"
        assert delta(before, admin.calls()) == {f"{RUN}GetService": 1, f"{RUN}GetIamPolicy": 1}
    finally:
        await clients.close()


@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": 1500}], indirect=True)
async def test_rollout_in_progress_is_not_failed(fresh_emulator: EmulatorProcess) -> None:
    """Someone else's rollout under way: the template holds the spec and nothing is retried."""
    admin = fresh_emulator.admin
    admin.put_service_account(SA)
    admin.put_service(PROJECT, REGION, "progress", env={})
    desired = parse(spec("progress"))
    clients = make_clients(fresh_emulator.grpc_endpoint)
    try:
        rollouts = Rollouts()
        writer = Gateway(clients, rollout_timeout=30, on_rollout=rollouts)
        # Our own write returns while its rollout (1.5 s) is under way: Progressing, no wait.
        wrote = await reconcile(writer, desired, Managed(), Prior())
        assert wrote.ready.reason == "Progressing" and wrote.rolling_out, wrote.ready
        assert admin.get_service(PROJECT, REGION, "progress")["reconciling"]
        await rollouts.wait(1)
        first = await reconcile(writer, desired, Managed(), prior_after(wrote))
        assert first.ready.status and first.managed is not None
        # A deploy of another variable, through the API, still rolling out.
        observed = await writer.observe(desired.ref, "")
        other = parse(spec("progress", env=[{"name": "OTHER", "value": "x"}]))
        rolling = asyncio.ensure_future(
            writer.update_service(observed, plan(other, observed, Managed()))
        )
        await wait_until(
            lambda: admin.get_service(PROJECT, REGION, "progress")["reconciling"],
            10,
            interval=0.02,
            message="the rollout never started",
        )

        seen = await writer.observe(desired.ref, "")
        assert seen.rollout.state is RolloutState.IN_PROGRESS
        assert seen.rollout.latest_created_revision != seen.latest_ready_revision
        before = admin.calls()
        during = await reconcile(writer, desired, first.managed, prior_after(first))
        assert writes_in(delta(before, admin.calls())) == {}
        assert during.ready.status and during.ready.reason == "Synced"
        await rolling
    finally:
        await clients.close()


# ---------------------------------------------------------------------- claims, roles, traffic


async def test_claim_through_the_real_client_rides_on_the_write_and_is_released(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    from dataclasses import replace

    from controller.reconcile import release

    me = "default/ns/orch"
    desired = replace(parse(spec(service)), owner=me)
    update = await reconcile(gateway, desired, Managed(), Prior())
    assert update.ready.status, update.ready
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["annotations"]["runwarden.dev/owner"] == me
    assert len(got["revisions"]) == 2  # the deploy's, and the one write's: the claim rode on it
    other = replace(desired, owner="default/other/orch")
    refused = await reconcile(gateway, other, Managed(), Prior())
    assert refused.ready.reason == "OwnedElsewhere" and me in refused.ready.message
    assert await release(gateway, desired)
    after = emulator.admin.get_service(PROJECT, REGION, service)
    assert "runwarden.dev/owner" not in after["annotations"]
    assert after["revisions"] == got["revisions"]  # the release alone made no revision
    assert after["env"] == got["env"]


async def test_role_edit_moves_the_grant_through_one_set_iam_policy(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    _, managed = await converge(gateway, parse(spec(service)))
    edited = parse(spec(service, invokers={"role": OTHER_ROLE, "members": [MEMBER]}))
    before = emulator.admin.calls()
    moved = await reconcile(gateway, edited, managed, Prior())
    assert moved.ready.status, moved.ready
    assert delta(before, emulator.admin.calls()).get(f"{RUN}SetIamPolicy") == 1
    iam = emulator.admin.get_service(PROJECT, REGION, service)["iam"]
    assert iam["roles/run.invoker"] == [FOREIGN]
    assert sorted(iam[OTHER_ROLE]) == sorted([FOREIGN, MEMBER])


async def test_pinned_traffic_is_read_from_traffic_statuses(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    old = emulator.admin.get_service(PROJECT, REGION, service)["latestReadyRevision"]
    emulator.admin.put_service(
        PROJECT, REGION, service, traffic=[{"revision": old, "percent": 100}]
    )
    update = await reconcile(gateway, parse(spec(service)), Managed(), Prior())
    assert update.serving is not None and update.serving.reason == "TrafficPinned"
    assert f"{old} 100%" in update.serving.message
    assert not update.ready.status and update.ready.reason == "TrafficPinned"
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["trafficStatuses"] == [{"type": "REVISION", "revision": old, "percent": 100}]
