"""StatusUpdate -> a merge patch for .status, following the Kubernetes API conventions.

Conditions keep their lastTransitionTime unless their status flips; every condition carries the
observedGeneration it was computed from; only top-level status fields that change are patched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from controller.domain.model import (
    DEFAULT_ROLE,
    SERVICE_ASPECTS,
    Aspect,
    Condition,
    Managed,
    Reason,
    StatusUpdate,
)
from controller.domain.outcome import CONDITION_TYPES, SERVING, Prior

CONDITION_ORDER = ("Ready", *CONDITION_TYPES.values(), SERVING)


def timestamp(now: datetime) -> str:
    """RFC 3339, UTC, whole seconds: what Kubernetes itself writes."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def managed_of(status: Mapping[str, Any] | None, role: str = DEFAULT_ROLE) -> Managed:
    """status.managed as a Managed (empty when absent or malformed).

    Owned members are read with their role from status.managed.invokerRoles ([{role, members}]:
    a list, so that a merge patch replaces it whole and a role left behind does not linger); a
    status written before roles were recorded has only status.managed.invokers, taken as members
    of ``role`` (the spec's role: the one they were granted under unless it was edited since).
    """
    raw = (status or {}).get("managed") or {}
    env = frozenset(x for x in raw.get("env") or [] if isinstance(x, str))
    by_role = raw.get("invokerRoles")
    if isinstance(by_role, list):
        grants = frozenset(
            (entry["role"], m)
            for entry in by_role
            if isinstance(entry, Mapping)
            and isinstance(entry.get("role"), str)
            and isinstance(entry.get("members"), list)
            for m in entry["members"]
            if isinstance(m, str)
        )
        return Managed(env=env, grants=grants)
    invokers = frozenset(x for x in raw.get("invokers") or [] if isinstance(x, str))
    return Managed.of(env, role, invokers)


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
    ready_condition = conditions.get("Ready", {})
    # Pinned traffic keeps Ready False while the service holds the spec: not a failure to
    # announce recovery from with a Synced Event at every check.
    ready = ready_condition.get("status") == "True" or (
        ready_condition.get("reason") == Reason.TRAFFIC_PINNED
    )
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
    if update.serving is not None:
        conditions.append(_condition(update.serving, previous.get(SERVING), generation, stamp))
    elif SERVING in previous:
        conditions.append(previous[SERVING])  # not checked this time: leave it as it was
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
        by_role: dict[str, list[str]] = {}
        for role, member in sorted(update.managed.grants):
            by_role.setdefault(role, []).append(member)
        want["managed"] = {
            "env": sorted(update.managed.env),
            "invokers": sorted(update.managed.invokers),
            "invokerRoles": [{"role": r, "members": ms} for r, ms in by_role.items()],
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


def economize(
    patch: dict[str, Any], history: Mapping[str, Any] | None, now: datetime, heartbeat: float
) -> dict[str, Any]:
    """The patch to write given the status heartbeat: {} when the only key that would move is
    lastSyncTime and the recorded one is younger than ``heartbeat`` seconds.

    A check that changes nothing then costs the apiserver (and etcd, and every watcher) nothing;
    anything else that moves is written at once, lastSyncTime with it. ``history`` is the
    status as last written (the live one overlaid with this process's unseen patches).
    """
    if heartbeat <= 0 or set(patch) != {"lastSyncTime"}:
        return patch
    last = _parse_time((history or {}).get("lastSyncTime"))
    if last is not None and 0 <= (now - last).total_seconds() < heartbeat:
        return {}
    return patch


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)  # ~20x faster than strptime: once per check
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


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
