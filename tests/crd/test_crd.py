"""The Orchestrator CRD on a real kube-apiserver: the contract's example, defaults, explain,
printer columns (read from the server, never from printed tables), status schema, immutability."""

from __future__ import annotations

import json

import pytest

from tests.crd.orchestrators import (
    TABLE,
    apply,
    contract_example,
    get,
    minimal,
    raw_get,
    variant,
)
from tests.fixtures.bodies import API_VERSION as API
from tests.fixtures.wait import wait_for

CRD = "orchestrators.runwarden.dev"

PRINTER_COLUMNS = [
    # (name, type, jsonPath, priority)
    ("Service", "string", ".spec.service.name", 0),
    ("Region", "string", ".spec.service.region", 0),
    ("Mode", "string", ".spec.policy.mode", 0),
    ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', 0),
    ("Reason", "string", '.status.conditions[?(@.type=="Ready")].reason', 0),
    ("Drifts", "integer", ".status.drift.count", 0),
    ("Last Sync", "date", ".status.lastSyncTime", 0),
    ("Age", "date", ".metadata.creationTimestamp", 0),
    ("Project", "string", ".spec.service.project", 1),
    ("Revision", "string", ".status.latestReadyRevision", 1),
]

CONTRACT_STATUS = {
    "observedGeneration": 1,
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Synced",
            "message": "service holds the spec",
            "lastTransitionTime": "2026-11-28T18:00:00Z",
            "observedGeneration": 1,
        },
        {
            "type": "EnvSynced",
            "status": "True",
            "reason": "Synced",
            "message": "",
            "lastTransitionTime": "2026-11-28T18:00:00Z",
            "observedGeneration": 1,
        },
        {
            "type": "InvokersSynced",
            "status": "True",
            "reason": "Synced",
            "message": "",
            "lastTransitionTime": "2026-11-28T18:00:00Z",
            "observedGeneration": 1,
        },
        {
            "type": "SettingsSynced",
            "status": "True",
            "reason": "Synced",
            "message": "",
            "lastTransitionTime": "2026-11-28T18:00:00Z",
            "observedGeneration": 1,
        },
    ],
    "serviceUri": "https://phase3-to-phase4-abc123-wl.a.run.app",
    "latestReadyRevision": "phase3-to-phase4-00007-xyz",
    "lastSyncTime": "2026-11-28T18:00:00Z",
    "managed": {
        "env": ["GCP_PROJECT_ID", "SLACK_WEBHOOK_URL"],
        "invokers": ["serviceAccount:756957797294-compute@developer.gserviceaccount.com"],
    },
    "drift": {
        "count": 4,
        "lastDetectedTime": "2026-11-28T17:59:58Z",
        "lastRepairedTime": "2026-11-28T18:00:00Z",
        "last": [
            "env GCP_PROJECT_ID missing",
            "invoker serviceAccount:x@y.iam.gserviceaccount.com missing",
        ],
        "pending": [],
    },
    # kopf's own progress storage for handlers and its diff-base bookkeeping.
    "kopf": {"progress": {"reconcile": {"started": "2026-11-28T18:00:00Z", "retries": 1}}},
}


@pytest.fixture(scope="module")
def crd(crds) -> dict:
    return json.loads(crds.kubectl("get", "crd", CRD, "-o", "json").stdout)


