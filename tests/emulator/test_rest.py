"""The REST surface (`--rest-port`, CONTRACT §6.3): v1 Knative objects as gcloud reads and writes
them, the v1/v2 IAM methods, v2 services and operations, errors in Google's JSON shape; one store
with the gRPC surface (checked through the real google-cloud-run client)."""

from __future__ import annotations

import base64
import copy

import pytest
import requests

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.wait import wait_for

from .conftest import PROJECT, REGION

KN = "/apis/serving.knative.dev/v1/namespaces"
REGIONAL = f"http://{REGION}-run.googleapis.com"  # reached in proxy form, as gcloud does
GLOBAL = "http://run.googleapis.com"
PUSH = f"serviceAccount:push@{PROJECT}.iam.gserviceaccount.com"


def _session(emu: EmulatorProcess, principal: str = "tester@example.com") -> requests.Session:
    """A session that uses the emulator as its HTTP proxy, with a proxy user as gcloud sends."""
    s = requests.Session()
    host = emu.rest_url.removeprefix("http://")
    s.proxies = {"http": f"http://{principal}:x@{host}"}
    return s


def _ok(resp: requests.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def _wait_ready(s: requests.Session, url: str, deadline_s: float = 30.0) -> dict:
    def settled() -> dict | None:
        svc = _ok(s.get(url))
        ready = {c["type"]: c["status"] for c in svc["status"]["conditions"]}.get("Ready")
        done = svc["status"]["observedGeneration"] == svc["metadata"]["generation"]
        return svc if done and ready in ("True", "False") else None

    return wait_for(settled, deadline_s, interval=0.05, message="service never settled")


def test_v1_get_is_the_grpc_service_in_knative_form(emulator, deploy):
    svc = deploy(env={"A": "1"}, secret_env={"S": {"secret": "sek", "version": "3"}})
    s = _session(emulator)
    got = _ok(s.get(f"{REGIONAL}{KN}/{PROJECT}/services/{svc.service}"))
    admin = svc.get()
    assert got["apiVersion"] == "serving.knative.dev/v1" and got["kind"] == "Service"
    meta = got["metadata"]
    # Cloud Run v1 reports the namespace as the project number.
    assert meta["namespace"].isdigit() and meta["namespace"] != PROJECT
    assert meta["labels"]["cloud.googleapis.com/location"] == REGION
    assert meta["resourceVersion"] == admin["serviceEtag"].strip('"')
    assert meta["generation"] == admin["generation"]
    c = got["spec"]["template"]["spec"]["containers"][0]
    assert c["env"] == [
        {"name": "A", "value": "1"},
        {"name": "S", "valueFrom": {"secretKeyRef": {"name": "sek", "key": "3"}}},
    ]
    assert c["resources"]["limits"] == {"cpu": "1000m", "memory": "512Mi"}
    spec = got["spec"]["template"]["spec"]
    assert spec["containerConcurrency"] == 80 and spec["timeoutSeconds"] == 300
    assert spec["serviceAccountName"].endswith("-compute@developer.gserviceaccount.com")
    assert got["status"]["latestReadyRevisionName"] == admin["latestReadyRevision"]
    # the same object by project number, and on the global endpoint (searched by name)
    by_number = _ok(s.get(f"{GLOBAL}{KN}/{meta['namespace']}/services/{svc.service}"))
    assert by_number["metadata"]["uid"] == meta["uid"]


def test_v1_replace_round_trip_is_seen_by_admin_and_attributed(emulator, deploy):
    svc = deploy(env={"A": "1", "B": "2"})
    s = _session(emulator, "ci@example.iam.gserviceaccount.com")
    url = f"{REGIONAL}{KN}/{PROJECT}/services/{svc.service}"
    got = _ok(s.get(url))
    body = copy.deepcopy(got)
    body["spec"]["template"]["metadata"].pop("name", None)
    body["spec"]["template"]["metadata"].setdefault("labels", {})["client.knative.dev/nonce"] = (
        "abcde"
    )
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "A", "value": "9"}]
    put = _ok(s.put(url, json=body))
    assert put["metadata"]["generation"] == got["metadata"]["generation"] + 1
    done = _wait_ready(s, url)
    assert done["status"]["latestCreatedRevisionName"] != got["status"]["latestCreatedRevisionName"]
    return_svc = svc.get()
    assert return_svc["env"] == {"A": "9"}
    assert return_svc["lastModifier"] == "ci@example.iam.gserviceaccount.com"

    # the nonce label finds the revision gcloud just created
    revs = _ok(
        s.get(
            f"{REGIONAL}{KN}/{PROJECT}/revisions",
            params={"labelSelector": "client.knative.dev/nonce=abcde"},
        )
    )
    assert [r["metadata"]["name"] for r in revs["items"]] == [
        done["status"]["latestCreatedRevisionName"]
    ]
    rev = revs["items"][0]
    assert rev["status"]["imageDigest"].split("@sha256:")[0] == (
        "us-docker.pkg.dev/cloudrun/container/hello"
    )
    one = _ok(s.get(f"{REGIONAL}{KN}/{PROJECT}/revisions/{rev['metadata']['name']}"))
    assert one["metadata"]["labels"]["serving.knative.dev/service"] == svc.service

    # a stale resourceVersion is a conflict, in Google's error shape
    stale = s.put(url, json=body)
    assert stale.status_code == 409, stale.text
    err = stale.json()["error"]
    assert err["status"] == "ABORTED" and err["code"] == 409
    assert svc.service in err["message"]


