"""Long-running operations: pending rollouts (--rollout-ms), failNextRevision, GetOperation and
WaitOperation, each on an emulator process of the test's own."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.longrunning import operations_pb2

from controller.gcp.clients import make_clients
from tests.fixtures.wait import wait_for

from .conftest import PROJECT, REGION, fresh_deploy

ROLLOUT = pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": 1500}], indirect=True)


def short(name: str) -> str:
    """A revision's short name (v2 Service fields carry projects/…/revisions/NAME)."""
    return name.rsplit("/", 1)[-1]


def env_of(service: run_v2.Service) -> dict[str, str]:
    return {e.name: e.value for e in service.template.containers[0].env}


@pytest.fixture
async def fresh_clients(fresh_emulator):
    c = make_clients(fresh_emulator.grpc_endpoint)
    try:
        yield c
    finally:
        await c.close()


@ROLLOUT
async def test_rollout_stays_pending_then_moves_latest_ready(fresh_emulator, fresh_clients):
    svc = fresh_deploy(fresh_emulator, "rolling", env={"A": "1"})
    before = svc.get()["latestReadyRevision"]
    current = await fresh_clients.run.get_service(name=svc.name)
    current.template.containers[0].env = [run_v2.EnvVar(name="A", value="2")]

    op = await fresh_clients.run.update_service(service=current)
    assert not op.operation.done
    assert op.metadata.name == svc.name  # metadata is the Service, as from_gapic requires

    pending = await fresh_clients.run.get_service(name=svc.name)
    assert pending.reconciling
    # real Cloud Run: CONDITION_PENDING while reconciling (test_fidelity, KCC_VCR)
    assert pending.terminal_condition.state == run_v2.Condition.State.CONDITION_PENDING
    assert short(pending.latest_ready_revision) == before
    assert short(pending.latest_created_revision) != before
    assert pending.generation == 2
    assert pending.observed_generation == 1
    assert env_of(pending) == {"A": "2"}  # the spec is already the new one

    done = await op.result(timeout=30)
    assert not done.reconciling
    assert done.latest_ready_revision == pending.latest_created_revision
    assert done.observed_generation == 2
    assert done.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    assert svc.get()["latestReadyRevision"] == short(done.latest_ready_revision)
    assert fresh_emulator.admin.calls().get("google.longrunning.Operations/GetOperation", 0) >= 1


@ROLLOUT
async def test_admin_view_moves_when_the_rollout_completes(fresh_emulator, fresh_clients):
    svc = fresh_deploy(fresh_emulator, "rolling-admin", env={"A": "1"})
    current = await fresh_clients.run.get_service(name=svc.name)
    current.template.containers[0].env = [run_v2.EnvVar(name="B", value="1")]
    op = await fresh_clients.run.update_service(service=current)
    created = short(op.metadata.latest_created_revision)
    assert svc.get()["reconciling"] is True
    wait_for(
        lambda: svc.get()["latestReadyRevision"] == created,
        timeout=15,
        message="latestReadyRevision never moved to the new revision",
    )
    assert svc.get()["reconciling"] is False


@ROLLOUT
async def test_wait_operation_returns_when_done(fresh_emulator, fresh_clients):
    svc = fresh_deploy(fresh_emulator, "waiting", env={"A": "1"})
    current = await fresh_clients.run.get_service(name=svc.name)
    current.template.containers[0].env = []
    op = await fresh_clients.run.update_service(service=current)
    # google-cloud-run 0.16 quirk: wait_operation returns the raw bytes of the Operation.
    raw = await fresh_clients.run.wait_operation(
        request={"name": op.operation.name, "timeout": {"seconds": 20}}
    )
    waited = operations_pb2.Operation.FromString(raw)
    assert waited.done
    assert waited.response.Is(run_v2.Service.pb().DESCRIPTOR)


@ROLLOUT
async def test_newer_update_supersedes_a_pending_rollout(fresh_emulator, fresh_clients):
    svc = fresh_deploy(fresh_emulator, "superseded", env={"A": "1"})
    current = await fresh_clients.run.get_service(name=svc.name)
    current.template.containers[0].env = [run_v2.EnvVar(name="A", value="2")]
    first = await fresh_clients.run.update_service(service=current)
    current.template.containers[0].env = [run_v2.EnvVar(name="A", value="3")]
    current.etag = first.metadata.etag  # the Operation's metadata is the Service as written
    second = await fresh_clients.run.update_service(service=current)
    with pytest.raises(gexc.GoogleAPICallError, match="superseded"):
        await first.result(timeout=30)
    final = await second.result(timeout=30)
    assert env_of(final) == {"A": "3"}
    assert final.latest_ready_revision == second.metadata.latest_created_revision


async def test_fail_next_revision_fails_the_operation_and_keeps_serving(
    fresh_emulator, fresh_clients
):
    svc = fresh_deploy(fresh_emulator, "failing", env={"A": "1"})
    serving = svc.get()["latestReadyRevision"]
    fresh_emulator.admin.set_faults(fail_next_revision=True)

    current = await fresh_clients.run.get_service(name=svc.name)
    current.template.containers[0].env = [run_v2.EnvVar(name="A", value="broken")]
    op = await fresh_clients.run.update_service(service=current)
    with pytest.raises(gexc.GoogleAPICallError, match="not ready and cannot serve traffic"):
        await op.result(timeout=30)

    after = await fresh_clients.run.get_service(name=svc.name)
    assert after.terminal_condition.state == run_v2.Condition.State.CONDITION_FAILED
    assert short(after.latest_ready_revision) == serving
    assert short(after.latest_created_revision) != serving
    # a LATEST status names no revision; it serves latest_ready_revision (test_fidelity)
    assert after.traffic_statuses[0].revision == ""
    assert svc.get()["latestReadyRevision"] == serving

    # One-shot: the next rollout succeeds.
    after.template.containers[0].env = [run_v2.EnvVar(name="A", value="fixed")]
    ok = await (await fresh_clients.run.update_service(service=after)).result(timeout=30)
    assert ok.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    assert short(ok.latest_ready_revision) != serving


@ROLLOUT
async def test_fail_next_revision_with_rollout(fresh_emulator, fresh_clients):
    svc = fresh_deploy(fresh_emulator, "failing-slow", env={"A": "1"})
    serving = svc.get()["latestReadyRevision"]
    fresh_emulator.admin.set_faults(fail_next_revision=True)
    assert fresh_emulator.admin.request("GET", "/admin/faults")[1]["failNextRevision"] is True
    current = await fresh_clients.run.get_service(name=svc.name)
    current.template.containers[0].env = []
    op = await fresh_clients.run.update_service(service=current)
    assert not op.operation.done
    with pytest.raises(gexc.GoogleAPICallError, match="cannot serve traffic"):
        await op.result(timeout=30)
    assert svc.get()["latestReadyRevision"] == serving
    assert svc.get()["ready"] == "CONDITION_FAILED"


async def test_unknown_operation_is_not_found(clients):
    name = f"projects/{PROJECT}/locations/{REGION}/operations/00000000-0000-0000-0000-000000000000"
    with pytest.raises(gexc.NotFound):
        await clients.run.get_operation(request={"name": name})
    with pytest.raises(gexc.InvalidArgument):
        await clients.run.get_operation(request={"name": "operations/x"})
