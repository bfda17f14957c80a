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

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane, namespace_name
from tests.fixtures.orch import (
    FOREIGN,
    MEMBER,
    MODE_VALUE,
    OTHER_ROLE,
    PROJECT,
    REGION,
    Orch,
    condition,
    deploy_service,
)
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

OWNER = "runwarden.dev/owner"
OWNED = "runwarden.dev/owned"
DEADLINE = 40


# ---------------------------------------------------------------------- helpers


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


@pytest.fixture
def service(emulator: EmulatorProcess, unique_name: Callable[[str], str]) -> str:
    """A service with someone else's variable, member and other role."""
    return deploy_service(emulator, unique_name("own"))


@pytest.fixture
def orchs(
    crds: ControlPlane, two_namespaces: tuple[str, str], emulator: EmulatorProcess, service: str
) -> tuple[Orch, Orch]:
    """The Orchestrator "orch" for ``service`` in each of the two namespaces (nothing applied)."""
    a, b = (Orch(crds, ns, emulator, service, deadline=DEADLINE) for ns in two_namespaces)
    return a, b


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


def owner(o: Orch) -> str:
    """The owner record ``o`` writes on its service (cluster name "e2e")."""
    return f"e2e/{o.namespace}/{o.name}"


def annotations(o: Orch) -> dict[str, str]:
    return o.state().get("annotations", {})  # type: ignore[no-any-return]


def released(o: Orch) -> dict[str, Any]:
    """The service's state, asserted to hold no owner record."""
    state = o.state()
    assert OWNER not in state["annotations"] and OWNED not in state["annotations"]
    return state


def syncs(o: Orch, n: int) -> None:
    """Wait until ``n`` more checks of the object completed (lastSyncTime has second
    resolution and resync is 2 s: each change is at least one more check; the controllers here
    run with --status-heartbeat 0, so every check writes it)."""
    seen: list[str] = []

    def moved() -> bool:
        stamp = o.get().get("status", {}).get("lastSyncTime")
        if stamp and (not seen or seen[-1] != stamp):
            seen.append(stamp)
        return len(seen) > n

    wait_for(moved, DEADLINE + 10 * n, interval=0.3, message=f"{n} more checks of {o.name}")


# ---------------------------------------------------------------------- item 2: one owner


def test_second_orchestrator_on_a_claimed_service_writes_nothing_and_names_the_owner(
    controller2: ControllerProcess, orchs: tuple[Orch, Orch]
) -> None:
    a, b = orchs
    a.apply_ready()
    claim = annotations(a)
    assert claim[OWNER] == owner(a)
    assert json.loads(claim[OWNED]) == {
        "env": ["GCP_PROJECT_ID", "MODE"],
        "invokers": {"roles/run.invoker": [MEMBER]},
    }

    b.apply(env={"MODE": "the-other-value"})
    obj = b.wait("False", reason="OwnedElsewhere")
    assert owner(a) in condition(obj)["message"]
    before = b.state()
    syncs(b, 3)
    after = b.state()
    assert after["generation"] == before["generation"], "a write to a service owned elsewhere"
    assert after["revisions"] == before["revisions"]
    assert after["env"]["MODE"] == MODE_VALUE
    assert condition(a.get())["status"] == "True"
    assert b.has_event("OwnedElsewhere")


def test_take_over_and_release_on_deletion(
    controller2: ControllerProcess, orchs: tuple[Orch, Orch]
) -> None:
    a, b = orchs
    a.apply_ready()
    b.apply_ready(policy={"takeOver": True})
    assert annotations(b)[OWNER] == owner(b)
    assert b.has_event("TakenOver")
    a.wait("False", reason="OwnedElsewhere")

    # Abandon releases the claim (and changes nothing else) ...
    b.delete()
    assert released(b)["env"]["MODE"] == MODE_VALUE
    # ... the other one may write again (its spec holds: no write, no claim yet) and claims the
    # service with its next write.
    a.wait("True")
    a.emulator.admin.put_service(PROJECT, REGION, a.service, env={"FOREIGN": "keep-me"})
    wait_for(
        lambda: annotations(a).get(OWNER) == owner(a),
        DEADLINE,
        interval=0.3,
        message="the claim written with the repair",
    )
    # Revoke releases it too.
    a.patch({"spec": {"policy": {"deletion": "Revoke"}}})
    a.wait("True")
    a.delete()
    assert released(a)["env"] == {"FOREIGN": "keep-me"}


def test_claim_survives_a_deploy_and_alone_makes_no_revision(
    controller2: ControllerProcess, orchs: tuple[Orch, Orch]
) -> None:
    a, _ = orchs
    # The env already holds the spec: the only write is IAM, so the claim goes alone.
    a.emulator.admin.put_service(
        PROJECT,
        REGION,
        a.service,
        env={"FOREIGN": "keep-me", "GCP_PROJECT_ID": PROJECT, "MODE": MODE_VALUE},
    )
    revisions = a.state()["revisions"]
    a.apply_ready()
    state = a.state()
    assert state["annotations"][OWNER] == owner(a)
    assert state["revisions"] == revisions, "the claim alone made a revision"
    # Someone else's deploy sends the service back whole: the claim stays.
    a.emulator.admin.put_service(PROJECT, REGION, a.service, env={"FOREIGN": "changed"})
    a.wait("True", extra=lambda o: o["status"]["drift"]["count"] >= 1)
    assert annotations(a)[OWNER] == owner(a)


