"""Helpers for the CRD tests: the contract's example Orchestrator, kubectl apply of a dict, and the
apiserver's Table API (what `kubectl get` renders) read as JSON, never as printed text."""

from __future__ import annotations

import base64
import copy
import json
import ssl
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from tests.fixtures.bodies import orchestrator
from tests.fixtures.k8s import ControlPlane

TABLE = "application/json;as=Table;g=meta.k8s.io;v=v1"


def contract_example(namespace: str, name: str = "phase3-to-phase4") -> dict[str, Any]:
    """The full example of CONTRACT.md §1, in ``namespace``."""
    return orchestrator(
        name,
        "phase3-to-phase4",
        project="nba-props-platform",
        region="us-west2",
        container="",
        namespace=namespace,
        env=[
            {"name": "GCP_PROJECT_ID", "value": "nba-props-platform"},
            {
                "name": "SLACK_WEBHOOK_URL",
                "secretKeyRef": {"secret": "slack-webhook", "version": "latest"},
            },
        ],
        role="roles/run.invoker",
        invokers=["serviceAccount:756957797294-compute@developer.gserviceaccount.com"],
        settings={
            "serviceAccount": "orchestrator@nba-props-platform.iam.gserviceaccount.com",
            "timeoutSeconds": 540,
            "minInstances": 0,
            "maxInstances": 10,
            "concurrency": 1,
            "cpu": "1",
            "memory": "512Mi",
            "ingress": "all",
            "labels": {"team": "data"},
        },
        policy={
            "mode": "Enforce",
            "env": "Merge",
            "invokers": "Additive",
            "deletion": "Abandon",
            "resyncSeconds": 60,
            "allowPublicInvokers": False,
        },
    )


def minimal(namespace: str, name: str = "minimal") -> dict[str, Any]:
    """The smallest valid Orchestrator: only spec.service."""
    return orchestrator(
        name, name, project="nba-props-platform", region="us-west2", namespace=namespace
    )


def apply(
    plane: ControlPlane, obj: dict[str, Any], *, dry_run: bool = False, check: bool = False
) -> Any:
    """`kubectl apply -f -` of ``obj`` (server-side dry run if asked); the CompletedProcess."""
    args = ["apply", "-f", "-", "-o", "json"]
    if dry_run:
        args.append("--dry-run=server")
    # JSON keeps types exact (no YAML 1.1 surprises) and escapes non-ASCII as \\uXXXX.
    return plane.kubectl(*args, input=json.dumps(obj), check=check)


def get(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    """The Orchestrator as stored (defaults filled in)."""
    done = plane.kubectl("get", "orchestrators.runwarden.dev", name, "-n", namespace, "-o", "json")
    return json.loads(done.stdout)


def variant(obj: dict[str, Any]) -> dict[str, Any]:
    """A deep copy to mutate."""
    return copy.deepcopy(obj)


def _material(section: dict[str, Any], key: str, tmp: Path) -> str | None:
    """A kubeconfig credential as a file path, from ``key`` (a path) or ``key-data`` (base64)."""
    if section.get(key):
        return str(section[key])
    if section.get(f"{key}-data"):
        path = tmp / key
        path.write_bytes(base64.b64decode(section[f"{key}-data"]))
        return str(path)
    return None


def raw_get(plane: ControlPlane, path: str, accept: str = "application/json") -> Any:
    """GET ``path`` from the apiserver with the admin credentials of the kubeconfig and an
    explicit Accept header (kubectl get --raw cannot set one); the decoded JSON."""
    config = json.loads(Path(plane.kubeconfig).read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ca = _material(cluster, "certificate-authority", tmp)
        context = ssl.create_default_context(cafile=ca)
        cert = _material(user, "client-certificate", tmp)
        key = _material(user, "client-key", tmp)
        if cert and key:
            context.load_cert_chain(cert, key)
        headers = {"Accept": accept}
        if user.get("token"):
            headers["Authorization"] = f"Bearer {user['token']}"
        request = urllib.request.Request(cluster["server"] + path, headers=headers)
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return json.loads(response.read())
