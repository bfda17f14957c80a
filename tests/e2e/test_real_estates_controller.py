"""Issue 15 end to end: the real apiserver + the emulator + `python -m controller`, for what a
user sees in status and Events: a pinned revision name (15.1), conditional IAM bindings (15.7)
and `invokerIamDisabled` (15.10). The reconcile-level detail is in test_real_estates.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.clients import make_clients
from tests.e2e.test_real_estates import TEMP, grant_under_condition, make_public, someone_deploys
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.orch import FOREIGN, MEMBER, PROJECT, REGION, SA, Orch, condition
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

DEADLINE = 30  # resync 2 s + rollout + watch latency, on a busy 2-core machine


@pytest.fixture
def estate(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    unique_name: Callable[[str], str],
) -> Callable[[str], Orch]:
    """A factory: the Orchestrator ``name`` (served by ``controller``, nothing applied) for a
    service of its own with a foreign variable and invoker."""

    def make(name: str) -> Orch:
        service = unique_name("estate")
        emulator.admin.put_service_account(SA)
        emulator.admin.put_service(
            PROJECT,
            REGION,
            service,
            env={"FOREIGN": "x"},
            invokers={"roles/run.invoker": [FOREIGN]},
        )
        return Orch(crds, namespace, emulator, service, controller, name=name, deadline=DEADLINE)

    return make


def on_clients(endpoint: str, action: Callable[[Any], Any]) -> None:
    """Run someone else's write with the real v2 client."""

    async def run() -> None:
        clients = make_clients(endpoint)
        try:
            await action(clients)
        finally:
            await clients.close()

    asyncio.run(run())


def test_a_pinned_revision_name_is_repaired_not_retried_as_a_conflict(
    estate: Callable[[str], Orch],
) -> None:
    orch = estate("pinned")
    service, emulator = orch.service, orch.emulator
    orch.apply_ready()
    pinned = f"{service}-tf-1"

    def deploy(svc: Any) -> None:
        svc.template.revision = pinned
        del svc.template.containers[0].env[:]

    on_clients(emulator.grpc_endpoint, lambda c: someone_deploys(c, service, deploy, PROJECT))
    wait_for(
        lambda: "MODE" in orch.state()["env"] and orch.state()["latestReadyRevision"] != pinned,
        DEADLINE,
        message="the drift under a pinned revision name repaired",
    )
    obj = orch.get()
    assert condition(obj).get("reason") != "Conflict"
    assert obj["status"]["drift"]["count"] >= 1


def test_conditional_members_are_said_in_status_and_a_warning(
    estate: Callable[[str], Orch],
) -> None:
    orch = estate("cond")
    service, emulator = orch.service, orch.emulator
    on_clients(emulator.grpc_endpoint, lambda c: grant_under_condition(c, service, TEMP, PROJECT))
    conditional = orch.state()["iamConditional"]
    orch.apply(policy={"invokers": "Authoritative"})
    obj = orch.wait("True")
    message = condition(obj, "InvokersSynced")["message"]
    assert TEMP in message and "Authoritative" in message
    wait_for(
        lambda: orch.has_event("ConditionalBinding"),
        DEADLINE,
        message="Warning ConditionalBinding",
    )
    [event] = orch.has_event("ConditionalBinding")
    assert event["type"] == "Warning" and TEMP in event["message"]
    state = orch.state()
    assert state["iam"]["roles/run.invoker"] == [MEMBER]
    assert state["iamConditional"] == conditional  # never touched


def test_invoker_iam_disabled_is_repaired_and_reported(estate: Callable[[str], Orch]) -> None:
    orch = estate("iam-off")
    service, emulator = orch.service, orch.emulator
    orch.apply_ready()
    on_clients(emulator.grpc_endpoint, lambda c: make_public(c, service, PROJECT))
    wait_for(
        lambda: orch.state()["invokerIamDisabled"] is False,
        DEADLINE,
        message="invokerIamDisabled set back to false",
    )
    obj = orch.wait(
        "True",
        extra=lambda o: any(
            "invokerIamDisabled" in line for line in o["status"]["drift"].get("last", [])
        ),
    )
    assert obj["status"]["drift"]["count"] >= 1

    # Allowed by the policy: left public, and said so.
    orch.apply(policy={"allowPublicInvokers": True})
    on_clients(emulator.grpc_endpoint, lambda c: make_public(c, service, PROJECT))
    obj = orch.wait(
        "True",
        kind="InvokersSynced",
        extra=lambda o: (
            "invokerIamDisabled is true" in condition(o, "InvokersSynced").get("message", "")
        ),
    )
    assert orch.state()["invokerIamDisabled"] is True
