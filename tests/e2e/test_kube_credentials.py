"""End to end: the controller's Kubernetes credentials from a kubeconfig whose user is an exec
credential plugin (as GKE's kubeconfig is, with gke-gcloud-auth-plugin), on the real apiserver.

- The plugin (a script printing an ExecCredential) hands out a ServiceAccount token minted with
  `kubectl create token`, which the testenv apiserver accepts (it runs the ServiceAccount token
  authenticator): the controller reaches Ready with it, kopf and the status writer alike.
- A token the apiserver refuses (401), or no credentials at all (anonymous: 403 on discovery):
  the controller logs the status code, liveness fails, and it exits non-zero within 60 s,
  instead of "waiting for the CRD" forever while liveness answers 200.
"""

from __future__ import annotations

import base64
import json
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

PROJECT = "runwarden-e2e"
REGION = "us-west2"
SA = "invoker@runwarden-e2e.iam.gserviceaccount.com"
MEMBER = f"serviceAccount:{SA}"
EXIT_DEADLINE = 60  # CONTRACT §6.2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def liveness_status(url: str) -> int:
    """The liveness endpoint's HTTP status; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def exec_kubeconfig(cp: ControlPlane, tmp: Path, token: str | None) -> str:
    """The control plane's cluster, with a user that is an exec plugin printing ``token`` (or,
    with None, a user without any credentials)."""
    admin = json.loads(Path(cp.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    user: dict[str, Any] = {}
    if token is not None:
        plugin = tmp / "auth-plugin.py"
        credential = {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "kind": "ExecCredential",
            "status": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"},
        }
        plugin.write_text(f"import json\nprint(json.dumps({credential!r}))\n")
        plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
        user = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1beta1",
                "command": sys.executable,
                "args": [str(plugin)],
                "interactiveMode": "Never",
            }
        }
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testenv", "cluster": cluster}],
        "users": [{"name": "plugin", "user": user}],
        "contexts": [{"name": "plugin", "context": {"cluster": "testenv", "user": "plugin"}}],
        "current-context": "plugin",
    }
    path = tmp / "exec-kubeconfig"
    path.write_text(json.dumps(config))
    return str(path)


def service_account_token(cp: ControlPlane, namespace: str) -> str:
    """A token of a ServiceAccount bound to cluster-admin (`kubectl create token`)."""
    name = "runwarden-exec"
    cp.kubectl("create", "serviceaccount", name, "-n", namespace)
    cp.kubectl(
        "create",
        "clusterrolebinding",
        f"{namespace}-{name}",
        "--clusterrole=cluster-admin",
        f"--serviceaccount={namespace}:{name}",
    )
    return cp.kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()


def orchestrator(name: str, service: str) -> dict[str, Any]:
    return {
        "apiVersion": "runwarden.dev/v1alpha1",
        "kind": "Orchestrator",
        "metadata": {"name": name},
        "spec": {
            "service": {"project": PROJECT, "region": REGION, "name": service},
            "env": [{"name": "GCP_PROJECT_ID", "value": PROJECT}],
            "invokers": {"members": [MEMBER]},
        },
    }


def test_an_exec_plugin_kubeconfig_reaches_ready(
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    token = service_account_token(crds, namespace)
    kubeconfig = exec_kubeconfig(crds, tmp_path, token)
    # The plugin's token is what authenticates: kubectl with this kubeconfig is the SA.
    who = subprocess.run(
        [str(crds.bin / "kubectl"), f"--kubeconfig={kubeconfig}", "auth", "whoami", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "system:serviceaccount" in who.stdout, who.stdout
    service = unique_name("exec")
    emulator.admin.put_service_account(SA)
    emulator.admin.put_service(PROJECT, REGION, service, env={}, invokers={})
    crds.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(orchestrator("exec", service))
    )
    proc = ControllerProcess(
        kubeconfig=kubeconfig,
        gcp_endpoint=emulator.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "controller.log",
    )
    with proc:

        def ready() -> bool:
            out = crds.kubectl("get", "orchestrator", "exec", "-n", namespace, "-o", "json")
            status = json.loads(out.stdout).get("status") or {}
            conditions = {c["type"]: c for c in status.get("conditions") or []}
            return conditions.get("Ready", {}).get("status") == "True"

        wait_for(ready, 60, interval=0.3, message="Ready=True with the exec plugin's token")
        assert emulator.admin.get_service(PROJECT, REGION, service)["env"] == {
            "GCP_PROJECT_ID": PROJECT
        }
        assert "kube_credentials_refused" not in proc.log_text()


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (base64.b64encode(b"not a token the apiserver issued").decode(), 401),
        (None, 403),  # no credentials: anonymous, which API discovery refuses
    ],
    ids=["refused-token", "anonymous"],
)
def test_refused_credentials_fail_liveness_and_exit_non_zero(
    crds: ControlPlane, tmp_path: Path, token: str | None, code: int
) -> None:
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    proc = ControllerProcess(
        kubeconfig=exec_kubeconfig(crds, tmp_path, token),
        gcp_endpoint=None,
        all_namespaces=True,
        log_path=tmp_path / "controller.log",
        liveness=liveness,
    )
    began = time.monotonic()
    proc.start(wait=False)
    try:
        seen: list[int] = []

        def failed_liveness_or_exit() -> bool:
            status = liveness_status(liveness)
            if status:
                seen.append(status)
            return status >= 500 or not proc.running

        wait_for(failed_liveness_or_exit, EXIT_DEADLINE, interval=0.2, message="liveness fails")
        assert proc.running and seen and seen[-1] == 503, (seen, proc.tail())
        assert proc.proc is not None
        proc.proc.wait(timeout=max(1.0, EXIT_DEADLINE - (time.monotonic() - began)))
        assert proc.proc.returncode != 0, proc.tail()
        refused = [
            line for line in proc.log_lines() if line.get("event") == "kube_credentials_refused"
        ]
        assert refused and refused[0]["status"] == code, proc.tail()
        assert f"HTTP {code}" in refused[0]["message"]
        assert 200 not in seen, f"liveness answered 200 with refused credentials: {seen}"
    finally:
        proc.stop()
