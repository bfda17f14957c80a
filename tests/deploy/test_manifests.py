"""manifests/ as kustomize renders it: what gets installed, how the controller is locked down, and
the pipeline's examples. Rendering needs only the built kubectl (no apiserver); the examples are
also validated by a real apiserver (server-side dry run)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.settings import (
    DEFAULT_READS_PER_MINUTE,
    DEFAULT_WRITES_PER_MINUTE,
    parse_selector,
    selector_matches,
)
from tests.fixtures.k8s import BIN

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
EXAMPLES = MANIFESTS / "examples"
SA_EMAIL_PLACEHOLDER = "runwarden@PROJECT_ID.iam.gserviceaccount.com"
PUSH_SA = "serviceAccount:756957797294-compute@developer.gserviceaccount.com"


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = BIN / "kubectl"
    if not kubectl.exists():
        pytest.fail(f"{kubectl} not found: build it with `hack/testenv build` (`make test` does)")
    done = subprocess.run(
        [str(kubectl), "kustomize", str(directory)], text=True, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict[str, Any]]:
    objects = kustomize(MANIFESTS)
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(by_kind) == len(objects), "no object twice"
    return by_kind


@pytest.fixture(scope="module")
def deployment(base) -> dict[str, Any]:
    return base[("Deployment", "runwarden")]


@pytest.fixture(scope="module")
def container(deployment) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def test_base_installs_exactly_the_controller(base):
    assert sorted(base) == [
        ("ClusterRole", "runwarden"),
        ("ClusterRole", "runwarden-editor"),
        ("ClusterRole", "runwarden-viewer"),
        ("ClusterRoleBinding", "runwarden"),
        ("CustomResourceDefinition", "orchestrators.runwarden.dev"),
        ("Deployment", "runwarden"),
        ("Namespace", "runwarden-system"),
        ("PodDisruptionBudget", "runwarden"),
        ("Role", "runwarden-leader-election"),
        ("RoleBinding", "runwarden-leader-election"),
        ("ServiceAccount", "runwarden"),
        ("ValidatingAdmissionPolicy", "runwarden-namespace-binding"),
        ("ValidatingAdmissionPolicyBinding", "runwarden-namespace-binding"),
    ]
    for (kind, _), obj in base.items():
        if kind in ("ServiceAccount", "Deployment", "PodDisruptionBudget", "Role", "RoleBinding"):
            assert obj["metadata"]["namespace"] == "runwarden-system"
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "runwarden"


def test_the_crd_is_the_one_in_crds(base):
    crd_file = yaml.safe_load((REPO / "crds" / "orchestrators.runwarden.dev.yaml").read_text())
    rendered = base[("CustomResourceDefinition", "orchestrators.runwarden.dev")]
    assert rendered["spec"] == crd_file["spec"]


def test_examples_are_not_in_the_base(base):
    assert not any(kind == "Orchestrator" for kind, _ in base)


def test_service_account_carries_the_workload_identity_annotation(base):
    sa = base[("ServiceAccount", "runwarden")]
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == SA_EMAIL_PLACEHOLDER
    binding = base[("ClusterRoleBinding", "runwarden")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "runwarden",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "runwarden", "namespace": "runwarden-system"}
    ]
    assert deployment_sa(base) == "runwarden"


def deployment_sa(base) -> str:
    return base[("Deployment", "runwarden")]["spec"]["template"]["spec"]["serviceAccountName"]


def test_cluster_role_is_least_privilege(base):
    rules = base[("ClusterRole", "runwarden")]["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for rule in rules:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
    assert granted == {
        ("runwarden.dev", "orchestrators", "get"),
        ("runwarden.dev", "orchestrators", "list"),
        ("runwarden.dev", "orchestrators", "watch"),
        ("runwarden.dev", "orchestrators", "patch"),
        ("runwarden.dev", "orchestrators/status", "get"),
        ("runwarden.dev", "orchestrators/status", "patch"),
        ("runwarden.dev", "orchestrators/finalizers", "update"),
        ("", "events", "create"),
        ("", "events", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
        ("", "namespaces", "get"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }


def test_deployment_runs_two_replicas_with_leader_election(deployment, container):
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert container["image"] == "ghcr.io/runwarden/runwarden:0.1.0"
    assert container["args"] == [
        "--all-namespaces",
        "--standalone",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=9090",
        "--log-format=json",
        "--leader-election",
        "--leader-election-namespace=runwarden-system",
        "--namespace-binding=required",
    ]
    # The identity is the pod's name (--leader-election-identity's default reads POD_NAME).
    [pod_name] = [e for e in container["env"] if e["name"] == "POD_NAME"]
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_disruption_budget_keeps_one_replica(base, deployment):
    pdb = base[("PodDisruptionBudget", "runwarden")]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_leases_only_in_the_controllers_own_namespace(base):
    role = base[("Role", "runwarden-leader-election")]
    assert role["metadata"]["namespace"] == "runwarden-system"
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]
    binding = base[("RoleBinding", "runwarden-leader-election")]
    assert binding["metadata"]["namespace"] == "runwarden-system"
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "runwarden", "namespace": "runwarden-system"}
    ]
    cluster_rules = base[("ClusterRole", "runwarden")]["rules"]
    assert not any("coordination.k8s.io" in r["apiGroups"] for r in cluster_rules)


def test_shards_overlay_renders_three_disjoint_shards(base):
    objects = kustomize(MANIFESTS / "shards")
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(by_kind) == len(objects), "no object twice"
    shared = {k: v for k, v in base.items() if k[0] not in ("Deployment", "PodDisruptionBudget")}
    for key, obj in shared.items():
        assert by_kind[key] == obj, f"{key} differs from the base"
    base_deployment = base[("Deployment", "runwarden")]
    [base_container] = base_deployment["spec"]["template"]["spec"]["containers"]
    selectors, leases = [], set()
    for n in range(3):
        deployment = by_kind[("Deployment", f"runwarden-shard-{n}")]
        pdb = by_kind[("PodDisruptionBudget", f"runwarden-shard-{n}")]
        match = deployment["spec"]["selector"]["matchLabels"]
        assert match["runwarden.dev/shard"] == str(n)
        assert pdb["spec"]["selector"]["matchLabels"] == match
        assert match.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert deployment["spec"]["replicas"] == 2 and pdb["spec"]["minAvailable"] == 1
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        # The base's args, plus the shard's selector, Lease and share of the region's budget.
        assert args[: len(base_container["args"])] == base_container["args"]
        extra = dict(a.split("=", 1) for a in args[len(base_container["args"]) :])
        assert set(extra) == {
            "--selector",
            "--leader-election-name",
            "--reads-per-minute",
            "--writes-per-minute",
        }
        assert float(extra["--reads-per-minute"]) * 3 <= DEFAULT_READS_PER_MINUTE
        assert float(extra["--writes-per-minute"]) * 3 <= DEFAULT_WRITES_PER_MINUTE
        selectors.append(parse_selector(extra["--selector"]))
        leases.add(extra["--leader-election-name"])
        rest = {k: v for k, v in container.items() if k != "args"}
        assert rest == {k: v for k, v in base_container.items() if k != "args"}
    assert len(leases) == 3, "one Lease per shard"
    # Every Orchestrator is served by exactly one shard, labelled or not.
    for labels in (
        {},
        {"runwarden.dev/shard": "0"},
        {"runwarden.dev/shard": "1"},
        {"runwarden.dev/shard": "2"},
        {"runwarden.dev/shard": "7"},
        {"other": "1"},
    ):
        serving = [n for n, sel in enumerate(selectors) if selector_matches(sel, labels)]
        assert len(serving) == 1, (labels, serving)


def test_deployment_is_locked_down(deployment, container):
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] == 65532
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not ctx.get("privileged", False)
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}, kind
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert all("hostPath" not in v for v in volumes.values())


def test_liveness_probe_and_metrics_match_the_args(deployment, container):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    port = ports.get(probe["port"], probe["port"])
    assert f"--liveness=http://0.0.0.0:{port}{probe['path']}" in container["args"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert f"--metrics-port={annotations['prometheus.io/port']}" in container["args"]
    assert int(annotations["prometheus.io/port"]) in ports.values()
    assert annotations["prometheus.io/path"] == "/metrics"


def test_audit_subscription_is_documented_but_off(container):
    assert not any(e["name"] == "RUNWARDEN_AUDIT_SUBSCRIPTION" for e in container.get("env", []))
    text = (MANIFESTS / "controller" / "deployment.yaml").read_text()
    assert "#     value: projects/PROJECT_ID/subscriptions/" in text
    assert "RUNWARDEN_AUDIT_SUBSCRIPTION" in text


@pytest.fixture(scope="module")
def examples() -> list[dict[str, Any]]:
    return kustomize(EXAMPLES)


def test_examples_are_the_three_pipeline_orchestrators(examples):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in examples)
    assert kinds == [
        ("Namespace", "pipeline"),
        ("Orchestrator", "phase3-to-phase4"),
        ("Orchestrator", "phase4-to-phase5"),
        ("Orchestrator", "phase5-to-phase6"),
    ]
    for orch in (o for o in examples if o["kind"] == "Orchestrator"):
        spec = orch["spec"]
        assert orch["metadata"]["namespace"] == "pipeline"
        assert spec["service"] == {
            "project": "nba-props-platform",
            "region": "us-west2",
            "name": orch["metadata"]["name"],
        }
        env = {e["name"]: e for e in spec["env"]}
        assert env["GCP_PROJECT_ID"]["value"] == "nba-props-platform"
        assert env["SLACK_WEBHOOK_URL"]["secretKeyRef"]["secret"] == "slack-webhook"
        assert PUSH_SA in spec["invokers"]["members"]
    [ns] = [o for o in examples if o["kind"] == "Namespace"]
    # The shipped controller requires namespace binding: the examples' namespace is bound.
    assert ns["metadata"]["annotations"]["runwarden.dev/projects"] == "nba-props-platform"


def test_people_roles_aggregate_into_the_built_in_roles(base):
    editor = base[("ClusterRole", "runwarden-editor")]
    viewer = base[("ClusterRole", "runwarden-viewer")]
    labels = editor["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    for role in (editor, viewer):
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["runwarden.dev"], rule
            assert "orchestrators/status" not in rule["resources"] or set(rule["verbs"]) <= {
                "get",
                "list",
                "watch",
            }, rule
    assert {r for rule in editor["rules"] for r in rule["resources"]} == {"orchestrators"}


def test_admission_policy_is_bound_and_denies(base):
    policy = base[("ValidatingAdmissionPolicy", "runwarden-namespace-binding")]
    binding = base[("ValidatingAdmissionPolicyBinding", "runwarden-namespace-binding")]
    assert policy["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert binding["spec"] == {
        "policyName": "runwarden-namespace-binding",
        "validationActions": ["Deny"],
    }
    assert policy["spec"]["failurePolicy"] == "Fail"
    text = json.dumps(policy)
    for annotation in ("runwarden.dev/projects", "runwarden.dev/allow-public-invokers"):
        assert annotation in text


def test_examples_pass_the_apiserver(crds, namespace, examples):
    """Server-side dry run: the apiserver's schema and CEL rules accept every example (moved to a
    fresh namespace so the shared control plane gets no `pipeline` namespace)."""
    for orch in (o for o in examples if o["kind"] == "Orchestrator"):
        orch = {**orch, "metadata": {**orch["metadata"], "namespace": namespace}}
        done = crds.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=json.dumps(orch), check=False
        )
        assert done.returncode == 0, f"{orch['metadata']['name']}: {done.stderr}"
