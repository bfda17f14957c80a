"""The contract's Prometheus metrics (CONTRACT §2), served on --metrics-port."""

from __future__ import annotations

import functools

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server

RECONCILES = Counter(
    "runwarden_reconcile_total",
    "Reconciles (drift checks included) by result.",
    ["result"],  # synced | repaired | pending | error
)
RECONCILE_SECONDS = Histogram(
    "runwarden_reconcile_duration_seconds",
    "Duration of one reconcile: observe, plan, apply and verify.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DRIFT_REPAIRS = Counter(
    "runwarden_drift_repairs_total",
    "Drift repairs by aspect (env, invokers, settings).",
    ["aspect"],
)
GCP_REQUESTS = Counter(
    "runwarden_gcp_requests_total",
    "Requests to the Cloud Run and IAM APIs by method and gRPC status code.",
    ["method", "code"],
)


# The labelled series of the per-call counters, looked up once (labels() takes a lock and builds
# a key on every call: twice per check, bench overhead). Their label values are few and fixed.
@functools.cache
def gcp_requests(method: str, code: str) -> Counter:
    return GCP_REQUESTS.labels(method=method, code=code)


@functools.cache
def reconciles(result: str) -> Counter:
    return RECONCILES.labels(result=result)


ORCHESTRATORS = Gauge(
    "runwarden_orchestrators",
    "Orchestrators handled by this controller, by their Ready condition status.",
    ["ready"],
)

AUDIT_EVENTS = Counter(
    "runwarden_audit_events_total",
    "Cloud Audit Log entries received from --audit-subscription, by what became of them.",
    ["result"],  # matched | own | unmatched | malformed
)
for _result in ("matched", "own", "unmatched", "malformed"):
    AUDIT_EVENTS.labels(result=_result)
DRIFT_REPAIR_SECONDS = Histogram(
    "runwarden_drift_repair_seconds",
    "From the audit log entry of someone else's change to the repair, verified.",
    buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, 900, 3600),
)

CHECK_PERIOD = Gauge(
    "runwarden_effective_check_period_seconds",
    "Mean period between two checks of an Orchestrator in this region: the resync, stretched "
    "when the region's read budget (--reads-per-minute) cannot afford it.",
    ["region"],
)
BUDGET_WAIT = Counter(
    "runwarden_budget_wait_seconds_total",
    "Seconds Cloud Run calls waited for the region's read or write budget.",
    ["region", "kind"],  # kind: read | write
)

# Ready by reason, for dashboards and alerts (manifests/monitoring/): a count per (ready,
# reason), and one series per Orchestrator that is not Ready (none while all are Ready), so an
# alert can name the object and the reason. Not "namespace"/"name": Prometheus's own target
# labels would shadow them (the scraped ones become exported_namespace).
ORCHESTRATORS_BY_REASON = Gauge(
    "runwarden_orchestrators_by_reason",
    "Orchestrators handled by this controller, by Ready condition status and reason.",
    ["ready", "reason"],
)
ORCHESTRATOR_NOT_READY = Gauge(
    "runwarden_orchestrator_not_ready",
    "1 for each Orchestrator whose Ready condition is not True, labelled with its reason.",
    ["orchestrator_namespace", "orchestrator_name", "reason"],
)

_ready_by_object: dict[tuple[str, str], tuple[str, str]] = {}
_ready_counts: dict[str, int] = {"True": 0, "False": 0, "Unknown": 0}
_reason_counts: dict[tuple[str, str], int] = {}
for _state in _ready_counts:
    ORCHESTRATORS.labels(ready=_state).set(0)


def set_ready(namespace: str, name: str, ready: str | None, reason: str = "") -> None:
    """Record one Orchestrator's Ready status ("True"/"False"/"Unknown"; None = forgotten) and
    the condition's reason."""
    key = (namespace, name)
    old = _ready_by_object.pop(key, None) if ready is None else _ready_by_object.get(key)
    new = (ready, reason) if ready is not None else None
    if new is not None:
        _ready_by_object[key] = new
    if old == new:
        return
    for entry, delta in ((old, -1), (new, 1)):
        if entry is None:
            continue
        state, why = entry
        if old is None or new is None or old[0] != new[0]:
            _ready_counts[state] = _ready_counts.get(state, 0) + delta
            ORCHESTRATORS.labels(ready=state).set(_ready_counts[state])
        _reason_counts[entry] = _reason_counts.get(entry, 0) + delta
        ORCHESTRATORS_BY_REASON.labels(ready=state, reason=why).set(_reason_counts[entry])
    if old is not None and old[0] != "True":
        ORCHESTRATOR_NOT_READY.remove(namespace, name, old[1])
    if new is not None and new[0] != "True":
        ORCHESTRATOR_NOT_READY.labels(
            orchestrator_namespace=namespace, orchestrator_name=name, reason=new[1]
        ).set(1)


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Expose /metrics on ``port`` (all interfaces) from a background thread."""
    _start_http_server(port, registry=registry)
