"""Every metric name that manifests/monitoring/ (rules and dashboard) uses exists in the /metrics
output of a real controller, scraped after it has synced, repaired drift and failed a check."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for
from tests.monitoring.test_rules import metric_names_used

pytestmark = pytest.mark.e2e

PROJECT = "metrics-e2e"
REGION = "us-west2"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def exposed_names(text: str) -> set[str]:
    """Sample names, and for families without samples yet the names their type implies."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            names |= {name.removesuffix("_total") + s for s in suffixes.get(kind, ())}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def orchestrator(name: str, service: str) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "runwarden.dev/v1alpha1",
            "kind": "Orchestrator",
            "metadata": {"name": name},
            "spec": {
                "service": {"project": PROJECT, "region": REGION, "name": service},
                "env": [{"name": "GCP_PROJECT_ID", "value": PROJECT}],
            },
        }
    )


def test_every_metric_used_by_rules_and_dashboard_is_exposed(
    emulator: EmulatorProcess,
    crds: ControlPlane,
    namespace: str,
    tmp_path: Path,
    unique_name: Callable[[str], str],
) -> None:
    service = unique_name("metrics")
    emulator.admin.put_service(PROJECT, REGION, service, env={"OTHER": "1"})
    port = free_port()
    controller = ControllerProcess(
        kubeconfig=crds.kubeconfig,
        gcp_endpoint=emulator.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "controller.log",
        metrics_port=port,
    )
    with controller:
        crds.kubectl("apply", "-n", namespace, "-f", "-", input=orchestrator("synced", service))
        crds.kubectl(
            "apply", "-n", namespace, "-f", "-", input=orchestrator("missing", unique_name("gone"))
        )
        wait_for(
            lambda: (
                'runwarden_orchestrators_by_reason{ready="True",reason="Synced"} 1.0'
                in scrape(port)
            ),
            60,
            interval=0.5,
            message="the Orchestrator Synced",
        )
        # Drift: someone redeploys without our variable; the controller repairs it.
        emulator.admin.put_service(PROJECT, REGION, service, env={"OTHER": "2"})
        wait_for(
            lambda: 'runwarden_drift_repairs_total{aspect="env"}' in scrape(port),
            60,
            interval=0.5,
            message="a drift repair counted",
        )

        def not_ready() -> str | None:
            text = scrape(port)
            return text if 'reason="ServiceNotFound"' in text else None

        text = wait_for(
            not_ready,
            60,
            interval=0.5,
            message="the missing service's Orchestrator reported not Ready",
        )
    not_ready_samples = [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "runwarden_orchestrator_not_ready"
    ]
    assert not_ready_samples == [
        (
            {
                "orchestrator_namespace": namespace,
                "orchestrator_name": "missing",
                "reason": "ServiceNotFound",
            },
            1.0,
        )
    ]
    exposed = exposed_names(text)
    used = metric_names_used()
    assert used, "no metric names found in rules and dashboard"
    assert used <= exposed, sorted(used - exposed)
