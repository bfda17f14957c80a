"""End to end with the real Google Cloud CLI: the `gcloud run services ...` commands that cause
the incidents Runwarden exists for, run unmodified against the emulator's REST surface (v1
Knative + v1 IAM, configured by `cloudrun-emulator gcloud-env`). Each test checks what gcloud
prints (`--format json`, parsed) and what the gRPC surface shows through the real
google-cloud-run client; the last ones let a controller on the real control plane repair what
gcloud broke. Skipped, naming gcloud, without the Cloud SDK; required when CI=true.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.iam.v1 import iam_policy_pb2

from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.clients import make_clients
from tests.fixtures.gcloud import Gcloud, GcloudError
from tests.fixtures.orch import FOREIGN, MEMBER, MODE_VALUE, PROJECT, REGION, Orch
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

CI = "ci-deployer@runwarden-e2e.iam.gserviceaccount.com"
PUSH = "serviceAccount:pubsub-push@runwarden-e2e.iam.gserviceaccount.com"


def env_of(gcloud_service: dict[str, Any]) -> dict[str, Any]:
    """name -> value (or the secret reference) of a v1 Service's first container, as printed."""
    out: dict[str, Any] = {}
    for e in gcloud_service["spec"]["template"]["spec"]["containers"][0].get("env", []):
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


async def grpc_service(emulator: EmulatorProcess, service: str) -> Any:
    clients = make_clients(emulator.grpc_endpoint)
    try:
        return await clients.run.get_service(
            name=f"projects/{PROJECT}/locations/{REGION}/services/{service}"
        )
    finally:
        await clients.close()


async def grpc_policy(emulator: EmulatorProcess, service: str) -> dict[str, list[str]]:
    clients = make_clients(emulator.grpc_endpoint)
    try:
        policy = await clients.run.get_iam_policy(
            request=iam_policy_pb2.GetIamPolicyRequest(
                resource=f"projects/{PROJECT}/locations/{REGION}/services/{service}"
            )
        )
        return {b.role: sorted(b.members) for b in policy.bindings}
    finally:
        await clients.close()


def grpc_env(svc: Any) -> dict[str, str]:
    return {e.name: e.value for e in svc.template.containers[0].env}


@pytest.fixture
def seeded(emulator: EmulatorProcess, unique_name: Callable[[str], str]) -> str:
    name = unique_name("gc")
    emulator.admin.put_service(
        PROJECT,
        REGION,
        name,
        env={"A": "1", "B": "2"},
        secret_env={"S": {"secret": "sek", "version": "latest"}},
        invokers={"roles/run.invoker": [PUSH]},
    )
    return name


@pytest.fixture
def gc(gcloud: Callable[..., Gcloud]) -> Gcloud:
    return gcloud(principal=CI, project=PROJECT)


async def test_describe_prints_the_service_grpc_serves(
    gc: Gcloud, emulator: EmulatorProcess, seeded: str
) -> None:
    got = gc.json("run", "services", "describe", seeded, "--region", REGION)
    svc = await grpc_service(emulator, seeded)
    assert got["metadata"]["name"] == seeded
    assert env_of(got) == {
        "A": "1",
        "B": "2",
        "S": {"secretKeyRef": {"name": "sek", "key": "latest"}},
    }
    assert got["metadata"]["resourceVersion"] == svc.etag.strip('"')
    # v1 names the revision; v2 gives its full resource name (test_fidelity, KCC_VCR)
    assert got["status"]["latestReadyRevisionName"] == svc.latest_ready_revision.rsplit("/", 1)[-1]
    conditions = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    limits = got["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == dict(svc.template.containers[0].resources.limits)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--update-env-vars", "C=3", {"A": "1", "B": "2", "C": "3"}),
        ("--set-env-vars", "ONLY=1", {"ONLY": "1"}),  # the incident: A and B are gone
        ("--remove-env-vars", "A", {"B": "2"}),
    ],
)
async def test_update_env_flags(
    gc: Gcloud,
    emulator: EmulatorProcess,
    seeded: str,
    flag: str,
    value: str,
    expected: dict[str, str],
) -> None:
    before = await grpc_service(emulator, seeded)
    gc.run("run", "services", "update", seeded, "--region", REGION, flag, value)
    after = await grpc_service(emulator, seeded)
    plain = {k: v for k, v in grpc_env(after).items() if k != "S"}
    assert plain == expected
    # the secret reference survives every one of these flags, as on Cloud Run
    secret = [e for e in after.template.containers[0].env if e.name == "S"]
    assert secret and secret[0].value_source.secret_key_ref.secret == "sek"
    assert after.generation == before.generation + 1
    assert after.latest_created_revision != before.latest_created_revision
    assert after.latest_ready_revision == after.latest_created_revision
    assert after.last_modifier == CI
    assert after.client == "gcloud"  # from the run.googleapis.com/client-name annotation
    # gcloud pins the running code when a flag changes the template but not the image: it reads
    # the base revision (by its nonce label, else latestCreatedRevisionName) and sets the image
    # to that revision's status.imageDigest (googlecloudsdk command_lib/run/
    # serverless_operations.py, _EnsureImageDigest and _SwitchToDigestChange).
    base_name = before.latest_created_revision.rsplit("/", 1)[-1]
    base = gc.json("run", "revisions", "describe", base_name, "--region", REGION)
    assert "@sha256:" in base["status"]["imageDigest"]
    assert after.template.containers[0].image == base["status"]["imageDigest"]
    described = gc.json("run", "services", "describe", seeded, "--region", REGION)
    assert {k: v for k, v in env_of(described).items() if k != "S"} == expected
    assert described["metadata"]["annotations"]["serving.knative.dev/lastModifier"] == CI
    assert emulator.admin.get_service(PROJECT, REGION, seeded)["lastModifier"] == CI


