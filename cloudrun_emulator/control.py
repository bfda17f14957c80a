"""Test controls applied to gRPC calls: call counters, injected faults and per-minute quota."""

from __future__ import annotations

import fnmatch
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from .errors import ApiError, invalid

WRITE_METHODS = frozenset(
    {
        "google.cloud.run.v2.Services/CreateService",
        "google.cloud.run.v2.Services/UpdateService",
        "google.cloud.run.v2.Services/DeleteService",
        "google.cloud.run.v2.Services/SetIamPolicy",
    }
)

# Messages the way Google words them, for the codes tests usually inject.
FAULT_MESSAGES = {
    "UNAVAILABLE": "The service is currently unavailable.",
    "RESOURCE_EXHAUSTED": "Quota exceeded (injected fault).",
    "INTERNAL": "Internal error encountered.",
    "DEADLINE_EXCEEDED": "Deadline expired before operation could complete.",
    "PERMISSION_DENIED": "The caller does not have permission",
    "ABORTED": "The operation was aborted.",
    "UNKNOWN": "Unknown error.",
}


def is_write(method: str) -> bool:
    return method in WRITE_METHODS


@dataclass
class Faults:
    rate: float = 0.0
    codes: list[grpc.StatusCode] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["*"])
    latency_ms: int = 0
    _match_cache: dict[str, bool] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return (self.rate > 0 and bool(self.codes)) or self.latency_ms > 0

    def matches(self, method: str) -> bool:
        hit = self._match_cache.get(method)
        if hit is None:
            short = method.rsplit("/", 1)[-1]
            hit = any(
                fnmatch.fnmatchcase(method, p) or fnmatch.fnmatchcase(short, p)
                for p in self.methods
            )
            self._match_cache[method] = hit
        return hit

    def as_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "codes": [c.name for c in self.codes],
            "methods": self.methods,
            "latencyMs": self.latency_ms,
        }


def parse_faults(body: Any) -> tuple[Faults, bool]:
    """Admin JSON -> (Faults, failNextRevision)."""
    if not isinstance(body, dict):
        raise invalid("faults body must be a JSON object")
    allowed = {"rate", "codes", "methods", "latencyMs", "failNextRevision"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unknown field(s) {unknown}; expected some of {sorted(allowed)}")
    rate = body.get("rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise invalid(f"'rate' must be a number between 0 and 1, got {rate!r}")
    raw_codes = body.get("codes", ["UNAVAILABLE"] if rate else [])
    if not isinstance(raw_codes, list):
        raise invalid("'codes' must be a list of gRPC status code names")
    codes = []
    for c in raw_codes:
        if not isinstance(c, str) or c not in grpc.StatusCode.__members__ or c == "OK":
            raise invalid(f"unknown gRPC status code {c!r} in 'codes'")
        codes.append(grpc.StatusCode[c])
    methods = body.get("methods", ["*"])
    if not isinstance(methods, list) or not all(isinstance(m, str) and m for m in methods):
        raise invalid("'methods' must be a list of method names or patterns ('*' for all)")
    latency = body.get("latencyMs", 0)
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or latency < 0:
        raise invalid(f"'latencyMs' must be a non-negative number, got {latency!r}")
    fail_next = body.get("failNextRevision", False)
    if not isinstance(fail_next, bool):
        raise invalid("'failNextRevision' must be true or false")
    return Faults(float(rate), codes, list(methods), int(latency)), fail_next


class _Window:
    """A sliding one-minute window of admitted calls."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.times: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """Record a call and return None, or return the seconds until one would fit."""
        times = self.times
        while times and now - times[0] >= 60.0:
            times.popleft()
        if len(times) >= self.limit:
            return max(0.0, 60.0 - (now - times[0]))
        times.append(now)
        return None


class Quota:
    def __init__(self, reads_per_minute: int | None = None, writes_per_minute: int | None = None):
        self.reads = _Window(reads_per_minute) if reads_per_minute is not None else None
        self.writes = _Window(writes_per_minute) if writes_per_minute is not None else None

    @property
    def active(self) -> bool:
        return self.reads is not None or self.writes is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "readsPerMinute": self.reads.limit if self.reads else None,
            "writesPerMinute": self.writes.limit if self.writes else None,
        }

    def check(self, method: str, project: str = "") -> None:
        write = is_write(method)
        window = self.writes if write else self.reads
        if window is None:
            return
        wait = window.admit(time.monotonic())
        if wait is None:
            return
        kind = "Write" if write else "Read"
        consumer = f"project_number:{project}" if project else "project_number:000000000000"
        message = (
            f"Quota exceeded for quota metric '{kind} requests' and limit "
            f"'{kind} requests per minute per region' of service 'run.googleapis.com' "
            f"for consumer '{consumer}'."
        )
        raise ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            message,
            trailing_metadata=(("grpc-status-details-bin", _status_details(message, kind, wait)),),
        )


def parse_quota(body: Any) -> Quota:
    if not isinstance(body, dict):
        raise invalid("quota body must be a JSON object")
    allowed = {"readsPerMinute", "writesPerMinute"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unknown field(s) {unknown}; expected some of {sorted(allowed)}")
    values = {}
    for key in allowed:
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise invalid(f"'{key}' must be a non-negative integer or null, got {v!r}")
        values[key] = v
    return Quota(values["readsPerMinute"], values["writesPerMinute"])


def _status_details(message: str, kind: str, wait: float) -> bytes:
    """google.rpc.Status with ErrorInfo + RetryInfo, as Google sends with RESOURCE_EXHAUSTED."""
    info = error_details_pb2.ErrorInfo(
        reason="RATE_LIMIT_EXCEEDED",
        domain="googleapis.com",
        metadata={
            "service": "run.googleapis.com",
            "quota_metric": f"run.googleapis.com/{kind.lower()}_requests",
            "quota_limit": f"{kind}RequestsPerMinutePerProjectPerRegion",
        },
    )
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(wait) + 1))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    status.details.add().Pack(info)
    status.details.add().Pack(retry)
    return status.SerializeToString()


class Controls:
    """Counters, faults and quota, shared by the gRPC layer and the admin API."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.calls: dict[str, int] = {}
        # The same per x-emulator-principal (the gRPC caller's identity), then method: which
        # replica of a controller sent what.
        self.calls_by_principal: dict[str, dict[str, int]] = {}
        self.faults = Faults()
        self.quota = Quota()

    def fault_for(self, method: str) -> tuple[float, ApiError | None]:
        """(latency seconds, error to raise or None) for one call."""
        f = self.faults
        if not f.active or not f.matches(method):
            return 0.0, None
        error = None
        if f.codes and f.rate > 0 and self.rng.random() < f.rate:
            code = self.rng.choice(f.codes)
            error = ApiError(code, FAULT_MESSAGES.get(code.name, f"Injected fault: {code.name}"))
        return f.latency_ms / 1000.0, error
