"""Secrets: every env value the suite declares or deploys is a canary (CanaryCollector.value). No
controller log line, Event or Orchestrator status of the whole suite may contain one.

Each test's own logs, Events and statuses are scanned when it ends (conftest._canary_scan); the
last test of the session scans everything once more, with the totals in the figures table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for
from tests.reliability.harness import (
    FINAL_SCAN,
    PROJECT,
    REGION,
    CanaryCollector,
    Rig,
    condition,
    sa_email,
)


def test_the_scan_finds_a_planted_canary(
    canary: CanaryCollector, control_plane: ControlPlane, tmp_path: Path
) -> None:
    planted = tmp_path / "planted.log"
    value = canary.value("planted")
    planted.write_text(f'{{"event": "ok"}}\n{{"event": "leak", "v": "{value[:20]}"}}\n')
    scan = canary.scan(control_plane, [planted], [])
    assert scan.hits == ["planted.log:2"]
    assert scan.counts["log lines"] == 2


def test_values_stay_out_of_logs_events_and_status(rig: Rig) -> None:
    """The paths most tempted to show a value: a value changed out of band and repaired, the
    same change pending in Observe mode, and a failure message (unknown service account)."""
    admin, canary = rig.admin, rig.canary
    enforce, observe, failing = rig.targets(3, "sec")
    observe.policy = {"mode": "Observe"}
    failing.members = {f"serviceAccount:{sa_email('no-such-account')}"}
    rig.deploy([enforce, observe, failing])
    controller = rig.start_controller(rig.emulator)
    rig.apply([enforce, failing])
    rig.converged([enforce], 30)

    # Someone sets our variable to another secret value; it is put back.
    name = sorted(enforce.env)[0]
    current = rig.state(enforce)
    env = {**current["env"], name: canary.value("changed-by-someone")}
    admin.put_service(PROJECT, REGION, enforce.service, env=env)
    rig.converged([enforce], 30)
    # The service may hold the spec again a moment before the status says so.
    last = wait_for(
        lambda: rig.orchestrators()[enforce.name]["status"]["drift"].get("last"),
        30,
        message="the repair in status.drift.last",
    )
    assert last == [f"env {name} changed"]

    # Observe mode with a different value on the service: pending, named, not shown.
    others = {k: canary.value("other") for k in observe.env}
    admin.put_service(PROJECT, REGION, observe.service, env={**observe.foreign_env, **others})
    rig.apply([observe])
    obj = wait_for(
        lambda: (
            (o := rig.orchestrators().get(observe.name))
            and condition(o).get("reason") == "DriftDetected"
            and o
        ),
        30,
        message="Observe mode pending",
    )
    assert sorted(obj["status"]["drift"]["pending"])[0] == f"env {sorted(observe.env)[0]} changed"
    wait_for(
        lambda: (
            condition(rig.orchestrators()[failing.name], "InvokersSynced").get("reason")
            == "ServiceAccountNotFound"
        ),
        30,
        message="ServiceAccountNotFound",
    )

    scan = canary.scan(rig.plane, [controller.log_path], [rig.ns])
    assert scan.counts["log lines"] and scan.counts["events"] and scan.counts["statuses"] == 3
    assert not scan.hits, scan.hits


def test_values_stay_out_of_the_tenancy_paths(rig: Rig) -> None:
    """Tenancy (--namespace-binding required, impersonation): a repair made as the namespace's
    Google service account, an Orchestrator refused for its project (ProjectNotAllowed), one
    refused for a public member (PublicInvokerRefused), and a failed impersonation after the
    namespace's account changed to one that does not exist (PermissionDenied)."""
    admin, canary, plane, ns = rig.admin, rig.canary, rig.plane, rig.ns
    tenant = sa_email("tenant-runner")
    admin.put_service_account(tenant)
    admin.set_grants(tenant, [PROJECT])
    enforce, elsewhere, public = rig.targets(3, "ten")
    public.members.add("allUsers")
    public.policy = {"allowPublicInvokers": True}
    rig.deploy([enforce, public])
    plane.kubectl(
        "annotate",
        "namespace",
        ns,
        f"runwarden.dev/projects={PROJECT}",
        f"runwarden.dev/google-service-account={tenant}",
    )
    controller = rig.start_controller(
        rig.emulator,
        extra_args=[
            "--namespace-binding=required",
            f"--iam-credentials-endpoint={rig.emulator.admin_url}",
        ],
    )
    rig.apply([enforce, public])
    other = elsewhere.body()
    other["spec"]["service"]["project"] = "other-tenant-prj"
    plane.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(other))
    rig.converged([enforce], 30)
    assert rig.state(enforce)["lastModifier"] == tenant

    # Someone sets our variable to another secret value; it is put back, as the tenant.
    name = sorted(enforce.env)[0]
    current = rig.state(enforce)
    admin.put_service(
        PROJECT, REGION, enforce.service, env={**current["env"], name: canary.value("tenant")}
    )
    rig.converged([enforce], 30)
    assert rig.state(enforce)["lastModifier"] == tenant
    for target, reason in (
        (elsewhere, "ProjectNotAllowed"),
        (public, "PublicInvokerRefused"),
    ):
        wait_for(
            lambda t=target, r=reason: (
                condition(rig.orchestrators().get(t.name)).get("reason") == r
            ),
            30,
            message=reason,
        )

    # The namespace now names an account that does not exist: impersonation fails.
    plane.kubectl(
        "annotate",
        "namespace",
        ns,
        f"runwarden.dev/google-service-account={sa_email('no-such-runner')}",
        "--overwrite",
    )
    current = rig.state(enforce)
    admin.put_service(
        PROJECT, REGION, enforce.service, env={**current["env"], name: canary.value("ghost")}
    )
    wait_for(
        lambda: condition(rig.orchestrators()[enforce.name]).get("reason") == "PermissionDenied",
        30,
        message="PermissionDenied for a failed impersonation",
    )

    scan = canary.scan(plane, [controller.log_path], [ns])
    assert scan.counts["log lines"] and scan.counts["events"] and scan.counts["statuses"] == 3
    assert not scan.hits, scan.hits


def test_no_canary_anywhere_in_the_suite(
    canary: CanaryCollector,
    control_plane: ControlPlane,
    figures: Callable[[str, str, str], None],
) -> None:
    """Runs last (conftest moves it): every log, Event and status the suite registered."""
    if not canary.logs:
        pytest.skip("no reliability scenario ran in this session: nothing to scan")
    scan = canary.scan_all(control_plane)
    figures(
        "Secrets canary (whole reliability suite)",
        f"{canary.issued} canary values, {len(canary.logs)} controller logs, "
        f"{len(canary.namespaces)} namespaces",
        f"{scan.summary()}",
    )
    assert scan.counts["log lines"] > 0 and scan.counts["statuses"] > 0
    assert not scan.hits, scan.hits[:50]


assert test_no_canary_anywhere_in_the_suite.__name__ == FINAL_SCAN
