"""Outcomes: what a check found and did, as conditions, Events and a StatusUpdate. Pure.

The reconcile (controller.reconcile) observes, plans, writes and reads back; these functions turn
what happened into the StatusUpdate that status and Events are made of.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from controller.domain.model import (
    SERVICE_ASPECTS,
    Aspect,
    Condition,
    DriftReport,
    Event,
    Failure,
    Managed,
    Observed,
    Plan,
    Reason,
    Retry,
    StatusUpdate,
    WriteRecord,
)
from controller.domain.plan import managed_after

SERVING = "ServingSynced"  # the condition about traffic (with_serving)
CONDITION_TYPES = {
    Aspect.ENV: "EnvSynced",
    Aspect.INVOKERS: "InvokersSynced",
    Aspect.SETTINGS: "SettingsSynced",
}


@dataclass(frozen=True)
class Prior:
    """What earlier checks left in status, as far as this reconcile cares."""

    # Aspects that held the spec at the current generation at some check (condition True then;
    # status.drift.syncedGeneration keeps it past a failed repair attempt): a change needed there
    # now is drift (someone else changed the service), not the spec being applied.
    synced: frozenset[Aspect] = frozenset()
    # Ready is True already (or False only because traffic is pinned): success needs no
    # Synced Event
    ready: bool = False
    pending: tuple[str, ...] = ()  # status.drift.pending
    rolling_out: bool = False  # the last check left a rollout of ours under way (Progressing)
    repaired: frozenset[Aspect] = frozenset()  # aspects whose condition says DriftRepaired


def failed(failure: Failure, events: tuple[Event, ...]) -> StatusUpdate:
    """Nothing could be checked (the service could not be read, or the spec is invalid)."""
    return StatusUpdate(
        ready=Condition("Ready", False, failure.reason, failure.message),
        aspects={
            a: Condition(CONDITION_TYPES[a], False, failure.reason, failure.message) for a in Aspect
        },
        checked=False,
        events=events,
        failure=failure,
        # Like the aspects: what could not be checked is not known to hold.
        serving=Condition(SERVING, False, failure.reason, failure.message),
    )


def noted(p: Plan, aspects: dict[Aspect, Condition]) -> dict[Aspect, Condition]:
    """The aspects' conditions with the plan's notes added to their messages."""
    out = dict(aspects)
    for a, c in aspects.items():
        lines = p.note_lines(a)
        if lines:
            out[a] = replace(c, message="; ".join([c.message, *lines]))
    return out


def note_events(p: Plan) -> tuple[Event, ...]:
    """One Warning per note (the schedule posts a repeated one once, not every check)."""
    return tuple(Event("Warning", n.reason, n.text) for n in p.notes)


def in_sync(p: Plan, observed: Observed, prior: Prior) -> StatusUpdate:
    events: tuple[Event, ...] = ()
    if not prior.ready:
        events = (Event("Normal", Reason.SYNCED, f"service {observed.ref} holds the spec"),)
    events += note_events(p)
    return StatusUpdate(
        ready=Condition("Ready", True, Reason.SYNCED, "the service holds the spec"),
        aspects=noted(
            p, {a: Condition(CONDITION_TYPES[a], True, Reason.SYNCED, "in sync") for a in Aspect}
        ),
        checked=True,
        managed=p.managed,
        uri=observed.uri,
        latest_ready_revision=observed.latest_ready_revision,
        pending=(),
        events=events,
    )


def report_only(p: Plan, observed: Observed, prior: Prior) -> StatusUpdate:
    """Observe mode: the same plan, reported, never applied."""
    drift = tuple(p.lines())
    pending = drift
    retry = p.rollout_retry
    if retry is not None:
        pending += (f"rollout retry (revision {retry.failed_revision} failed)",)
    if not pending:
        update = in_sync(p, observed, prior)
        return replace(update, managed=None)
    news = pending != prior.pending
    events: tuple[Event, ...] = ()
    if news and drift:
        events = (
            Event(
                "Warning",
                Reason.DRIFT_DETECTED,
                f"Observe mode, not repairing: {summary(drift)}",
            ),
        )
    aspects = {
        a: (
            Condition(CONDITION_TYPES[a], False, Reason.DRIFT_DETECTED, summary(p.lines(a)))
            if a in p.aspects
            else Condition(CONDITION_TYPES[a], True, Reason.SYNCED, "in sync")
        )
        for a in Aspect
    }
    ready = Condition(
        "Ready",
        False,
        Reason.DRIFT_DETECTED,
        f"{len(pending)} change(s) pending, not applied in Observe mode",
    )
    if retry is not None:
        failed = revision_failed(observed, retry.failed_revision, "not retried in Observe mode")
        ready = Condition("Ready", False, failed.reason, failed.message)
        for a in SERVICE_ASPECTS - p.aspects:
            aspects[a] = Condition(CONDITION_TYPES[a], False, failed.reason, failed.message)
    return StatusUpdate(
        ready=ready,
        aspects=noted(p, aspects),
        checked=True,
        uri=observed.uri,
        latest_ready_revision=observed.latest_ready_revision,
        pending=pending,
        drift=DriftReport(detected=drift if news else ()),
        events=events + note_events(p),
    )


def revision_failed(observed: Observed, revision: str, then: str) -> Failure:
    return Failure(
        Reason.REVISION_FAILED,
        f"revision {revision} of service {observed.ref} failed to become ready and the previous "
        f"revision keeps serving; {then}",
        Retry.SLOWLY,
    )


def outcome(
    p: Plan,
    after: Observed,
    managed: Managed,
    prior: Prior,
    drift: frozenset[Aspect],
    drift_lines: tuple[str, ...],
    failures: dict[Aspect, Failure],
    events: list[Event],
    wrote: WriteRecord,
) -> StatusUpdate:
    aspects: dict[Aspect, Condition] = {}
    for a in Aspect:
        kind = CONDITION_TYPES[a]
        if a in failures:
            aspects[a] = Condition(kind, False, failures[a].reason, failures[a].message)
        elif a in drift:
            aspects[a] = Condition(
                kind, True, Reason.DRIFT_REPAIRED, f"repaired: {summary(p.lines(a))}"
            )
        else:
            aspects[a] = Condition(kind, True, Reason.SYNCED, "in sync")

    repaired = frozenset(a for a in drift if a not in failures)
    if failures:
        first = next(failures[a] for a in Aspect if a in failures)
        message = "; ".join(dict.fromkeys(f.message for f in failures.values()))
        ready = Condition("Ready", False, first.reason, message)
    elif drift:
        ready = Condition(
            "Ready", True, Reason.DRIFT_REPAIRED, f"repaired drift: {summary(drift_lines)}"
        )
    else:
        ready = Condition("Ready", True, Reason.SYNCED, "the service holds the spec")

    if repaired:
        repaired_lines = tuple(line for a in sorted(repaired) for line in p.lines(a))
        events.append(
            Event("Normal", Reason.DRIFT_REPAIRED, f"repaired: {summary(repaired_lines)}")
        )
    applied = p.aspects - drift - failures.keys()
    if applied and not failures:
        events.append(Event("Normal", Reason.SYNCED, f"applied the spec: {summary(p.lines())}"))
    elif not failures and not prior.ready and not applied and not repaired:
        events.append(Event("Normal", Reason.SYNCED, "the service holds the spec"))

    events.extend(note_events(p))
    failure = None
    if failures:
        failure = min(failures.values(), key=lambda f: list(Retry).index(f.retry))
    return StatusUpdate(
        ready=ready,
        aspects=noted(p, aspects),
        checked=True,
        managed=managed_after(managed, p, frozenset(Aspect) - failures.keys()),
        uri=after.uri,
        latest_ready_revision=after.latest_ready_revision,
        drift=DriftReport(detected=drift_lines, repaired=bool(repaired), aspects=repaired),
        pending=(),
        events=tuple(events),
        failure=failure,
        wrote=wrote,
    )


def rolling_out(update: StatusUpdate, after: Observed) -> StatusUpdate:
    """A rollout this controller started is still under way: Ready=False Progressing (not True:
    the revision may yet fail). When another failure owns Ready, the env and settings conditions
    that hold say Progressing instead, so that the next check still knows (prior_of)."""
    revision = after.rollout.latest_created_revision or "the new revision"
    message = (
        f"revision {revision} of service {after.ref} is rolling out; "
        f"{after.latest_ready_revision or 'the previous revision'} serves until it is ready"
    )
    if update.failure is None:
        ready = Condition("Ready", False, Reason.PROGRESSING, message)
        return replace(update, ready=ready, rolling_out=True)
    aspects = dict(update.aspects)
    for a in SERVICE_ASPECTS:
        if aspects[a].status:
            aspects[a] = Condition(CONDITION_TYPES[a], True, Reason.PROGRESSING, message)
    return replace(update, aspects=aspects, rolling_out=True)


def rolled_out(update: StatusUpdate, prior: Prior) -> StatusUpdate:
    """Our rollout has ended and serves: a repair it carried is complete only now, so Ready
    says DriftRepaired (once) rather than Synced."""
    if not prior.repaired:
        return update
    aspects = dict(update.aspects)
    for a in prior.repaired:
        aspects[a] = Condition(CONDITION_TYPES[a], True, Reason.DRIFT_REPAIRED, "repaired")
    ready = Condition(
        "Ready", True, Reason.DRIFT_REPAIRED, "repaired drift; the new revision serves"
    )
    return replace(update, ready=ready, aspects=aspects)


def summary(lines: list[str] | tuple[str, ...], limit: int = 10) -> str:
    lines = list(lines)
    text = ", ".join(lines[:limit])
    if len(lines) > limit:
        text += f" and {len(lines) - limit} more"
    return text


def serving(observed: Observed) -> Condition:
    """ServingSynced: whether the traffic goes to the revision holding the spec.

    The revision made from the current template is the latest ready one (a failed rollout is
    RevisionFailed, reported on its own); traffic someone pinned elsewhere (a ``--no-traffic``
    deploy, a canary split, a rollback to a named revision) means requests are served by a
    revision without the spec. Runwarden never moves traffic: it says so, naming the revisions
    and their percents. Tags without a percent serve no share and are left out.
    """
    holder = observed.latest_ready_revision
    shares = [s for s in observed.traffic if s.percent > 0]
    pinned = [s for s in shares if s.revision != holder]
    if not pinned or not holder:
        return Condition(SERVING, True, Reason.SYNCED, "all traffic goes to the latest revision")
    held = sum(s.percent for s in shares if s.revision == holder)
    where = ", ".join(
        f"{s.revision or '(none)'} {s.percent}%" + (f" (tag {s.tag})" if s.tag else "")
        for s in pinned
    )
    return Condition(
        SERVING,
        False,
        Reason.TRAFFIC_PINNED,
        f"traffic is pinned to {where}; revision {holder}, which holds the spec, serves {held}%. "
        "Runwarden never moves traffic: route it to the latest revision (gcloud run services "
        "update-traffic --to-latest) when the pinned revision is done with",
    )


def with_serving(update: StatusUpdate, observed: Observed) -> StatusUpdate:
    """Add ServingSynced to a completed check (a failed one has it False with its reason).

    Pinned traffic makes Ready False (reason TrafficPinned) unless something else already made
    it False: the service does not serve the spec, whatever its template holds
    (docs/troubleshooting.md#trafficpinned)."""
    if not update.checked:
        return update
    condition = serving(observed)
    update = replace(update, serving=condition)
    if condition.status or not update.ready.status:
        return update
    message = condition.message
    if update.ready.reason == Reason.DRIFT_REPAIRED:
        message = f"{update.ready.message}; {message}"
    return replace(
        update,
        ready=Condition("Ready", False, Reason.TRAFFIC_PINNED, message),
        events=(*update.events, Event("Warning", Reason.TRAFFIC_PINNED, condition.message)),
    )


def owned_elsewhere(failure: Failure, observed: Observed) -> StatusUpdate:
    """Another owner claims the service: nothing is written; the check still completed."""
    update = failed(failure, events=(Event("Warning", failure.reason, failure.message),))
    return replace(
        update,
        checked=True,
        uri=observed.uri,
        latest_ready_revision=observed.latest_ready_revision,
        pending=(),
    )
