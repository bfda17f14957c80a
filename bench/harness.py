"""The benchmark's moving parts: control plane, emulator, controller, Orchestrators and a watch.

Everything here is real: kube-apiserver + etcd from `hack/testenv`, `cloudrun-emulator`, and
`python -m controller` as a subprocess. The harness observes the controller from outside only:
its Prometheus metrics, /proc for CPU and memory, the emulator's call counters, and a watch on
the Orchestrators (JSON from `kubectl get --raw ...?watch=1`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from cloudrun_emulator.admin import AdminClient
from cloudrun_emulator.testing import free_port
from tests.fixtures.bodies import orchestrator as orchestrator_body
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import CRDS, REPO, TESTENV, ControlPlane

PROJECT = "bench-project"
REGION = "us-west2"
SA_EMAIL = "invoker@bench-project.iam.gserviceaccount.com"
MEMBER = f"serviceAccount:{SA_EMAIL}"
ROLE = "roles/run.invoker"
FOREIGN_ENV = {"OWNED_BY_SOMEONE_ELSE": "x"}  # never declared: must survive every write
GROUP_PATH = "/apis/runwarden.dev/v1alpha1"
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- control plane


def control_plane_up(directory: Path) -> ControlPlane:
    """`hack/testenv up DIR --owner-pid <us>` (a watchdog stops it if we die) + the CRDs."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(TESTENV), "up", str(directory), "--owner-pid", str(os.getpid())],
        text=True,
        capture_output=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"hack/testenv up {directory} failed:\n{done.stderr}")
    plane = ControlPlane(directory)
    apply_crds(plane)
    return plane


def apply_crds(plane: ControlPlane) -> None:
    files = [arg for f in sorted(CRDS.glob("*.yaml")) for arg in ("-f", str(f))]
    plane.kubectl("apply", "--server-side", "--force-conflicts", *files)
    plane.wait_established(*files)


def kubectl_json(plane: ControlPlane, *args: str) -> Any:
    return json.loads(plane.kubectl(*args, "-o", "json").stdout)


# ---------------------------------------------------------------------- Orchestrators


def service_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:04d}"


