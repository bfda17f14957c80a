"""RBAC for people (manifests/access/roles.yaml) on a real apiserver, checked with `kubectl --as`:
a namespace editor (RoleBinding to the built-in `edit`) manages Orchestrators in their namespace,
never their status, nothing elsewhere, and cannot change their namespace's annotations (the
tenancy binding); a viewer reads them.

The test control plane has no kube-controller-manager, whose clusterrole-aggregation controller
fills aggregated roles; ``aggregate`` does its work here: the rules of every ClusterRole matching
one of the built-in role's ``aggregationRule.clusterRoleSelectors`` (the selector is the
apiserver's own), so the labels in roles.yaml are what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.k8s import ControlPlane

REPO = Path(__file__).resolve().parents[2]
EDITOR, VIEWER = "alice@example.com", "bob@example.com"


def aggregate(plane: ControlPlane, name: str) -> list[dict[str, Any]]:
    """Fill ClusterRole ``name``'s rules from its aggregation rule, as kube-controller-manager
    would; returns them."""
    role = json.loads(plane.kubectl("get", "clusterrole", name, "-o", "json").stdout)
    selectors = role["aggregationRule"]["clusterRoleSelectors"]
    roles = json.loads(plane.kubectl("get", "clusterroles", "-o", "json").stdout)["items"]
    rules: list[dict[str, Any]] = []
    for other in sorted(roles, key=lambda r: r["metadata"]["name"]):
        labels = other["metadata"].get("labels") or {}
        if other["metadata"]["name"] == name:
            continue
        if any(labels.items() >= s.get("matchLabels", {}).items() for s in selectors):
            rules += [r for r in other.get("rules") or [] if r not in rules]
    patch = json.dumps({"rules": rules})
    plane.kubectl("patch", "clusterrole", name, "--type=merge", "-p", patch)
    return rules


@pytest.fixture(scope="module")
def people(crds: ControlPlane) -> ControlPlane:
    crds.kubectl("apply", "-f", str(REPO / "manifests" / "access" / "roles.yaml"))
    for name in ("view", "edit", "admin"):
        aggregate(crds, name)
    return crds


@pytest.fixture
def bound(people: ControlPlane, namespace: str) -> str:
    for user, role in ((EDITOR, "edit"), (VIEWER, "view")):
        people.kubectl(
            "create",
            "rolebinding",
            f"{role}-{user.split('@')[0]}",
            "-n",
            namespace,
            f"--clusterrole={role}",
            f"--user={user}",
        )
    return namespace


def can_i(plane: ControlPlane, user: str, verb: str, resource: str, *extra: str) -> bool:
    done = plane.kubectl("auth", "can-i", verb, resource, *extra, as_user=user, check=False)
    answer = done.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {resource}: {done.stdout}{done.stderr}"
    return answer == "yes"


def test_the_built_in_roles_aggregate_the_runwarden_roles(people: ControlPlane) -> None:
    for name, verbs in (("edit", {"create", "patch", "delete"}), ("view", {"get", "list"})):
        role = json.loads(people.kubectl("get", "clusterrole", name, "-o", "json").stdout)
        granted = {
            v
            for r in role["rules"]
            if "runwarden.dev" in r.get("apiGroups", []) and "orchestrators" in r["resources"]
            for v in r["verbs"]
        }
        assert verbs <= granted, (name, granted)


def test_a_namespace_editor_manages_orchestrators_there_only(
    people: ControlPlane, bound: str
) -> None:
    ns = bound
    for verb in ("create", "update", "patch", "delete", "get", "list", "watch"):
        assert can_i(people, EDITOR, verb, "orchestrators.runwarden.dev", "-n", ns), verb
    assert not can_i(
        people, EDITOR, "patch", "orchestrators.runwarden.dev", "-n", ns, "--subresource=status"
    )
    assert not can_i(people, EDITOR, "create", "orchestrators.runwarden.dev", "-n", "default")
    for verb in ("patch", "update"):
        assert not can_i(people, EDITOR, verb, f"namespace/{ns}"), verb

    orch = {
        "apiVersion": "runwarden.dev/v1alpha1",
        "kind": "Orchestrator",
        "metadata": {"name": "by-alice", "namespace": ns},
        "spec": {"service": {"project": "tenant-a-prj", "region": "us-west2", "name": "svc"}},
    }
    people.kubectl("apply", "-f", "-", input=json.dumps(orch), as_user=EDITOR)
    people.kubectl("label", "orchestrator", "by-alice", "-n", ns, "team=a", as_user=EDITOR)
    status = people.kubectl(
        "patch",
        "orchestrator",
        "by-alice",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"conditions": []}}),
        as_user=EDITOR,
        check=False,
    )
    assert status.returncode != 0 and "forbidden" in status.stderr.lower(), status.stderr
    annotate = people.kubectl(
        "annotate",
        "namespace",
        ns,
        "runwarden.dev/projects=*",
        "--overwrite",
        as_user=EDITOR,
        check=False,
    )
    assert annotate.returncode != 0 and "forbidden" in annotate.stderr.lower(), annotate.stderr
    got = json.loads(people.kubectl("get", "namespace", ns, "-o", "json").stdout)
    assert "runwarden.dev/projects" not in (got["metadata"].get("annotations") or {})
    people.kubectl("delete", "orchestrator", "by-alice", "-n", ns, "--wait=false", as_user=EDITOR)


def test_a_namespace_viewer_reads_orchestrators(people: ControlPlane, bound: str) -> None:
    ns = bound
    for verb in ("get", "list", "watch"):
        assert can_i(people, VIEWER, verb, "orchestrators.runwarden.dev", "-n", ns), verb
    assert can_i(
        people, VIEWER, "get", "orchestrators.runwarden.dev", "-n", ns, "--subresource=status"
    )
    for verb in ("create", "patch", "delete"):
        assert not can_i(people, VIEWER, verb, "orchestrators.runwarden.dev", "-n", ns), verb
