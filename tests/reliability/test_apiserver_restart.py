"""apiserver restart: kube-apiserver stops (etcd and its data stay) while the controller runs and
someone changes the services; when it is back the controller, the same process, resumes
watching and the drift made meanwhile is repaired and reported within 30 s.

With 2 replicas and leader election the leader cannot renew its Lease during the outage: once
its renew deadline has passed by its own clock it stops writing (fencing) and exits to be
restarted as a standby (exit 3, as client-go's leader election does); the standby cannot reach
the Lease either. A drift made after that waits for the apiserver: once it is back, exactly one
replica holds the Lease and reconciles, the other stands by, and that one leader repairs the
drift alone (one UpdateService and one SetIamPolicy per service, counted per replica).
"""

from __future__ import annotations

import re
import time

import pytest

from controller.operator.handlers import LEASE_LOST_EXIT
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.wait import wait_for
from tests.reliability.harness import (
    REPLICA_DEADLINE,
    Replicas,
    Rig,
    Target,
    double_writes,
    knock_out,
    scaled,
    utc_stamp,
    violations,
    writes_since,
)

RETURN_DEADLINE = 30  # the figure
# The outage lasts until kopf is at this attempt of a request it keeps retrying with a growing
# backoff (1, 1, 2, 3, 5, 8, 13 s...): attempt 5 comes ~7 s into the outage, attempt 8 ~33 s.
OUTAGE_ATTEMPT = scaled(5, 8)
ATTEMPT = re.compile(r"Request attempt #(\d+)/")
TARGETS = 2


@pytest.mark.parametrize("replicas", [1, 2], ids=["1-replica", "2-replicas"])
def test_drift_during_apiserver_outage_is_repaired_after_its_return(rig: Rig) -> None:
    admin, canary = rig.admin, rig.canary
    targets = rig.targets(TARGETS, "api")
    group = rig.synced_replicas(targets)
    controller = group.leader()
    pid = controller.pid
    mark = len(controller.log_lines())
    standby = group.other(controller) if group.elected else None

    rig.plane.stop_apiserver()
    stopped = time.monotonic()
    try:
        assert all(violations(knock_out(admin, t, canary, i), t) for i, t in enumerate(targets))
        if standby is None:
            # The controller sees the outage (its watches and status patches fail) and keeps
            # running.
            wait_for(
                lambda: retried_up_to(controller, mark) >= OUTAGE_ATTEMPT,
                120,
                message=f"attempt #{OUTAGE_ATTEMPT} of a request to the stopped apiserver",
            )
            assert controller.running, controller.tail()
        else:
            fenced = fence_during_outage(rig, group, targets, controller, standby)
    finally:
        rig.plane.start_apiserver()
    back = time.monotonic()
    since = utc_stamp(round_up=True)

    if standby is None:
        rig.converged(targets, RETURN_DEADLINE, since=since)
        repaired = time.monotonic() - back
        assert controller.running and controller.pid == pid, "the controller restarted"
        outcome = "same process"
    else:
        before = fenced
        leader = one_leader_after_return(group, controller)
        rig.converged(targets, RETURN_DEADLINE + REPLICA_DEADLINE, since=since)
        repaired = time.monotonic() - back
        wrote = writes_since(group.writes(), before)
        # The drift made while nobody could hold the Lease: repaired once, by the leader alone.
        assert not double_writes(wrote, TARGETS), double_writes(wrote, TARGETS)
        assert set(wrote) == {group.identity(leader)}, wrote
        assert group.holder() == group.identity(leader)
        assert group.lines(group.other(leader), "standby"), group.other(leader).tail()
        who = "the old leader, restarted" if leader is controller else "the standby"
        outcome = (
            f"the leader fenced itself (no write) and exited {LEASE_LOST_EXIT} during the "
            f"outage; after it exactly one leader ({who}), the other standing by; the drift made "
            "while nobody held the Lease repaired once, by that leader alone"
        )

    # Watching again: a spec change made now is applied.
    changed = time.monotonic()
    targets[0].declare_env("AFTER_RESTART", canary.value("after-restart"))
    rig.apply(targets)
    rig.converged(targets, RETURN_DEADLINE)
    rig.figures(
        "apiserver restart (etcd kept)",
        f"1 outage of {back - stopped:.0f} s "
        + (f"(to kopf's retry #{OUTAGE_ATTEMPT})" if standby is None else "(to the fencing)")
        + f", {TARGETS} Orchestrators",
        f"{outcome}; drift made during the outage repaired and in status "
        f"{repaired:.1f} s after the apiserver's return (limit "
        f"{RETURN_DEADLINE if standby is None else RETURN_DEADLINE + REPLICA_DEADLINE} s); "
        f"a spec change after it applied in {time.monotonic() - changed:.1f} s",
    )


def fence_during_outage(
    rig: Rig,
    group: Replicas,
    targets: list[Target],
    leader: ControllerProcess,
    standby: ControllerProcess,
) -> dict[str, dict[str, int]]:
    """With the apiserver down: the leader gives its Lease up by its own clock and exits; then
    a second drift, which nobody may repair while nobody can hold the Lease. The write counts
    from then on."""
    wait_for(
        lambda: group.lines(leader, "leader_lost"),
        REPLICA_DEADLINE,
        message=f"the leader fenced by its renew deadline\n{leader.tail()}",
    )
    fenced = group.writes()
    # Another variable and member of each (the first drift's repair may have been made).
    for i, t in enumerate(targets):
        assert violations(knock_out(rig.admin, t, rig.canary, i + 1), t)
    # Two more of the standby's Lease attempts (every 2 s, failing): more than a resync period
    # (2 s) for a replica that still wrote to repair the drift.
    tried = len(group.lines(standby, "lease_request_failed"))
    wait_for(
        lambda: len(group.lines(standby, "lease_request_failed")) >= tried + 2,
        REPLICA_DEADLINE,
        message=f"the standby retries the Lease\n{standby.tail()}",
    )
    assert standby.running, standby.tail()
    assert writes_since(group.writes(), fenced) == {}, "a write while nobody held the Lease"
    return fenced


def one_leader_after_return(group: Replicas, old: ControllerProcess) -> ControllerProcess:
    """The old leader exits LEASE_LOST_EXIT (if it has not yet) and is restarted, as the kubelet
    does; then exactly one replica holds the Lease and has started, the other stands by."""
    wait_for(lambda: not old.running, REPLICA_DEADLINE, message="the old leader exits")
    assert old.proc is not None and old.proc.returncode == LEASE_LOST_EXIT, old.tail()
    group.restart(old)

    def settled() -> ControllerProcess | None:
        holder = group.holder()
        leader = group.procs.get(holder)
        if leader is None or not group.lines(leader, "started"):
            return None
        return leader

    leader = wait_for(settled, REPLICA_DEADLINE, message="one leader after the apiserver's return")
    other = group.other(leader)
    assert other.running and not group.lines(other, "started"), other.tail()
    group.wait_standing_by(other)
    return leader


def retried_up_to(controller: ControllerProcess, mark: int) -> int:
    """The highest n of kopf's "Request attempt #n/9 failed; will retry" lines since ``mark``."""
    found = [ATTEMPT.match(str(line.get("event", ""))) for line in controller.log_lines()[mark:]]
    return max((int(m.group(1)) for m in found if m), default=0)