async def test_v1_write_is_what_the_grpc_client_reads(emulator, deploy, clients):
    svc = deploy(env={"A": "1"})
    s = _session(emulator, "ci@example.iam.gserviceaccount.com")
    url = f"{REGIONAL}{KN}/{PROJECT}/services/{svc.service}"
    body = _ok(s.get(url))
    body["metadata"]["annotations"]["runwarden.dev/owner"] = "default/ns/orch"
    body["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "B", "value": "2"})
    _ok(s.put(url, json=body))
    got = await clients.run.get_service(name=svc.name)
    assert [e.name for e in got.template.containers[0].env] == ["A", "B"]
    assert got.last_modifier == "ci@example.iam.gserviceaccount.com"
    assert got.annotations["runwarden.dev/owner"] == "default/ns/orch"
    # system annotations are not stored as annotations: they map to fields
    assert not any(k.startswith("serving.knative.dev/") for k in got.annotations)
    assert got.etag.strip('"') == _ok(s.get(url))["metadata"]["resourceVersion"]


@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": 1500, "rest_port": 0}], indirect=True)
def test_v1_readiness_comes_from_the_rollout(fresh_emulator):
    emu = fresh_emulator
    emu.admin.put_service(PROJECT, REGION, "rolling", env={"A": "1"})
    s = _session(emu)
    url = f"{REGIONAL}{KN}/{PROJECT}/services/rolling"
    body = _ok(s.get(url))
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "A", "value": "2"}]
    put = _ok(s.put(url, json=body))
    ready = {c["type"]: c["status"] for c in put["status"]["conditions"]}["Ready"]
    assert ready == "Unknown"
    assert put["status"]["observedGeneration"] < put["metadata"]["generation"]
    done = _wait_ready(s, url)
    assert {c["type"]: c["status"] for c in done["status"]["conditions"]}["Ready"] == "True"


def test_v1_create_list_and_label_selector(emulator, unique_name):
    s = _session(emulator)
    name = unique_name("created")
    body = {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"team": "a"}},
        "spec": {"template": {"spec": {"containers": [{"image": "gcr.io/p/i:1"}]}}},
    }
    created = _ok(s.post(f"{REGIONAL}{KN}/{PROJECT}/services", json=body))
    assert created["metadata"]["labels"] == {"team": "a", "cloud.googleapis.com/location": REGION}
    again = s.post(f"{REGIONAL}{KN}/{PROJECT}/services", json=body)
    assert again.status_code == 409 and again.json()["error"]["status"] == "ALREADY_EXISTS"
    listed = _ok(s.get(f"{REGIONAL}{KN}/{PROJECT}/services", params={"labelSelector": "team=a"}))
    assert name in [i["metadata"]["name"] for i in listed["items"]]
    none = _ok(s.get(f"{REGIONAL}{KN}/{PROJECT}/services", params={"labelSelector": "team=zz"}))
    assert name not in [i["metadata"]["name"] for i in none.get("items", [])]
    every = _ok(s.get(f"{GLOBAL}/v1/projects/{PROJECT}/locations/-/services"))
    assert name in [i["metadata"]["name"] for i in every["items"]]


