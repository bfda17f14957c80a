"""StatusUpdate -> a merge patch for .status, following the Kubernetes API conventions.

Conditions keep their lastTransitionTime unless their status flips; every condition carries the
observedGeneration it was computed from; only top-level status fields that change are patched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from controller.domain.model import (
    SERVICE_ASPECTS,
    Aspect,
    Condition,
    Managed,
    Reason,
    StatusUpdate,
)
from controller.domain.outcome import CONDITION_TYPES, Prior

CONDITION_ORDER = ("Ready", *CONDITION_TYPES.values())


def timestamp(now: datetime) -> str:
    """RFC 3339, UTC, whole seconds: what Kubernetes itself writes."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def managed_of(status: Mapping[str, Any] | None) -> Managed:
    """status.managed as a Managed (empty when absent or malformed)."""
    raw = (status or {}).get("managed") or {}
    env = raw.get("env") or []
    invokers = raw.get("invokers") or []
    return Managed(
        env=frozenset(x for x in env if isinstance(x, str)),
        invokers=frozenset(x for x in invokers if isinstance(x, str)),
    )


def prior_of(status: Mapping[str, Any] | None, generation: int) -> Prior:
    """What the reconcile needs to know about earlier checks.

    An aspect counts as synced (so a change needed there now is drift) when the service held
    the spec there at this generation at any check: status.drift.syncedGeneration remembers it
    past a failed repair attempt, whose condition is False by the next check.
    """
    status = status or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    held = synced_generations(status)
    synced = frozenset(
        aspect
        for aspect, kind in CONDITION_TYPES.items()
        if held.get(aspect) == generation
        or (
            conditions.get(kind, {}).get("status") == "True"
            and conditions.get(kind, {}).get("observedGeneration") == generation
        )
    )
    ready = conditions.get("Ready", {}).get("status") == "True"
    pending = tuple(str(x) for x in (status.get("drift") or {}).get("pending") or [])
    rolling = any(
        conditions.get(kind, {}).get("reason") == Reason.PROGRESSING
        for kind in ("Ready", *(CONDITION_TYPES[a] for a in SERVICE_ASPECTS))
    )
    repaired = frozenset(
        a
        for a, kind in CONDITION_TYPES.items()
        if conditions.get(kind, {}).get("reason") == Reason.DRIFT_REPAIRED
    )
    return Prior(
        synced=synced, ready=ready, pending=pending, rolling_out=rolling, repaired=repaired
    )


def synced_generations(status: Mapping[str, Any] | None) -> dict[Aspect, int]:
    """status.drift.syncedGeneration: per aspect, the latest spec generation whose check found
    (or made) the service hold the spec there. Malformed entries are ignored."""
    raw = ((status or {}).get("drift") or {}).get("syncedGeneration") or {}
    if not isinstance(raw, Mapping):
        return {}
    return {
        a: raw[a.value]
        for a in Aspect
        if isinstance(raw.get(a.value), int) and not isinstance(raw.get(a.value), bool)
    }


def build_patch(
    status: Mapping[str, Any] | None,
    update: StatusUpdate,
    generation: int,
    now: datetime,
    current: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The merge patch (the value for ``.status``) that records ``update``; {} if nothing moves.

    ``status`` is the history the update builds on (counters, transition times); ``current`` is
    what the server is known to hold, to leave out what is already there (default: ``status``).
    Given several views of it (the live status, and the live one overlaid with this process's
    patches not seen back yet), a key is left out only when every view holds the wanted value:
    a stale live view must not hide that our own unseen patch changed the key since.
    """
    status = status or {}
    if current is None:
        views: list[Mapping[str, Any]] = [status]
    elif isinstance(current, Mapping):
        views = [current]
    else:
        views = list(current)
    stamp = timestamp(now)
    want: dict[str, Any] = {"observedGeneration": generation}

    previous = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    computed = [update.ready, *(update.aspects[a] for a in Aspect)]
    conditions = [_condition(c, previous.get(c.type), generation, stamp) for c in computed]
    # Keep conditions someone else (a future feature) added, in their place after ours.
    conditions += [c for t, c in previous.items() if t not in CONDITION_ORDER]
    want["conditions"] = conditions

    if update.uri is not None:
        want["serviceUri"] = update.uri
    if update.latest_ready_revision is not None:
        want["latestReadyRevision"] = update.latest_ready_revision
    if update.checked:
        want["lastSyncTime"] = stamp
    if update.managed is not None:
        want["managed"] = {
            "env": sorted(update.managed.env),
            "invokers": sorted(update.managed.invokers),
        }

    drift = dict(status.get("drift") or {})
    drift.setdefault("count", 0)
    if update.drift.detected:
        drift["lastDetectedTime"] = stamp
    if update.drift.repaired:
        drift["count"] = int(drift.get("count") or 0) + 1
        drift["lastRepairedTime"] = stamp
        drift["last"] = list(update.drift.detected)
    if update.pending is not None:
        drift["pending"] = list(update.pending)
    held = synced_generations(status)
    for a, kind in CONDITION_TYPES.items():
        was = previous.get(kind) or {}
        if was.get("status") == "True" and was.get("observedGeneration") == generation:
            held[a] = generation  # a status from before syncedGeneration existed
        if update.aspects[a].status:
            held[a] = generation
    if held:
        drift["syncedGeneration"] = {a.value: g for a, g in sorted(held.items())}
    want["drift"] = drift

    return {k: v for k, v in want.items() if any(view.get(k) != v for view in views)}


def _condition(
    c: Condition, previous: Mapping[str, Any] | None, generation: int, stamp: str
) -> dict[str, Any]:
    status = "True" if c.status else "False"
    transition = stamp
    if previous is not None and previous.get("status") == status:
        transition = previous.get("lastTransitionTime") or stamp
    return {
        "type": c.type,
        "status": status,
        "reason": c.reason,
        "message": c.message,
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }


def ready_of(status: Mapping[str, Any] | None) -> str:
    """The Ready condition's status ("True"/"False"/"Unknown")."""
    for c in (status or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == "Ready":
            return str(c.get("status", "Unknown"))
    return "Unknown"