async def test_deploy_image_to_existing_and_new_service(
    gc: Gcloud, emulator: EmulatorProcess, seeded: str, unique_name: Callable[[str], str]
) -> None:
    gc.run("run", "deploy", seeded, "--region", REGION, "--image", "gcr.io/p/app:2")
    svc = await grpc_service(emulator, seeded)
    assert svc.template.containers[0].image == "gcr.io/p/app:2"
    assert {k: v for k, v in grpc_env(svc).items() if k != "S"} == {"A": "1", "B": "2"}

    new = unique_name("gc-new")
    gc.run("run", "deploy", new, "--region", REGION, "--image", "gcr.io/p/app:1")
    created = await grpc_service(emulator, new)
    assert created.creator == CI and created.template.containers[0].image == "gcr.io/p/app:1"
    assert created.template.service_account.endswith("-compute@developer.gserviceaccount.com")
    listed = gc.json("run", "services", "list", "--region", REGION)
    assert new in [s["metadata"]["name"] for s in listed]
    everywhere = gc.json("run", "services", "list")
    assert {seeded, new} <= {s["metadata"]["name"] for s in everywhere}


async def test_the_four_iam_commands(
    gc: Gcloud, emulator: EmulatorProcess, seeded: str, tmp_path: Path
) -> None:
    policy = gc.json("run", "services", "get-iam-policy", seeded, "--region", REGION)
    assert {b["role"]: sorted(b["members"]) for b in policy["bindings"]} == await grpc_policy(
        emulator, seeded
    )

    gc.run(
        "run", "services", "add-iam-policy-binding", seeded, "--region", REGION,
        "--member", "user:dev@example.com", "--role", "roles/run.invoker",
    )  # fmt: skip
    assert await grpc_policy(emulator, seeded) == {
        "roles/run.invoker": sorted([PUSH, "user:dev@example.com"])
    }
    gc.run(
        "run", "services", "remove-iam-policy-binding", seeded, "--region", REGION,
        "--member", PUSH, "--role", "roles/run.invoker",
    )  # fmt: skip
    assert await grpc_policy(emulator, seeded) == {"roles/run.invoker": ["user:dev@example.com"]}

    # set-iam-policy from a file read before those changes: its etag is stale -> refused
    stale = tmp_path / "stale.yaml"
    stale.write_text(yaml.safe_dump(policy))
    refused = gc.run(
        "run", "services", "set-iam-policy", seeded, str(stale), "--region", REGION, check=False
    )
    assert refused.returncode != 0 and "ABORTED" in refused.stderr
    # ... and the same file without an etag overwrites (the incident's old policy.yaml)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"bindings": [{"role": "roles/run.invoker", "members": [PUSH]}]}))
    gc.run("run", "services", "set-iam-policy", seeded, str(old), "--region", REGION)
    assert await grpc_policy(emulator, seeded) == {"roles/run.invoker": [PUSH]}
    after = gc.json("run", "services", "get-iam-policy", seeded, "--region", REGION)
    assert after["etag"] != policy["etag"]


def test_missing_service_is_reported_by_gcloud(gc: Gcloud) -> None:
    done = gc.run("run", "services", "describe", "no-such-svc", "--region", REGION, check=False)
    assert done.returncode != 0 and "Cannot find service [no-such-svc]" in done.stderr
    with pytest.raises(GcloudError, match="NOT_FOUND"):
        gc.run("run", "services", "get-iam-policy", "no-such-svc", "--region", REGION)


# ---------------------------------------------------------------------- the controller repairs


def test_controller_repairs_what_gcloud_breaks(ready_orchestrator: Orch, gc: Gcloud) -> None:
    orch = ready_orchestrator
    service = orch.service

    # the env incident: a deploy with --set-env-vars replaces every plain variable
    gc.run("run", "deploy", service, "--region", REGION, "--image", "gcr.io/p/app:3",
           "--set-env-vars", "OTHER=1")  # fmt: skip
    # the IAM incident: the invoker the Orchestrator declares is removed by hand
    gc.run(
        "run", "services", "remove-iam-policy-binding", service, "--region", REGION,
        "--member", MEMBER, "--role", "roles/run.invoker",
    )  # fmt: skip

    def repaired() -> bool:
        state = orch.state()
        return "MODE" in state["env"] and MEMBER in state["iam"].get("roles/run.invoker", [])

    wait_for(repaired, 60, message="the controller restores MODE and the invoker")
    orch.wait("True")
    described = gc.json("run", "services", "describe", service, "--region", REGION)
    env = env_of(described)
    assert env["MODE"] == MODE_VALUE and env["GCP_PROJECT_ID"] == PROJECT and env["OTHER"] == "1"
    assert "FOREIGN" not in env  # gcloud removed it; not the Orchestrator's to restore
    assert described["spec"]["template"]["spec"]["containers"][0]["image"] == "gcr.io/p/app:3"
    policy = gc.json("run", "services", "get-iam-policy", service, "--region", REGION)
    invokers = {
        m for b in policy["bindings"] if b["role"] == "roles/run.invoker" for m in b["members"]
    }
    assert invokers == {MEMBER, FOREIGN}
