"""End to end: the real apiserver + the emulator + `python -m controller` as a process.

Every test waits for a state with a deadline (wait_for); none sleeps and hopes. The controller
runs with RUNWARDEN_RESYNC_SECONDS=2, so "restored within resync + a few seconds" is ~10 s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2

from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.clients import make_clients
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

PROJECT = "runwarden-e2e"
REGION = "us-west2"
SA = "invoker@runwarden-e2e.iam.gserviceaccount.com"
MEMBER = f"serviceAccount:{SA}"
FOREIGN = "user:someone@example.com"
OTHER_ROLE = "roles/run.developer"
RUN = "google.cloud.run.v2.Services/"
MODE_VALUE = "mode-value-7c1f"  # must never show up in logs or Events
REPAIR_DEADLINE = 20  # resync 2 s + rollout + watch latency, on a busy 2-core machine


# ---------------------------------------------------------------------- helpers


def orchestrator(name: str, service: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "runwarden.dev/v1alpha1",
        "kind": "Orchestrator",
        "metadata": {"name": name},
        "spec": {
            "service": {"project": PROJECT, "region": REGION, "name": service},
            "env": [
                {"name": "GCP_PROJECT_ID", "value": PROJECT},
                {"name": "MODE", "value": MODE_VALUE},
            ],
            "invokers": {"members": [MEMBER]},
        },
    }
    body["spec"].update(spec)
    return body


def apply(cp: ControlPlane, namespace: str, body: dict[str, Any]) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


def get(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    out = cp.kubectl("get", "orchestrator", name, "-n", namespace, "-o", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def condition(obj: dict[str, Any], kind: str = "Ready") -> dict[str, Any]:
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return c  # type: ignore[no-any-return]
    return {}


def wait_condition(
    cp: ControlPlane,
    namespace: str,
    name: str,
    status: str,
    reason: str | None = None,
    kind: str = "Ready",
    timeout: float = REPAIR_DEADLINE,
    extra: Callable[[dict[str, Any]], bool] = lambda _: True,
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        obj = get(cp, namespace, name)
        c = condition(obj, kind)
        generation = obj["metadata"]["generation"]
        if (
            c.get("status") == status
            and (reason is None or c.get("reason") == reason)
            and obj.get("status", {}).get("observedGeneration") == generation
            and extra(obj)
        ):
            return obj
        return None

    return wait_for(ready, timeout, interval=0.3, message=f"{name} {kind}={status} {reason or ''}")


def events(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    out = cp.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "-o",
        "json",
        f"--field-selector=involvedObject.name={name}",
    ).stdout
    return json.loads(out)["items"]  # type: ignore[no-any-return]


def has_event(cp: ControlPlane, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in events(cp, namespace, name) if e["reason"] == reason]


def service_state(emulator: EmulatorProcess, service: str) -> dict[str, Any]:
    return emulator.admin.get_service(PROJECT, REGION, service)


def writes(calls: dict[str, int]) -> int:
    return sum(
        n
        for m, n in calls.items()
        if m.endswith(("/UpdateService", "/SetIamPolicy", "/CreateService", "/DeleteService"))
    )


@pytest.fixture
def service(emulator: EmulatorProcess, unique_name: Callable[[str], str]) -> str:
    """A deployed service with a foreign variable, a foreign invoker and another role."""
    name = unique_name("e2e")
    emulator.admin.put_service_account(SA)
    emulator.admin.put_service(
        PROJECT,
        REGION,
        name,
        env={"FOREIGN": "keep-me"},
        invokers={"roles/run.invoker": [FOREIGN], OTHER_ROLE: [FOREIGN]},
    )
    return name


async def full_template_update_without_env(endpoint: str, service: str) -> None:
    """What `gcloud run deploy --set-env-vars OTHER=1` does: the whole template, our vars gone."""
    clients = make_clients(endpoint)
    try:
        name = f"projects/{PROJECT}/locations/{REGION}/services/{service}"
        svc = await clients.run.get_service(name=name)
        container = svc.template.containers[0]
        del container.env[:]
        container.env.append(run_v2.EnvVar(name="OTHER", value="1"))
        container.env.append(run_v2.EnvVar(name="FOREIGN", value="keep-me"))
        op = await clients.run.update_service(service=svc)
        await op.result(timeout=30)
    finally:
        await clients.close()


async def drop_member_with_set_iam_policy(endpoint: str, service: str, member: str) -> None:
    clients = make_clients(endpoint)
    try:
        resource = f"projects/{PROJECT}/locations/{REGION}/services/{service}"
        policy = await clients.run.get_iam_policy(
            request=iam_policy_pb2.GetIamPolicyRequest(resource=resource)
        )
        for binding in policy.bindings:
            if member in binding.members:
                binding.members.remove(member)
        await clients.run.set_iam_policy(
            request=iam_policy_pb2.SetIamPolicyRequest(resource=resource, policy=policy)
        )
    finally:
        await clients.close()


# ---------------------------------------------------------------------- tests


def test_apply_becomes_ready_and_service_holds_spec(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    service: str,
) -> None:
    apply(crds, namespace, orchestrator("orch", service, settings={"maxInstances": 4}))
    obj = wait_condition(crds, namespace, "orch", "True")
    state = service_state(emulator, service)
    assert state["env"] == {"FOREIGN": "keep-me", "GCP_PROJECT_ID": PROJECT, "MODE": MODE_VALUE}
    assert sorted(state["iam"]["roles/run.invoker"]) == sorted([FOREIGN, MEMBER])
    assert state["iam"][OTHER_ROLE] == [FOREIGN]
    assert state["settings"]["maxInstances"] == 4

    st = obj["status"]
    assert st["managed"] == {"env": ["GCP_PROJECT_ID", "MODE"], "invokers": [MEMBER]}
    assert st["serviceUri"].startswith("https://")
    assert st["latestReadyRevision"] == state["latestReadyRevision"].rsplit("/", 1)[-1]
    assert st["lastSyncTime"].endswith("Z")
    assert st["drift"]["count"] == 0 and st["drift"]["pending"] == []
    kinds = {c["type"]: c for c in st["conditions"]}
    assert set(kinds) == {"Ready", "EnvSynced", "InvokersSynced", "SettingsSynced"}
    for c in kinds.values():
        assert c["status"] == "True"
        assert c["observedGeneration"] == obj["metadata"]["generation"]
        assert c["lastTransitionTime"].endswith("Z")
    assert FINALIZER_IN(obj)
    synced = wait_for(
        lambda: has_event(crds, namespace, "orch", "Synced"), 10, message="Synced Event"
    )
    assert synced[0]["source"]["component"] == "runwarden"  # the "From" in kubectl describe

    # Later checks find no drift, write nothing, and leave lastTransitionTime alone.
    before = condition(obj)["lastTransitionTime"]
    first_sync = st["lastSyncTime"]
    later = wait_for(
        lambda: (o := get(crds, namespace, "orch"))["status"]["lastSyncTime"] != first_sync and o,
        15,
        message="a later check",
    )
    assert condition(later)["lastTransitionTime"] == before
    assert condition(later)["status"] == "True"


def FINALIZER_IN(obj: dict[str, Any]) -> bool:
    return "runwarden.dev/finalizer" in obj["metadata"].get("finalizers", [])


async def test_env_wiped_by_full_template_update_is_restored_foreign_survives(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    service: str,
) -> None:
    apply(crds, namespace, orchestrator("orch", service))
    wait_condition(crds, namespace, "orch", "True")
    await full_template_update_without_env(emulator.grpc_endpoint, service)
    assert "MODE" not in service_state(emulator, service)["env"]

    obj = wait_condition(
        crds,
        namespace,
        "orch",
        "True",
        extra=lambda o: o["status"]["drift"]["count"] >= 1,
    )
    state = service_state(emulator, service)
    assert state["env"] == {
        "OTHER": "1",
        "FOREIGN": "keep-me",
        "GCP_PROJECT_ID": PROJECT,
        "MODE": MODE_VALUE,
    }
    drift = obj["status"]["drift"]
    assert set(drift["last"]) == {"env GCP_PROJECT_ID missing", "env MODE missing"}
    assert drift["lastRepairedTime"] and drift["lastDetectedTime"]
    assert has_event(crds, namespace, "orch", "DriftDetected")
    repaired = has_event(crds, namespace, "orch", "DriftRepaired")
    assert repaired and "MODE" in repaired[0]["message"]
    assert MODE_VALUE not in json.dumps(events(crds, namespace, "orch"))  # names, not values
    assert MODE_VALUE not in controller.log_text()


async def test_dropped_invoker_is_restored_foreign_member_and_other_role_survive(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    service: str,
) -> None:
    apply(crds, namespace, orchestrator("orch", service))
    wait_condition(crds, namespace, "orch", "True")
    await drop_member_with_set_iam_policy(emulator.grpc_endpoint, service, MEMBER)
    assert MEMBER not in service_state(emulator, service)["iam"]["roles/run.invoker"]

    wait_for(
        lambda: MEMBER in service_state(emulator, service)["iam"]["roles/run.invoker"],
        REPAIR_DEADLINE,
        message="invoker restored",
    )
    state = service_state(emulator, service)
    assert FOREIGN in state["iam"]["roles/run.invoker"]
    assert state["iam"][OTHER_ROLE] == [FOREIGN]
    obj = wait_condition(
        crds, namespace, "orch", "True", extra=lambda o: o["status"]["drift"]["count"] >= 1
    )
    assert obj["status"]["drift"]["last"] == [f"invoker {MEMBER} missing"]


def test_removed_from_spec_is_pruned(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    service: str,
) -> None:
    apply(crds, namespace, orchestrator("orch", service))
    wait_condition(crds, namespace, "orch", "True")
    apply(
        crds,
        namespace,
        orchestrator(
            "orch",
            service,
            env=[{"name": "GCP_PROJECT_ID", "value": PROJECT}],
            invokers={"members": []},
        ),
    )
    obj = wait_condition(
        crds, namespace, "orch", "True", extra=lambda o: o["metadata"]["generation"] >= 2
    )
    state = service_state(emulator, service)
    assert state["env"] == {"FOREIGN": "keep-me", "GCP_PROJECT_ID": PROJECT}
    assert state["iam"]["roles/run.invoker"] == [FOREIGN]
    assert obj["status"]["managed"] == {"env": ["GCP_PROJECT_ID"], "invokers": []}
    assert obj["status"]["drift"]["count"] == 0  # a spec change is not drift


def test_observe_mode_reports_pending_and_writes_nothing(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    service: str,
) -> None:
    before = service_state(emulator, service)
    apply(crds, namespace, orchestrator("orch", service, policy={"mode": "Observe"}))
    obj = wait_condition(crds, namespace, "orch", "False", reason="DriftDetected")
    pending = obj["status"]["drift"]["pending"]
    assert set(pending) == {
        "env GCP_PROJECT_ID missing",
        "env MODE missing",
        f"invoker {MEMBER} missing",
    }
    first_sync = obj["status"]["lastSyncTime"]
    # Several checks later the service is untouched.
    wait_for(
        lambda: get(crds, namespace, "orch")["status"]["lastSyncTime"] != first_sync,
        15,
        message="another Observe check",
    )
    after = service_state(emulator, service)
    assert after["generation"] == before["generation"]
    assert after["etag"] == before["etag"]
    assert after["env"] == before["env"] and after["iam"] == before["iam"]
    assert has_event(crds, namespace, "orch", "DriftDetected")


def test_observe_mode_makes_no_write_calls(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    kubeconfig: str,
    tmp_path: Any,
) -> None:
    fresh_emulator.admin.put_service_account(SA)
    fresh_emulator.admin.put_service(PROJECT, REGION, "observed", env={"FOREIGN": "x"})
    fresh_emulator.admin.reset_calls()
    with ControllerProcess(
        kubeconfig=kubeconfig,
        gcp_endpoint=fresh_emulator.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "c.log",
    ):
        apply(crds, namespace, orchestrator("orch", "observed", policy={"mode": "Observe"}))
        wait_condition(crds, namespace, "orch", "False", reason="DriftDetected")
        wait_for(
            lambda: fresh_emulator.admin.calls().get(f"{RUN}GetService", 0) >= 3,
            20,
            message="several checks",
        )
    calls = fresh_emulator.admin.calls()
    assert writes(calls) == 0, calls


def test_revoke_removes_owned_and_nothing_else(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    service: str,
) -> None:
    apply(crds, namespace, orchestrator("orch", service, policy={"deletion": "Revoke"}))
    wait_condition(crds, namespace, "orch", "True")
    crds.kubectl("delete", "orchestrator", "orch", "-n", namespace, "--timeout=60s")
    state = service_state(emulator, service)
    assert state["env"] == {"FOREIGN": "keep-me"}
    assert state["iam"]["roles/run.invoker"] == [FOREIGN]
    assert state["iam"][OTHER_ROLE] == [FOREIGN]
    assert has_event(crds, namespace, "orch", "Revoked")


def test_abandon_leaves_the_service_as_it_is(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    service: str,
) -> None:
    apply(crds, namespace, orchestrator("orch", service))
    wait_condition(crds, namespace, "orch", "True")
    crds.kubectl("delete", "orchestrator", "orch", "-n", namespace, "--timeout=60s")
    state = service_state(emulator, service)
    assert state["env"]["MODE"] == MODE_VALUE and MEMBER in state["iam"]["roles/run.invoker"]


def test_service_not_found_then_found(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    unique_name: Callable[[str], str],
) -> None:
    missing = unique_name("missing")
    emulator.admin.put_service_account(SA)
    apply(crds, namespace, orchestrator("orch", missing))
    obj = wait_condition(crds, namespace, "orch", "False", reason="ServiceNotFound")
    assert missing in condition(obj)["message"]
    emulator.admin.put_service(PROJECT, REGION, missing, env={})
    wait_condition(crds, namespace, "orch", "True")


def test_service_account_not_found_names_the_member(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    service: str,
) -> None:
    ghost = "serviceAccount:ghost-e2e@runwarden-e2e.iam.gserviceaccount.com"
    apply(crds, namespace, orchestrator("orch", service, invokers={"members": [MEMBER, ghost]}))
    obj = wait_condition(crds, namespace, "orch", "False", reason="ServiceAccountNotFound")
    assert ghost in condition(obj)["message"]
    assert condition(obj, "InvokersSynced")["reason"] == "ServiceAccountNotFound"
    assert condition(obj, "EnvSynced")["status"] == "True"
    assert MEMBER in service_state(emulator, service)["iam"]["roles/run.invoker"]


def test_kubectl_get_prints_the_contract_columns(
    controller: ControllerProcess,
    crds: ControlPlane,
    namespace: str,
    service: str,
) -> None:
    apply(crds, namespace, orchestrator("orch", service))
    wait_condition(crds, namespace, "orch", "True")
    header, row = crds.kubectl("get", "orch", "-n", namespace).stdout.splitlines()[:2]
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
    assert row.split()[:7] == ["orch", service, REGION, "Enforce", "True", "Synced", "0"]
    wide = crds.kubectl("get", "orch", "-n", namespace, "-o", "wide").stdout.splitlines()[0]
    assert wide.split()[-2:] == ["PROJECT", "REVISION"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_drift_checks_cost_one_get_each_and_metrics_show_it(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    kubeconfig: str,
    tmp_path: Any,
) -> None:
    import urllib.request

    fresh_emulator.admin.put_service_account(SA)
    fresh_emulator.admin.put_service(PROJECT, REGION, "steady", env={"FOREIGN": "x"})
    port = _free_port()
    with ControllerProcess(
        kubeconfig=kubeconfig,
        gcp_endpoint=fresh_emulator.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "c.log",
        metrics_port=port,
    ) as proc:
        apply(crds, namespace, orchestrator("orch", "steady"))
        obj = wait_condition(crds, namespace, "orch", "True")
        fresh_emulator.admin.reset_calls()
        seen = {obj["status"]["lastSyncTime"]}

        def three_more_checks() -> bool:
            seen.add(get(crds, namespace, "orch")["status"]["lastSyncTime"])
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
    kubeconfig: str,
    tmp_path: Any,
) -> None:
    admin = fresh_emulator.admin
    admin.put_service_account(SA)
    admin.put_service(PROJECT, REGION, "flaky", env={})
    with ControllerProcess(
        kubeconfig=kubeconfig,
        gcp_endpoint=fresh_emulator.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "c.log",
    ) as proc:
        apply(crds, namespace, orchestrator("orch", "flaky"))
        wait_condition(crds, namespace, "orch", "True")

        admin.set_faults(rate=1.0, codes=["PERMISSION_DENIED"], methods=["GetService"])
        wait_condition(crds, namespace, "orch", "False", reason="PermissionDenied", timeout=30)

        admin.set_faults(rate=1.0, codes=["UNAVAILABLE"], methods=["GetIamPolicy"])
        obj = wait_condition(crds, namespace, "orch", "False", reason="Unavailable", timeout=40)
        assert all(c["status"] == "False" for c in obj["status"]["conditions"])

        admin.clear_faults()
        admin.set_quota(reads_per_minute=6)
        wait_condition(crds, namespace, "orch", "False", reason="QuotaExceeded", timeout=40)

        admin.clear_quota()
        wait_condition(crds, namespace, "orch", "True", timeout=60)
        assert proc.running  # never a crash
