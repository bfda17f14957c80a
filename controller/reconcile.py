"""The one use-case: observe -> plan -> apply -> verify -> StatusUpdate.

Level-based and idempotent: it looks at the service as it is now, and at most one UpdateService
and one SetIamPolicy later the service holds the spec (or a condition says why not). A check that
finds nothing to do costs one GetService and one GetIamPolicy, and writes nothing.
"""

from __future__ import annotations

from dataclasses import replace

from controller.domain import ownership
from controller.domain.model import (
    SERVICE_ASPECTS,
    Aspect,
    Change,
    Desired,
    Event,
    Failure,
    Managed,
    Mode,
    Observed,
    Plan,
    Reason,
    Retry,
    RolloutState,
    StatusUpdate,
    WriteRecord,
)
from controller.domain.outcome import (
    Prior,
    failed,
    in_sync,
    outcome,
    owned_elsewhere,
    report_only,
    revision_failed,
    rolled_out,
    rolling_out,
    summary,
    with_serving,
)
from controller.domain.ownership import Standing
from controller.domain.plan import plan, restrict, revoke_plan
from controller.gcp.errors import GatewayError, ServiceAccountMissing
from controller.gcp.gateway import Gateway

_SA_PREFIX = "serviceAccount:"


async def reconcile(gw: Gateway, desired: Desired, managed: Managed, prior: Prior) -> StatusUpdate:
    """Make the service hold ``desired`` (or, in Observe mode, only report what it would do).

    A rollout is never waited for: the UpdateService returns once Cloud Run has taken the new
    template, the read-back verifies the template, and while the new revision rolls out the
    check says Progressing; the check after it (woken when the rollout ends) reads how it
    ended. A failed rollout of ours is reported (RevisionFailed, backing off) before it is
    retried, as when the write itself had failed.
    """
    try:
        observed = await gw.observe(desired.ref, desired.container)
    except GatewayError as exc:
        return failed(exc.failure(), events=())
    standing = ownership.standing(desired, observed)
    if standing is Standing.ELSEWHERE:
        return owned_elsewhere(ownership.owned_elsewhere(observed), observed)
    managed = ownership.effective_managed(managed, desired, observed)
    p = plan(desired, observed, managed)
    if desired.policy.mode is Mode.OBSERVE:
        return with_serving(report_only(p, observed, prior), observed)
    taken: tuple[Event, ...] = ()
    if standing is Standing.TAKE_OVER:
        # Taking the claim is a write of its own: the other owner stops at its next check.
        p = replace(p, claim=ownership.claim_for(desired, observed, p))
        taken = (
            Event(
                "Normal",
                "TakenOver",
                f"took the claim on service {observed.ref} from {observed.owner} "
                "(spec.policy.takeOver)",
            ),
        )
    failures: dict[Aspect, Failure] = {}
    events: list[Event] = []
    if p.rollout_retry is not None and prior.rolling_out:
        # The rollout the last check started has failed: say so now, retry after the backoff.
        failure = revision_failed(observed, p.rollout_retry.failed_revision, "retried with backoff")
        failures = dict.fromkeys(SERVICE_ASPECTS, failure)
        events.append(Event("Warning", "UpdateFailed", f"UpdateService: {failure.message}"))
        p = restrict(p, frozenset(Aspect) - SERVICE_ASPECTS)
        if p.empty:
            return with_serving(
                outcome(
                    p, observed, managed, prior, frozenset(), (), failures, events, WriteRecord()
                ),
                observed,
            )
    if p.empty:
        update = in_sync(p, observed, prior)
        if prior.rolling_out and observed.rollout.state is RolloutState.IN_PROGRESS:
            update = rolling_out(update, observed)
        elif prior.rolling_out and not failures:
            update = rolled_out(update, prior)
        return with_serving(update, observed)
    if p.claim is None:
        p = replace(p, claim=ownership.claim_for(desired, observed, p))
    update = await _enforce(gw, desired, observed, p, managed, prior, failures, events)
    if update.wrote.generation is None:
        return update  # the claim was not written: nothing taken over (yet)
    return replace(update, events=(*taken, *update.events))


