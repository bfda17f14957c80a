"""The records the store keeps, and the protobuf helpers its parts share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, timestamp_pb2

from .. import names

ServicePb = run_v2.Service.pb()
ConditionPb = run_v2.Condition.pb()


def now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def pack(message: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(message)
    return a


@dataclass(slots=True)
class Revision:
    name: str
    generation: int
    template: bytes  # serialized RevisionTemplate, for "did the template change"
    ready: bool = False
    failed: bool = False


@dataclass(slots=True)
class Rollout:
    """A revision on its way to serving (only with --rollout-ms > 0)."""

    revision: str
    operation: str
    fail: bool
    handle: asyncio.TimerHandle | None = None
    principal: str = ""
    method: str = ""
    request: Any = None


@dataclass(slots=True)
class OperationEntry:
    op: operations_pb2.Operation
    done: asyncio.Event


@dataclass(slots=True)
class ServiceEntry:
    key: names.ServiceKey
    service: Any  # ServicePb, the authoritative state
    policy: policy_pb2.Policy
    revisions: dict[str, Revision] = field(default_factory=dict)
    pending: Rollout | None = None
    _wire: bytes | None = None

    def wire(self) -> bytes:
        """The serialized Service, cached so that reads cost a dict lookup."""
        if self._wire is None:
            self._wire = self.service.SerializeToString()
        return self._wire

    def touched(self) -> None:
        self._wire = None

    def snapshot(self) -> Any:
        s = ServicePb()
        s.CopyFrom(self.service)
        return s
