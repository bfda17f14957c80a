"""End to end: how the controller starts, and what its first sync costs.

- Started before the Orchestrator CRD exists (a Deployment applied together with its CRD), it
  waits for the CRD, alive, and serves Orchestrators as soon as the apiserver serves the CRD, with
  no restart. This needs a control plane of its own: the session's has the CRD from the start.
- The first sync of a new (or resumed) Orchestrator is ONE check: one GetService and one
  GetIamPolicy, not a second check right after it for the same generation.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudrun_emulator.testing import EmulatorProcess, free_port
from tests.fixtures import bodies
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import CRDS, ControlPlane
from tests.fixtures.wait import holds_for, wait_for

pytestmark = pytest.mark.e2e

PROJECT = "runwarden-e2e"
REGION = "us-west2"
SA = "invoker@runwarden-e2e.iam.gserviceaccount.com"
MEMBER = f"serviceAccount:{SA}"
RUN = "google.cloud.run.v2.Services/"
CRD = "orchestrators.runwarden.dev"
CRD_FILE = CRDS / f"{CRD}.yaml"
# kopf's warning when it runs without the resource it serves; from then on it only notices the
# CRD if its discovery re-scan happens to run after the apiserver publishes it (see run() in
# controller/operator/handlers.py).
UNRESOLVED = "Unresolved resources cannot be served"
WAITING = '"event": "waiting_for_crd"'
READY_DEADLINE = 30  # CRD served -> kopf started -> one check, on a busy 2-core machine


def orchestrator(name: str, service: str) -> dict[str, Any]:
    return bodies.orchestrator(
        name,
        service,
        project=PROJECT,
        region=REGION,
        env={"GCP_PROJECT_ID": PROJECT},
        invokers=[MEMBER],
    )


def apply(cp: ControlPlane, namespace: str, body: dict[str, Any]) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


def get(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    out = cp.kubectl("get", "orchestrator", name, "-n", namespace, "-o", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def ready(cp: ControlPlane, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """Wait until Ready=True at the current generation; the object."""

    def check() -> dict[str, Any] | None:
        obj = get(cp, namespace, name)
        status = obj.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        if (
            conditions.get("Ready", {}).get("status") == "True"
            and status.get("observedGeneration") == obj["metadata"]["generation"]
        ):
            return obj
        return None

    return wait_for(check, timeout, interval=0.3, message=f"{name} Ready=True")


def steady_calls(emulator: EmulatorProcess, window: float = 3.0) -> dict[str, int]:
    """The emulator's call counters, asserted not to move for ``window`` seconds."""
    first = emulator.admin.calls()
    holds_for(lambda: emulator.admin.calls() == first, window, "more calls after the first sync")
    return first


def healthz(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


# ---------------------------------------------------------------------- CRD after the controller


@pytest.fixture
def bare_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane of this test's own, without the Orchestrator CRD."""
    plane = ControlPlane.up(tmp_path / "plane")
    try:
        yield plane
    finally:
        plane.down()


def test_controller_started_before_the_crd_serves_it_once_established(
    bare_plane: ControlPlane,
    emulator: EmulatorProcess,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    namespace = "pipeline"
    bare_plane.kubectl("create", "namespace", namespace)
    service = unique_name("startup")
    emulator.admin.put_service_account(SA)
    emulator.admin.put_service(PROJECT, REGION, service, env={}, invokers={})
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    proc = ControllerProcess(
        kubeconfig=bare_plane.kubeconfig,
        gcp_endpoint=emulator.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "controller.log",
        liveness=liveness,
    )
    proc.start(wait=False)  # "started" comes once there is something to serve
    try:
        # The controller has looked for the CRD and not found it.
        wait_for(
            lambda: WAITING in (text := proc.log_text()) or UNRESOLVED in text,
            60,
            message="the controller noticing the missing CRD",
        )
        assert "waiting for CRD orchestrators.runwarden.dev" in proc.log_text()
        # Waiting is healthy: the process runs and its liveness probe answers (no restarts).
        assert wait_for(lambda: healthz(liveness) == 200, 10, message="liveness while waiting")
        assert proc.running, proc.tail()

        bare_plane.kubectl("apply", "-f", str(CRD_FILE))
        bare_plane.wait_established(f"crd/{CRD}")
        wait_for(
            lambda: apply(bare_plane, namespace, orchestrator("orch", service)) or True,
            30,
            message="kubectl apply of the first Orchestrator",
        )
        ready(bare_plane, namespace, "orch", READY_DEADLINE)

        assert proc.running, proc.tail()
        log = proc.log_text()
        # kopf started once the resource was served, so it never ran without it.
        assert UNRESOLVED not in log, proc.tail()
        assert '"event": "crd_served"' in log
        state = emulator.admin.get_service(PROJECT, REGION, service)
        assert state["env"] == {"GCP_PROJECT_ID": PROJECT}
        assert state["iam"]["roles/run.invoker"] == [MEMBER]
        assert healthz(liveness) == 200  # kopf's own probe took over on the same endpoint
    finally:
        proc.stop()


# ---------------------------------------------------------------------- one check per sync


def test_first_sync_and_resume_are_one_check_each(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    service = unique_name("once")
    # Already as the spec wants it: the first check finds no drift and writes nothing.
    fresh_emulator.admin.put_service(
        PROJECT,
        REGION,
        service,
        env={"GCP_PROJECT_ID": PROJECT},
        invokers={"roles/run.invoker": [MEMBER]},
    )
    one_check = {f"{RUN}GetService": 1, f"{RUN}GetIamPolicy": 1}
    proc = ControllerProcess(
        kubeconfig=crds.kubeconfig,
        gcp_endpoint=fresh_emulator.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "controller.log",
        resync_seconds=300,  # no periodic check within the test
    )
    with proc:
        fresh_emulator.admin.reset_calls()
        apply(crds, namespace, orchestrator("orch", service))
        obj = ready(crds, namespace, "orch", READY_DEADLINE)
        [condition] = [c for c in obj["status"]["conditions"] if c["type"] == "Ready"]
        assert condition["reason"] == "Synced"
        assert steady_calls(fresh_emulator) == one_check

    # A restart resumes the object: again one check, not one for the resume and one for the timer.
    fresh_emulator.admin.reset_calls()
    with proc:
        wait_for(
            lambda: fresh_emulator.admin.calls().get(f"{RUN}GetIamPolicy"),
            READY_DEADLINE,
            message="the check on resume",
        )
        assert steady_calls(fresh_emulator) == one_check
