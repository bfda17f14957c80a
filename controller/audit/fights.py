"""Fight detection: when someone keeps undoing the spec, say so and stop fighting for a while.

A CI/CD pipeline that redeploys with ``--set-env-vars`` drops the declared variables every time;
repairing each time makes two robots take turns forever. So: when one service needs more than
``threshold`` drift repairs within ``window`` seconds, Runwarden holds its repairs for that
service for a backoff that doubles while the fight goes on (60 s, 2 min, 4 min, ... up to an hour),
posts a Warning Event ``DriftFight`` naming the principals seen undoing it (from the audit log),
and sets the Ready condition's reason to ``DriftFight``. Checks still run and report the drift.

Pure: no I/O, no asyncio; the clock is passed in (seconds since the epoch).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from controller.domain.model import (
    Condition,
    Desired,
    Event,
    Mode,
    Reason,
    ServiceRef,
    StatusUpdate,
)

DRIFT_FIGHT = Reason.DRIFT_FIGHT
UNKNOWN_PRINCIPAL = "an unknown principal"


@dataclass(frozen=True)
class FightPolicy:
    threshold: int = 5  # more repairs than this within the window is a fight; 0 = never
    window: float = 600.0  # seconds
    first_backoff: float = 60.0
    max_backoff: float = 3600.0

    @property
    def enabled(self) -> bool:
        return self.threshold > 0


@dataclass(frozen=True)
class Hold:
    """Repairs of one service are held until ``until`` (epoch seconds)."""

    until: float
    backoff: float  # seconds
    repairs: int  # repairs within the window when the hold began
    window: float
    principals: tuple[str, ...]  # who undid the spec, as seen in audit entries (sorted)

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)


@dataclass
class _Service:
    repairs: deque[float] = field(default_factory=deque)
    seen: dict[str, float] = field(default_factory=dict)  # principal -> last seen
    level: int = 0  # holds in this fight so far
    hold: Hold | None = None


class FightDetector:
    """Counts repairs and foreign writers per service; decides the holds."""

    def __init__(self, policy: FightPolicy | None = None) -> None:
        self.policy = policy or FightPolicy()
        self._services: dict[ServiceRef, _Service] = {}

    def saw(self, ref: ServiceRef, principal: str, at: float) -> None:
        """Someone other than Runwarden wrote to this service (an audit entry)."""
        if not principal:
            principal = UNKNOWN_PRINCIPAL
        state = self._services.setdefault(ref, _Service())
        state.seen[principal] = max(at, state.seen.get(principal, -math.inf))

    def principals(self, ref: ServiceRef, now: float) -> tuple[str, ...]:
        """The foreign writers of this service seen within the window."""
        state = self._services.get(ref)
        if state is None:
            return ()
        horizon = now - self.policy.window
        return tuple(sorted(p for p, at in state.seen.items() if at >= horizon))

    def holding(self, ref: ServiceRef, now: float) -> Hold | None:
        """The hold in force for this service, if any."""
        state = self._services.get(ref)
        if state is None or state.hold is None or now >= state.hold.until:
            return None
        return state.hold

    def repaired(self, ref: ServiceRef, now: float) -> Hold | None:
        """Record one drift repair of this service; returns the new hold when it makes a fight.

        A fight starts with the repair that exceeds the threshold within the window. Once in a
        fight, the first repair after a hold expires (within a window of it) starts the next,
        twice as long; a window without repairs after the last hold ends the fight.
        """
        if not self.policy.enabled:
            return None
        state = self._services.setdefault(ref, _Service())
        horizon = now - self.policy.window
        while state.repairs and state.repairs[0] < horizon:
            state.repairs.popleft()
        for principal, at in list(state.seen.items()):
            if at < horizon:
                del state.seen[principal]
        if state.hold is not None and now - state.hold.until > self.policy.window:
            state.level, state.hold = 0, None  # the last fight is over
        state.repairs.append(now)
        fighting = len(state.repairs) > self.policy.threshold or state.level > 0
        if not fighting:
            return None
        backoff = min(self.policy.max_backoff, self.policy.first_backoff * 2**state.level)
        state.level += 1
        state.hold = Hold(
            until=now + backoff,
            backoff=backoff,
            repairs=len(state.repairs),
            window=self.policy.window,
            principals=self.principals(ref, now),
        )
        return state.hold

    def calm(self, ref: ServiceRef) -> None:
        """A check found the service holding the spec: the repairs so far were not one fight
        (the check path, without the audit feed, calls this; see ``end``)."""
        state = self._services.get(ref)
        if state is not None:
            state.repairs.clear()

    def forget(self, ref: ServiceRef) -> None:
        self._services.pop(ref, None)


# ---------------------------------------------------------------------- status and Events


def observe_only(desired: Desired) -> Desired:
    """The spec as Observe mode: during a hold the check computes and reports, never writes."""
    return replace(desired, policy=replace(desired.policy, mode=Mode.OBSERVE))


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60 or seconds % 60:
        return f"{seconds}s"
    if seconds < 3600 or seconds % 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def who(hold: Hold, limit: int = 5) -> str:
    """The principals of a hold, for a message."""
    names = list(hold.principals) or [UNKNOWN_PRINCIPAL]
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += f" and {len(names) - limit} more"
    return text


def message(hold: Hold) -> str:
    """Why repairs stopped, naming who undid the spec (never a value)."""
    return (
        f"the spec keeps being undone by {who(hold)}: {hold.repairs} repairs in "
        f"{_duration(hold.window)}; not repairing for {_duration(hold.backoff)}, until "
        f"{_stamp(hold.until)}"
    )


def started(update: StatusUpdate, hold: Hold) -> StatusUpdate:
    """The check whose repair made a fight: Ready reason DriftFight and a Warning Event."""
    text = message(hold)
    return replace(
        update,
        ready=Condition("Ready", False, DRIFT_FIGHT, text),
        events=(*update.events, Event("Warning", DRIFT_FIGHT, text)),
    )


def held(update: StatusUpdate, hold: Hold) -> StatusUpdate:
    """A check during a hold (run as Observe): drift is reported under reason DriftFight."""
    if update.failure is not None or not update.pending:
        return update
    lines = ", ".join(update.pending[:10])
    if len(update.pending) > 10:
        lines += f" and {len(update.pending) - 10} more"
    events = tuple(
        replace(
            e,
            message=f"not repairing until {_stamp(hold.until)} (DriftFight with {who(hold)}): "
            f"{lines}",
        )
        if e.reason == Reason.DRIFT_DETECTED
        else e
        for e in update.events
    )
    return replace(
        update,
        ready=Condition("Ready", False, DRIFT_FIGHT, f"{message(hold)}; pending: {lines}"),
        events=events,
    )


# ---------------------------------------------------------------------- the check path


def begin(
    detector: FightDetector, ref: ServiceRef, reasons: tuple[str, ...], now: float
) -> Hold | None:
    """Before a check without the audit feed: the hold in force (the check must only report).

    A spec change is applied even during a hold: someone acted on the spec.
    """
    if any(r.startswith("spec-") for r in reasons):
        return None
    return detector.holding(ref, now)


def end(
    detector: FightDetector, ref: ServiceRef, update: StatusUpdate, hold: Hold | None, now: float
) -> tuple[StatusUpdate, Hold | None]:
    """After a check without the audit feed: a service whose spec keeps being undone (a drift
    repair at check after check, no check in between finding it in sync) is a fight even though
    no audit entry names who undid it. Without the names of foreign writers to go on, a clean
    check ends the count: drift now and then (a deploy a day) never adds up to a fight.
    Returns the update as it should be reported, and the hold that starts now (if any)."""
    if hold is not None:
        return held(update, hold), None
    if not update.drift.repaired:
        if update.checked and update.failure is None and not update.drift.detected:
            detector.calm(ref)
        return update, None
    new = detector.repaired(ref, now)
    if new is None:
        return update, None
    return started(update, new), new
