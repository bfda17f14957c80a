"""End to end: `runwarden export` -> kubectl apply -> Ready with nothing pending -> Enforce, and
not one write reaches the emulator. Plus what export refuses, on real services and a real
namespace. Real apiserver, real emulator (its own process: a clean call counter and no other
test's services in the project), the real google clients, the controller as a process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.type import expr_pb2

from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.clients import make_clients
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PROJECT = "export-e2e"
REGION = "us-west2"
INVOKER = "serviceAccount:pubsub-push@export-e2e.iam.gserviceaccount.com"
RUNTIME_SA = "orchestrator@export-e2e.iam.gserviceaccount.com"
LITERAL = "literal-value-4e2a"  # a plain env value: must reach the YAML, never stderr
READY_DEADLINE = 60
WRITE_METHODS = ("/UpdateService", "/SetIamPolicy", "/CreateService", "/DeleteService")


def run_export(kubeconfig: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWARDEN_")}
    env["KUBECONFIG"] = kubeconfig
    return subprocess.run(
        [sys.executable, "-m", "controller", "export", *args],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )


def writes(calls: dict[str, int]) -> dict[str, int]:
    return {m: n for m, n in calls.items() if m.endswith(WRITE_METHODS) and n}


def seed(emu: EmulatorProcess) -> list[str]:
    """Three services deployed by 'someone else', with everything export carries."""
    emu.admin.put_service_account(INVOKER.removeprefix("serviceAccount:"))
    emu.admin.put_service_account(RUNTIME_SA)
    names = ["phase3-to-phase4", "phase4-to-phase5", "phase5-to-phase6"]
    for i, name in enumerate(names):
        emu.admin.put_service(
            PROJECT,
            REGION,
            name,
            env={"GCP_PROJECT_ID": PROJECT, "PHASE": str(i + 3), "API_TOKEN": LITERAL},
            secret_env={"SLACK_WEBHOOK_URL": {"secret": "slack-webhook", "version": "latest"}},
            invokers={
                "roles/run.invoker": [INVOKER],
                "roles/run.developer": ["user:dev@example.com"],
            },
            settings={
                "timeoutSeconds": 540,
                "maxInstances": 10 + i,
                "serviceAccount": RUNTIME_SA,
                "memory": "512Mi",
                "ingress": "internal",
                "labels": {"team": "data"},
            },
        )
    return names


def annotate(cp: ControlPlane, namespace: str, projects: str) -> None:
    cp.kubectl(
        "annotate", "namespace", namespace, "--overwrite", f"runwarden.dev/projects={projects}"
    )


def get(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    out = cp.kubectl("get", "orchestrator", name, "-n", namespace, "-o", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def ready_in_sync(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    obj = get(cp, namespace, name)
    status = obj.get("status", {})
    ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
    if (
        ready.get("status") == "True"
        and status.get("observedGeneration") == obj["metadata"]["generation"]
        and status.get("drift", {}).get("pending") == []
    ):
        return obj
    return None


def test_export_apply_enforce_makes_zero_writes(
    fresh_emulator: EmulatorProcess, crds: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    emu, cp = fresh_emulator, crds
    names = seed(emu)
    before = {n: emu.admin.get_service(PROJECT, REGION, n) for n in names}
    annotate(cp, namespace, f"other-project,{PROJECT}")

    done = run_export(
        cp.kubeconfig,
        *("--project", PROJECT, "--region", REGION, "--namespace", namespace),
        *("--gcp-endpoint", emu.grpc_endpoint),
    )
    assert done.returncode == 0, done.stderr
    assert LITERAL not in done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert [d["metadata"]["name"] for d in docs] == names  # ListServices: all of them
    first = docs[0]["spec"]
    assert first["policy"]["mode"] == "Observe"
    assert {
        "name": "SLACK_WEBHOOK_URL",
        "secretKeyRef": {"secret": "slack-webhook", "version": "latest"},
    } in first["env"]
    assert {"name": "API_TOKEN", "value": LITERAL} in first["env"]
    assert first["invokers"]["members"] == [INVOKER]
    assert first["settings"]["ingress"] == "internal"
    assert first["settings"]["serviceAccount"] == RUNTIME_SA

    controller = ControllerProcess(
        kubeconfig=cp.kubeconfig,
        gcp_endpoint=emu.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "controller.log",
    )
    with controller:
        cp.kubectl("apply", "-f", "-", input=done.stdout)
        for name in names:
            wait_for(
                lambda n=name: ready_in_sync(cp, namespace, n),
                READY_DEADLINE,
                interval=0.5,
                message=f"{name} Ready in Observe mode with nothing pending",
            )
        assert writes(emu.admin.calls()) == {}

        emu.admin.reset_calls()
        # The README's third command: the same YAML with policy.mode switched to Enforce.
        enforce, switched = re.subn(r"(?m)^    mode: Observe$", "    mode: Enforce", done.stdout)
        assert switched == len(names)
        cp.kubectl("apply", "-f", "-", input=enforce)
        for name in names:
            obj = wait_for(
                lambda n=name: ready_in_sync(cp, namespace, n),
                READY_DEADLINE,
                interval=0.5,
                message=f"{name} Ready in Enforce mode",
            )
            assert obj["spec"]["policy"]["mode"] == "Enforce"
            assert obj["status"]["drift"]["count"] == 0
        # More Enforce checks of every service (resync 2 s), after each was seen in Enforce.
        gets = "google.cloud.run.v2.Services/GetService"
        seen = emu.admin.calls().get(gets, 0)
        wait_for(
            lambda: emu.admin.calls().get(gets, 0) >= seen + 2 * len(names),
            READY_DEADLINE,
            interval=0.5,
            message="two more Enforce checks per service",
        )
        assert writes(emu.admin.calls()) == {}, controller.tail()
    after = {n: emu.admin.get_service(PROJECT, REGION, n) for n in names}
    for name in names:
        assert after[name]["generation"] == before[name]["generation"]
        assert after[name]["etag"] == before[name]["etag"]
        assert after[name]["env"] == before[name]["env"]


async def _multi_container_service(endpoint: str, name: str) -> None:
    clients = make_clients(endpoint)
    try:
        service = run_v2.Service(
            template=run_v2.RevisionTemplate(
                containers=[
                    run_v2.Container(
                        name="app",
                        image="us-docker.pkg.dev/cloudrun/container/hello",
                        ports=[run_v2.ContainerPort(container_port=8080)],
                        env=[run_v2.EnvVar(name="GCP_PROJECT_ID", value=PROJECT)],
                    ),
                    run_v2.Container(
                        name="sidecar",
                        image="us-docker.pkg.dev/cloudrun/container/hello",
                        env=[run_v2.EnvVar(name="PROXY_TOKEN", value=LITERAL)],
                    ),
                ]
            )
        )
        op = await clients.run.create_service(
            parent=f"projects/{PROJECT}/locations/{REGION}", service=service, service_id=name
        )
        await op.result(timeout=30)
    finally:
        await clients.close()


async def _conditional_invoker(endpoint: str, name: str) -> None:
    clients = make_clients(endpoint)
    try:
        resource = f"projects/{PROJECT}/locations/{REGION}/services/{name}"
        policy = await clients.run.get_iam_policy(
            request=iam_policy_pb2.GetIamPolicyRequest(resource=resource)
        )
        policy.version = 3
        policy.bindings.append(
            policy_pb2.Binding(
                role="roles/run.invoker",
                members=["user:contractor@example.com"],
                condition=expr_pb2.Expr(
                    title="until-june",
                    expression="request.time < timestamp('2027-06-01T00:00:00Z')",
                ),
            )
        )
        await clients.run.set_iam_policy(
            request=iam_policy_pb2.SetIamPolicyRequest(resource=resource, policy=policy)
        )
    finally:
        await clients.close()


def test_export_refuses_what_it_cannot_represent(
    fresh_emulator: EmulatorProcess, crds: ControlPlane, namespace: str
) -> None:
    emu, cp = fresh_emulator, crds
    emu.admin.put_service(PROJECT, REGION, "plain", env={"A": "1"})
    asyncio.run(_multi_container_service(emu.grpc_endpoint, "two-containers"))
    emu.admin.put_service(PROJECT, REGION, "conditional", invokers={"roles/run.invoker": [INVOKER]})
    asyncio.run(_conditional_invoker(emu.grpc_endpoint, "conditional"))
    emu.admin.reset_calls()
    endpoint = ("--gcp-endpoint", emu.grpc_endpoint)
    where = ("--project", PROJECT, "--region", REGION)

    # All services: the representable one is printed, the others refused by name, exit 1.
    done = run_export(cp.kubeconfig, *where, *endpoint)
    assert done.returncode == 1, done.stderr
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(done.stdout)] == ["plain"]
    assert "refused export-e2e/us-west2/two-containers" in done.stderr
    assert "container sidecar has env vars (PROXY_TOKEN)" in done.stderr
    assert "spec.service.container" in done.stderr
    assert LITERAL not in done.stderr + done.stdout  # the sidecar's value goes nowhere
    assert "refused export-e2e/us-west2/conditional" in done.stderr
    assert "conditional binding" in done.stderr

    # One named service that cannot be represented: nothing on stdout.
    done = run_export(cp.kubeconfig, *where, "--service", "conditional", *endpoint)
    assert done.returncode == 1 and done.stdout == ""

    # A namespace whose runwarden.dev/projects does not list the project: refused before any
    # call to Google.
    emu.admin.reset_calls()
    annotate(cp, namespace, "some-other-project")
    done = run_export(cp.kubeconfig, *where, "--namespace", namespace, *endpoint)
    assert done.returncode == 2 and done.stdout == ""
    assert f"namespace {namespace} does not list project {PROJECT}" in done.stderr
    assert "runwarden.dev/projects" in done.stderr and "kubectl annotate namespace" in done.stderr
    cp.kubectl("annotate", "namespace", namespace, "runwarden.dev/projects-")
    done = run_export(cp.kubeconfig, *where, "--namespace", namespace, *endpoint)
    assert done.returncode == 2 and "(it lists: nothing)" in done.stderr
    assert not any(emu.admin.calls().values()), emu.admin.calls()

    done = run_export(cp.kubeconfig, *where, "--namespace", "no-such-namespace", *endpoint)
    assert done.returncode == 2 and "no-such-namespace: no such namespace" in done.stderr

    # With "*", the namespace takes any project.
    annotate(cp, namespace, "*")
    done = run_export(
        cp.kubeconfig, *where, "--service", "plain", "--namespace", namespace, *endpoint
    )
    assert done.returncode == 0, done.stderr
    [doc] = yaml.safe_load_all(done.stdout)
    assert doc["metadata"] == {"name": "plain", "namespace": namespace}
    # And it is a valid Orchestrator: the real apiserver (CRD schema and CEL rules) takes it.
    cp.kubectl("apply", "--dry-run=server", "-f", "-", input=done.stdout)
