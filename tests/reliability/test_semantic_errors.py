"""Semantic errors, the second half of the bad input catalog (the first half, admission, is
tests/crd/test_bad_input.py): specs the apiserver accepts but Google cannot satisfy. Each becomes a
condition naming the problem; the retries are visible in the emulator's call counters, are not a
hot loop and slow down; the controller neither crashes nor restarts.

One controller serves three Orchestrators whose retries show up on different counters:
- ``missing``: its service does not exist (GetService NOT_FOUND) -> ServiceNotFound. Its checks
  are the GetService calls not followed by a GetIamPolicy (the other two read both).
- ``ghost``: declares a service account that does not exist -> ServiceAccountNotFound. Its
  checks are the GetServiceAccount calls (nothing else looks up an account).
- ``denied``: SetIamPolicy answers PERMISSION_DENIED -> PermissionDenied. Its checks are the
  SetIamPolicy calls (nothing else needs to write).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane, namespace_name
from tests.fixtures.wait import wait_for
from tests.reliability.harness import (
    IAM,
    PROJECT,
    REGION,
    RUN,
    CallSampler,
    CanaryCollector,
    Target,
    apply,
    condition,
    event_counts,
    events,
    gaps,
    make_target,
    orchestrators,
    sa_email,
    scaled,
    state,
    violations,
)

RESYNC = 2.0
WINDOW = scaled(24, 90)  # seconds of counters watched once all three conditions are up


def _missing(calls: Mapping[str, int]) -> int:
    return calls.get(f"{RUN}GetService", 0) - calls.get(f"{RUN}GetIamPolicy", 0)


SERIES = {
    "missing": _missing,
    "ghost": lambda calls: calls.get(f"{IAM}GetServiceAccount", 0),
    "denied": lambda calls: calls.get(f"{RUN}SetIamPolicy", 0),
}
EXPECTED = {
    "missing": ("Ready", "ServiceNotFound"),
    "ghost": ("InvokersSynced", "ServiceAccountNotFound"),
    "denied": ("InvokersSynced", "PermissionDenied"),
}


@dataclass
class Observation:
    targets: dict[str, Target]
    objs: dict[str, dict[str, Any]]
    attempts: dict[str, list[float]]  # monotonic times of each Orchestrator's retries
    services: dict[str, dict[str, Any] | None]
    log: list[dict[str, Any]]
    running: bool
    events: dict[str, int]
    window: float


@pytest.fixture(scope="module")
def observed(
    crds: ControlPlane,
    kubeconfig: str,
    canary: CanaryCollector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Observation]:
    """Run the scenario once for the module's tests (its window is the expensive part)."""
    ns = namespace_name("semantic-errors")
    crds.kubectl("create", "namespace", ns)
    canary.watch_namespace(ns)
    tmp = tmp_path_factory.mktemp("semantic")
    emulator = EmulatorProcess(log_dir=tmp).start()
    controller = ControllerProcess(
        kubeconfig=kubeconfig,
        gcp_endpoint=emulator.grpc_endpoint,
        namespaces=[ns],
        log_path=tmp / "controller.log",
        resync_seconds=RESYNC,
        status_heartbeat=0,
    )
    canary.watch_log(controller.log_path)
    try:
        yield run(crds, ns, emulator, controller, canary)
    finally:
        controller.stop()
        emulator.stop()
        scan = canary.scan(crds, [controller.log_path], [ns])
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        assert not scan.hits, f"canary values leaked: {scan.hits[:20]}"