def test_crd_is_established_with_the_contract_names(crd):
    spec = crd["spec"]
    assert spec["group"] == "runwarden.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "Orchestrator"
    assert spec["names"]["plural"] == "orchestrators"
    assert spec["names"]["singular"] == "orchestrator"
    assert spec["names"]["shortNames"] == ["orch"]
    assert spec["names"]["categories"] == ["runwarden"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    # Structural and free of schema violations the apiserver reports as a condition.
    assert conditions.get("NonStructuralSchema", "False") == "False"


def test_printer_columns_as_the_contract_says(crd):
    [version] = crd["spec"]["versions"]
    got = [
        (c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
        for c in version["additionalPrinterColumns"]
    ]
    assert got == PRINTER_COLUMNS


def test_contract_example_applies_and_round_trips(crds, namespace):
    example = contract_example(namespace)
    done = apply(crds, example)
    assert done.returncode == 0, done.stderr
    stored = get(crds, namespace, "phase3-to-phase4")
    assert stored["spec"] == example["spec"]
    assert stored["metadata"]["generation"] == 1


def test_defaults_are_filled_in(crds, namespace):
    obj = minimal(namespace)
    obj["spec"]["invokers"] = {"members": ["user:alice@example.com"]}
    obj["spec"]["env"] = [
        {"name": "SLACK_WEBHOOK_URL", "secretKeyRef": {"secret": "slack-webhook"}}
    ]
    apply(crds, obj, check=True)
    spec = get(crds, namespace, "minimal")["spec"]
    assert spec["policy"] == {
        "mode": "Enforce",
        "env": "Merge",
        "invokers": "Additive",
        "deletion": "Abandon",
        "resyncSeconds": 60,
        "allowPublicInvokers": False,
    }
    assert spec["invokers"]["role"] == "roles/run.invoker"
    assert spec["env"][0]["secretKeyRef"]["version"] == "latest"
    # Settings are not defaulted: only declared settings are managed.
    assert "settings" not in spec


def test_a_partial_policy_keeps_its_values_and_gets_the_rest(crds, namespace):
    obj = minimal(namespace)
    obj["spec"]["policy"] = {"mode": "Observe", "resyncSeconds": 5}
    apply(crds, obj, check=True)
    policy = get(crds, namespace, "minimal")["spec"]["policy"]
    assert policy["mode"] == "Observe"
    assert policy["resyncSeconds"] == 5
    assert policy["env"] == "Merge"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            "orchestrator.spec.env",
            ["exactly one of value or secretKeyRef", "Merge", "Authoritative"],
        ),
        ("orchestrator.spec.env.name", ["PORT", "K_"]),
        ("orchestrator.spec.env.secretKeyRef", ["Secret Manager"]),
        ("orchestrator.spec.service", ["immutable"]),
        ("orchestrator.spec.service.project", ["project id"]),
        ("orchestrator.spec.invokers.members", ["serviceAccount:", "allowPublicInvokers"]),
        ("orchestrator.spec.settings.ingress", ["internal-and-cloud-load-balancing"]),
        ("orchestrator.spec.policy.mode", ["Observe never writes"]),
        ("orch.status.drift.count", ["repairs"]),
        ("orchestrators.status.managed", ["owns", "runwarden.dev/owned"]),
        ("orchestrator.spec.policy.takeOver", ["runwarden.dev/owner", "OwnedElsewhere"]),
        ("orchestrator.status.managed.invokerRoles", ["spec.invokers.role", "never changed"]),
        ("orchestrator.status.conditions", ["ServingSynced", "TrafficPinned"]),
    ],
)
def test_kubectl_explain_teaches(crds, path, expected):
    # The OpenAPI document the apiserver publishes for a new CRD may lag its Established condition.
    def explained():
        done = crds.kubectl("explain", path, check=False)
        return done.stdout if done.returncode == 0 else None

    text = wait_for(explained, timeout=60, message=f"kubectl explain {path}")
    assert "DESCRIPTION" in text or "FIELD" in text
    for phrase in expected:
        assert phrase in " ".join(text.split()), f"{path}: {phrase!r} not in\n{text}"


def test_every_schema_field_has_a_description(crd):
    [version] = crd["spec"]["versions"]
    missing: list[str] = []

    def walk(node: dict, path: str) -> None:
        if path not in ("", ".metadata") and not node.get("description", "").strip():
            missing.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if "items" in node:
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    walk(version["schema"]["openAPIV3Schema"], "")
    assert not missing, f"fields without a description: {missing}"


