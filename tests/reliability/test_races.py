"""etag races: while the spec keeps changing (so the controller keeps writing), an out-of-band
writer adds and removes its own members and variables with read-modify-writes of its own. Both
sides use etags; afterwards the writer's final state and the final spec both hold, nothing is
duplicated, and what either side removed stays removed."""

from __future__ import annotations

import asyncio
import queue
import random
import threading

import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, options_pb2

from controller.gcp.clients import Clients, make_clients
from tests.reliability.harness import (
    PROJECT,
    REGION,
    CanaryCollector,
    Rig,
    Target,
    event_counts,
    metric_sum,
    scaled,
    scrape,
)

ROUNDS = scaled(20, 100)
CONFLICTS = (gexc.Aborted, gexc.Conflict, gexc.FailedPrecondition)


class OutOfBandWriter:
    """Someone else's tooling on the same service: it owns the WRITER_* variables and the
    writer-* members and edits them read-modify-write, retrying when its etag is stale."""

    def __init__(self, endpoint: str, target: Target, canary: CanaryCollector, seed: int) -> None:
        self.target = target
        self.canary = canary
        self.rng = random.Random(seed)
        self.members = [f"user:writer-{k}@example.com" for k in range(5)]
        self.variables = [f"WRITER_{k}" for k in range(5)]
        self.conflicts = 0
        self.writes = 0
        self.errors: list[BaseException] = []
        self.ticks: queue.Queue[int | None] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        self._clients: Clients = self._loop.run_until_complete(self._connect(endpoint))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.resource = f"projects/{PROJECT}/locations/{REGION}/services/{target.service}"

    @staticmethod
    async def _connect(endpoint: str) -> Clients:
        return make_clients(endpoint)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self.ticks.put(None)
        self._thread.join(timeout)
        self._loop.run_until_complete(self._clients.close())
        self._loop.close()
        assert not self._thread.is_alive(), "the writer did not finish"

    def _run(self) -> None:
        while (tick := self.ticks.get()) is not None:
            try:
                self._loop.run_until_complete(self.round(tick))
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
                return

    async def round(self, tick: int) -> None:
        t = self.target
        member = self.rng.choice(self.members)
        add = member not in t.foreign_members
        await self._edit_members(member, add)
        if add:
            t.foreign_members.add(member)
            t.gone_members.discard(member)
        else:
            t.foreign_members.discard(member)
            t.gone_members.add(member)

        name = self.rng.choice(self.variables)
        value = (
            None
            if name in t.foreign_env and self.rng.random() < 0.5
            else (self.canary.value(f"writer-{tick}"))
        )
        await self._edit_env(name, value)
        if value is None:
            t.foreign_env.pop(name, None)
            t.gone_env.add(name)
        else:
            t.foreign_env[name] = value
            t.gone_env.discard(name)

    async def _edit_members(self, member: str, add: bool) -> None:
        role = self.target.role
        while True:
            policy = await self._clients.run.get_iam_policy(
                request=iam_policy_pb2.GetIamPolicyRequest(
                    resource=self.resource,
                    options=options_pb2.GetPolicyOptions(requested_policy_version=3),
                )
            )
            binding = next(
                (b for b in policy.bindings if b.role == role and not b.HasField("condition")), None
            )
            if binding is None:
                binding = policy.bindings.add(role=role)
            wanted = (set(binding.members) | {member}) if add else (set(binding.members) - {member})
            del binding.members[:]
            binding.members.extend(sorted(wanted))
            try:
                request = iam_policy_pb2.SetIamPolicyRequest(resource=self.resource, policy=policy)
                await self._clients.run.set_iam_policy(request=request)
            except CONFLICTS:
                self.conflicts += 1
                continue
            self.writes += 1
            return

    async def _edit_env(self, name: str, value: str | None) -> None:
        while True:
            service = await self._clients.run.get_service(name=self.resource)
            container = service.template.containers[0]
            kept = [e for e in container.env if e.name != name]
            if value is not None:
                kept.append(run_v2.EnvVar(name=name, value=value))
            del container.env[:]
            container.env.extend(kept)
            try:
                operation = await self._clients.run.update_service(service=service)
            except CONFLICTS:
                self.conflicts += 1
                continue
            self.writes += 1
            try:
                await operation.result(timeout=30)
            except gexc.GoogleAPICallError:
                pass  # superseded by a later update, which started from this one (etag)
            return


def change_spec(target: Target, canary: CanaryCollector, r: int) -> None:
    """Round r's spec change: a new value for one variable, a member in or out, and every
    third round a variable declared or dropped, so the controller has something to write."""
    first = sorted(v for v in target.env if not v.startswith("TOGGLE"))[0]
    target.declare_env(first, canary.value(f"spec-{r}"))
    member = f"group:spec-{r % 3}@example.com"
    if member in target.members:
        target.undeclare_member(member)
    else:
        target.declare_member(member)
    if r % 3 == 2:
        if "TOGGLE_VAR" in target.env:
            target.undeclare_env("TOGGLE_VAR")
        else:
            target.declare_env("TOGGLE_VAR", canary.value(f"toggle-{r}"))


@pytest.mark.timeout(120 + ROUNDS * 6)
@pytest.mark.parametrize("fresh_emulator", [{"rollout_ms": 100}], indirect=True)
def test_concurrent_writer_and_spec_changes_both_hold(rig: Rig) -> None:
    (target,) = rig.targets(1, "race")
    controller = rig.synced([target], metrics=True)

    writer = OutOfBandWriter(rig.emulator.grpc_endpoint, target, rig.canary, seed=ROUNDS)
    writer.start()
    try:
        for r in range(ROUNDS):
            change_spec(target, rig.canary, r)
            rig.apply([target])
            writer.ticks.put(r)  # the writer's edits overlap the controller's reaction
    finally:
        writer.join(120)
    assert not writer.errors, writer.errors

    objs = rig.converged([target], 60)
    managed = objs[target.name]["status"]["managed"]
    assert set(managed["env"]) == set(target.env), "status.managed.env is not the declared set"
    assert set(managed["invokers"]) == target.members, "status.managed.invokers is not declared"
    assert controller.running, controller.tail()

    metrics = scrape(controller.metrics_port)  # type: ignore[attr-defined]
    aborted = metric_sum(metrics, "runwarden_gcp_requests_total", code="ABORTED")
    reasons = event_counts(rig.events())
    rig.figures(
        "etag races (out-of-band writer + spec changes)",
        f"{ROUNDS} rounds",
        f"final state of both holds; writer: {writer.writes} writes, {writer.conflicts} etag "
        f"conflicts retried; controller: {aborted:.0f} ABORTED answers retried; "
        f"Events {dict(reasons)}",
    )