def run(
    crds: ControlPlane,
    ns: str,
    emulator: EmulatorProcess,
    controller: ControllerProcess,
    canary: CanaryCollector,
) -> Observation:
    admin = emulator.admin
    missing = make_target(canary, "missing")
    ghost = make_target(canary, "ghost")
    ghost_sa = f"serviceAccount:{sa_email('ghost-account')}"
    ghost.members = {"group:ghost-team@example.com", ghost_sa}
    ghost.service_accounts = set()
    denied = make_target(canary, "denied")
    denied.members = {"group:denied-team@example.com", "user:denied-ops@example.com"}
    denied.service_accounts = set()
    targets = {"missing": missing, "ghost": ghost, "denied": denied}

    # ghost and denied: the service already holds their variables, so a check writes nothing
    # but the one member each cannot get.
    for t in (ghost, denied):
        present = t.members - {ghost_sa, "user:denied-ops@example.com"}
        admin.put_service(
            PROJECT,
            REGION,
            t.service,
            env={**t.foreign_env, **t.env},
            invokers={t.role: sorted(t.foreign_members | present), **t.other_roles},
        )
    admin.set_faults(rate=1.0, codes=["PERMISSION_DENIED"], methods=["SetIamPolicy"])
    controller.start()
    apply(crds, ns, list(targets.values()))

    def all_failing() -> bool:
        objs = orchestrators(crds, ns)
        return all(
            condition(objs.get(t.name), kind).get("reason") == reason
            for t, (kind, reason) in zip(targets.values(), EXPECTED.values(), strict=True)
        )

    wait_for(all_failing, 30, message="the three conditions")
    before_events = event_counts(events(crds, ns))
    with CallSampler(admin, interval=0.1) as sampler:
        end = time.monotonic() + WINDOW
        wait_for(lambda: time.monotonic() >= end or not controller.running, WINDOW + 5)
    after_events = event_counts(events(crds, ns))
    services: dict[str, dict[str, Any] | None] = {}
    for key, t in targets.items():
        try:
            services[key] = state(admin, t)
        except KeyError:
            services[key] = None
    return Observation(
        targets=targets,
        objs=orchestrators(crds, ns),
        attempts={key: sampler.increments(fn) for key, fn in SERIES.items()},
        services=services,
        log=controller.log_lines(),
        running=controller.running,
        events={k: after_events[k] - before_events[k] for k in after_events},
        window=WINDOW,
    )


def test_semantic_errors_become_conditions_without_crash_or_hot_loop(
    observed: Observation, figures: Any
) -> None:
    obs = observed
    for key, (kind, reason) in EXPECTED.items():
        obj = obs.objs[obs.targets[key].name]
        assert condition(obj)["status"] == "False", key
        assert condition(obj, kind)["reason"] == reason, (key, condition(obj, kind))
    assert obs.targets["missing"].service in condition(obs.objs["missing"])["message"]
    assert "ghost-account" in condition(obs.objs["ghost"], "InvokersSynced")["message"]
    assert condition(obs.objs["ghost"], "EnvSynced")["status"] == "True"

    # Nothing was created for the missing service; nobody's members or variables were lost.
    assert obs.services["missing"] is None
    for key in ("ghost", "denied"):
        svc = obs.services[key]
        assert svc is not None
        assert not violations(svc, obs.targets[key], declared=False)

    # No crash, no restart loop, no exception escaping to kopf.
    assert obs.running
    assert sum(1 for line in obs.log if line.get("event") == "started") == 1
    assert not [line for line in obs.log if escaped(line)]

    # Retried, but not in a hot loop: never faster than the resync period (-10 % jitter).
    ceiling = int(obs.window / (0.9 * RESYNC)) + 1
    counts = {key: len(times) for key, times in obs.attempts.items()}
    figures(
        "Semantic errors (missing service, unknown SA, PERMISSION_DENIED on SetIamPolicy)",
        f"3 Orchestrators, {obs.window:.0f} s of counters",
        f"conditions ServiceNotFound / ServiceAccountNotFound / PermissionDenied; retries in "
        f"the window {counts} (ceiling {ceiling}); Events in the window {obs.events}; "
        "no crash, 1 start",
    )
    for key, n in counts.items():
        assert 1 <= n <= ceiling, (key, n, ceiling)


def escaped(line: Mapping[str, Any]) -> bool:
    """A log line of an exception escaping the check (kopf then retries the handler itself)."""
    text = str(line.get("event", ""))
    return (
        "exception" in line
        or "Traceback" in text
        or "failed with an exception" in text
        or (line.get("logger") == "kopf.objects" and line.get("level") in ("error", "critical"))
    )


def test_semantic_error_retries_slow_down(observed: Observation) -> None:
    slowing = {}
    for key, times in observed.attempts.items():
        intervals = gaps(times)
        # Slowed down: the gaps grow, or so few retries that most gaps exceed the resync a lot.
        slowing[key] = len(times) <= observed.window / (3 * RESYNC) or (
            len(intervals) >= 2 and intervals[-1] >= 1.5 * intervals[0]
        )
    assert all(slowing.values()), {
        k: [round(g, 1) for g in gaps(t)] for k, t in observed.attempts.items()
    }
