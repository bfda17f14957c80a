"""Cloud Audit Log entries for Cloud Run: which service changed, who changed it, and whether it was
Runwarden's own write.

Pure: no I/O, no Google client, no kopf, no asyncio. The Pub/Sub subscriber (listener.py) hands
each message's bytes to ``parse`` and asks ``OwnWrites.origin`` whose write it was; everything
else it does is plumbing.

What counts (ISSUE 8): ``protoPayload.serviceName == run.googleapis.com``, one of the write methods
below, a successful call (no ``protoPayload.status.code`` or 0) and, for a long-running operation,
only the entry with ``operation.last``. The service is keyed by ``resource.labels`` (project_id,
location, service_name), falling back to a v2 ``protoPayload.resourceName``
(``projects/P/locations/R/services/S``) or the v1 ``request.name``
(``namespaces/P/services/S``, the region then from the resource labels or resourceLocation).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from controller.domain.model import ServiceRef

RUN_SERVICE = "run.googleapis.com"
_V1 = "google.cloud.run.v1.Services."
_V2 = "google.cloud.run.v2.Services."
SERVICE_WRITES = frozenset(
    {
        _V1 + "CreateService",
        _V1 + "ReplaceService",
        _V1 + "DeleteService",
        _V2 + "CreateService",
        _V2 + "UpdateService",
        _V2 + "DeleteService",
    }
)
IAM_WRITES = frozenset({_V1 + "SetIamPolicy", _V2 + "SetIamPolicy"})
WRITE_METHODS = SERVICE_WRITES | IAM_WRITES
# Runwarden never creates or deletes a service: such an entry is never its own write.
OWN_CAPABLE = IAM_WRITES | {_V1 + "ReplaceService", _V2 + "UpdateService"}

_V2_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/services/([^/]+)$")
_V2_PARENT = re.compile(r"^projects/([^/]+)/locations/([^/]+)$")
_V1_NAME = re.compile(r"^namespaces/([^/]+)/services/([^/]+)$")


class Result(enum.StrEnum):
    """What became of one message: the values of ``runwarden_audit_events_total{result}``."""

    MATCHED = "matched"  # someone else changed a service an Orchestrator here manages
    OWN = "own"  # Runwarden's own write, already known
    UNMATCHED = "unmatched"  # a readable entry of no concern (other API, read, failure, unmanaged)
    MALFORMED = "malformed"  # not a Cloud Audit Log entry we can read


@dataclass(frozen=True)
class AuditEntry:
    """One successful write to a Cloud Run service, as the audit log tells it."""

    ref: ServiceRef
    method: str
    principal: str  # authenticationInfo.principalEmail ("" when the entry has none)
    timestamp: float | None = None  # seconds since the epoch (the entry's own time)
    generation: int | None = None  # the service's generation after a service write
    iam_etag: bytes | None = None  # the policy's etag after SetIamPolicy
    insert_id: str = ""

    @property
    def iam(self) -> bool:
        return self.method in IAM_WRITES

    @property
    def short_method(self) -> str:
        return self.method.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Ignored:
    """A message that wakes nothing, and why (for the log; the ``why`` names no values)."""

    result: Result  # UNMATCHED or MALFORMED
    why: str


Parsed = AuditEntry | Ignored


class _Malformed(ValueError):
    pass


def parse(data: bytes | str) -> Parsed:
    """A Pub/Sub message's data (a LogEntry as JSON, what a Log Router sink publishes)."""
    try:
        entry = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return Ignored(Result.MALFORMED, "not JSON")
    return parse_entry(entry)


def parse_entry(entry: Any) -> Parsed:
    """A decoded LogEntry -> the write it records, or why it is ignored. Never raises."""
    try:
        return _parse(entry)
    except _Malformed as exc:
        return Ignored(Result.MALFORMED, str(exc))