def test_every_string_and_list_is_bounded(crd):
    """maxLength/maxItems bound the estimated cost of the CEL rules (and request sizes)."""
    [version] = crd["spec"]["versions"]
    unbounded: list[str] = []

    def walk(node: dict, path: str) -> None:
        if path.startswith(".status") or path in (".metadata", ".apiVersion", ".kind"):
            return  # written by the controller, or type metadata: no CEL there
        kind = node.get("type")
        if kind == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        if kind == "array" and "maxItems" not in node:
            unbounded.append(path)
        if kind == "object" and isinstance(node.get("additionalProperties"), dict):
            if "maxProperties" not in node:
                unbounded.append(path)
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        if "items" in node:
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")

    walk(version["schema"]["openAPIV3Schema"], "")
    assert not unbounded, f"unbounded strings/lists/maps: {unbounded}"


def test_status_subresource_accepts_the_contract_status(crds, namespace):
    apply(crds, contract_example(namespace), check=True)
    crds.kubectl(
        "patch",
        "orchestrators.runwarden.dev",
        "phase3-to-phase4",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": CONTRACT_STATUS}),
    )
    stored = get(crds, namespace, "phase3-to-phase4")
    assert stored["status"] == CONTRACT_STATUS
    # A status write does not bump the generation (so it never looks like a spec change).
    assert stored["metadata"]["generation"] == 1


def test_status_is_ignored_on_the_main_resource(crds, namespace):
    obj = contract_example(namespace)
    obj["status"] = {"observedGeneration": 99}
    apply(crds, obj, check=True)
    assert "observedGeneration" not in get(crds, namespace, "phase3-to-phase4").get("status", {})


def test_table_api_serves_the_contract_columns_and_cells(crds, namespace):
    """What `kubectl get orch` and `kubectl get orch -o wide` print, read as the Table JSON."""
    apply(crds, contract_example(namespace), check=True)
    crds.kubectl(
        "patch",
        "orchestrators.runwarden.dev",
        "phase3-to-phase4",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": CONTRACT_STATUS}),
    )
    table = raw_get(crds, f"/apis/{API}/namespaces/{namespace}/orchestrators", accept=TABLE)
    assert table["kind"] == "Table"
    columns = [(c["name"], c.get("priority", 0)) for c in table["columnDefinitions"]]
    default = [name.upper() for name, priority in columns if priority == 0]
    wide = [name.upper() for name, _ in columns]
    assert default == [
        "NAME",
        "SERVICE",
        "REGION",
        "MODE",
        "READY",
        "REASON",
        "DRIFTS",
        "LAST SYNC",
        "AGE",
    ]
    assert wide == [*default, "PROJECT", "REVISION"]
    [row] = table["rows"]
    cells = dict(zip((name for name, _ in columns), row["cells"], strict=True))
    assert cells["Name"] == "phase3-to-phase4"
    assert cells["Service"] == "phase3-to-phase4"
    assert cells["Region"] == "us-west2"
    assert cells["Mode"] == "Enforce"
    assert cells["Ready"] == "True"
    assert cells["Reason"] == "Synced"
    assert cells["Drifts"] == 4
    assert cells["Project"] == "nba-props-platform"
    assert cells["Revision"] == "phase3-to-phase4-00007-xyz"
    assert cells["Last Sync"]  # rendered as an age by the server
    assert cells["Age"]


def test_short_name_and_category_resolve(crds, namespace):
    apply(crds, minimal(namespace), check=True)
    for resource in ("orch", "orchestrator", "orchestrators", "runwarden"):
        done = crds.kubectl("get", resource, "-n", namespace, "-o", "json")
        items = json.loads(done.stdout)["items"]
        assert [i["metadata"]["name"] for i in items] == ["minimal"], resource


