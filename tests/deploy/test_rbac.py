"""manifests/ on a real apiserver: `kubectl apply -k manifests/` installs, the ServiceAccount's
RBAC is small (`kubectl auth can-i` refuses what the controller does not need), and it is enough:
the controller, authenticated with a TokenRequest token of that ServiceAccount, reconciles an
Orchestrator to Ready against the emulator."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudrun_emulator.testing import free_port
from tests.fixtures.bodies import orchestrator
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for

REPO = Path(__file__).resolve().parents[2]
SA = "system:serviceaccount:runwarden-system:runwarden"
ADMISSION_BINDING = "runwarden-namespace-binding"

# (verb, resource, extra kubectl args): what the controller must be able to do.
ALLOWED = [
    ("get", "orchestrators.runwarden.dev", ["-n", "pipeline"]),
    ("list", "orchestrators.runwarden.dev", ["--all-namespaces"]),
    ("watch", "orchestrators.runwarden.dev", ["--all-namespaces"]),
    ("patch", "orchestrators.runwarden.dev", ["-n", "pipeline"]),
    ("patch", "orchestrators.runwarden.dev", ["-n", "pipeline", "--subresource=status"]),
    ("get", "orchestrators.runwarden.dev", ["-n", "pipeline", "--subresource=status"]),
    ("update", "orchestrators.runwarden.dev", ["-n", "pipeline", "--subresource=finalizers"]),
    ("create", "events", ["-n", "pipeline"]),
    ("patch", "events", ["-n", "pipeline"]),
    ("create", "events.events.k8s.io", ["-n", "pipeline"]),
    ("get", "namespaces", []),
    ("list", "namespaces", []),
    ("watch", "namespaces", []),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", []),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io", []),
    # --leader-election: the Lease(s) in its own namespace.
    ("get", "leases.coordination.k8s.io", ["-n", "runwarden-system"]),
    ("create", "leases.coordination.k8s.io", ["-n", "runwarden-system"]),
    ("update", "leases.coordination.k8s.io", ["-n", "runwarden-system"]),
]

# What it must not be able to do: secrets, pods, workloads, RBAC, other custom resources, and
# verbs on its own resource it has no use for.
DENIED = [
    ("get", "secrets", ["-n", "pipeline"]),
    ("list", "secrets", ["--all-namespaces"]),
    ("watch", "secrets", ["-n", "runwarden-system"]),
    ("create", "pods", ["-n", "pipeline"]),
    ("get", "pods", ["-n", "runwarden-system"]),
    ("create", "pods/exec", ["-n", "runwarden-system"]),
    ("get", "configmaps", ["-n", "pipeline"]),
    ("create", "deployments.apps", ["-n", "pipeline"]),
    ("patch", "deployments.apps", ["-n", "runwarden-system"]),
    ("create", "serviceaccounts/token", ["-n", "runwarden-system"]),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", []),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", []),
    ("impersonate", "serviceaccounts", ["-n", "runwarden-system"]),
    ("create", "orchestrators.runwarden.dev", ["-n", "pipeline"]),
    ("update", "orchestrators.runwarden.dev", ["-n", "pipeline"]),
    ("delete", "orchestrators.runwarden.dev", ["-n", "pipeline"]),
    ("deletecollection", "orchestrators.runwarden.dev", ["-n", "pipeline"]),
    ("update", "orchestrators.runwarden.dev", ["-n", "pipeline", "--subresource=status"]),
    ("get", "kopfpeerings.kopf.dev", ["-n", "pipeline"]),
    ("get", "clusterkopfpeerings.kopf.dev", []),
    ("list", "certificates.cert-manager.io", ["--all-namespaces"]),
    ("get", "widgets.example.com", ["-n", "pipeline"]),
    ("patch", "customresourcedefinitions.apiextensions.k8s.io", []),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", []),
    ("create", "namespaces", []),
    ("delete", "namespaces", []),
    ("get", "events", ["-n", "pipeline"]),
    ("delete", "events", ["-n", "pipeline"]),
    ("list", "nodes", []),
    # Leases: only in its own namespace, and only what the election needs.
    ("get", "leases.coordination.k8s.io", ["-n", "pipeline"]),
    ("update", "leases.coordination.k8s.io", ["-n", "kube-system"]),
    ("create", "leases.coordination.k8s.io", ["-n", "pipeline"]),
    ("delete", "leases.coordination.k8s.io", ["-n", "runwarden-system"]),
    ("list", "leases.coordination.k8s.io", ["--all-namespaces"]),
]


@pytest.fixture(scope="module")
def installed(crds: ControlPlane) -> Iterator[ControlPlane]:
    """`kubectl apply -k manifests/` on the session's control plane (pods never run: no kubelet).

    Afterwards the admission policy's binding goes again: it would refuse the Orchestrators of
    later tests in the shared control plane, whose namespaces are not bound to projects."""
    done = crds.kubectl("apply", "-k", str(REPO / "manifests"))
    assert "serviceaccount/runwarden" in done.stdout, done.stdout
    # The Namespace enforces the "restricted" Pod Security Standard; the apiserver checks the
    # Deployment's pod template against it and would warn here.
    assert "PodSecurity" not in done.stderr, done.stderr
    yield crds
    crds.kubectl(
        "delete",
        "validatingadmissionpolicybinding",
        ADMISSION_BINDING,
        "--ignore-not-found",
        check=False,
    )


def test_apply_k_manifests_installs_everything(installed):
    versions = {}
    for kind, name, namespace in [
        ("namespace", "runwarden-system", None),
        ("customresourcedefinition", "orchestrators.runwarden.dev", None),
        ("serviceaccount", "runwarden", "runwarden-system"),
        ("clusterrole", "runwarden", None),
        ("clusterrolebinding", "runwarden", None),
        ("deployment", "runwarden", "runwarden-system"),
        ("poddisruptionbudget", "runwarden", "runwarden-system"),
        ("role", "runwarden-leader-election", "runwarden-system"),
        ("rolebinding", "runwarden-leader-election", "runwarden-system"),
        ("clusterrole", "runwarden-editor", None),
        ("clusterrole", "runwarden-viewer", None),
        ("validatingadmissionpolicy", "runwarden-namespace-binding", None),
        ("validatingadmissionpolicybinding", "runwarden-namespace-binding", None),
    ]:
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        obj = json.loads(installed.kubectl(*args).stdout)
        assert obj["metadata"]["name"] == name
        versions[kind, name] = (args, obj["metadata"]["resourceVersion"])
    deployment = json.loads(
        installed.kubectl(
            "get", "deployment", "runwarden", "-n", "runwarden-system", "-o", "json"
        ).stdout
    )
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "runwarden"
    # Applying again is a no-op: kustomize output is stable, nothing fights the server's defaults.
    again = installed.kubectl("apply", "-k", str(REPO / "manifests"))
    # (kubectl says "configured" for a PodDisruptionBudget whatever happens: it always sends a
    # patch for its selector. The server is the judge: no object's resourceVersion moves.)
    said = [line for line in again.stdout.splitlines() if "configured" in line]
    assert all(line.startswith("poddisruptionbudget.policy/") for line in said), again.stdout
    for (kind, name), (args, version) in versions.items():
        after = json.loads(installed.kubectl(*args).stdout)["metadata"]["resourceVersion"]
        assert after == version, f"{kind}/{name} changed by applying the same manifests again"


def can_i(plane: ControlPlane, verb: str, resource: str, extra: list[str]) -> bool:
    done = plane.kubectl("auth", "can-i", verb, resource, *extra, as_user=SA, check=False)
    answer = done.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {resource}: {done.stdout}{done.stderr}"
    return answer == "yes"


@pytest.mark.parametrize(("verb", "resource", "extra"), ALLOWED, ids=lambda v: str(v))
def test_service_account_can_do_what_the_controller_needs(installed, verb, resource, extra):
    assert can_i(installed, verb, resource, extra), f"{SA} cannot {verb} {resource} {extra}"


@pytest.mark.parametrize(("verb", "resource", "extra"), DENIED, ids=lambda v: str(v))
def test_service_account_cannot_do_anything_else(installed, verb, resource, extra):
    assert not can_i(installed, verb, resource, extra), f"{SA} CAN {verb} {resource} {extra}"


def test_can_i_is_meaningful_here(installed):
    """The apiserver authorizes with RBAC (not AlwaysAllow): an unknown user gets nothing."""
    done = installed.kubectl(
        "auth",
        "can-i",
        "get",
        "orchestrators.runwarden.dev",
        "-A",
        as_user="system:serviceaccount:runwarden-system:nobody",
        check=False,
    )
    assert done.stdout.strip() == "no"


# ------------------------------------------------------------------ the controller as that SA


def service_account_kubeconfig(plane: ControlPlane, directory: Path) -> Path:
    """A kubeconfig with the cluster's server and CA and a TokenRequest token of the SA only."""
    token = plane.kubectl(
        "create", "token", "runwarden", "-n", "runwarden-system", "--duration=1h"
    ).stdout.strip()
    assert token.count(".") == 2, "a JWT"
    admin = json.loads(Path(plane.kubeconfig).read_text())
    cluster = dict(admin["clusters"][0]["cluster"])
    config: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testenv", "cluster": cluster}],
        "users": [{"name": "runwarden", "user": {"token": token}}],
        "contexts": [{"name": "runwarden", "context": {"cluster": "testenv", "user": "runwarden"}}],
        "current-context": "runwarden",
    }
    if "certificate-authority" in cluster:  # relative paths would break in another directory
        cluster["certificate-authority"] = str(
            (Path(plane.kubeconfig).parent / cluster["certificate-authority"]).resolve()
        )
    path = directory / "runwarden.kubeconfig"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def kubectl_as(
    plane: ControlPlane, kubeconfig: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(plane.bin / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_token_kubeconfig_authenticates_as_the_service_account(installed, tmp_path):
    kubeconfig = service_account_kubeconfig(installed, tmp_path)
    whoami = kubectl_as(installed, kubeconfig, "auth", "whoami", "-o", "json")
    assert whoami.returncode == 0, whoami.stderr
    assert json.loads(whoami.stdout)["status"]["userInfo"]["username"] == SA
    refused = kubectl_as(installed, kubeconfig, "get", "secrets", "-n", "runwarden-system")
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()


def _ready(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    obj = json.loads(
        plane.kubectl(
            "get", "orchestrators.runwarden.dev", name, "-n", namespace, "-o", "json"
        ).stdout
    )
    for condition in obj.get("status", {}).get("conditions", []):
        if condition["type"] == "Ready" and condition["status"] == "True":
            return obj
    return None


def _http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode(errors="replace")


@pytest.mark.e2e
def test_controller_reconciles_to_ready_as_the_service_account(
    installed, namespace, fresh_emulator, unique_name, tmp_path
):
    """The Deployment's flags and the ServiceAccount's token: RBAC proven sufficient, not small.

    An emulator of its own: watching all namespaces, the controller also meets the Orchestrators
    that earlier tests left behind, and must not touch services other tests use."""
    emulator = fresh_emulator
    project, region, service = "nba-props-platform", "us-west2", unique_name("rbac")
    pusher = "756957797294-compute@developer.gserviceaccount.com"
    emulator.admin.put_service_account(pusher)
    emulator.admin.put_service(
        project,
        region,
        service,
        env={"DEPLOYED_BY_SOMEONE_ELSE": "keep"},
        invokers={"roles/run.invoker": []},
    )

    health_port, metrics_port = free_port(), free_port()
    controller = ControllerProcess(
        kubeconfig=str(service_account_kubeconfig(installed, tmp_path)),
        gcp_endpoint=emulator.grpc_endpoint,
        log_path=tmp_path / "controller.log",
        all_namespaces=True,  # as deployed: cluster-wide watch, namespaces observed
        standalone=True,
        resync_seconds=3,
        liveness=f"http://127.0.0.1:{health_port}/healthz",
        metrics_port=metrics_port,
        log_format="json",
        extra_args=[
            "--leader-election",
            "--leader-election-identity",
            "rbac-proof-replica",
            "--namespace-binding=required",  # as deployed
        ],
    )
    # The namespace is bound to the project, as the admission policy and the controller demand.
    installed.kubectl(
        "annotate", "namespace", namespace, f"runwarden.dev/projects={project}", "--overwrite"
    )
    controller.start()
    try:
        orch = orchestrator(
            "rbac-proof",
            service,
            project=project,
            region=region,
            namespace=namespace,
            env={"GCP_PROJECT_ID": project},
            invokers=[f"serviceAccount:{pusher}"],
        )
        installed.kubectl("apply", "-f", "-", input=json.dumps(orch))
        ready = wait_for(
            lambda: _ready(installed, namespace, "rbac-proof"),
            timeout=60,
            message="Orchestrator Ready=True with the controller running as the ServiceAccount",
        )
        assert ready["status"]["observedGeneration"] == ready["metadata"]["generation"]
        # It reconciled as the holder of the Lease, made with the Role's rights.
        lease = json.loads(
            installed.kubectl(
                "get", "lease", "runwarden", "-n", "runwarden-system", "-o", "json"
            ).stdout
        )
        assert lease["spec"]["holderIdentity"] == "rbac-proof-replica"

        got = emulator.admin.get_service(project, region, service)
        assert got["env"]["GCP_PROJECT_ID"] == project
        assert got["env"]["DEPLOYED_BY_SOMEONE_ELSE"] == "keep"
        assert f"serviceAccount:{pusher}" in got["iam"]["roles/run.invoker"]

        # Events are created with the ServiceAccount's rights.
        def events() -> list[dict[str, Any]]:
            done = installed.kubectl(
                "get",
                "events",
                "-n",
                namespace,
                "--field-selector=involvedObject.name=rbac-proof",
                "-o",
                "json",
            )
            return json.loads(done.stdout)["items"]

        wait_for(events, timeout=30, message="an Event on the Orchestrator")

        # The liveness probe and the metrics endpoint the Deployment points at answer.
        assert _http_get(f"http://127.0.0.1:{health_port}/healthz")[0] == 200
        status, metrics = _http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "runwarden_reconcile_total" in metrics

        # The finalizer is released with the ServiceAccount's rights: deletion completes.
        installed.kubectl(
            "delete", "orchestrators.runwarden.dev", "rbac-proof", "-n", namespace, "--wait=false"
        )

        def gone() -> bool:
            done = installed.kubectl(
                "get", "orchestrators.runwarden.dev", "rbac-proof", "-n", namespace, check=False
            )
            return done.returncode != 0 and "NotFound" in done.stderr

        wait_for(gone, timeout=60, message="the Orchestrator deleted (finalizer released)")
    finally:
        controller.stop()
    # No RBAC refusal anywhere in the run (other refusals, e.g. Events in a namespace that is
    # being deleted by an earlier test, are not about this ServiceAccount's rights).
    denials = re.findall(rf"{re.escape(SA)}\\?\" cannot [^\n]{{0,160}}", controller.log_text())
    assert not denials, f"RBAC refusals in the controller log: {denials[:5]}"
