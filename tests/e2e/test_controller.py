"""End to end: the real apiserver + the emulator + `python -m controller` as a process.

Every test waits for a state with a deadline (Orch.wait, wait_for); none sleeps and hopes. The
controller runs with RUNWARDEN_RESYNC_SECONDS=2, so "restored within resync + a few seconds" is
~10 s. The Orchestrator, its service and the waits are tests/fixtures/orch.py's.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

import pytest

from cloudrun_emulator.testing import EmulatorProcess, free_port
from tests.fixtures import drift
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.orch import (
    FOREIGN,
    MEMBER,
    MODE_VALUE,
    OTHER_ROLE,
    PROJECT,
    REGION,
    ROLE,
    SA,
    Orch,
    condition,
)
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

RUN = "google.cloud.run.v2.Services/"
FINALIZER = "runwarden.dev/finalizer"


# ---------------------------------------------------------------------- helpers


def writes(calls: dict[str, int]) -> int:
    return sum(
        n
        for m, n in calls.items()
        if m.endswith(("/UpdateService", "/SetIamPolicy", "/CreateService", "/DeleteService"))
    )


def own_service(
    crds: ControlPlane, namespace: str, emulator: EmulatorProcess, service: str
) -> Orch:
    """A service of ``emulator``'s own with one foreign variable, for tests that start their
    own controller (to count its calls or scrape its metrics)."""
    emulator.admin.put_service_account(SA)
    emulator.admin.put_service(PROJECT, REGION, service, env={"FOREIGN": "x"})
    return Orch(crds, namespace, emulator, service)


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("ready_orchestrator", [{"settings": {"maxInstances": 4}}], indirect=True)
def test_apply_becomes_ready_and_service_holds_spec(ready_orchestrator: Orch) -> None:
    orch = ready_orchestrator
    obj = orch.ready
    assert obj is not None
    state = orch.state()
    drift.assert_spec_held(state)
    assert state["settings"]["maxInstances"] == 4

    st = obj["status"]
    assert st["managed"] == {
        "env": ["GCP_PROJECT_ID", "MODE"],
        "invokers": [MEMBER],
        "invokerRoles": [{"role": "roles/run.invoker", "members": [MEMBER]}],
    }
    assert st["serviceUri"].startswith("https://")
    assert st["latestReadyRevision"] == state["latestReadyRevision"].rsplit("/", 1)[-1]
    assert st["lastSyncTime"].endswith("Z")
    assert st["drift"]["count"] == 0 and st["drift"]["pending"] == []
    kinds = {c["type"]: c for c in st["conditions"]}
    assert set(kinds) == {"Ready", "EnvSynced", "InvokersSynced", "SettingsSynced", "ServingSynced"}
    for c in kinds.values():
        assert c["status"] == "True"
        assert c["observedGeneration"] == obj["metadata"]["generation"]
        assert c["lastTransitionTime"].endswith("Z")
    assert FINALIZER in obj["metadata"].get("finalizers", [])
    synced = wait_for(lambda: orch.has_event("Synced"), 10, message="Synced Event")
    assert synced[0]["source"]["component"] == "runwarden"  # the "From" in kubectl describe

    # Later checks find no drift, write nothing, and leave lastTransitionTime alone.
    before = condition(obj)["lastTransitionTime"]
    first_sync = st["lastSyncTime"]
    later = wait_for(
        lambda: (o := orch.get())["status"]["lastSyncTime"] != first_sync and o,
        15,
        message="a later check",
    )
    assert condition(later)["lastTransitionTime"] == before
    assert condition(later)["status"] == "True"


async def test_env_wiped_by_full_template_update_is_restored_foreign_survives(
    ready_orchestrator: Orch,
) -> None:
    orch = ready_orchestrator
    await drift.wipe_env(orch.emulator.grpc_endpoint, orch.service)
    obj = drift.assert_env_restored(orch)
    record = obj["status"]["drift"]
    assert set(record["last"]) == {"env GCP_PROJECT_ID missing", "env MODE missing"}
    assert record["lastRepairedTime"] and record["lastDetectedTime"]
    assert orch.has_event("DriftDetected")
    repaired = orch.has_event("DriftRepaired")
    assert repaired and "MODE" in repaired[0]["message"]
    assert MODE_VALUE not in json.dumps(orch.events())  # names, not values
    assert orch.controller is not None
    assert MODE_VALUE not in orch.controller.log_text()


async def test_dropped_invoker_is_restored_foreign_member_and_other_role_survive(
    ready_orchestrator: Orch,
) -> None:
    orch = ready_orchestrator
    await drift.drop_member(orch.emulator.grpc_endpoint, orch.service, MEMBER)
    drift.assert_invoker_restored(orch, MEMBER)
    obj = orch.wait("True", extra=lambda o: o["status"]["drift"]["count"] >= 1)
    assert obj["status"]["drift"]["last"] == [f"invoker {MEMBER} missing"]


def test_removed_from_spec_is_pruned(ready_orchestrator: Orch) -> None:
    orch = ready_orchestrator
    orch.apply(env={"GCP_PROJECT_ID": PROJECT}, invokers=[])
    obj = orch.wait("True", extra=lambda o: o["metadata"]["generation"] >= 2)
    state = orch.state()
    assert state["env"] == {"FOREIGN": "keep-me", "GCP_PROJECT_ID": PROJECT}
    assert state["iam"][ROLE] == [FOREIGN]
    assert obj["status"]["managed"] == {
        "env": ["GCP_PROJECT_ID"],
        "invokers": [],
        "invokerRoles": [],
    }
    assert obj["status"]["drift"]["count"] == 0  # a spec change is not drift


def test_observe_mode_reports_pending_and_writes_nothing(orch: Orch) -> None:
    before = orch.state()
    orch.apply(policy={"mode": "Observe"})
    obj = orch.wait("False", reason="DriftDetected")
    pending = obj["status"]["drift"]["pending"]
    assert set(pending) == {
        "env GCP_PROJECT_ID missing",
        "env MODE missing",
        f"invoker {MEMBER} missing",
    }
    first_sync = obj["status"]["lastSyncTime"]
    # Several checks later the service is untouched.
    wait_for(
        lambda: orch.get()["status"]["lastSyncTime"] != first_sync,
        15,
        message="another Observe check",
    )
    after = orch.state()
    assert after["generation"] == before["generation"]
    assert after["etag"] == before["etag"]
    assert after["env"] == before["env"] and after["iam"] == before["iam"]
    assert orch.has_event("DriftDetected")


def test_observe_mode_makes_no_write_calls(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
) -> None:
    orch = own_service(crds, namespace, fresh_emulator, "observed")
    fresh_emulator.admin.reset_calls()
    with own_controller():
        orch.apply(policy={"mode": "Observe"})
        orch.wait("False", reason="DriftDetected")
        wait_for(
            lambda: fresh_emulator.admin.calls().get(f"{RUN}GetService", 0) >= 3,
            20,
            message="several checks",
        )
    calls = fresh_emulator.admin.calls()
    assert writes(calls) == 0, calls


@pytest.mark.parametrize("ready_orchestrator", [{"policy": {"deletion": "Revoke"}}], indirect=True)
def test_revoke_removes_owned_and_nothing_else(ready_orchestrator: Orch) -> None:
    orch = ready_orchestrator
    orch.delete()
    state = orch.state()
    assert state["env"] == {"FOREIGN": "keep-me"}
    assert state["iam"][ROLE] == [FOREIGN]
    assert state["iam"][OTHER_ROLE] == [FOREIGN]
    assert orch.has_event("Revoked")


def test_abandon_leaves_the_service_as_it_is(ready_orchestrator: Orch) -> None:
    orch = ready_orchestrator
    orch.delete()
    state = orch.state()
    assert state["env"]["MODE"] == MODE_VALUE and MEMBER in state["iam"][ROLE]


def test_service_not_found_then_found(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    unique_name: Callable[[str], str],
) -> None:
    orch = Orch(crds, namespace, emulator, unique_name("missing"), controller)
    emulator.admin.put_service_account(SA)
    orch.apply()
    obj = orch.wait("False", reason="ServiceNotFound")
    assert orch.service in condition(obj)["message"]
    emulator.admin.put_service(PROJECT, REGION, orch.service, env={})
    orch.wait("True")


def test_service_account_not_found_names_the_member(orch: Orch) -> None:
    ghost = "serviceAccount:ghost-e2e@runwarden-e2e.iam.gserviceaccount.com"
    orch.apply(invokers=[MEMBER, ghost])
    obj = orch.wait("False", reason="ServiceAccountNotFound")
    assert ghost in condition(obj)["message"]
    assert condition(obj, "InvokersSynced")["reason"] == "ServiceAccountNotFound"
    assert condition(obj, "EnvSynced")["status"] == "True"
    assert MEMBER in orch.state()["iam"][ROLE]


def test_kubectl_get_prints_the_contract_columns(ready_orchestrator: Orch) -> None:
    orch = ready_orchestrator
    kubectl, ns = orch.plane.kubectl, orch.namespace
    header, row = kubectl("get", "orch", "-n", ns).stdout.splitlines()[:2]
    assert header.split() == [
        "NAME",
        "SERVICE",
        "REGION",
        "MODE",
        "READY",
        "REASON",
        "DRIFTS",
        "LAST",
        "SYNC",
        "AGE",
    ]
    assert row.split()[:7] == ["orch", orch.service, REGION, "Enforce", "True", "Synced", "0"]
    wide = kubectl("get", "orch", "-n", ns, "-o", "wide").stdout.splitlines()[0]
    assert wide.split()[-2:] == ["PROJECT", "REVISION"]


def test_no_drift_checks_cost_one_get_each_and_metrics_show_it(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
) -> None:
    orch = own_service(crds, namespace, fresh_emulator, "steady")
    port = free_port()
    with own_controller(
        metrics_port=port,
        status_heartbeat=0,  # counts checks by lastSyncTime
    ) as proc:
        orch.apply()
        obj = orch.wait("True")
        fresh_emulator.admin.reset_calls()
        seen = {obj["status"]["lastSyncTime"]}

        def three_more_checks() -> bool:
            seen.add(orch.get()["status"]["lastSyncTime"])
            return len(seen) >= 4

        wait_for(three_more_checks, 30, interval=0.5, message="three more checks")
        calls = fresh_emulator.admin.calls()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        log = proc.log_lines()

    assert set(calls) <= {f"{RUN}GetService", f"{RUN}GetIamPolicy"}, calls
    assert calls[f"{RUN}GetService"] >= 3
    assert abs(calls[f"{RUN}GetService"] - calls[f"{RUN}GetIamPolicy"]) <= 1, calls

    assert 'runwarden_reconcile_total{result="synced"}' in text
    assert 'runwarden_gcp_requests_total{code="OK",method="GetService"}' in text
    assert 'runwarden_gcp_requests_total{code="OK",method="UpdateService"} 1.0' in text
    assert 'runwarden_orchestrators{ready="True"} 1.0' in text
    assert "runwarden_reconcile_duration_seconds_bucket" in text

    # Structured logs: kopf's lines carry k8s_ref and never kopf's settings; no env value.
    assert all("settings" not in line for line in log)
    assert any(
        line.get("event") == "check" and line.get("k8s_ref", {}).get("name") == "orch"
        for line in log
    )
    assert MODE_VALUE not in json.dumps(log)


def test_api_errors_become_conditions_and_recover(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
) -> None:
    admin = fresh_emulator.admin
    admin.put_service_account(SA)
    admin.put_service(PROJECT, REGION, "flaky", env={})
    orch = Orch(crds, namespace, fresh_emulator, "flaky")
    with own_controller() as proc:
        orch.apply()
        orch.wait("True")

        admin.set_faults(rate=1.0, codes=["PERMISSION_DENIED"], methods=["GetService"])
        orch.wait("False", reason="PermissionDenied", timeout=30)

        admin.set_faults(rate=1.0, codes=["UNAVAILABLE"], methods=["GetIamPolicy"])
        obj = orch.wait("False", reason="Unavailable", timeout=40)
        assert all(c["status"] == "False" for c in obj["status"]["conditions"])

        admin.clear_faults()
        admin.set_quota(reads_per_minute=6)
        orch.wait("False", reason="QuotaExceeded", timeout=40)

        admin.clear_quota()
        orch.wait("True", timeout=60)
        assert proc.running  # never a crash