def test_service_is_immutable_but_the_rest_is_not(crds, namespace):
    original = contract_example(namespace)
    apply(crds, original, check=True)

    changed = variant(original)
    changed["spec"]["env"].append({"name": "NEXT_TOPIC", "value": "nba-phase4-trigger"})
    changed["spec"]["settings"]["maxInstances"] = 20
    changed["spec"]["policy"]["mode"] = "Observe"
    done = apply(crds, changed)
    assert done.returncode == 0, done.stderr

    for field, value in [
        ("name", "phase4-to-phase5"),
        ("project", "nba-props-staging"),
        ("region", "us-central1"),
        ("container", "sidecar"),
    ]:
        moved = variant(changed)
        moved["spec"]["service"][field] = value
        done = apply(crds, moved)
        assert done.returncode != 0, f"spec.service.{field} change accepted"
        assert "spec.service" in done.stderr and "immutable" in done.stderr, done.stderr
    assert (
        get(crds, namespace, "phase3-to-phase4")["spec"]["service"] == original["spec"]["service"]
    )


@pytest.mark.parametrize(
    ("case", "mutate"),
    [
        (
            "public invoker with opt-in",
            lambda s: (
                s["invokers"]["members"].append("allUsers")
                or s["policy"].update(allowPublicInvokers=True)
            ),
        ),
        (
            "all authenticated with opt-in",
            lambda s: (
                s["invokers"]["members"].append("allAuthenticatedUsers")
                or s["policy"].update(allowPublicInvokers=True)
            ),
        ),
        ("empty env value", lambda s: s["env"].append({"name": "EMPTY", "value": ""})),
        ("lowercase env name", lambda s: s["env"].append({"name": "_lower_1", "value": "x"})),
        (
            "name containing K_ not at start",
            lambda s: s["env"].append({"name": "MY_K_VAR", "value": "x"}),
        ),
        ("PORTS is not PORT", lambda s: s["env"].append({"name": "PORTS", "value": "x"})),
        ("numbered secret version", lambda s: s["env"][1]["secretKeyRef"].update(version="3")),
        (
            "full secret resource name",
            lambda s: s["env"][1]["secretKeyRef"].update(
                secret="projects/nba-props-platform/secrets/slack-webhook"
            ),
        ),
        (
            "every member prefix",
            lambda s: s["invokers"].update(
                members=[
                    "user:alice@example.com",
                    "serviceAccount:pusher@nba-props-platform.iam.gserviceaccount.com",
                    "group:data-eng@example.com",
                    "domain:example.com",
                    "principal://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/subject/s",
                    "principalSet://iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/*",
                ]
            ),
        ),
        (
            "custom role",
            lambda s: s["invokers"].update(role="projects/nba-props-platform/roles/runInvoker"),
        ),
        ("empty label value", lambda s: s["settings"]["labels"].update(cost_center="")),
        ("min equals max", lambda s: s["settings"].update(minInstances=3, maxInstances=3)),
        ("max 0 is unset", lambda s: s["settings"].update(minInstances=3, maxInstances=0)),
        ("millicpu", lambda s: s["settings"].update(cpu="1000m")),
        ("fractional cpu", lambda s: s["settings"].update(cpu="0.5")),
        ("memory in Gi", lambda s: s["settings"].update(memory="2Gi")),
        (
            "internal ingress",
            lambda s: s["settings"].update(ingress="internal-and-cloud-load-balancing"),
        ),
        (
            "bounds",
            lambda s: (
                s["settings"].update(timeoutSeconds=3600, concurrency=1000)
                or s["policy"].update(resyncSeconds=86400)
            ),
        ),
        ("named container", lambda s: s["service"].update(container="app")),
        ("49-character service name", lambda s: s["service"].update(name="a" * 49)),
        ("30-character project", lambda s: s["service"].update(project="p" + "-" * 28 + "1")),
        (
            "authoritative everything",
            lambda s: s["policy"].update(
                env="Authoritative", invokers="Authoritative", deletion="Revoke"
            ),
        ),
    ],
)
def test_valid_edge_cases_are_accepted(crds, namespace, case, mutate):
    obj = contract_example(namespace)
    mutate(obj["spec"])
    done = apply(crds, obj, dry_run=True)
    assert done.returncode == 0, f"{case}: {done.stderr}"
