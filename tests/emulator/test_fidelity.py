"""Fidelity fixtures: behaviours of real Cloud Run / IAM the controller depends on, each written
down with the outside source it comes from, and checked against the emulator through the real
google-cloud-run / google-cloud-iam clients (gRPC) or, for wire shapes, its REST surface.

Sources (each test names the ones it checks):
- KCC: Config Connector's recordings of real API traffic,
  github.com/GoogleCloudPlatform/k8s-config-connector,
  pkg/test/resourcefixture/testdata/basic/run/v1beta1/runservice/runservicebasic/_http.log
  (commit d8439a5998acf1d763271af3069e37a0a7fb053a; also read at
  0d5edf1f222337a45bdae633af3e819d5cb47578).
  Normalised by KCC (generation, revision names and etags replaced by placeholders).
- KCC_VCR: the same test's unnormalised cassette of real v2 traffic,
  pkg/test/resourcefixture/testdata/basic/run/v1beta1/runservice/runservicebasic/_vcr_cassettes/tf.yaml
  (commit 531841188072922f48b65d8917ca7a52b93ed42d): CreateService's operation metadata has
  `"generation": "1"`, `"reconciling": true`, `"terminalCondition": {"state": "CONDITION_PENDING"}`;
  the PATCH (UpdateService) of a changed template answers an operation whose metadata has
  `"generation": "2"`, `"observedGeneration": "1"`, `"terminalCondition": {"type": "Ready",
  "state": "CONDITION_PENDING", ...}`, `"reconciling": true`; the finished operation has
  `"observedGeneration": "2"`, no `reconciling`, and `"latestReadyRevision"` ==
  `"latestCreatedRevision"` == `"projects/example-project/locations/us-central1/services/
  runservice-1w5ax8rh1otic/revisions/runservice-1w5ax8rh1otic-00002-tnq"` (the first revision was
  `...-00001-vqh`); `"trafficStatuses": [{"type": "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST",
  "percent": 100}]` (no revision named); etags are quoted strings.
- RUN_SERVICE_PROTO: googleapis/googleapis google/cloud/run/v2/service.proto (commit
  01711ae89e793a7b3630222047d8e7a0038c0808): `generation` "monotonically increases every time the
  user modifies the desired state"; `reconciling` "If reconciliation succeeded, the following
  fields will match: `traffic` and `traffic_statuses`, `observed_generation` and `generation`,
  `latest_ready_revision` and `latest_created_revision`"; `latest_ready_revision` and
  `latest_created_revision` are `resource_reference { type: "run.googleapis.com/Revision" }`;
  `annotations`: "should be preserved when modifying objects. ... Cloud Run API v2 does not
  support annotations with `run.googleapis.com`, `cloud.googleapis.com`, `serving.knative.dev`,
  or `autoscaling.knative.dev` namespaces, and they will be rejected in new resources."
- REVISION_TEMPLATE_PROTO: googleapis google/cloud/run/v2/revision_template.proto, `revision`:
  "The unique name for the revision. If this field is omitted, it will be automatically
  generated based on the Service name." (text as found in the generated client references).
- KCC_772: GoogleCloudPlatform/k8s-config-connector#772 (a real Admin Activity entry of
  `google.cloud.run.v2.Services.UpdateService` with `"status": {"code": 6, "message": "Revision
  named 'my-run-service-00012-car' with different configuration already exists."}`; code 6 is
  ALREADY_EXISTS).
- FIREBASE_10148: firebase/firebase-tools#10148 (the v1 replaceService answer: `{"code": 409,
  "message": "Revision named 'ssrthelifegamedev-00002-luh' with different configuration already
  exists.", "status": "ALREADY_EXISTS"}`); googleapis/google-cloud-python#14259 (the same text
  from the v2 Python client, "409 Revision named '<...>' with different configuration already
  exists."); hashicorp/terraform-provider-google#14569 (Terraform's pinned `template.revision`);
  hashicorp/terraform-provider-google#9438 (comment: a client-specified revision name "has to be
  unique ... a revision by the name ... already exists, and with a different spec than the
  existing revision, and so this is indeed a 409/conflict").
- RUN_TRAFFIC_DOC: https://cloud.google.com/run/docs/rollouts-rollbacks-traffic-migration ("If you
  split traffic between multiple revisions or assigned traffic to a previous revision, all
  subsequent deployments use that traffic split pattern going forward.")
- KNATIVE_REVISIONS: https://knative.dev/docs/serving/revisions/ ("Revisions are always created in
  response to updates to a Configuration spec"; the Configuration spec is the Service's template).
- RUN_V1_REPLACE: https://cloud.google.com/run/docs/reference/rest/v1/namespaces.services/replaceService
  ("May provide metadata.resourceVersion to enforce update from last read for optimistic
  concurrency control"; names `namespaces/{project_id_or_number}/services/{serviceName}`).
- RUN_AUDIT: https://cloud.google.com/run/docs/audit-logging (service name run.googleapis.com;
  v1 and v2 method names; methods marked LRO write two entries, first and last).
- IAM_POLICY_PROTO: googleapis google/iam/v1/policy.proto, the text shipped in the pinned
  grpc-google-iam-v1 (the index's stored googleapis copy is an older revision without it):
  `version` "Valid values are `0`, `1`, and `3`. ... Any operation that affects conditional role
  bindings must specify version `3`"; `etag` "An `etag` is returned in the response to
  `getIamPolicy`, and systems are expected to put that etag in the request to `setIamPolicy`
  ... If you omit this field, then IAM allows you to overwrite a version `3` policy with a version
  `1` policy, and all of the conditions in the version `3` policy are lost." (generated clients
  of the IAM v1 API say: "If no `etag` is provided in the call to `setIamPolicy`, then the
  existing policy is overwritten blindly.")
- IAM_ABORTED: GoogleCloudPlatform/deploymentmanager-samples#332 (a real setIamPolicy answer:
  `{"code":409,"message":"There were concurrent policy changes. Please retry the whole
  read-modify-write with exponential backoff.","status":"ABORTED"}`) and openshift/installer
  pkg/terraform/diagnose_test.go (commit 17be09f2f0a795fc625e13d138ddc1faa37024d6: "googleapi:
  Error 409: There were concurrent policy changes. Please retry the whole read-modify-write with
  exponential backoff., aborted"). Both are project policies (cloudresourcemanager), not a Cloud
  Run service: the same IAM backend, see "Not grounded".
- AVOCANO_238: GoogleCloudPlatform/avocano#238 (a v2 CreateService: "Error 400: Violation in
  CreateServiceRequest.service.template.annotations[autoscaling.knative.dev/maxScale]: system
  annotations are not supported in Cloud Run API v2.").
- KCC_SA_404: k8s-config-connector
  pkg/test/resourcefixture/testdata/basic/iam/v1beta1/iamserviceaccount/iamserviceaccount/_http.log
  (commit 2018d05e057ce41cd227f31ec3110078679e3bda): GET of a missing service account answers
  404 `"message": "Unknown service account"`, `"status": "NOT_FOUND"`.
- RUN_TROUBLESHOOTING: https://docs.cloud.google.com/run/docs/troubleshooting ("Default Compute
  Engine service account is deleted": "Permission 'iam.serviceaccounts.actAs' denied on service
  account PROJECT_NUMBER-compute@developer.gserviceaccount.com (or it may not exist).").
- GCLOUD_V1_404: GoogleCloudPlatform/generative-ai#1795 (gcloud output: "Resource
  'gemini-live-demo' of kind 'SERVICE' in region 'us-central1' in project '' does not exist.").

Not grounded (no outside source found; the emulator's behaviour is a choice, not a fact):
- The ABORTED text on a Cloud Run service's own SetIamPolicy (only project policies were found
  with it, IAM_ABORTED); the version a fresh unconditional policy reports (the emulator says 1).
- Whether a change of service-level annotations or labels alone creates no revision on Cloud
  Run itself: KNATIVE_REVISIONS states it for Knative; no recording of Cloud Run shows it.
- During a rollout, GetService's `latest_created_revision`: the emulator names the new revision
  at once; KCC_VCR's operation metadata, taken when the PATCH returned, still named the old one.
  CreateService's pending terminal condition has no `type` in KCC_VCR; the emulator says Ready.
- Refusal of system annotations by UpdateService (only CreateService's refusal was found,
  AVOCANO_238; the emulator refuses them on create only), and the text for `service.annotations`
  (the found text names `service.template.annotations`; the emulator words both alike).
- The v1 prefix of the actAs denial ("User EMAIL does not have permission to access namespace
  NAMESPACE (or it may not exist): ", RUN_TROUBLESHOOTING quotes it from gcloud) is not
  reproduced; the emulator's message is the documented tail.
- Whether a write that changes nothing still bumps `generation` (the emulator bumps it).
"""