def orchestrator(
    name: str,
    service: str,
    project: str = PROJECT,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A typical Orchestrator: two env vars, one invoker, one setting."""
    body = orchestrator_body(
        name,
        service,
        project=project,
        region=REGION,
        env={"GCP_PROJECT_ID": project, "MODE": "bench"},
        invokers=[MEMBER],
        settings={"maxInstances": 10},
    )
    if labels:
        body["metadata"]["labels"] = dict(labels)
    return body


# Someone else's changes, as admin-API bodies (put_service keyword arguments). The initial state
# is a service deployed by someone else, before Runwarden adopts it: nothing declared holds yet.
INITIAL: dict[str, Any] = {
    "env": dict(FOREIGN_ENV),
    "invokers": {ROLE: []},
    "settings": {"maxInstances": 3},
}
DRIFTS: dict[str, dict[str, Any]] = {
    "env": {"env": {**FOREIGN_ENV, "GCP_PROJECT_ID": PROJECT, "MODE": "tampered"}},
    "invokers": {"invokers": {ROLE: []}},
    "settings": {"settings": {"maxInstances": 3}},
    "env+invokers": {
        "env": {**FOREIGN_ENV, "GCP_PROJECT_ID": PROJECT, "MODE": "tampered"},
        "invokers": {ROLE: []},
    },
}


def put_services(
    admin: AdminClient,
    names: Iterable[str],
    body: Mapping[str, Any],
    workers: int = 4,
    project_of: Callable[[str], str] | None = None,
) -> None:
    """Create or change many services through the admin API (someone else's deploys), in
    PROJECT or, with ``project_of``, in the project it names for each service."""

    def put(name: str) -> None:
        admin.put_service(project_of(name) if project_of else PROJECT, REGION, name, **body)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, names))


def apply_orchestrators(plane: ControlPlane, namespace: str, bodies: list[dict[str, Any]]) -> None:
    """One `kubectl apply --server-side` of a multi-document YAML (not one process per CR)."""
    text = yaml.safe_dump_all(bodies, sort_keys=False)
    plane.kubectl(
        "apply", "--server-side", "--field-manager=bench", "-n", namespace, "-f", "-",
        input=text, timeout=900,
    )  # fmt: skip


def apply_orchestrators_parallel(
    plane: ControlPlane,
    namespace: str,
    bodies: list[dict[str, Any]],
    batch: int = 1000,
    parallel: int = 4,
) -> None:
    """What an operator applying thousands does: batches of ``batch`` documents, ``parallel``
    `kubectl apply --server-side` processes at a time."""
    chunks = [bodies[i : i + batch] for i in range(0, len(bodies), batch)]
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(lambda chunk: apply_orchestrators(plane, namespace, chunk), chunks))


def annotate_namespace(plane: ControlPlane, name: str, annotations: Mapping[str, str]) -> None:
    plane.kubectl(
        "annotate", "--overwrite", "namespace", name, *(f"{k}={v}" for k, v in annotations.items())
    )


def status_writes(plane: ControlPlane) -> int:
    """Orchestrator status PATCHes the apiserver has served (its own apiserver_request_total)."""
    text = plane.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("apiserver_request_total{")
            and 'resource="orchestrators"' in line
            and 'subresource="status"' in line
            and 'verb="PATCH"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def create_namespace(plane: ControlPlane, name: str) -> None:
    plane.kubectl("create", "namespace", name)


# ---------------------------------------------------------------------- the controller


@dataclass
class ProcStat:
    """CPU seconds (user+system) and memory of a process from /proc, at one instant."""

    cpu: float
    rss_mb: float
    peak_rss_mb: float  # VmHWM: the high-water mark since the process started
    at: float = field(default_factory=time.monotonic)


def proc_stat(pid: int) -> ProcStat:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    mem: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            mem[key] = int(value.split()[0]) / 1024
    return ProcStat(cpu, mem.get("VmRSS", 0.0), mem.get("VmHWM", 0.0))


class Controller:
    """`python -m controller` for some namespaces, with its metrics and /proc numbers."""

    def __init__(
        self,
        plane: ControlPlane,
        endpoint: str,
        namespaces: list[str],
        log_path: Path,
        resync_seconds: float | None,
        extra_args: list[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.metrics_port = free_port()
        self.proc = ControllerProcess(
            kubeconfig=plane.kubeconfig,
            gcp_endpoint=endpoint,
            namespaces=namespaces,
            log_path=log_path,
            resync_seconds=resync_seconds,
            metrics_port=self.metrics_port,
            extra_args=extra_args or (),
            extra_env=extra_env,
            python=sys.executable,
        )

    def start(self) -> Controller:
        self.proc.start(timeout=120)
        return self

    def stop(self) -> None:
        self.proc.stop()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def stat(self) -> ProcStat:
        return proc_stat(self.pid)

    def metrics(self) -> Metrics:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return Metrics.parse(resp.read().decode())

    def wait_metrics(self, predicate: Callable[[Metrics], bool], timeout: float) -> Metrics:
        """Scrape until ``predicate`` holds; RuntimeError with the log tail when it never does."""
        deadline = time.monotonic() + timeout
        last: Metrics | None = None
        while time.monotonic() < deadline:
            if not self.proc.running:
                raise RuntimeError(f"the controller exited:\n{self.proc.tail()}")
            try:
                last = self.metrics()
            except OSError:
                last = None
            if last is not None and predicate(last):
                return last
            time.sleep(0.2)
        seen = last.by_label("runwarden_reconcile_total", "result") if last else None
        raise RuntimeError(
            f"controller metrics did not reach the expected state in {timeout:g}s; last "
            f"reconcile_total={seen}\n{self.proc.tail()}"
        )


@dataclass
class Metrics:
    """One scrape: sample name -> [(labels, value)]."""

    samples: dict[str, list[tuple[dict[str, str], float]]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return cls(samples)

    def total(self, name: str, **labels: str) -> float:
        return sum(
            v
            for lab, v in self.samples.get(name, [])
            if all(lab.get(k) == want for k, want in labels.items())
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for lab, v in self.samples.get(name, []):
            out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + v
        return out

    def has(self, name: str) -> bool:
        return name in self.samples

    @property
    def checks(self) -> float:
        return self.total("runwarden_reconcile_total")


# ---------------------------------------------------------------------- a watch on Orchestrators


class Watch:
    """Ready status and drift counts of every Orchestrator in a namespace, as the apiserver has
    them, from one long-running `kubectl get --raw <collection>?watch=1` (JSON lines)."""

    def __init__(self, plane: ControlPlane, namespace: str) -> None:
        self.plane = plane
        self.namespace = namespace
        self.lock = threading.Lock()
        self.ready: dict[str, bool] = {}
        self._n_ready = 0  # sum(self.ready.values()), kept as events arrive (10,000 objects)
        self.synced: set[str] = set()  # Ready with reason Synced (not, e.g., DriftRepaired)
        self.ready_at: dict[str, float] = {}  # name -> monotonic time it was first seen Ready
        self.drift: dict[str, int] = {}
        self.modified: dict[str, int] = {}  # MODIFIED events per object (e.g. status writes)
        # (monotonic time, number Ready) each time the number changes
        self.ready_series: list[tuple[float, int]] = [(time.monotonic(), 0)]
        self.repaired_at: dict[str, float] = {}
        self._baseline: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"watch-{namespace}", daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        self._thread.join(10)

    def _run(self) -> None:
        url = f"{GROUP_PATH}/namespaces/{self.namespace}/orchestrators?watch=1"
        cmd = [
            str(self.plane.bin / "kubectl"),
            f"--kubeconfig={self.plane.kubeconfig}",
            "get",
            "--raw",
            url,
        ]
        while not self._stopping:  # the apiserver ends watches after a while: watch again
            self._proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
            )
            assert self._proc.stdout is not None
            for line in self._proc.stdout:
                if line.strip():
                    self._event(json.loads(line))
            self._proc.wait()
            if not self._stopping:
                time.sleep(0.5)

    def _event(self, event: dict[str, Any]) -> None:
        obj = event.get("object") or {}
        name = (obj.get("metadata") or {}).get("name")
        if not name or event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
            return
        now = time.monotonic()
        status = obj.get("status") or {}
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        synced = ready and any(
            c.get("type") == "Ready" and c.get("reason") == "Synced" for c in conditions
        )
        count = int((status.get("drift") or {}).get("count") or 0)
        with self.lock:
            was = self.ready.pop(name, False)
            if event["type"] == "MODIFIED":
                self.modified[name] = self.modified.get(name, 0) + 1
            self.synced.discard(name)
            if event["type"] != "DELETED":
                if synced:
                    self.synced.add(name)
                self.ready[name] = ready
                self.drift[name] = count
                if ready:
                    self.ready_at.setdefault(name, now)
            self._n_ready += int(ready and event["type"] != "DELETED") - int(was)
            n = self._n_ready
            if n != self.ready_series[-1][1]:
                self.ready_series.append((now, n))
            base = self._baseline
            if base is not None and name not in self.repaired_at and count > base.get(name, 0):
                self.repaired_at[name] = now

    def n_ready(self) -> int:
        with self.lock:
            return self._n_ready

    def n_synced(self) -> int:
        with self.lock:
            return len(self.synced)

    def mark_drift_baseline(self) -> None:
        """From now on, an Orchestrator whose drift count grows counts as repaired."""
        with self.lock:
            self._baseline = dict(self.drift)
            self.repaired_at = {}

    def n_repaired(self) -> int:
        with self.lock:
            return len(self.repaired_at)

    def wait(self, what: Callable[[], int], n: int, timeout: float, label: str) -> float:
        """Wait until ``what()`` reaches ``n``; returns the monotonic time it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what() >= n:
                return time.monotonic()
            time.sleep(0.1)
        raise RuntimeError(f"{label}: {what()} of {n} after {timeout:g}s")


def calls_delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


def short(method: str) -> str:
    """'google.cloud.run.v2.Services/GetService' -> 'GetService'."""
    return method.rsplit("/", 1)[-1]


__all__ = [
    "DRIFTS",
    "INITIAL",
    "MEMBER",
    "PROJECT",
    "REGION",
    "REPO",
    "SA_EMAIL",
    "Controller",
    "Metrics",
    "ProcStat",
    "Watch",
    "annotate_namespace",
    "apply_orchestrators",
    "apply_orchestrators_parallel",
    "calls_delta",
    "control_plane_up",
    "create_namespace",
    "kubectl_json",
    "orchestrator",
    "proc_stat",
    "put_services",
    "service_name",
    "short",
]
