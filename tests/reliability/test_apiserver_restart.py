"""apiserver restart: kube-apiserver stops (etcd and its data stay) while the controller runs and
someone changes the services; when it is back the controller, the same process, resumes
watching and the drift made meanwhile is repaired and reported within 30 s."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for
from tests.reliability.harness import (
    CanaryCollector,
    Target,
    apply,
    deploy,
    knock_out,
    scaled,
    utc_stamp,
    violations,
    wait_converged,
)

RETURN_DEADLINE = 30  # the figure
# The outage lasts until kopf is at this attempt of a request it keeps retrying with a growing
# backoff (1, 1, 2, 3, 5, 8, 13 s...): attempt 5 comes ~7 s into the outage, attempt 8 ~33 s.
OUTAGE_ATTEMPT = scaled(5, 8)
ATTEMPT = re.compile(r"Request attempt #(\d+)/")


def test_drift_during_apiserver_outage_is_repaired_after_its_return(
    control_plane: ControlPlane,
    crds: ControlPlane,
    ns: str,
    fresh_emulator: EmulatorProcess,
    start_controller: Callable[..., ControllerProcess],
    make_targets: Callable[..., list[Target]],
    canary: CanaryCollector,
    figures: Callable[[str, str, str], None],
) -> None:
    admin = fresh_emulator.admin
    targets = make_targets(2, "api")
    for t in targets:
        deploy(admin, t)
    controller = start_controller(fresh_emulator)
    apply(crds, ns, targets)
    wait_converged(crds, ns, admin, targets, 30)
    pid = controller.pid
    mark = len(controller.log_lines())

    control_plane.stop_apiserver()
    stopped = time.monotonic()
    try:
        assert all(violations(knock_out(admin, t, canary, i), t) for i, t in enumerate(targets))
        # The controller sees the outage (its watches and status patches fail) and keeps running.
        wait_for(
            lambda: retried_up_to(controller, mark) >= OUTAGE_ATTEMPT,
            120,
            message=f"attempt #{OUTAGE_ATTEMPT} of a request to the stopped apiserver",
        )
        assert controller.running, controller.tail()
    finally:
        control_plane.start_apiserver()
    back = time.monotonic()
    since = utc_stamp(round_up=True)

    wait_converged(crds, ns, admin, targets, RETURN_DEADLINE, since=since)
    repaired = time.monotonic() - back
    assert controller.running and controller.pid == pid, "the controller restarted"

    # Watching again: a spec change made now is applied.
    changed = time.monotonic()
    targets[0].declare_env("AFTER_RESTART", canary.value("after-restart"))
    apply(crds, ns, targets)
    wait_converged(crds, ns, admin, targets, RETURN_DEADLINE)
    figures(
        "apiserver restart (etcd kept)",
        f"1 outage of {back - stopped:.0f} s (to kopf's retry #{OUTAGE_ATTEMPT}), 2 Orchestrators",
        f"same process; drift made during the outage repaired and in status "
        f"{repaired:.1f} s after the apiserver's return (limit {RETURN_DEADLINE} s); "
        f"a spec change after it applied in {time.monotonic() - changed:.1f} s",
    )


def retried_up_to(controller: ControllerProcess, mark: int) -> int:
    """The highest n of kopf's "Request attempt #n/9 failed; will retry" lines since ``mark``."""
    found = [ATTEMPT.match(str(line.get("event", ""))) for line in controller.log_lines()[mark:]]
    return max((int(m.group(1)) for m in found if m), default=0)