from __future__ import annotations

import base64
import re

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from google.type import expr_pb2

from cloudrun_emulator import audit, names
from cloudrun_emulator.events import AuditEvent
from controller.gcp.clients import make_clients

from .conftest import PROJECT, REGION, fresh_deploy

ROLLOUT = pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": 1500}], indirect=True)
LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
State = run_v2.Condition.State
INVOKER = "roles/run.invoker"
# KCC_VCR: runservice-1w5ax8rh1otic-00001-vqh, -00002-tnq: <service>-<generation:05d>-<abc>
REVISION_NAME = re.compile(r"^(?P<service>[a-z][-a-z0-9]*)-(?P<generation>\d{5})-[a-z]{3}$")
# KCC_772 / FIREBASE_10148
ALREADY_EXISTS = "Revision named '{}' with different configuration already exists."
# IAM_ABORTED
CONCURRENT = (
    "There were concurrent policy changes. Please retry the whole read-modify-write with "
    "exponential backoff."
)
# AVOCANO_238
SYSTEM_ANNOTATION = (
    "Violation in CreateServiceRequest.{}[{}]: system annotations are not supported in Cloud Run "
    "API v2."
)


@pytest.fixture
async def fresh_clients(fresh_emulator):
    c = make_clients(fresh_emulator.grpc_endpoint)
    try:
        yield c
    finally:
        await c.close()


