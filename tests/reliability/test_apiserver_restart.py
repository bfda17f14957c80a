"""apiserver restart: kube-apiserver stops (etcd and its data stay) while the controller runs and
someone changes the services; when it is back the controller, the same process, resumes
watching and the drift made meanwhile is repaired and reported within 30 s."""

from __future__ import annotations

import re
import time

from tests.fixtures.controller import ControllerProcess
from tests.fixtures.wait import wait_for
from tests.reliability.harness import Rig, knock_out, scaled, utc_stamp, violations

RETURN_DEADLINE = 30  # the figure
# The outage lasts until kopf is at this attempt of a request it keeps retrying with a growing
# backoff (1, 1, 2, 3, 5, 8, 13 s...): attempt 5 comes ~7 s into the outage, attempt 8 ~33 s.
OUTAGE_ATTEMPT = scaled(5, 8)
ATTEMPT = re.compile(r"Request attempt #(\d+)/")


def test_drift_during_apiserver_outage_is_repaired_after_its_return(rig: Rig) -> None:
    admin, canary = rig.admin, rig.canary
    targets = rig.targets(2, "api")
    controller = rig.synced(targets)
    pid = controller.pid
    mark = len(controller.log_lines())

    rig.plane.stop_apiserver()
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
        rig.plane.start_apiserver()
    back = time.monotonic()
    since = utc_stamp(round_up=True)

    rig.converged(targets, RETURN_DEADLINE, since=since)
    repaired = time.monotonic() - back
    assert controller.running and controller.pid == pid, "the controller restarted"

    # Watching again: a spec change made now is applied.
    changed = time.monotonic()
    targets[0].declare_env("AFTER_RESTART", canary.value("after-restart"))
    rig.apply(targets)
    rig.converged(targets, RETURN_DEADLINE)
    rig.figures(
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
