"""End to end: a rollout in progress never holds up a spec change or a deletion (issue 15.8).

The emulator's rollouts take ROLLOUT_MS here (Cloud Run's take seconds to minutes). A check
that writes does not wait for its rollout: it says Progressing and lets the object go, so a spec
change is applied, and a deletion completes, while the first rollout is still under way. "While"
is read off the emulator, not a clock: the revision serving before the first write is still the
latest ready one when the spec change shows, and still when the object is gone. (A check that
waited for the rollout under the object's lock would have let the first revision become ready
first.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane, KubectlError
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

PROJECT = "runwarden-e2e"
REGION = "us-west2"
ROLLOUT_MS = 120_000  # far longer than any wait below: every rollout is "in progress" here


def orchestrator(service: str, mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "runwarden.dev/v1alpha1",
        "kind": "Orchestrator",
        "metadata": {"name": "slow"},
        "spec": {
            "service": {"project": PROJECT, "region": REGION, "name": service},
            "env": [{"name": "MODE", "value": mode}],
        },
    }


def get(cp: ControlPlane, namespace: str) -> dict[str, Any] | None:
    try:
        out = cp.kubectl("get", "orchestrator", "slow", "-n", namespace, "-o", "json").stdout
    except KubectlError as exc:
        if "NotFound" in exc.stderr:
            return None
        raise
    return json.loads(out)  # type: ignore[no-any-return]


def ready_reason(obj: dict[str, Any] | None) -> str | None:
    conditions = {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}
    return conditions.get("Ready", {}).get("reason")


@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": ROLLOUT_MS}], indirect=True)
def test_spec_change_and_deletion_do_not_wait_for_a_rollout(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    admin = fresh_emulator.admin
    service = unique_name("slow")
    admin.put_service(PROJECT, REGION, service, env={"MODE": "old"})
    serving = admin.get_service(PROJECT, REGION, service)["latestReadyRevision"]
    assert serving
    proc = ControllerProcess(
        kubeconfig=crds.kubeconfig,
        gcp_endpoint=fresh_emulator.grpc_endpoint,
        namespaces=[namespace],
        log_path=tmp_path / "controller.log",
        resync_seconds=300,  # only spec changes and rollout ends wake a check here
    )

    def apply(mode: str) -> None:
        body = yaml.safe_dump(orchestrator(service, mode))
        crds.kubectl("apply", "-n", namespace, "-f", "-", input=body)

    with proc:
        apply("first")
        # The first write: its revision rolls out, and the check says so instead of waiting.
        wait_for(
            lambda: ready_reason(get(crds, namespace)) == "Progressing",
            60,
            interval=0.3,
            message=f"Ready=False Progressing while the rollout is under way:\n{proc.tail()}",
        )
        first = admin.get_service(PROJECT, REGION, service)
        assert first["env"] == {"MODE": "first"} and first["reconciling"], first
        assert first["latestReadyRevision"] == serving

        # A spec change: applied at once, the first rollout still under way.
        apply("second")
        changed = wait_for(
            lambda: (
                (s := admin.get_service(PROJECT, REGION, service))["env"] == {"MODE": "second"}
                and s
            ),
            60,
            interval=0.2,
            message=f"the spec change applied:\n{proc.tail()}",
        )
        assert changed["latestReadyRevision"] == serving, "waited for the first rollout"
        assert changed["latestCreatedRevision"] != first["latestCreatedRevision"]
        obj = get(crds, namespace)
        assert obj is not None
        wait_for(
            lambda: (
                (o := get(crds, namespace)) is not None
                and (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]
            ),
            60,
            interval=0.3,
            message="status of the changed spec",
        )

        # A deletion: done (finalizer released) while the rollout is still under way.
        crds.kubectl("delete", "orchestrator", "slow", "-n", namespace, "--wait=false")
        wait_for(
            lambda: get(crds, namespace) is None,
            60,
            interval=0.3,
            message=f"the Orchestrator deleted:\n{proc.tail()}",
        )
        after = admin.get_service(PROJECT, REGION, service)
        assert after["reconciling"] and after["latestReadyRevision"] == serving, after
        assert proc.running, proc.tail()