def short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def env_of(service: run_v2.Service) -> dict[str, str]:
    return {e.name: e.value for e in service.template.containers[0].env}


async def update(clients, service: run_v2.Service) -> run_v2.Service:
    return await (await clients.run.update_service(service=service)).result(timeout=30)


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
    # an etag from before is refused, with IAM's text (IAM_ABORTED)
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


# ---------------------------------------------------------------- 1. UpdateService and rollouts


@ROLLOUT
async def test_update_is_an_lro_that_rolls_out_as_kcc_recorded(fresh_emulator, fresh_clients):
    # KCC_VCR (the whole sequence), RUN_SERVICE_PROTO (reconciling), REVISION_TEMPLATE_PROTO
    svc = fresh_deploy(fresh_emulator, "rollout", env={"A": "1"})
    before = await fresh_clients.run.get_service(name=svc.name)
    assert before.generation == before.observed_generation == 1
    first = short(before.latest_ready_revision)
    assert (
        before.latest_ready_revision
        == before.latest_created_revision
        == (f"{svc.name}/revisions/{first}")
    )
    assert REVISION_NAME.match(first)["service"] == svc.service
    assert REVISION_NAME.match(first)["generation"] == "00001"
    assert [(t.type_, t.percent, t.revision) for t in before.traffic_statuses] == [
        (LATEST, 100, "")
    ]
    assert before.etag.startswith('"') and before.etag.endswith('"')

    before.template.containers[0].env = [run_v2.EnvVar(name="A", value="2")]
    op = await fresh_clients.run.update_service(service=before)
    assert not op.operation.done
    assert KCC_OPERATION_NAME.match(op.operation.name)
    meta = op.metadata  # the Service as the update left it
    assert meta.generation == 2
    assert meta.observed_generation == 1
    assert meta.reconciling
    assert meta.terminal_condition.type_ == "Ready"
    assert meta.terminal_condition.state == State.CONDITION_PENDING
    assert short(meta.latest_ready_revision) == first

    during = await fresh_clients.run.get_service(name=svc.name)
    assert during.reconciling and during.generation == 2 and during.observed_generation == 1
    assert short(during.latest_ready_revision) == first  # the old revision serves meanwhile

    done = await op.result(timeout=30)
    assert not done.reconciling
    assert done.generation == done.observed_generation == 2
    assert done.terminal_condition.state == State.CONDITION_SUCCEEDED
    second = short(done.latest_ready_revision)
    assert (
        done.latest_ready_revision
        == done.latest_created_revision
        == (f"{svc.name}/revisions/{second}")
    )
    assert second != first
    assert REVISION_NAME.match(second)["generation"] == "00002"
    assert [(t.type_, t.percent, t.revision) for t in done.traffic_statuses] == [(LATEST, 100, "")]


