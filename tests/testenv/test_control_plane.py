"""The local control plane is a real kube-apiserver: schema, CEL, printer columns, status
subresource and RBAC are enforced by the server, and `hack/testenv` manages it cleanly."""

from __future__ import annotations

import base64
import json
import re
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.k8s import REPO, ControlPlane, namespace_name
from tests.fixtures.wait import wait_for

GROUP = "testenv.runwarden.dev"
CRD_NAME = f"widgets.{GROUP}"
CEL_MESSAGE = "minReplicas must not exceed maxReplicas"

WIDGET_CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {CRD_NAME}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {{status: {{}}}}
      additionalPrinterColumns:
        - {{name: Size, type: string, jsonPath: .spec.size}}
        - {{name: Max, type: integer, jsonPath: .spec.maxReplicas}}
        - {{name: Phase, type: string, jsonPath: .status.phase}}
        - {{name: Age, type: date, jsonPath: .metadata.creationTimestamp}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              x-kubernetes-validations:
                - rule: "self.minReplicas <= self.maxReplicas"
                  message: "{CEL_MESSAGE}"
              properties:
                size: {{type: string, enum: [S, M, L]}}
                minReplicas: {{type: integer, minimum: 0, default: 0}}
                maxReplicas: {{type: integer, minimum: 0, default: 1}}
            status:
              type: object
              properties:
                phase: {{type: string}}
"""


def widget(name: str, namespace: str, **spec: object) -> str:
    return json.dumps(
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def get_json(plane: ControlPlane, *args: str) -> Any:
    return json.loads(plane.kubectl("get", *args, "-o", "json").stdout)


def k8s_version() -> str:
    go_mod = (REPO / "hack" / "testenv.d" / "k8s" / "go.mod").read_text()
    match = re.search(r"^\s*k8s\.io/kubernetes (v\S+)", go_mod, re.M)
    assert match, "hack/testenv.d/k8s/go.mod pins no k8s.io/kubernetes"
    return match.group(1)


def request_table(plane: ControlPlane, path: str, tmp_path: Path) -> Any:
    """GET `path` as a meta.k8s.io/v1 Table, the server-side rendering `kubectl get` shows.

    kubectl cannot send an Accept header with --raw, so this speaks HTTPS with the kubeconfig's
    own credentials.
    """
    config = yaml.safe_load(Path(plane.kubeconfig).read_text())
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    for field, filename in (("client-certificate-data", "crt"), ("client-key-data", "key")):
        (tmp_path / f"admin.{filename}").write_bytes(base64.b64decode(user[field]))
    ctx = ssl.create_default_context(
        cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
    )
    ctx.load_cert_chain(tmp_path / "admin.crt", tmp_path / "admin.key")
    req = urllib.request.Request(
        cluster["server"] + path,
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def widget_crd(control_plane: ControlPlane) -> ControlPlane:
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=WIDGET_CRD)
    control_plane.wait_established(f"crd/{CRD_NAME}")
    return control_plane


def test_apiserver_is_ready_and_reports_the_built_version(control_plane: ControlPlane) -> None:
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    assert control_plane.server.startswith("https://127.0.0.1:")
    versions = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == k8s_version()
    assert versions["clientVersion"]["gitVersion"] == k8s_version()


def test_kubeconfig_fixture_is_the_control_planes(
    kubeconfig: str, control_plane: ControlPlane
) -> None:
    assert kubeconfig == control_plane.kubeconfig
    assert Path(kubeconfig).is_file()


def test_repo_crds_are_established(crds: ControlPlane) -> None:
    files = sorted((REPO / "crds").glob("*.yaml"))
    if not files:
        pytest.skip("crds/ has no *.yaml yet")
    args = [arg for f in files for arg in ("-f", str(f))]
    found = json.loads(crds.kubectl("get", *args, "-o", "json").stdout)
    items = found.get("items", [found])
    assert len(items) == len(files)
    for crd in items:
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", crd["metadata"]["name"]


def test_namespace_fixture_gives_a_fresh_valid_namespace(
    control_plane: ControlPlane, namespace: str
) -> None:
    assert re.fullmatch(r"t-[a-z0-9-]+-[0-9a-f]{6}", namespace)
    ns = get_json(control_plane, "namespace", namespace)
    assert ns["status"]["phase"] == "Active"


def test_namespace_names_stay_valid_for_long_test_names() -> None:
    name = namespace_name("test_" + "Very_Long[param-" * 10 + "]")
    assert len(name) <= 63
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert name != namespace_name("test_" + "Very_Long[param-" * 10 + "]")


def test_cel_rule_refuses_an_invalid_object(widget_crd: ControlPlane, namespace: str) -> None:
    bad = widget("bad", namespace, size="M", minReplicas=5, maxReplicas=2)
    refused = widget_crd.kubectl("apply", "-f", "-", input=bad, check=False)
    assert refused.returncode != 0
    assert CEL_MESSAGE in refused.stderr
    assert widget_crd.kubectl("get", "widget", "bad", "-n", namespace, check=False).returncode
    # The same object within the rule is accepted, and the schema applied the defaults.
    good = widget("good", namespace, size="M", maxReplicas=2)
    widget_crd.kubectl("apply", "-f", "-", input=good)
    spec = get_json(widget_crd, "widget", "good", "-n", namespace)["spec"]
    assert spec == {"size": "M", "minReplicas": 0, "maxReplicas": 2}


def test_structural_schema_refuses_a_value_outside_the_enum(
    widget_crd: ControlPlane, namespace: str
) -> None:
    refused = widget_crd.kubectl(
        "apply", "-f", "-", input=widget("xl", namespace, size="XL"), check=False
    )
    assert refused.returncode != 0
    assert "spec.size" in refused.stderr and "Unsupported value" in refused.stderr


def test_get_shows_the_printer_columns(
    widget_crd: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    widget_crd.kubectl("apply", "-f", "-", input=widget("w1", namespace, size="L", maxReplicas=3))
    table = request_table(widget_crd, f"/apis/{GROUP}/v1/namespaces/{namespace}/widgets", tmp_path)
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name",
        "Size",
        "Max",
        "Phase",
        "Age",
    ]
    [row] = table["rows"]
    assert row["cells"][:4] == ["w1", "L", 3, None]


def test_status_subresource_ignores_status_in_a_main_resource_update(
    widget_crd: ControlPlane, namespace: str
) -> None:
    kubectl = widget_crd.kubectl
    kubectl("apply", "-f", "-", input=widget("s1", namespace, size="S"))
    kubectl(
        "patch", "widget", "s1", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", '{"status": {"phase": "Ready"}}',
    )  # fmt: skip
    before = get_json(widget_crd, "widget", "s1", "-n", namespace)
    assert before["status"] == {"phase": "Ready"}

    kubectl(
        "patch", "widget", "s1", "-n", namespace, "--type=merge",
        "-p", '{"spec": {"size": "L"}, "status": {"phase": "Hacked"}}',
    )  # fmt: skip
    after = get_json(widget_crd, "widget", "s1", "-n", namespace)
    assert after["spec"]["size"] == "L"
    assert after["status"] == {"phase": "Ready"}
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1


def test_rbac_denies_an_unprivileged_service_account(
    control_plane: ControlPlane, namespace: str
) -> None:
    nobody = f"system:serviceaccount:{namespace}:nobody"
    for verb, resource in (("get", "pods"), ("list", "secrets"), ("create", "namespaces")):
        answer = control_plane.kubectl(
            "auth", "can-i", verb, resource, "-n", namespace, as_user=nobody, check=False
        )
        assert (answer.returncode, answer.stdout.strip()) == (1, "no"), (verb, resource)
    admin = control_plane.kubectl("auth", "can-i", "create", "namespaces")
    assert admin.stdout.strip() == "yes"


def _live_processes_mentioning(text: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


def test_a_second_control_plane_does_not_collide_restarts_and_goes_down_cleanly(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    second = ControlPlane.up(tmp_path / "second")
    try:
        assert second.server != control_plane.server
        pids = second.pids()
        assert {"etcd", "kube-apiserver"} <= set(pids)
        assert not set(pids.values()) & set(control_plane.pids().values())

        # Separate etcds: what one stores, the other does not see.
        second.kubectl("create", "namespace", "only-in-second")
        assert second.kubectl("get", "namespace", "only-in-second").returncode == 0
        first = control_plane.kubectl("get", "namespace", "only-in-second", check=False)
        assert first.returncode != 0 and "NotFound" in first.stderr

        # Restarting kube-apiserver keeps its port, certificates and etcd's data.
        server = second.server
        second.stop_apiserver()
        down = second.kubectl("get", "--raw", "/readyz", check=False, timeout=30)
        assert down.returncode != 0
        second.start_apiserver()
        assert second.server == server
        assert second.pids()["etcd"] == pids["etcd"]
        assert second.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
        assert second.kubectl("get", "namespace", "only-in-second").returncode == 0
        assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    finally:
        second.down()

    assert not _live_processes_mentioning(str(second.dir))
    assert not second.pids()
    # The first control plane is untouched.
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_a_control_plane_goes_down_when_its_owner_process_ends(tmp_path: Path) -> None:
    owner = subprocess.Popen(["sleep", "600"])
    try:
        plane = ControlPlane.up(tmp_path / "owned", owner_pid=owner.pid)
        assert set(plane.pids()) == {"etcd", "kube-apiserver", "watchdog"}
        assert plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    finally:
        owner.kill()
        owner.wait()
    # Like a test run killed before its teardown: the watchdog stops everything by itself.
    wait_for(
        lambda: not _live_processes_mentioning(str(plane.dir)),
        timeout=30,
        message="processes left after the owner ended",
    )
    plane.down()  # idempotent: nothing left to stop
