"""Revisions and rollouts: a changed template creates a revision `<svc>-<generation:05d>-<abc>`
that settles at once, or after `--rollout-ms` (the service `reconciling` meanwhile); a newer
revision supersedes a pending one; a write's operation completes when its revision settles."""

from __future__ import annotations

import asyncio
import random
import string
from typing import Any

from google.rpc import code_pb2

from ..events import AuditEvent, AuditSink
from . import traffic
from .directory import Directory
from .operations import Operations
from .records import ConditionPb, OperationEntry, Revision, Rollout, ServiceEntry, now

SUCCEEDED = ConditionPb.CONDITION_SUCCEEDED
FAILED = ConditionPb.CONDITION_FAILED
PENDING = ConditionPb.CONDITION_PENDING


class Revisions:
    def __init__(
        self,
        directory: Directory,
        operations: Operations,
        emit: AuditSink,
        *,
        rollout_ms: int,
        rng: random.Random,
    ) -> None:
        self.directory = directory
        self.operations = operations
        self.emit = emit
        self.rollout_ms = rollout_ms
        self.rng = rng
        self.fail_next_revision = False  # the admin API's failNextRevision fault

    def new_name(self, service: str, generation: int) -> str:
        suffix = "".join(self.rng.choice(string.ascii_lowercase) for _ in range(3))
        return f"{service}-{generation:05d}-{suffix}"

    def create(
        self,
        entry: ServiceEntry,
        requested: str,
        template: bytes,
        op: OperationEntry,
        *,
        immediate: bool,
        principal: str,
        method: str,
        request: Any,
    ) -> bool:
        """A new revision for the service's changed template (named `requested` if given);
        settle it now or start its rollout. True if it is going to fail."""
        svc = entry.service
        revision = requested or self.new_name(entry.key.service, svc.generation)
        entry.revisions[revision] = Revision(revision, svc.generation, template)
        svc.latest_created_revision = entry.key.revision_name(revision)
        fail = False
        if not immediate and self.fail_next_revision:
            fail = True
            self.fail_next_revision = False
        if entry.pending is not None:
            self.supersede(entry)
        if immediate or self.rollout_ms <= 0:
            self.settle(entry, revision, fail)
        else:
            self._start_rollout(
                entry, Rollout(revision, op.op.name, fail, None, principal, method, request)
            )
        return fail

    def settle(self, entry: ServiceEntry, revision: str, fail: bool) -> None:
        """The revision finished rolling out (or failed to)."""
        svc = entry.service
        rev = entry.revisions.get(revision)
        svc.reconciling = False
        svc.observed_generation = svc.generation
        del svc.conditions[:]
        if fail:
            if rev is not None:
                rev.failed = True
            message = (
                f"Revision '{revision}' is not ready and cannot serve traffic. The user-provided "
                "container failed to start and listen on the port defined provided by the "
                "PORT=8080 environment variable within the allocated timeout."
            )
            svc.terminal_condition.CopyFrom(
                ConditionPb(
                    type_="Ready",
                    state=FAILED,
                    message=message,
                    last_transition_time=now(),
                    severity=ConditionPb.ERROR,
                    reason=ConditionPb.REVISION_FAILED,
                )
            )
            svc.conditions.add(
                type_="ConfigurationsReady",
                state=FAILED,
                message=message,
                last_transition_time=now(),
                severity=ConditionPb.ERROR,
            )
            svc.conditions.add(type_="RoutesReady", state=SUCCEEDED, last_transition_time=now())
        else:
            if rev is not None:
                rev.ready = True
            svc.latest_ready_revision = entry.key.revision_name(revision)
            svc.terminal_condition.CopyFrom(
                ConditionPb(type_="Ready", state=SUCCEEDED, last_transition_time=now())
            )
            svc.conditions.add(type_="RoutesReady", state=SUCCEEDED, last_transition_time=now())
            svc.conditions.add(
                type_="ConfigurationsReady", state=SUCCEEDED, last_transition_time=now()
            )
        traffic.route(svc)  # a LATEST target now reaches the new revision; pinned ones do not
        entry.touched()

    def _start_rollout(self, entry: ServiceEntry, rollout: Rollout) -> None:
        svc = entry.service
        svc.reconciling = True
        # While a rollout is under way real Cloud Run reports the terminal condition
        # CONDITION_PENDING, keeping the previous transition time, and `reconciling: true`
        # (Config Connector's recording of real traffic, runservicebasic/_vcr_cassettes/tf.yaml:
        # the PATCH's operation metadata has `"terminalCondition": {"type": "Ready", "state":
        # "CONDITION_PENDING", ...}`, `"observedGeneration": "1"` with `"generation": "2"`).
        previous = svc.terminal_condition.last_transition_time
        pending = ConditionPb(type_="Ready", state=PENDING)
        if previous.seconds or previous.nanos:
            pending.last_transition_time.CopyFrom(previous)
        else:
            pending.last_transition_time.CopyFrom(now())
        svc.terminal_condition.CopyFrom(pending)
        loop = asyncio.get_running_loop()
        rollout.handle = loop.call_later(self.rollout_ms / 1000, self._rollout_done, entry, rollout)
        entry.pending = rollout

    def _rollout_done(self, entry: ServiceEntry, rollout: Rollout) -> None:
        if entry.pending is not rollout or self.directory.services.get(entry.key.name) is not entry:
            return
        entry.pending = None
        self.settle(entry, rollout.revision, rollout.fail)
        op = self.operations.find(rollout.operation)
        if op is not None:
            self.complete_operation(
                entry, op, rollout.fail, rollout.principal, rollout.method, rollout.request
            )

    def supersede(self, entry: ServiceEntry) -> None:
        """Abort the service's pending rollout, if any: a newer write replaces it."""
        rollout = entry.pending
        if rollout is None:
            return
        entry.pending = None
        if rollout.handle is not None:
            rollout.handle.cancel()
        op = self.operations.find(rollout.operation)
        if op is not None:
            self.operations.finish(
                op,
                error=(
                    code_pb2.ABORTED,
                    f"Revision '{rollout.revision}' was superseded by a newer revision.",
                ),
            )

    def complete_operation(
        self,
        entry: ServiceEntry,
        op: OperationEntry,
        fail: bool,
        principal: str,
        method: str,
        request: Any,
    ) -> None:
        """Finish a write's operation with the service as it now is (v2 writes: audit `last`)."""
        result = entry.snapshot()
        error = None
        if fail:
            error = (code_pb2.FAILED_PRECONDITION, result.terminal_condition.message)
        self.operations.finish(op, response=result, error=error)
        if method.startswith("google.cloud.run.v2"):
            self.emit(
                AuditEvent(
                    method=method,
                    key=entry.key,
                    principal=principal,
                    request=request,
                    response=result,
                    operation_id=op.op.name,
                    last=True,
                    status=error,
                )
            )
