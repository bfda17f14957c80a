"""End to end (issue 15, items 2, 3 and 6): one owner per service recorded on the service, role
edits that move owned grants, fights seen without the audit feed, and traffic pinned to an older
revision. The real apiserver + the emulator + `python -m controller` as a process."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.bodies import env_entries
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane, namespace_name
from tests.fixtures.orch import (
    FOREIGN,
    MEMBER,
    MODE_VALUE,
    OTHER_ROLE,
    PROJECT,
    REGION,
    SA,
    Orch,
    condition,
)
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

OWNER = "runwarden.dev/owner"
OWNED = "runwarden.dev/owned"
DEADLINE = 40


# ---------------------------------------------------------------------- helpers


def orchestrator(name: str, service: str, **spec: Any) -> dict[str, Any]:
    """The default Orchestrator body (tests/fixtures/orch.py's spec) with raw spec overrides."""
    body = Orch(None, "", None, service, name=name).body()  # type: ignore[arg-type]
    body["spec"].update(spec)
    return body


def apply(cp: ControlPlane, namespace: str, body: dict[str, Any]) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


def handle(cp: ControlPlane, namespace: str, name: str) -> Orch:
    return Orch(cp, namespace, None, "", name=name)  # type: ignore[arg-type]


def get(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return handle(cp, namespace, name).get()


def wait_condition(
    cp: ControlPlane,
    namespace: str,
    name: str,
    status: str,
    reason: str | None = None,
    kind: str = "Ready",
    timeout: float = DEADLINE,
    extra: Callable[[dict[str, Any]], bool] = lambda _: True,
) -> dict[str, Any]:
    return handle(cp, namespace, name).wait(status, reason, kind, timeout, extra)


def has_event(cp: ControlPlane, namespace: str, name: str, reason: str) -> list[dict[str, Any]]:
    return handle(cp, namespace, name).has_event(reason)


def service_state(emulator: EmulatorProcess, service: str) -> dict[str, Any]:
    return emulator.admin.get_service(PROJECT, REGION, service)


@pytest.fixture
def two_namespaces(crds: ControlPlane, request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    names = (namespace_name(request.node.name + "-a"), namespace_name(request.node.name + "-b"))
    for ns in names:
        crds.kubectl("create", "namespace", ns)
    try:
        yield names
    finally:
        for ns in names:
            crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def start_controller(
    kubeconfig: str, emulator: EmulatorProcess, namespaces: tuple[str, ...], log: Path, **env: str
) -> ControllerProcess:
    # Heartbeat 0: every check writes lastSyncTime, which syncs() counts checks by.
    return ControllerProcess(
        kubeconfig=kubeconfig,
        gcp_endpoint=emulator.grpc_endpoint,
        namespaces=namespaces,
        log_path=log,
        extra_env={"RUNWARDEN_STATUS_HEARTBEAT": "0", **env},
    ).start()


@pytest.fixture
def controller2(
    kubeconfig: str, emulator: EmulatorProcess, two_namespaces: tuple[str, str], tmp_path: Path
) -> Iterator[ControllerProcess]:
    """One controller serving both namespaces (cluster name "e2e")."""
    proc = start_controller(
        kubeconfig,
        emulator,
        two_namespaces,
        tmp_path / "controller.log",
        RUNWARDEN_CLUSTER_NAME="e2e",
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def service(emulator: EmulatorProcess, unique_name: Callable[[str], str]) -> str:
    name = unique_name("own")
    emulator.admin.put_service_account(SA)
    emulator.admin.put_service(
        PROJECT,
        REGION,
        name,
        env={"FOREIGN": "keep-me"},
        invokers={"roles/run.invoker": [FOREIGN], OTHER_ROLE: [FOREIGN]},
    )
    return name


def annotations(emulator: EmulatorProcess, service: str) -> dict[str, str]:
    return service_state(emulator, service).get("annotations", {})  # type: ignore[no-any-return]


def syncs(cp: ControlPlane, ns: str, name: str, n: int) -> None:
    """Wait until ``n`` more checks of the object completed (lastSyncTime has second
    resolution and resync is 2 s: each change is at least one more check; the controllers here
    run with --status-heartbeat 0, so every check writes it)."""
    seen: list[str] = []

    def moved() -> bool:
        stamp = get(cp, ns, name).get("status", {}).get("lastSyncTime")
        if stamp and (not seen or seen[-1] != stamp):
            seen.append(stamp)
        return len(seen) > n

    wait_for(moved, DEADLINE + 10 * n, interval=0.3, message=f"{n} more checks of {name}")


# ---------------------------------------------------------------------- item 2: one owner


def test_second_orchestrator_on_a_claimed_service_writes_nothing_and_names_the_owner(
    controller2: ControllerProcess,
    crds: ControlPlane,
    two_namespaces: tuple[str, str],
    emulator: EmulatorProcess,
    service: str,
) -> None:
    a, b = two_namespaces
    apply(crds, a, orchestrator("orch", service))
    wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    claim = annotations(emulator, service)
    assert claim[OWNER] == f"e2e/{a}/orch"
    assert json.loads(claim[OWNED]) == {
        "env": ["GCP_PROJECT_ID", "MODE"],
        "invokers": {"roles/run.invoker": [MEMBER]},
    }

    rival = orchestrator("orch", service)
    rival["spec"]["env"] = env_entries({"MODE": "the-other-value"})
    apply(crds, b, rival)
    obj = wait_condition(crds, b, "orch", "False", reason="OwnedElsewhere", timeout=DEADLINE)
    assert f"e2e/{a}/orch" in condition(obj)["message"]
    before = service_state(emulator, service)
    syncs(crds, b, "orch", 3)
    after = service_state(emulator, service)
    assert after["generation"] == before["generation"], "a write to a service owned elsewhere"
    assert after["revisions"] == before["revisions"]
    assert after["env"]["MODE"] == MODE_VALUE
    assert condition(get(crds, a, "orch"))["status"] == "True"
    assert has_event(crds, b, "orch", "OwnedElsewhere")


def test_take_over_and_release_on_deletion(
    controller2: ControllerProcess,
    crds: ControlPlane,
    two_namespaces: tuple[str, str],
    emulator: EmulatorProcess,
    service: str,
) -> None:
    a, b = two_namespaces
    apply(crds, a, orchestrator("orch", service))
    wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    apply(crds, b, orchestrator("orch", service, policy={"takeOver": True}))
    wait_condition(crds, b, "orch", "True", timeout=DEADLINE)
    assert annotations(emulator, service)[OWNER] == f"e2e/{b}/orch"
    assert has_event(crds, b, "orch", "TakenOver")
    wait_condition(crds, a, "orch", "False", reason="OwnedElsewhere", timeout=DEADLINE)

    # Abandon releases the claim (and changes nothing else) ...
    crds.kubectl("delete", "orchestrator", "orch", "-n", b, "--timeout=60s")
    state = service_state(emulator, service)
    assert OWNER not in state["annotations"] and OWNED not in state["annotations"]
    assert state["env"]["MODE"] == MODE_VALUE
    # ... the other one may write again (its spec holds: no write, no claim yet) and claims the
    # service with its next write.
    wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    emulator.admin.put_service(PROJECT, REGION, service, env={"FOREIGN": "keep-me"})
    wait_for(
        lambda: annotations(emulator, service).get(OWNER) == f"e2e/{a}/orch",
        DEADLINE,
        interval=0.3,
        message="the claim written with the repair",
    )
    # Revoke releases it too.
    crds.kubectl(
        "patch",
        "orchestrator",
        "orch",
        "-n",
        a,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"policy": {"deletion": "Revoke"}}}),
    )
    wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    crds.kubectl("delete", "orchestrator", "orch", "-n", a, "--timeout=60s")
    state = service_state(emulator, service)
    assert OWNER not in state["annotations"] and OWNED not in state["annotations"]
    assert state["env"] == {"FOREIGN": "keep-me"}


def test_claim_survives_a_deploy_and_alone_makes_no_revision(
    controller2: ControllerProcess,
    crds: ControlPlane,
    two_namespaces: tuple[str, str],
    emulator: EmulatorProcess,
    service: str,
) -> None:
    a, _ = two_namespaces
    # The env already holds the spec: the only write is IAM, so the claim goes alone.
    emulator.admin.put_service(
        PROJECT,
        REGION,
        service,
        env={"FOREIGN": "keep-me", "GCP_PROJECT_ID": PROJECT, "MODE": MODE_VALUE},
    )
    revisions = service_state(emulator, service)["revisions"]
    apply(crds, a, orchestrator("orch", service))
    wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    state = service_state(emulator, service)
    assert state["annotations"][OWNER] == f"e2e/{a}/orch"
    assert state["revisions"] == revisions, "the claim alone made a revision"
    # Someone else's deploy sends the service back whole: the claim stays.
    emulator.admin.put_service(PROJECT, REGION, service, env={"FOREIGN": "changed"})
    wait_condition(
        crds,
        a,
        "orch",
        "True",
        timeout=DEADLINE,
        extra=lambda o: o["status"]["drift"]["count"] >= 1,
    )
    assert annotations(emulator, service)[OWNER] == f"e2e/{a}/orch"


def test_ownership_survives_a_lost_status(
    crds: ControlPlane,
    kubeconfig: str,
    two_namespaces: tuple[str, str],
    emulator: EmulatorProcess,
    service: str,
    tmp_path: Path,
) -> None:
    """Restore from a backup: the object comes back without status; the names it owned are
    still known from the record on the service, so a variable it no longer declares goes."""
    a, _ = two_namespaces
    proc = start_controller(kubeconfig, emulator, (a,), tmp_path / "c1.log")
    try:
        apply(crds, a, orchestrator("orch", service))
        wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    finally:
        proc.stop()
    # The object is lost while no controller runs (no release), then re-created from a backup
    # that no longer declares MODE.
    crds.kubectl(
        "patch",
        "orchestrator",
        "orch",
        "-n",
        a,
        "--type=merge",
        "-p",
        json.dumps({"metadata": {"finalizers": None}}),
    )
    crds.kubectl("delete", "orchestrator", "orch", "-n", a, "--timeout=60s")
    restored = orchestrator("orch", service)
    restored["spec"]["env"] = env_entries({"GCP_PROJECT_ID": PROJECT})
    apply(crds, a, restored)
    proc = start_controller(kubeconfig, emulator, (a,), tmp_path / "c2.log")
    try:
        wait_for(
            lambda: "MODE" not in service_state(emulator, service)["env"],
            DEADLINE,
            interval=0.3,
            message="MODE, owned per the record on the service, pruned",
        )
        obj = wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
        assert obj["status"]["managed"]["env"] == ["GCP_PROJECT_ID"]
        assert service_state(emulator, service)["env"]["FOREIGN"] == "keep-me"
    finally:
        proc.stop()


def test_fight_is_detected_without_the_audit_feed(
    crds: ControlPlane,
    kubeconfig: str,
    two_namespaces: tuple[str, str],
    emulator: EmulatorProcess,
    service: str,
    tmp_path: Path,
) -> None:
    """A pipeline that undoes the spec after every repair, and no --audit-subscription."""
    pipeline_sa = "nightly-deploy@pipeline-project.iam.gserviceaccount.com"
    a, _ = two_namespaces
    proc = start_controller(
        kubeconfig, emulator, (a,), tmp_path / "c.log", RUNWARDEN_FIGHT_THRESHOLD="2"
    )
    stop = threading.Event()

    def pipeline() -> None:
        # Undo each repair a second after it lands: after the repair's read-back (so it counts
        # as repaired, not unverified), before the next check (resync 2 s).
        while not stop.wait(0.2):
            try:
                if "MODE" in service_state(emulator, service)["env"] and not stop.wait(1.0):
                    emulator.admin.put_service(
                        PROJECT, REGION, service, env={"FOREIGN": "keep-me"}, principal=pipeline_sa
                    )
            except Exception:  # the emulator is shared and busy: try again
                continue

    apply(crds, a, orchestrator("orch", service))
    wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    undoer = threading.Thread(target=pipeline, daemon=True)
    undoer.start()
    try:
        obj = wait_condition(crds, a, "orch", "False", reason="DriftFight", timeout=120)
        # No audit entry names who undid the spec: the service's last_modifier does.
        assert f"undone by {pipeline_sa}" in condition(obj)["message"]
        assert has_event(crds, a, "orch", "DriftFight")
    finally:
        stop.set()
        undoer.join(10)
        proc.stop()


# ---------------------------------------------------------------------- item 3: role edits


def test_role_edit_moves_owned_grants_and_revoke_follows_the_role(
    controller2: ControllerProcess,
    crds: ControlPlane,
    two_namespaces: tuple[str, str],
    emulator: EmulatorProcess,
    service: str,
) -> None:
    a, _ = two_namespaces
    apply(crds, a, orchestrator("orch", service, policy={"deletion": "Revoke"}))
    wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    crds.kubectl(
        "patch",
        "orchestrator",
        "orch",
        "-n",
        a,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"invokers": {"role": OTHER_ROLE, "members": [MEMBER]}}}),
    )
    obj = wait_condition(
        crds,
        a,
        "orch",
        "True",
        timeout=DEADLINE,
        extra=lambda o: (
            o["status"].get("managed", {}).get("invokerRoles")
            == [{"role": OTHER_ROLE, "members": [MEMBER]}]
        ),
    )
    iam = service_state(emulator, service)["iam"]
    assert iam["roles/run.invoker"] == [FOREIGN], "the grant under the old role stayed"
    assert sorted(iam[OTHER_ROLE]) == sorted([FOREIGN, MEMBER])
    assert obj["status"]["managed"]["invokers"] == [MEMBER]
    assert json.loads(annotations(emulator, service)[OWNED])["invokers"] == {OTHER_ROLE: [MEMBER]}

    crds.kubectl("delete", "orchestrator", "orch", "-n", a, "--timeout=60s")
    iam = service_state(emulator, service)["iam"]
    assert iam["roles/run.invoker"] == [FOREIGN]
    assert iam[OTHER_ROLE] == [FOREIGN]