def _parse(entry: Any) -> Parsed:
    if not isinstance(entry, dict):
        raise _Malformed("not a JSON object")
    payload = entry.get("protoPayload")
    if not isinstance(payload, dict):
        raise _Malformed("no protoPayload object (not a Cloud Audit Log entry)")
    service = _str(payload, "serviceName")
    method = _str(payload, "methodName")
    if not service or not method:
        raise _Malformed("protoPayload without serviceName or methodName")
    if service != RUN_SERVICE:
        return Ignored(Result.UNMATCHED, f"service {service}")
    if method not in WRITE_METHODS:
        return Ignored(Result.UNMATCHED, f"method {method}")
    status = payload.get("status")
    if status is not None and not isinstance(status, dict):
        raise _Malformed("protoPayload.status is not an object")
    code = (status or {}).get("code", 0)
    if code not in (0, None, "0", "OK"):
        return Ignored(Result.UNMATCHED, f"failed call (code {code})")
    operation = entry.get("operation")
    if operation is not None:
        if not isinstance(operation, dict):
            raise _Malformed("operation is not an object")
        if operation.get("last") is not True:
            return Ignored(Result.UNMATCHED, "not the last entry of its operation")

    ref = _service_ref(entry, payload)
    if ref is None:
        raise _Malformed(f"{method} entry names no service")
    auth = payload.get("authenticationInfo")
    if auth is not None and not isinstance(auth, dict):
        raise _Malformed("authenticationInfo is not an object")
    principal = _str(auth or {}, "principalEmail") or _str(auth or {}, "principalSubject")
    response = payload.get("response")
    response = response if isinstance(response, dict) else {}
    return AuditEntry(
        ref=ref,
        method=method,
        principal=principal,
        timestamp=_timestamp(entry.get("timestamp")),
        generation=None if method in IAM_WRITES else _generation(response),
        iam_etag=_etag(response) if method in IAM_WRITES else None,
        insert_id=_str(entry, "insertId"),
    )


def _str(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Malformed(f"{key} is not a string")
    return value


def _service_ref(entry: Mapping[str, Any], payload: Mapping[str, Any]) -> ServiceRef | None:
    resource = entry.get("resource")
    labels = resource.get("labels") if isinstance(resource, dict) else None
    labels = labels if isinstance(labels, dict) else {}
    project, location, name = (labels.get(k) for k in ("project_id", "location", "service_name"))
    if all(isinstance(v, str) and v for v in (project, location, name)):
        return ServiceRef(str(project), str(location), str(name))

    region = location if isinstance(location, str) and location else _resource_location(payload)
    request = payload.get("request")
    request = request if isinstance(request, dict) else {}
    for candidate in (
        payload.get("resourceName"),
        request.get("name"),
        request.get("resource"),  # SetIamPolicy
        (request.get("service") or {}).get("name")
        if isinstance(request.get("service"), dict)
        else None,
    ):
        ref = _ref_from_name(candidate, region)
        if ref is not None:
            return ref
    # v2 CreateService: parent + serviceId.
    parent, service_id = request.get("parent"), request.get("serviceId")
    if isinstance(parent, str) and isinstance(service_id, str) and service_id:
        m = _V2_PARENT.match(parent)
        if m:
            return ServiceRef(m.group(1), m.group(2), service_id)
    return None


def _ref_from_name(name: Any, region: str | None) -> ServiceRef | None:
    if not isinstance(name, str):
        return None
    m = _V2_NAME.match(name)
    if m:
        return ServiceRef(m.group(1), m.group(2), m.group(3))
    m = _V1_NAME.match(name)
    if m and region:
        return ServiceRef(m.group(1), region, m.group(2))
    return None


def _resource_location(payload: Mapping[str, Any]) -> str | None:
    where = payload.get("resourceLocation")
    current = where.get("currentLocations") if isinstance(where, dict) else None
    if isinstance(current, list) and current and isinstance(current[0], str):
        return current[0]
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _generation(response: Mapping[str, Any]) -> int | None:
    """The service's generation in a write's response: a v2 Service (``generation``), a v1
    Service (``metadata.generation``) or a v2 Operation whose metadata is the Service."""
    found = _int(response.get("generation"))
    if found is not None:
        return found
    for key in ("metadata", "response"):
        inner = response.get(key)
        if isinstance(inner, dict):
            found = _int(inner.get("generation"))
            if found is not None:
                return found
    return None


def _etag(response: Mapping[str, Any]) -> bytes | None:
    """A Policy's etag; JSON carries bytes as base64 (standard or URL-safe alphabet)."""
    raw = response.get("etag")
    if not isinstance(raw, str) or not raw:
        return None
    padded = raw + "=" * (-len(raw) % 4)
    try:
        if "-" in raw or "_" in raw:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return raw.encode()


def _timestamp(value: Any) -> float | None:
    """RFC 3339 (``2026-11-28T18:00:00.123456789Z``) -> epoch seconds; None when unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("z", "Z")).timestamp()
    except ValueError:
        return None