async def test_generation_moves_on_every_update_a_revision_only_with_the_template(clients, deploy):
    # RUN_SERVICE_PROTO (generation; annotations preserved), KNATIVE_REVISIONS
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    revision = current.latest_created_revision

    current.annotations["example.com/owner"] = "team-a"
    annotated = await update(clients, current)
    assert annotated.generation == 2
    assert annotated.latest_created_revision == revision  # no new revision

    annotated.labels["team"] = "a"
    labelled = await update(clients, annotated)
    assert labelled.generation == 3
    assert labelled.latest_created_revision == revision

    # a read-modify-write of the template keeps the user annotation and makes one revision
    labelled.template.containers[0].env = [run_v2.EnvVar(name="A", value="2")]
    changed = await update(clients, labelled)
    assert changed.generation == 4
    assert changed.latest_created_revision != revision
    assert REVISION_NAME.match(short(changed.latest_created_revision))["generation"] == "00004"
    assert dict(changed.annotations) == {"example.com/owner": "team-a"}
    assert dict(changed.labels) == {"team": "a"}


# ---------------------------------------------------------------- 2. pinned revisions, traffic


async def test_a_pinned_revision_name_cannot_take_a_changed_template(clients, deploy):
    # REVISION_TEMPLATE_PROTO, KCC_772, FIREBASE_10148 (code and text)
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    pinned = f"{svc.service}-terraform-1"
    current.template.revision = pinned
    current.template.containers[0].env = [run_v2.EnvVar(name="A", value="2")]
    named = await update(clients, current)
    assert short(named.latest_ready_revision) == pinned
    assert named.template.revision == pinned  # GetService returns it, so a read-modify-write
    generation = named.generation  #          sends it back

    # the same template under the same name is that revision: accepted, no new revision
    same = await update(clients, named)
    assert short(same.latest_created_revision) == pinned

    same.template.containers[0].env = [run_v2.EnvVar(name="A", value="3")]
    with pytest.raises(gexc.AlreadyExists) as info:
        await clients.run.update_service(service=same)
    assert info.value.message == ALREADY_EXISTS.format(pinned)
    after = await clients.run.get_service(name=svc.name)
    assert after.generation == generation + 1  # the refused write changed nothing
    assert env_of(after) == {"A": "2"}

    # what gcloud and Runwarden do: clear the name, the server names the revision
    after.template.containers[0].env = [run_v2.EnvVar(name="A", value="3")]
    after.template.revision = ""
    cleared = await update(clients, after)
    assert REVISION_NAME.match(short(cleared.latest_ready_revision))


async def test_traffic_pinned_to_a_revision_keeps_serving_it_after_an_update(clients, deploy):
    # RUN_TRAFFIC_DOC, RUN_SERVICE_PROTO (traffic_statuses match traffic once reconciled)
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    old = short(current.latest_ready_revision)
    current.traffic = [run_v2.TrafficTarget(type_=REVISION, revision=old, percent=100)]
    pinned = await update(clients, current)
    assert pinned.latest_created_revision == current.latest_created_revision  # traffic only

    pinned.template.containers[0].env = [run_v2.EnvVar(name="A", value="2")]
    deployed = await update(clients, pinned)
    assert short(deployed.latest_ready_revision) != old  # the new revision is ready ...
    assert [(t.type_, t.revision, t.percent) for t in deployed.traffic_statuses] == [
        (REVISION, old, 100)  # ... and serves nothing
    ]
    assert [(t.type_, t.revision, t.percent) for t in deployed.traffic] == [(REVISION, old, 100)]


# ---------------------------------------------------------------- 3. IAM


async def test_iam_etags_guard_read_modify_write(clients, deploy):
    # IAM_POLICY_PROTO (version values, etag), IAM_ABORTED (code and text)
    svc = deploy(invokers={INVOKER: ["user:a@example.com"]})
    read = await clients.run.get_iam_policy(request={"resource": svc.name})
    assert read.version in (0, 1, 3)
    assert read.etag

    someone = await clients.run.get_iam_policy(request={"resource": svc.name})
    someone.bindings[0].members.append("user:b@example.com")
    written = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": someone})
    assert written.etag != read.etag

    read.bindings[0].members.append("user:c@example.com")
    with pytest.raises(gexc.Aborted) as info:
        await clients.run.set_iam_policy(request={"resource": svc.name, "policy": read})
    assert info.value.message == CONCURRENT
    assert info.value.code == 409

    # no etag: the policy is overwritten blindly
    blind = policy_pb2.Policy(
        bindings=[policy_pb2.Binding(role=INVOKER, members=["user:c@example.com"])]
    )
    overwritten = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": blind})
    assert [list(b.members) for b in overwritten.bindings] == [["user:c@example.com"]]


