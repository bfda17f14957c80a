"""Fidelity fixtures: behaviours of real Cloud Run / IAM the controller depends on, each written
down with the outside source it comes from, and checked against the emulator.

Sources:
- KCC: Config Connector's recordings of real API traffic,
  github.com/GoogleCloudPlatform/k8s-config-connector,
  pkg/test/resourcefixture/testdata/basic/run/v1beta1/runservice/runservicebasic/_http.log
  (commit d8439a5998acf1d763271af3069e37a0a7fb053a).
- RUN_V1_REPLACE: https://cloud.google.com/run/docs/reference/rest/v1/namespaces.services/replaceService
  ("May provide metadata.resourceVersion to enforce update from last read for optimistic
  concurrency control"; names `namespaces/{project_id_or_number}/services/{serviceName}`).
- RUN_AUDIT: https://cloud.google.com/run/docs/audit-logging (service name run.googleapis.com;
  v1 and v2 method names; methods marked LRO write two entries, first and last).
- IAM_POLICY_PROTO: googleapis google/iam/v1/policy.proto (`version`: "Any operation that
  affects conditional role bindings must specify version `3`"; `etag` is bytes, base64 in JSON).
- GCLOUD_V1_404: GoogleCloudPlatform/generative-ai#1795 (gcloud output: "Resource
  'gemini-live-demo' of kind 'SERVICE' in region 'us-central1' in project '' does not exist.").
"""

from __future__ import annotations

import base64
import re

import requests

from cloudrun_emulator import audit, names
from cloudrun_emulator.events import AuditEvent

from .conftest import PROJECT, REGION

# What KCC's recording sent (POST .../services?serviceId=...) and what the real API filled in.
KCC_CREATE_BODY = {
    "ingress": "INGRESS_TRAFFIC_ALL",
    "labels": {"cnrm-test": "true", "managed-by-cnrm": "true"},
    "launchStage": "GA",
    "template": {
        "containers": [
            {"env": [{"name": "FOO", "value": "bar]"}], "image": "gcr.io/cloudrun/hello"}
        ],
        "scaling": {"maxInstanceCount": 2},
    },
    "traffic": [{"percent": 100, "type": "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST"}],
}
KCC_FILLED_TEMPLATE = {
    "containers": [
        {
            "env": [{"name": "FOO", "value": "bar]"}],
            "image": "gcr.io/cloudrun/hello",
            "resources": {"limits": {"cpu": "1000m", "memory": "512Mi"}},
        }
    ],
    "maxInstanceRequestConcurrency": 80,
    "scaling": {"maxInstanceCount": 2},
    "serviceAccount": "${projectNumber}-compute@developer.gserviceaccount.com",
    "timeout": "300s",
}
KCC_OPERATION_NAME = re.compile(r"^projects/[^/]+/locations/[^/]+/operations/[^/]+$")
KCC_404 = 'service "projects/{p}/locations/{r}/services/{s}" not found'


def test_v2_create_fills_the_defaults_kcc_recorded(emulator, unique_name):
    name = unique_name("kcc")
    base = f"{emulator.rest_url}/v2/projects/{PROJECT}/locations/{REGION}"
    headers = {"x-emulator-principal": "test@google.com"}
    op = requests.post(
        f"{base}/services", params={"serviceId": name}, json=KCC_CREATE_BODY, headers=headers
    ).json()
    # LRO shape (KCC): name projects/P/locations/R/operations/ID, metadata an Any of the Service
    assert KCC_OPERATION_NAME.match(op["name"]), op
    assert op["metadata"]["@type"] == "type.googleapis.com/google.cloud.run.v2.Service"
    done = requests.get(f"{emulator.rest_url}/v2/{op['name']}").json()
    assert done["done"] is True
    assert done["response"]["@type"] == "type.googleapis.com/google.cloud.run.v2.Service"
    svc = requests.get(f"{base}/services/{name}").json()
    number = names.project_number(PROJECT)
    expected = {
        **KCC_FILLED_TEMPLATE,
        "serviceAccount": KCC_FILLED_TEMPLATE["serviceAccount"].replace("${projectNumber}", number),
    }
    got = {k: svc["template"][k] for k in expected}
    assert got == expected
    # creator / lastModifier: the caller (KCC: "test@google.com" on the create's metadata)
    assert svc["creator"] == svc["lastModifier"] == "test@google.com"
    assert svc["terminalCondition"]["type"] == "Ready"
    assert svc["terminalCondition"]["state"] == "CONDITION_SUCCEEDED"
    assert svc["traffic"] == KCC_CREATE_BODY["traffic"]