async def revoke(gw: Gateway, target: Desired, managed: Managed) -> tuple[str, ...]:
    """Deletion policy Revoke: remove the owned env vars and members, verified, and release the
    claim on the service (in the same UpdateService when there is one).

    Returns what was removed (names). Raises GatewayError when it cannot finish, so that the
    finalizer stays and the deletion is retried. A service that is gone has nothing to revoke;
    one that another owner claims is not this Orchestrator's to change.
    """
    try:
        observed = await gw.observe(target.ref, target.container)
    except GatewayError as exc:
        if exc.reason == Reason.SERVICE_NOT_FOUND:
            return ()
        raise
    if ownership.standing(target, observed) is not Standing.OURS and observed.owner:
        return ()
    managed = ownership.effective_managed(managed, target, observed)
    p = revoke_plan(observed, target.role, managed)
    p = replace(p, claim=ownership.release_for(target, observed))
    if p.touches_service:
        observed = await gw.update_service(observed, p)
    if p.touches_iam:
        await gw.set_invokers(observed, p.role, p.invokers_add, p.invokers_remove, p.grants_remove)
    if not p.empty:
        after = await gw.observe(target.ref, target.container)
        left = revoke_plan(after, target.role, managed)
        if not left.empty:
            raise GatewayError(f"revocation not verified: {', '.join(left.lines())} still present")
    return tuple(p.lines())


async def release(gw: Gateway, target: Desired) -> bool:
    """Deletion policy Abandon: leave env and invokers as they are, remove only the claim (an
    annotation-only UpdateService: no revision). True if a claim was released. A service that
    is gone, or claimed by someone else, has nothing to release."""
    try:
        observed = await gw.observe(target.ref, target.container)
    except GatewayError as exc:
        if exc.reason == Reason.SERVICE_NOT_FOUND:
            return False
        raise
    claim = ownership.release_for(target, observed)
    if claim is None:
        return False
    await gw.update_service(observed, Plan(claim=claim))
    return True


async def _enforce(
    gw: Gateway,
    desired: Desired,
    observed: Observed,
    p: Plan,
    managed: Managed,
    prior: Prior,
    failures: dict[Aspect, Failure],
    events: list[Event],
) -> StatusUpdate:
    drift = p.aspects & prior.synced
    drift_lines = tuple(line for a in sorted(drift) for line in p.lines(a))
    # The service's last modifier made a drift of the service (not of its IAM policy).
    by = observed.last_modifier if drift & SERVICE_ASPECTS else ""
    if drift:
        who = f" (the service was last changed by {by})" if by else ""
        events.append(
            Event("Warning", Reason.DRIFT_DETECTED, f"drift: {summary(drift_lines)}{who}")
        )

    try:
        p, dropped = await _drop_missing_service_accounts(gw, p, failures)
    except GatewayError as exc:
        return failed(exc.failure(), events=tuple(events))

    wrote = WriteRecord()
    written: set[Aspect] = set()
    after = observed
    if p.touches_service:
        service_aspects = p.service_aspects
        try:
            after = await gw.update_service(observed, p)
            written |= service_aspects
            wrote = replace(wrote, generation=after.generation)
        except GatewayError as exc:
            claiming = p.claim is not None and observed.owner != p.claim.owner
            if claiming:
                # Without the claim, nothing else is written: another owner may have it now.
                service_aspects = p.aspects
                p = replace(
                    p,
                    invokers_add=frozenset(),
                    invokers_remove=frozenset(),
                    grants_remove=frozenset(),
                )
            for a in service_aspects:
                failures.setdefault(a, exc.failure())
            events.append(Event("Warning", "UpdateFailed", f"UpdateService: {exc.message}"))
    if p.touches_iam:
        try:
            etag = await gw.set_invokers(
                after, p.role, p.invokers_add, p.invokers_remove, p.grants_remove
            )
            written.add(Aspect.INVOKERS)
            wrote = replace(wrote, iam_etag=etag)
        except GatewayError as exc:
            failures.setdefault(Aspect.INVOKERS, exc.failure())
            events.append(Event("Warning", "UpdateFailed", f"SetIamPolicy: {exc.message}"))

    if written:
        after = await _verify(
            gw, desired, after, p, managed, frozenset(written), dropped, failures, events
        )

    update = outcome(p, after, managed, prior, drift, drift_lines, failures, events, wrote)
    if by:
        update = replace(update, drift=replace(update.drift, by=by))
    ours = bool(written & SERVICE_ASPECTS) or prior.rolling_out
    if ours and after.rollout.state is RolloutState.IN_PROGRESS:
        update = rolling_out(update, after)
    return with_serving(update, after)


