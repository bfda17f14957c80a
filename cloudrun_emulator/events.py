"""What the store tells the outside world: one `AuditEvent` per successful write, handed to a
sink it is given (the audit publisher in audit.py, or nothing). The store knows no Pub/Sub."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import names

log = logging.getLogger("cloudrun_emulator")


@dataclass(slots=True)
class AuditEvent:
    """One successful write, for the audit publisher (see audit.py)."""

    method: str  # e.g. google.cloud.run.v2.Services.UpdateService
    key: names.ServiceKey
    principal: str
    request: Any  # a protobuf message or a JSON-able dict
    response: Any | None
    operation_id: str | None = None
    first: bool = False
    last: bool = False
    status: tuple[int, str] | None = None  # (google.rpc code, message) of a failed operation
    resource_name: str | None = None


AuditSink = Callable[[AuditEvent], None]


def emitter(sink: AuditSink | None) -> AuditSink:
    """The callable the store emits through: a no-op without a sink, and never raises."""

    def emit(event: AuditEvent) -> None:
        if sink is None:
            return
        try:
            sink(event)
        except Exception:  # the audit sink must never break a write
            log.exception("audit_publish_failed")

    return emit