def test_not_found_texts(emulator):
    missing = "no-such-kcc"
    v2 = requests.get(
        f"{emulator.rest_url}/v2/projects/{PROJECT}/locations/{REGION}/services/{missing}"
    )
    assert v2.status_code == 404
    assert v2.json()["error"] == {
        "code": 404,
        "message": KCC_404.format(p=PROJECT, r=REGION, s=missing),
        "status": "NOT_FOUND",
    }
    s = requests.Session()
    s.proxies = {"http": emulator.rest_url}
    v1 = s.get(
        f"http://{REGION}-run.googleapis.com/apis/serving.knative.dev/v1/namespaces/{PROJECT}/services/{missing}"
    )
    assert v1.json()["error"]["message"] == (
        f"Resource '{missing}' of kind 'SERVICE' in region '{REGION}' in project '{PROJECT}' "
        "does not exist."
    )  # GCLOUD_V1_404


def test_v1_resource_version_is_optimistic_concurrency_by_number_or_id(emulator, deploy):
    # RUN_V1_REPLACE: the namespace may be the project id or number; resourceVersion is checked
    svc = deploy(env={"A": "1"})
    s = requests.Session()
    s.proxies = {"http": emulator.rest_url}
    number = names.project_number(PROJECT)
    url = f"http://{REGION}-run.googleapis.com/apis/serving.knative.dev/v1/namespaces/{number}/services/{svc.service}"
    body = s.get(url).json()
    assert s.put(url, json=body).status_code == 200
    stale = s.put(url, json=body)
    assert stale.status_code == 409 and stale.json()["error"]["status"] == "ABORTED"


def test_iam_policy_version_3_for_conditions_and_base64_etags(emulator, deploy):
    # IAM_POLICY_PROTO
    svc = deploy(invokers={"roles/run.invoker": ["user:a@example.com"]})
    url = f"{emulator.rest_url}/v2/{svc.name}"
    pol = requests.get(f"{url}:getIamPolicy").json()
    assert pol["version"] == 1
    base64.b64decode(pol["etag"], validate=True)
    cond = {
        "role": "roles/run.invoker",
        "members": ["user:b@example.com"],
        "condition": {
            "title": "t",
            "expression": "request.time < timestamp('2030-01-01T00:00:00Z')",
        },
    }
    v1 = requests.post(
        f"{url}:setIamPolicy",
        json={"policy": {"version": 1, "etag": pol["etag"], "bindings": [*pol["bindings"], cond]}},
    )
    assert v1.status_code == 400 and "version 3" in v1.json()["error"]["message"]
    v3 = requests.post(
        f"{url}:setIamPolicy",
        json={"policy": {"version": 3, "etag": pol["etag"], "bindings": [*pol["bindings"], cond]}},
    )
    assert v3.status_code == 200 and v3.json()["version"] == 3
    # an etag from before is refused, with IAM's text
    again = requests.post(
        f"{url}:setIamPolicy", json={"policy": {"etag": pol["etag"], "bindings": []}}
    )
    assert again.status_code == 409
    assert again.json()["error"]["message"].startswith("There were concurrent policy changes.")


def _entry(method: str, response: object = None) -> dict:
    key = names.ServiceKey(PROJECT, REGION, "svc")
    return audit.log_entry(
        AuditEvent(method, key, "ci@example.com", {}, response, operation_id="op", first=True)
    )


def test_audit_entries_follow_the_documented_names():
    # RUN_AUDIT: serviceName run.googleapis.com; v1 names on namespaces/P/services/S (what gcloud
    # calls), v2 names on projects/P/locations/R/services/S, IAM's SetIamPolicy on the service
    v1 = _entry("google.cloud.run.v1.Services.ReplaceService")
    p = v1["protoPayload"]
    assert p["serviceName"] == "run.googleapis.com"
    assert p["methodName"] == "google.cloud.run.v1.Services.ReplaceService"
    assert p["resourceName"] == f"namespaces/{PROJECT}/services/svc"
    assert p["authenticationInfo"] == {"principalEmail": "ci@example.com"}
    assert v1["resource"]["type"] == "cloud_run_revision"
    assert v1["resource"]["labels"]["service_name"] == "svc"
    assert v1["resource"]["labels"]["location"] == REGION
    assert v1["logName"] == f"projects/{PROJECT}/logs/cloudaudit.googleapis.com%2Factivity"
    v2 = _entry("google.cloud.run.v2.Services.UpdateService")
    assert (
        v2["protoPayload"]["resourceName"] == f"projects/{PROJECT}/locations/{REGION}/services/svc"
    )
    assert v2["operation"]["first"] is True  # an LRO's first entry
    iam = _entry("google.cloud.run.v1.Services.SetIamPolicy")
    assert iam["protoPayload"]["methodName"] == "google.cloud.run.v1.Services.SetIamPolicy"
    assert (
        iam["protoPayload"]["resourceName"] == f"projects/{PROJECT}/locations/{REGION}/services/svc"
    )