def test_not_found_in_google_error_shape(emulator):
    s = _session(emulator)
    resp = s.get(f"{REGIONAL}{KN}/{PROJECT}/services/no-such-service")
    assert resp.status_code == 404
    assert resp.json() == {
        "error": {
            "code": 404,
            "message": f"Resource 'no-such-service' of kind 'SERVICE' in region '{REGION}' "
            f"in project '{PROJECT}' does not exist.",
            "status": "NOT_FOUND",
        }
    }


def test_v1_iam_methods(emulator, deploy):
    svc = deploy(invokers={"roles/run.invoker": [PUSH]})
    s = _session(emulator, "ci@example.iam.gserviceaccount.com")
    base = f"{GLOBAL}/v1/{svc.name}"
    pol = _ok(s.get(f"{base}:getIamPolicy", params={"options.requestedPolicyVersion": 3}))
    base64.b64decode(pol["etag"], validate=True)  # gcloud decodes it
    assert pol["bindings"] == [{"role": "roles/run.invoker", "members": [PUSH]}]
    pol["bindings"][0]["members"].append("user:a@example.com")
    new = _ok(s.post(f"{base}:setIamPolicy", json={"policy": pol}))
    assert new["etag"] != pol["etag"]
    assert svc.get()["iam"] == {"roles/run.invoker": [PUSH, "user:a@example.com"]}
    stale = s.post(f"{base}:setIamPolicy", json={"policy": pol})
    assert stale.status_code == 409 and stale.json()["error"]["status"] == "ABORTED"
    bad = s.post(f"{base}:setIamPolicy", json={"policy": {"etag": "!!not base64", "bindings": []}})
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"
    perms = _ok(
        s.post(f"{base}:testIamPermissions", json={"permissions": ["run.services.get", "x.y"]})
    )
    assert perms == {"permissions": ["run.services.get"]}


async def test_v2_rest_services_and_operations(emulator, deploy, clients):
    svc = deploy(env={"A": "1"})
    s = requests.Session()
    url = f"{emulator.rest_url}/v2/{svc.name}"
    got = _ok(s.get(url))
    assert got["name"] == svc.name and got["template"]["containers"][0]["env"] == [
        {"name": "A", "value": "1"}
    ]
    got["template"]["containers"][0]["env"].append({"name": "B", "value": "2"})
    op = _ok(s.patch(url, json=got, headers={"x-emulator-principal": "v2@example.com"}))
    assert op["name"].startswith(f"projects/{PROJECT}/locations/{REGION}/operations/")
    assert op["metadata"]["@type"] == "type.googleapis.com/google.cloud.run.v2.Service"
    done = _ok(s.post(f"{emulator.rest_url}/v2/{op['name']}:wait", json={"timeout": "10s"}))
    assert done["done"] is True
    assert done["response"]["@type"] == "type.googleapis.com/google.cloud.run.v2.Service"
    grpc_view = await clients.run.get_service(name=svc.name)
    assert [e.name for e in grpc_view.template.containers[0].env] == ["A", "B"]
    assert grpc_view.last_modifier == "v2@example.com"
    # a stale etag is ABORTED on REST as on gRPC
    stale = s.patch(url, json=got)
    assert stale.status_code == 409 and stale.json()["error"]["status"] == "ABORTED"
    # enums as numbers when the REST client asks for them
    ints = _ok(s.get(url, params={"$alt": "json;enum-encoding=int"}))
    assert ints["ingress"] == 1