# ---------------------------------------------------------------------- item 6: pinned traffic


def test_pinned_traffic_is_reported_never_moved_and_ready_follows_serving(
    controller2: ControllerProcess,
    crds: ControlPlane,
    two_namespaces: tuple[str, str],
    emulator: EmulatorProcess,
    service: str,
) -> None:
    a, _ = two_namespaces
    old = service_state(emulator, service)["latestReadyRevision"].rsplit("/", 1)[-1]
    # Someone pins all traffic to the current revision (which lacks the spec) ...
    emulator.admin.put_service(
        PROJECT, REGION, service, traffic=[{"revision": old, "percent": 100}]
    )
    # ... then the Orchestrator writes the spec: a new revision, which serves nothing.
    apply(crds, a, orchestrator("orch", service))
    obj = wait_condition(crds, a, "orch", "False", reason="TrafficPinned", timeout=DEADLINE)
    state = service_state(emulator, service)
    new = state["latestReadyRevision"].rsplit("/", 1)[-1]
    assert new != old and state["env"]["MODE"] == MODE_VALUE
    serving = condition(obj, "ServingSynced")
    assert serving["status"] == "False" and serving["reason"] == "TrafficPinned"
    assert f"{old} 100%" in serving["message"] and new in serving["message"]
    for kind in ("EnvSynced", "InvokersSynced", "SettingsSynced"):
        assert condition(obj, kind)["status"] == "True"
    assert has_event(crds, a, "orch", "TrafficPinned")
    syncs(crds, a, "orch", 2)
    assert service_state(emulator, service)["trafficStatuses"] == [
        {"type": "REVISION", "revision": old, "percent": 100}
    ], "Runwarden moved pinned traffic"

    # The canary is over: traffic goes to the latest revision; Ready and ServingSynced follow.
    emulator.admin.put_service(PROJECT, REGION, service, traffic=[{"percent": 100}])
    obj = wait_condition(crds, a, "orch", "True", timeout=DEADLINE)
    assert condition(obj, "ServingSynced")["status"] == "True"
