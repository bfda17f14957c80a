"""Secrets: every env value the suite declares or deploys is a canary (CanaryCollector.value). No
controller log line, Event or Orchestrator status of the whole suite may contain one.

Each test's own logs, Events and statuses are scanned when it ends (conftest._canary_scan); the
last test of the session scans everything once more, with the totals in the figures table."""

from __future__ import annotations

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
