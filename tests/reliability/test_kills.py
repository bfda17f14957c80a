"""Kills: SIGKILL the controller at random moments, half of them right after an UpdateService
was accepted and before its rollout finished (between a write and its verification). Restarted,
it converges every time, and the Orchestrators get no storm of Events.

With 2 replicas and leader election (as the Deployment runs them) the kills alternate between
the leader and the standby, by name (the Lease's holder), mid-write or at a random moment. The
leader killed: the standby takes the Lease and repairs what is left, then the killed one comes
back as the standby. The standby killed: nothing changes, the same leader (same process, same
term) repairs the drift alone, and the restarted standby stands by again. Every drift round is
repaired by exactly one UpdateService and one SetIamPolicy per service, counted per replica by
the emulator (no double write, whoever was killed), and nothing is lost.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.fixtures.wait import wait_for
from tests.reliability.harness import (
    RUN,
    Rig,
    double_writes,
    event_counts,
    knock_out,
    scaled,
    writes_since,
)

KILLS = scaled(5, 20)
ORCHESTRATORS = 3
ROLLOUT_MS = 600  # the window between UpdateService and its verification read
CONVERGE = 60
# Per Orchestrator: one Synced, then per knock-out DriftDetected + DriftRepaired, and room for one
# more pair when a kill interrupted the repair. More than that is a storm.
EVENTS_PER_KILL = 4
# The leader's Lease (--leader-election-lease-seconds, the Deployment's default): a standby
# takes over once it has seen the record unchanged this long, then starts kopf.
LEASE_SECONDS = 10


@pytest.mark.timeout(120 + KILLS * (CONVERGE + 60))
@pytest.mark.parametrize("replicas", [1, 2], ids=["1-replica", "2-replicas"])
@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": ROLLOUT_MS}], indirect=True)
def test_sigkill_at_random_moments_then_converges_without_event_storm(rig: Rig) -> None:
    admin = rig.admin
    rng = random.Random(KILLS)
    targets = rig.targets(ORCHESTRATORS, "kill")
    group = rig.synced_replicas(targets, CONVERGE)
    n = group.count

    mid_write = 0
    leader_kills = 0
    recovery: list[float] = []
    takeovers: list[float] = []
    for k in range(KILLS):
        leader = group.leader()
        # One replica: always it. Two: the leader, then the standby, by turns.
        victim = leader if k % n == 0 else group.other(leader)
        successor = leader  # who leads after the kill (the same one, unless it is the victim)
        leader_pid = leader.pid
        before = group.writes()
        updates = admin.calls().get(f"{RUN}UpdateService", 0)
        for t in targets:
            knock_out(admin, t, rig.canary, k)
        if (k // n) % 2 == 0:
            # Right after the leader's UpdateService is accepted: its rollout is pending, the
            # read-back that verifies it (and the status patch) has not happened.
            wait_for(
                lambda seen=updates: admin.calls().get(f"{RUN}UpdateService", 0) > seen,
                30,
                interval=0.02,
                message="the controller's repair write",
            )
            group.kill(victim)
            mid_write += victim is leader and any(rig.state(t)["reconciling"] for t in targets)
        else:
            # A random point of the repair: after a random number (0 to 6) of Google calls since
            # the drift, so the kill lands before the check, amid its reads or after its writes.
            calls = sum(admin.calls().values())
            more = rng.randint(0, 6)
            wait_for(
                lambda seen=calls, n=more: sum(admin.calls().values()) >= seen + n,
                30,
                interval=0.02,
                message=f"{more} more Google calls before the kill",
            )
            group.kill(victim)
        began = time.monotonic()
        if not group.elected:
            group.restart(victim)
        elif victim is leader:
            leader_kills += 1
            successor = group.other(victim)
            group.wait_leads(successor, LEASE_SECONDS + CONVERGE)
            takeovers.append(time.monotonic() - began)
            # Only now the kubelet's restart: the same identity restarted before the standby
            # took over would take its own Lease back at once (a new term of the same pod).
            group.restart(victim)
            assert group.lines(victim, "standby") and not group.lines(victim, "started"), (
                victim.tail()
            )
        else:
            group.restart(victim)
            assert group.lines(victim, "standby"), victim.tail()
        rig.converged(targets, CONVERGE)
        recovery.append(time.monotonic() - began)

        wrote = writes_since(group.writes(), before)
        assert not double_writes(wrote, ORCHESTRATORS), (k, double_writes(wrote, ORCHESTRATORS))
        if group.elected and victim is not leader:
            # The standby's death changed nothing: same leader process, same term, sole writer.
            assert leader.running and leader.pid == leader_pid, leader.tail()
            assert group.holder() == group.identity(leader)
            assert not group.lines(leader, "leader_lost"), leader.tail()
            assert set(wrote) == {group.identity(leader)}, wrote
        elif group.elected:
            # The killed leader, back as the standby, wrote nothing since.
            assert set(wrote) <= {group.identity(victim), group.identity(successor)}, wrote
            assert group.holder() == group.identity(successor)

    reasons = event_counts(rig.events())
    total = sum(reasons.values())
    starts = group.starts()
    figures = (
        f"converged after every kill, in ≤ {max(recovery):.0f} s "
        f"(mean {sum(recovery) / len(recovery):.1f} s); {mid_write} kills landed mid-rollout "
        f"between a write and its verification; {total} Events in all {dict(reasons)}"
    )
    counts = f"{KILLS} kills, {ORCHESTRATORS} Orchestrators"
    if group.elected:
        counts = f"{KILLS} kills ({leader_kills} of the leader), {ORCHESTRATORS} Orchestrators"
        figures = (
            f"standby took over ≤ {max(takeovers):.0f} s after each SIGKILL of the leader "
            f"(lease {LEASE_SECONDS} s); {KILLS - leader_kills} standby kills changed nothing; "
            f"each drift repaired by exactly 1 UpdateService + 1 SetIamPolicy per service, "
            f"counted per replica; {figures}"
        )
    rig.figures("Kills (SIGKILL, restart)", counts, figures)
    # One "started" per term as the reconciling leader: the first, and one per leader kill.
    assert starts == 1 + (leader_kills if group.elected else KILLS), (
        f"{starts} starts for {KILLS} kills: a restart loop?"
    )
    assert mid_write >= 1, "no kill landed between a write and its verification"
    assert total <= ORCHESTRATORS * (1 + EVENTS_PER_KILL * KILLS), dict(reasons)