async def test_conditional_bindings_need_version_3_and_a_blind_v1_write_drops_them(clients, deploy):
    # IAM_POLICY_PROTO (version 3 for conditions; omitting the etag loses them)
    svc = deploy(invokers={INVOKER: ["user:a@example.com"]})
    policy = await clients.run.get_iam_policy(request={"resource": svc.name})
    policy.bindings.append(
        policy_pb2.Binding(
            role=INVOKER,
            members=["user:temp@example.com"],
            condition=expr_pb2.Expr(
                title="until 2030", expression="request.time < timestamp('2030-01-01T00:00:00Z')"
            ),
        )
    )
    policy.version = 1
    with pytest.raises(gexc.InvalidArgument):
        await clients.run.set_iam_policy(request={"resource": svc.name, "policy": policy})
    policy.version = 3
    v3 = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": policy})
    assert v3.version == 3
    read = await clients.run.get_iam_policy(
        request={"resource": svc.name, "options": {"requested_policy_version": 3}}
    )
    assert [b.condition.title for b in read.bindings if b.condition.expression] == ["until 2030"]

    blind = policy_pb2.Policy(
        version=1, bindings=[policy_pb2.Binding(role=INVOKER, members=["user:a@example.com"])]
    )
    after = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": blind})
    assert after.version == 1
    assert not [b for b in after.bindings if b.condition.expression]


# ---------------------------------------------------------------- 4. annotations


async def test_system_annotations_are_refused_in_a_new_v2_service(clients, unique_name):
    # RUN_SERVICE_PROTO (annotations), AVOCANO_238 (code and text)
    parent = f"projects/{PROJECT}/locations/{REGION}"
    template = run_v2.RevisionTemplate(containers=[run_v2.Container(image="gcr.io/cloudrun/hello")])
    sid = unique_name("annot")

    in_template = run_v2.RevisionTemplate(template)
    in_template.annotations["autoscaling.knative.dev/maxScale"] = "10"
    with pytest.raises(gexc.InvalidArgument) as info:
        await clients.run.create_service(
            parent=parent, service=run_v2.Service(template=in_template), service_id=sid
        )
    assert info.value.message == SYSTEM_ANNOTATION.format(
        "service.template.annotations", "autoscaling.knative.dev/maxScale"
    )
    with pytest.raises(gexc.InvalidArgument, match="system annotations are not supported"):
        await clients.run.create_service(
            parent=parent,
            service=run_v2.Service(
                template=template, annotations={"run.googleapis.com/ingress": "all"}
            ),
            service_id=sid,
        )

    # user annotations are kept, on the service and on its template
    user = run_v2.RevisionTemplate(template)
    user.annotations["example.com/build"] = "42"
    created = await (
        await clients.run.create_service(
            parent=parent,
            service=run_v2.Service(template=user, annotations={"example.com/team": "a"}),
            service_id=sid,
        )
    ).result(timeout=30)
    assert dict(created.annotations) == {"example.com/team": "a"}
    assert dict(created.template.annotations) == {"example.com/build": "42"}


# ---------------------------------------------------------------- 5. error texts


async def test_error_texts_the_controller_maps(clients, deploy):
    # KCC (v2 NOT_FOUND), KCC_SA_404, RUN_TROUBLESHOOTING
    missing = f"projects/{PROJECT}/locations/{REGION}/services/no-such-svc"
    with pytest.raises(gexc.NotFound) as info:
        await clients.run.get_service(name=missing)
    assert info.value.message == f'service "{missing}" not found'

    sa = f"nobody@{PROJECT}.iam.gserviceaccount.com"
    with pytest.raises(gexc.NotFound) as info:
        await clients.iam.get_service_account(name=f"projects/-/serviceAccounts/{sa}")
    assert info.value.message == "Unknown service account"

    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    current.template.service_account = sa
    with pytest.raises(gexc.PermissionDenied) as info:
        await clients.run.update_service(service=current)
    assert info.value.message == (
        f"Permission 'iam.serviceaccounts.actAs' denied on service account {sa} "
        "(or it may not exist)."
    )