async def _drop_missing_service_accounts(
    gw: Gateway, p: Plan, failures: dict[Aspect, Failure]
) -> tuple[Plan, frozenset[Change]]:
    """Check (cached) that service accounts exist before binding or running as them.

    Only members about to be added are checked, so a check without drift makes no IAM call.
    What is missing is left out of the writes (and returned); everything else is still applied.
    """
    missing = [
        m
        for m in sorted(p.invokers_add)
        if m.startswith(_SA_PREFIX) and not await gw.service_account_exists(m[len(_SA_PREFIX) :])
    ]
    if missing:
        failures[Aspect.INVOKERS] = ServiceAccountMissing(
            f"service account(s) not found: {', '.join(missing)}"
        ).failure()
    runtime_sa = p.settings_set.get("serviceAccount")
    if runtime_sa is not None and not await gw.service_account_exists(str(runtime_sa)):
        failures[Aspect.SETTINGS] = ServiceAccountMissing(
            f"settings.serviceAccount: service account not found: {runtime_sa}"
        ).failure()
        runtime_sa = None
    dropped = frozenset(c for c in p.changes if c.aspect is Aspect.INVOKERS and c.name in missing)
    if runtime_sa is None and "serviceAccount" in p.settings_set:
        dropped |= {
            c for c in p.changes if (c.aspect, c.name) == (Aspect.SETTINGS, "serviceAccount")
        }
    if not dropped:
        return p, dropped
    return (
        replace(
            p,
            invokers_add=p.invokers_add - frozenset(missing),
            settings_set={
                k: v for k, v in p.settings_set.items() if k != "serviceAccount" or runtime_sa
            },
            changes=tuple(c for c in p.changes if c not in dropped),
        ),
        dropped,
    )


async def _verify(
    gw: Gateway,
    desired: Desired,
    after: Observed,
    p: Plan,
    managed: Managed,
    written: frozenset[Aspect],
    dropped: frozenset[Change],
    failures: dict[Aspect, Failure],
    events: list[Event],
) -> Observed:
    """Read back what was written and check the spec holds there (CONTRACT: P1a).

    Checked against what was owned before the write as well as after it: a name the spec just
    dropped is owned by neither the new spec nor (yet) nobody -- its removal must be seen in the
    read-back, else it stays owned (outcome keeps the old names of a failed aspect) and is
    removed again next time, instead of being forgotten while still on the service.
    """
    try:
        if written & p.service_aspects:
            after = await gw.refresh_service(after, desired.container)
        if Aspect.INVOKERS in written:
            after = await gw.refresh_iam(after)
    except GatewayError as exc:
        for a in written:
            failures.setdefault(a, exc.failure())
        return after
    left = restrict(plan(desired, after, managed.union(p.managed)), written)
    unverified = [c for c in left.changes if c not in dropped]
    if unverified:
        message = (
            "read-back after the write does not hold the spec: "
            f"{summary([str(c) for c in unverified])}"
        )
        for c in unverified:
            failures[c.aspect] = Failure(Reason.VERIFICATION_FAILED, message, Retry.UNVERIFIED)
        events.append(Event("Warning", Reason.VERIFICATION_FAILED, message))
    return after