def test_ownership_survives_a_lost_status(
    kubeconfig: str, orchs: tuple[Orch, Orch], tmp_path: Path
) -> None:
    """Restore from a backup: the object comes back without status; the names it owned are
    still known from the record on the service, so a variable it no longer declares goes."""
    a, _ = orchs
    proc = start_controller(kubeconfig, a.emulator, (a.namespace,), tmp_path / "c1.log")
    try:
        a.apply_ready()
    finally:
        proc.stop()
    # The object is lost while no controller runs (no release), then re-created from a backup
    # that no longer declares MODE.
    a.patch({"metadata": {"finalizers": None}})
    a.delete()
    a.apply(env={"GCP_PROJECT_ID": PROJECT})
    proc = start_controller(kubeconfig, a.emulator, (a.namespace,), tmp_path / "c2.log")
    try:
        wait_for(
            lambda: "MODE" not in a.state()["env"],
            DEADLINE,
            interval=0.3,
            message="MODE, owned per the record on the service, pruned",
        )
        obj = a.wait("True")
        assert obj["status"]["managed"]["env"] == ["GCP_PROJECT_ID"]
        assert a.state()["env"]["FOREIGN"] == "keep-me"
    finally:
        proc.stop()


def test_fight_is_detected_without_the_audit_feed(
    kubeconfig: str, orchs: tuple[Orch, Orch], tmp_path: Path
) -> None:
    """A pipeline that undoes the spec after every repair, and no --audit-subscription."""
    pipeline_sa = "nightly-deploy@pipeline-project.iam.gserviceaccount.com"
    a, _ = orchs
    proc = start_controller(
        kubeconfig, a.emulator, (a.namespace,), tmp_path / "c.log", RUNWARDEN_FIGHT_THRESHOLD="2"
    )
    stop = threading.Event()

    def pipeline() -> None:
        # Undo each repair a second after it lands: after the repair's read-back (so it counts
        # as repaired, not unverified), before the next check (resync 2 s).
        while not stop.wait(0.2):
            try:
                if "MODE" in a.state()["env"] and not stop.wait(1.0):
                    a.emulator.admin.put_service(
                        PROJECT,
                        REGION,
                        a.service,
                        env={"FOREIGN": "keep-me"},
                        principal=pipeline_sa,
                    )
            except Exception:  # the emulator is shared and busy: try again
                continue

    a.apply_ready()
    undoer = threading.Thread(target=pipeline, daemon=True)
    undoer.start()
    try:
        obj = a.wait("False", reason="DriftFight", timeout=120)
        # No audit entry names who undid the spec: the service's last_modifier does.
        assert f"undone by {pipeline_sa}" in condition(obj)["message"]
        assert a.has_event("DriftFight")
    finally:
        stop.set()
        undoer.join(10)
        proc.stop()


# ---------------------------------------------------------------------- item 3: role edits


def test_role_edit_moves_owned_grants_and_revoke_follows_the_role(
    controller2: ControllerProcess, orchs: tuple[Orch, Orch]
) -> None:
    a, _ = orchs
    a.apply_ready(policy={"deletion": "Revoke"})
    a.patch({"spec": {"invokers": {"role": OTHER_ROLE, "members": [MEMBER]}}})
    obj = a.wait(
        "True",
        extra=lambda o: (
            o["status"].get("managed", {}).get("invokerRoles")
            == [{"role": OTHER_ROLE, "members": [MEMBER]}]
        ),
    )
    iam = a.state()["iam"]
    assert iam["roles/run.invoker"] == [FOREIGN], "the grant under the old role stayed"
    assert sorted(iam[OTHER_ROLE]) == sorted([FOREIGN, MEMBER])
    assert obj["status"]["managed"]["invokers"] == [MEMBER]
    assert json.loads(annotations(a)[OWNED])["invokers"] == {OTHER_ROLE: [MEMBER]}

    a.delete()
    iam = a.state()["iam"]
    assert iam["roles/run.invoker"] == [FOREIGN]
    assert iam[OTHER_ROLE] == [FOREIGN]


# ---------------------------------------------------------------------- item 6: pinned traffic


def test_pinned_traffic_is_reported_never_moved_and_ready_follows_serving(
    controller2: ControllerProcess, orchs: tuple[Orch, Orch]
) -> None:
    a, _ = orchs
    old = a.state()["latestReadyRevision"].rsplit("/", 1)[-1]
    # Someone pins all traffic to the current revision (which lacks the spec) ...
    a.emulator.admin.put_service(
        PROJECT, REGION, a.service, traffic=[{"revision": old, "percent": 100}]
    )
    # ... then the Orchestrator writes the spec: a new revision, which serves nothing.
    a.apply()
    obj = a.wait("False", reason="TrafficPinned")
    state = a.state()
    new = state["latestReadyRevision"].rsplit("/", 1)[-1]
    assert new != old and state["env"]["MODE"] == MODE_VALUE
    serving = condition(obj, "ServingSynced")
    assert serving["status"] == "False" and serving["reason"] == "TrafficPinned"
    assert f"{old} 100%" in serving["message"] and new in serving["message"]
    for kind in ("EnvSynced", "InvokersSynced", "SettingsSynced"):
        assert condition(obj, kind)["status"] == "True"
    assert a.has_event("TrafficPinned")
    syncs(a, 2)
    assert a.state()["trafficStatuses"] == [
        {"type": "REVISION", "revision": old, "percent": 100}
    ], "Runwarden moved pinned traffic"

    # The canary is over: traffic goes to the latest revision; Ready and ServingSynced follow.
    a.emulator.admin.put_service(PROJECT, REGION, a.service, traffic=[{"percent": 100}])
    obj = a.wait("True")
    assert condition(obj, "ServingSynced")["status"] == "True"
