"""Faults: 30 % of all emulator calls fail (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED)
while out-of-band deploys keep knocking declared variables and members out. The services
converge, the invariants hold, and the repairs cost few writes (no hammering)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from cloudrun_emulator.testing import EmulatorProcess
from controller.loops import QUOTA_BACKOFF
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for
from tests.reliability.harness import (
    RUN,
    CanaryCollector,
    Target,
    apply,
    delta,
    deploy,
    event_counts,
    events,
    knock_out,
    reads,
    scaled,
    state,
    utc_stamp,
    violations,
    wait_converged,
    writes,
)

ORCHESTRATORS = scaled(5, 20)
ROUNDS = scaled(2, 10)
RATE = 0.3
CODES = ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"]
# RESOURCE_EXHAUSTED reads as quota, whose backoff may reach the controller's cap (300 s) after a
# run of failed checks: a deadline shorter than that would fail a controller working as designed.
# (How often it gets there is the subject of test_quota_backoff_is_not_escalated_by_...)
DEADLINE = QUOTA_BACKOFF[1] + 30
# A repaired knock-out needs one UpdateService and one SetIamPolicy. With 30 % of calls failing,
# ~1.4 attempts per write are expected; 3 per needed write on average is the hammering line.
MAX_WRITES_PER_REPAIR = 2 * 3


@pytest.mark.timeout((ROUNDS + 2) * DEADLINE + 120)
@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": 50, "random_seed": 30}], indirect=True)
def test_converges_through_30_percent_faults(
    crds: ControlPlane,
    ns: str,
    fresh_emulator: EmulatorProcess,
    start_controller: Callable[..., ControllerProcess],
    make_targets: Callable[..., list[Target]],
    canary: CanaryCollector,
    figures: Callable[[str, str, str], None],
) -> None:
    admin = fresh_emulator.admin
    targets = make_targets(ORCHESTRATORS, "flt")
    for t in targets:
        deploy(admin, t)
    admin.set_faults(rate=RATE, codes=CODES)
    controller = start_controller(fresh_emulator)

    started = time.monotonic()
    apply(crds, ns, targets)
    wait_converged(crds, ns, admin, targets, DEADLINE, together=False)
    first_sync = time.monotonic() - started

    before = admin.calls()
    round_seconds: list[float] = []
    for r in range(ROUNDS):
        since = utc_stamp(round_up=True)
        began = time.monotonic()
        for t in targets:
            knock_out(admin, t, canary, r)
        assert all(violations(state(admin, t), t) for t in targets), "the drift did not land"
        wait_converged(
            crds, ns, admin, targets, 90 + 3 * ORCHESTRATORS, since=since, together=False
        )
        round_seconds.append(time.monotonic() - began)
    calls = delta(admin.calls(), before)

    admin.clear_faults()
    objs = wait_converged(crds, ns, admin, targets, 60)
    assert controller.running, controller.tail()

    repairs = ROUNDS * ORCHESTRATORS
    per_repair = writes(calls) / repairs
    counted = sum(o["status"]["drift"]["count"] for o in objs.values())
    reasons = event_counts(events(crds, ns))
    figures(
        "Faults (30 % UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED)",
        f"{ORCHESTRATORS} Orchestrators x {ROUNDS} drift rounds",
        f"first sync {first_sync:.0f} s; each round converged in ≤ {max(round_seconds):.0f} s; "
        f"{per_repair:.1f} write calls per repair (minimum 2), "
        f"{reads(calls) / repairs:.1f} reads per repair; "
        f"{counted} repairs counted in status; Events {dict(reasons)}",
    )
    assert per_repair <= MAX_WRITES_PER_REPAIR, calls


def failed_checks(controller: ControllerProcess, after: int = 0) -> list[dict[str, Any]]:
    return [line for line in controller.log_lines()[after:] if line.get("event") == "check_failed"]


def converged_single(
    crds: ControlPlane, ns: str, emulator: EmulatorProcess, target: Target
) -> None:
    deploy(emulator.admin, target)
    apply(crds, ns, [target])
    wait_converged(crds, ns, emulator.admin, [target], 30)


@pytest.mark.xfail(
    strict=True,
    reason="controller bug: Gateway._get_service calls GetService without READ_RETRY, so a "
    "DEADLINE_EXCEEDED (or INTERNAL) on the read fails the whole check; GetIamPolicy and "
    "GetServiceAccount are retried in the call",
)
def test_reads_are_retried_within_the_call(
    crds: ControlPlane,
    ns: str,
    fresh_emulator: EmulatorProcess,
    start_controller: Callable[..., ControllerProcess],
    make_targets: Callable[..., list[Target]],
) -> None:
    """30 % DEADLINE_EXCEEDED on both reads of a check: the read retry absorbs them, no check
    fails (7 tries in the read retry's 10 s: a check fails with probability 0.3**7)."""
    (target,) = make_targets(1, "rd")
    controller = start_controller(fresh_emulator, resync=1)
    converged_single(crds, ns, fresh_emulator, target)
    admin = fresh_emulator.admin
    mark = len(controller.log_lines())
    admin.set_faults(rate=0.3, codes=["DEADLINE_EXCEEDED"], methods=["GetService", "GetIamPolicy"])
    start = admin.calls().get(f"{RUN}GetIamPolicy", 0)
    # 20 checks that got past GetService (each then reads the IAM policy once or more).
    wait_for(lambda: admin.calls().get(f"{RUN}GetIamPolicy", 0) - start >= 20, 60,
             message="20 checks")
    failed = failed_checks(controller, mark)
    assert not failed, [f"{f.get('reason')}: {f.get('message')}" for f in failed]


@pytest.mark.xfail(
    strict=True,
    reason="controller bug: loops.DriftLoop.schedule counts consecutive failed checks of any "
    "kind, so the first quota refusal after a run of transient failures backs off as if it were "
    "the n-th quota refusal (5 s * 2**(n-1), up to 300 s)",
)
def test_quota_backoff_is_not_escalated_by_transient_failures(
    crds: ControlPlane,
    ns: str,
    fresh_emulator: EmulatorProcess,
    start_controller: Callable[..., ControllerProcess],
    make_targets: Callable[..., list[Target]],
) -> None:
    """Six transient failures, then one quota refusal, then the fault is gone: the next check
    comes after the first quota step (5-10 s), not minutes later."""
    (target,) = make_targets(1, "esc")
    controller = start_controller(fresh_emulator)
    converged_single(crds, ns, fresh_emulator, target)
    admin = fresh_emulator.admin
    mark = len(controller.log_lines())
    admin.set_faults(rate=1.0, codes=["DEADLINE_EXCEEDED"], methods=["GetService"])
    wait_for(lambda: len(failed_checks(controller, mark)) >= 6, 60, message="6 failed checks")
    before = admin.calls().get(f"{RUN}GetService", 0)
    admin.set_faults(rate=1.0, codes=["RESOURCE_EXHAUSTED"], methods=["GetService"])
    wait_for(lambda: admin.calls().get(f"{RUN}GetService", 0) > before, 30,
             message="a check refused for quota")
    admin.clear_faults()
    refused = admin.calls().get(f"{RUN}GetService", 0)
    wait_for(lambda: admin.calls().get(f"{RUN}GetService", 0) > refused,
             2 * QUOTA_BACKOFF[0] + 5, message="the check after the first quota refusal")
