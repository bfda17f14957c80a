"""Tenancy end to end: two tenants in one cluster, refused twice.

The real apiserver runs the shipped admission policy (manifests/admission/, CEL with
``namespaceObject``); the controller runs as deployed (``--namespace-binding required``) and acts
as each namespace's Google service account by impersonation (google-auth -> the emulator's IAM
Credentials GenerateAccessToken); the emulator holds each tenant account to its own project
(grants), so a tenant account cannot touch the other tenant's project even if the controller
tried.

The policy is the shipped one; only its binding is narrowed (a namespace label of this module)
so that the rest of the session's tests, whose namespaces are not bound to projects, are left
alone. Removing a namespace's label is "the policy removed" for it: objects created then reach
the controller, which refuses them itself.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import BIN, ControlPlane, namespace_name
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
REGION = "us-west2"
PROJECT_A = "tenant-a-prj"
PROJECT_B = "tenant-b-prj"
SA_A = f"runner@{PROJECT_A}.iam.gserviceaccount.com"
SA_B = f"runner@{PROJECT_B}.iam.gserviceaccount.com"
SELECTOR = "runwarden.dev/tenancy-e2e"
DEADLINE = 40  # resync 2 s, impersonation, rollout, watch latency, on a busy 2-core machine


@dataclass
class Cluster:
    plane: ControlPlane
    emulator: EmulatorProcess
    controller: ControllerProcess
    ns_a: str
    ns_b: str
    label: str


def _admission_objects(label: str) -> list[dict[str, Any]]:
    """manifests/admission as kustomize renders it, the binding narrowed to this module."""
    done = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(REPO / "manifests" / "admission")],
        text=True,
        capture_output=True,
        check=True,
    )
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    for obj in objects:
        if obj["kind"] == "ValidatingAdmissionPolicyBinding":
            obj["metadata"]["name"] = f"runwarden-namespace-binding-{label}"
            obj["spec"]["matchResources"] = {
                "namespaceSelector": {"matchLabels": {SELECTOR: label}}
            }
    return objects


@pytest.fixture(scope="module")
def cluster(
    control_plane: ControlPlane,
    crds: ControlPlane,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    plane = control_plane
    tmp = tmp_path_factory.mktemp("tenancy")
    label = secrets.token_hex(3)
    emulator = EmulatorProcess(log_dir=tmp).start()
    admission = _admission_objects(label)
    ns_a = namespace_name("tenant-a")
    ns_b = namespace_name("tenant-b")
    controller: ControllerProcess | None = None
    try:
        for sa in (SA_A, SA_B):
            emulator.admin.put_service_account(sa)
        emulator.admin.set_grants(SA_A, [PROJECT_A])
        emulator.admin.set_grants(SA_B, [PROJECT_B])
        for ns, project, sa in ((ns_a, PROJECT_A, SA_A), (ns_b, PROJECT_B, SA_B)):
            plane.kubectl(
                "apply",
                "-f",
                "-",
                input=json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {
                            "name": ns,
                            "labels": {SELECTOR: label},
                            "annotations": {
                                "runwarden.dev/projects": project,
                                "runwarden.dev/google-service-account": sa,
                            },
                        },
                    }
                ),
            )
        plane.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"kind": "List", "apiVersion": "v1", "items": admission}),
        )
        controller = ControllerProcess(
            kubeconfig=plane.kubeconfig,
            gcp_endpoint=emulator.grpc_endpoint,
            namespaces=[ns_a, ns_b],
            log_path=tmp / "controller.log",
            extra_args=[
                "--namespace-binding=required",
                f"--iam-credentials-endpoint={emulator.admin_url}",
            ],
        ).start()
        yield Cluster(plane, emulator, controller, ns_a, ns_b, label)
    finally:
        if controller is not None:
            controller.stop()
        for obj in admission:
            plane.kubectl(
                "delete",
                obj["kind"].lower(),
                obj["metadata"]["name"],
                "--ignore-not-found",
                check=False,
            )
        for ns in (ns_a, ns_b):
            plane.kubectl(
                "delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False
            )
        emulator.stop()


# ---------------------------------------------------------------------- helpers


def orchestrator(name: str, project: str, service: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "runwarden.dev/v1alpha1",
        "kind": "Orchestrator",
        "metadata": {"name": name},
        "spec": {
            "service": {"project": project, "region": REGION, "name": service},
            "env": [{"name": "TENANT", "value": project}],
        },
    }
    body["spec"].update(spec)
    return body


def apply(
    c: Cluster, namespace: str, body: dict[str, Any], *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return c.plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body), check=check)


def ready(c: Cluster, namespace: str, name: str) -> dict[str, Any]:
    out = c.plane.kubectl("get", "orchestrator", name, "-n", namespace, "-o", "json").stdout
    for cond in json.loads(out).get("status", {}).get("conditions", []):
        if cond["type"] == "Ready":
            return cond  # type: ignore[no-any-return]
    return {}


def wait_ready(c: Cluster, namespace: str, name: str, status: str, reason: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        cond = ready(c, namespace, name)
        return cond if (cond.get("status"), cond.get("reason")) == (status, reason) else None

    try:
        return wait_for(reached, DEADLINE, message=f"{name}: Ready={status} {reason}")
    except AssertionError:
        print(c.controller.tail(60))
        raise


def refused_at_admission(c: Cluster, namespace: str, body: dict[str, Any]) -> str:
    """The admission refusal's message (waits for the policy to be in force: the apiserver
    compiles a new policy and its binding asynchronously)."""

    def refused() -> str | None:
        done = apply(c, namespace, body, check=False)
        if done.returncode == 0:
            c.plane.kubectl(
                "delete",
                "orchestrator",
                body["metadata"]["name"],
                "-n",
                namespace,
                "--wait=false",
                check=False,
            )
            return None
        return done.stderr

    return wait_for(refused, DEADLINE, interval=1.0, message="refused at admission")


def admitted(c: Cluster, namespace: str, body: dict[str, Any]) -> None:
    """Apply, retrying while admission still refuses (the apiserver sees namespace label and
    annotation changes through an informer: a moment late)."""
    wait_for(
        lambda: apply(c, namespace, body, check=False).returncode == 0,
        DEADLINE,
        interval=1.0,
        message=f"{body['metadata']['name']} admitted in {namespace}",
    )


def unlabel(c: Cluster, namespace: str) -> None:
    c.plane.kubectl("label", "namespace", namespace, f"{SELECTOR}-")


def relabel(c: Cluster, namespace: str) -> None:
    c.plane.kubectl("label", "namespace", namespace, f"{SELECTOR}={c.label}", "--overwrite")


# ---------------------------------------------------------------------- tests


def test_each_tenant_repairs_its_own_services_as_its_own_identity(cluster: Cluster) -> None:
    c = cluster
    admin = c.emulator.admin
    for project, service in ((PROJECT_A, "svc-a"), (PROJECT_B, "svc-b")):
        admin.put_service(project, REGION, service, env={"KEEP": "1"}, principal="deployer@x.com")
    apply(c, c.ns_a, orchestrator("mine", PROJECT_A, "svc-a"))
    apply(c, c.ns_b, orchestrator("mine", PROJECT_B, "svc-b"))
    wait_ready(c, c.ns_a, "mine", "True", "Synced")
    wait_ready(c, c.ns_b, "mine", "True", "Synced")
    got_a = admin.get_service(PROJECT_A, REGION, "svc-a")
    got_b = admin.get_service(PROJECT_B, REGION, "svc-b")
    assert got_a["env"] == {"KEEP": "1", "TENANT": PROJECT_A}
    assert got_b["env"] == {"KEEP": "1", "TENANT": PROJECT_B}
    assert (got_a["lastModifier"], got_b["lastModifier"]) == (SA_A, SA_B)

    # Drift on tenant B's service is repaired, as tenant B.
    admin.put_service(PROJECT_B, REGION, "svc-b", env={"KEEP": "1"}, principal="deployer@x.com")
    assert admin.get_service(PROJECT_B, REGION, "svc-b")["lastModifier"] == "deployer@x.com"
    repaired = wait_for(
        lambda: (g := admin.get_service(PROJECT_B, REGION, "svc-b"))["env"].get("TENANT") and g,
        DEADLINE,
        message="tenant B's drift repaired",
    )
    assert repaired["lastModifier"] == SA_B
    assert admin.grants()["tokensIssued"].keys() == {SA_A, SA_B}


def test_each_tenant_is_refused_the_others_project_at_admission(cluster: Cluster) -> None:
    c = cluster
    for namespace, foreign in ((c.ns_a, PROJECT_B), (c.ns_b, PROJECT_A)):
        message = refused_at_admission(c, namespace, orchestrator("theirs", foreign, "svc"))
        assert "runwarden.dev/projects" in message, message
        assert f"project {foreign} is not allowed in namespace {namespace}" in message, message
        assert "ValidatingAdmissionPolicy" in message, message


def test_the_controller_refuses_what_admission_did_not_see(cluster: Cluster) -> None:
    """With the policy out of the way for tenant A's namespace, an Orchestrator for tenant B's
    project is stored; the controller refuses it (ProjectNotAllowed) and touches nothing."""
    c = cluster
    admin = c.emulator.admin
    admin.put_service(PROJECT_B, REGION, "svc-b2", env={"KEEP": "1"}, principal="deployer@x.com")
    unlabel(c, c.ns_a)
    try:
        admitted(c, c.ns_a, orchestrator("sneaky", PROJECT_B, "svc-b2"))
    finally:
        relabel(c, c.ns_a)
    cond = wait_ready(c, c.ns_a, "sneaky", "False", "ProjectNotAllowed")
    assert "runwarden.dev/projects" in cond["message"] and PROJECT_B in cond["message"]
    got = admin.get_service(PROJECT_B, REGION, "svc-b2")
    assert got["env"] == {"KEEP": "1"} and got["lastModifier"] == "deployer@x.com"
    events = json.loads(
        c.plane.kubectl(
            "get",
            "events",
            "-n",
            c.ns_a,
            "--field-selector=involvedObject.name=sneaky",
            "-o",
            "json",
        ).stdout
    )["items"]
    assert any(e["reason"] == "ProjectNotAllowed" for e in events)


def test_a_tenant_account_cannot_touch_the_other_project_even_if_the_controller_tried(
    cluster: Cluster,
) -> None:
    """A binding that wrongly lists tenant B's project for tenant A's namespace (the controller
    now tries): Google, here the emulator's grants, refuses tenant A's account there."""
    c = cluster
    admin = c.emulator.admin
    admin.put_service(PROJECT_B, REGION, "svc-b3", env={"KEEP": "1"}, principal="deployer@x.com")
    c.plane.kubectl(
        "annotate",
        "namespace",
        c.ns_a,
        f"runwarden.dev/projects={PROJECT_A},{PROJECT_B}",
        "--overwrite",
    )
    try:
        admitted(c, c.ns_a, orchestrator("tries", PROJECT_B, "svc-b3"))
        cond = wait_ready(c, c.ns_a, "tries", "False", "PermissionDenied")
        assert PROJECT_B in cond["message"]
    finally:
        c.plane.kubectl(
            "annotate", "namespace", c.ns_a, f"runwarden.dev/projects={PROJECT_A}", "--overwrite"
        )
    assert admin.get_service(PROJECT_B, REGION, "svc-b3")["env"] == {"KEEP": "1"}
    # The binding's change takes effect without a restart: refused before any call again.
    wait_ready(c, c.ns_a, "tries", "False", "ProjectNotAllowed")


def test_public_invokers_need_the_namespace_annotation(cluster: Cluster) -> None:
    c = cluster
    admin = c.emulator.admin
    admin.put_service(PROJECT_A, REGION, "svc-pub", env={"KEEP": "1"}, principal="deployer@x.com")
    public = orchestrator(
        "public",
        PROJECT_A,
        "svc-pub",
        invokers={"members": ["allUsers"]},
        policy={"allowPublicInvokers": True},
    )
    message = refused_at_admission(c, c.ns_a, public)
    assert 'runwarden.dev/allow-public-invokers: "true"' in message, message

    unlabel(c, c.ns_a)
    try:
        admitted(c, c.ns_a, public)
    finally:
        relabel(c, c.ns_a)
    cond = wait_ready(c, c.ns_a, "public", "False", "PublicInvokerRefused")
    assert "runwarden.dev/allow-public-invokers" in cond["message"]
    assert "allUsers" not in admin.get_service(PROJECT_A, REGION, "svc-pub")["iam"].get(
        "roles/run.invoker", []
    )

    # A cluster administrator allows it: it takes effect without a restart.
    c.plane.kubectl(
        "annotate", "namespace", c.ns_a, "runwarden.dev/allow-public-invokers=true", "--overwrite"
    )
    try:
        wait_ready(c, c.ns_a, "public", "True", "Synced")
        iam = admin.get_service(PROJECT_A, REGION, "svc-pub")["iam"]
        assert "allUsers" in iam["roles/run.invoker"]
        # ... and at admission too.
        changed = orchestrator(
            "public",
            PROJECT_A,
            "svc-pub",
            invokers={"members": ["allUsers", "allAuthenticatedUsers"]},
            policy={"allowPublicInvokers": True},
        )
        admitted(c, c.ns_a, changed)
    finally:
        c.plane.kubectl(
            "annotate", "namespace", c.ns_a, "runwarden.dev/allow-public-invokers-", "--overwrite"
        )
