"""One drift check of one Orchestrator, kopf-free: spec -> reconcile -> status patch + Events.

The operator layer (controller.operator) runs it from the drift loops' Scheduler, under the
loop's lock, and writes the returned patch; everything here is plain Python over the object's
body as a mapping, so it can be driven without kopf.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from controller import reconcile
from controller.audit import fights
from controller.audit.listener import AuditListener
from controller.domain import ownership, spec
from controller.domain.model import Desired, Event, Failure, Mode, Reason, Retry, StatusUpdate
from controller.domain.outcome import failed
from controller.domain.tenancy import refusal
from controller.gcp.budget import Pacer
from controller.gcp.gateway import Gateway
from controller.gcp.identity import Gateways
from controller.kube import status_patch as status
from controller.kube.namespaces import NamespaceBindings
from controller.obs import logs, metrics
from controller.schedule.drift_loop import DriftLoop
from controller.settings import Settings

DEFAULT_RESYNC = 60.0
LOGGER = "runwarden.controller"
log = logs.get(LOGGER)


async def check(
    loop: DriftLoop,
    body: Mapping[str, Any],
    memo: Any,
    reasons: tuple[str, ...],
    post_event: Callable[[Event], None],
) -> dict[str, Any]:
    """One drift check of one Orchestrator: its status patch (empty: nothing to write).

    ``memo`` carries the process's collaborators (config, gateways, namespace bindings, pacer,
    audit listener); ``post_event`` posts an Event on the object (the operator layer owns
    Kubernetes Events).
    """
    config: Settings = memo.config
    # A consistent snapshot: the live body may change while we await Google. kopf replaces the
    # live body's source with each watch event's freshly decoded object and never changes a
    # delivered one in place, so the status dict taken now stays as it is (and is only read).
    generation = int((body.get("metadata") or {}).get("generation") or 0)
    parsed = _parse(loop, body, generation, config.resync_override)
    live_status = dict(body.get("status") or {})
    history = loop.history(live_status)

    started = time.monotonic()
    resync = config.resync_override or DEFAULT_RESYNC
    period = resync
    desired: Desired | None = None
    gateway: Gateway | Failure | None = None
    if isinstance(parsed, spec.InvalidSpec):
        update = failed(Failure(parsed.reason, parsed.message, Retry.SPEC_CHANGE), ())
    else:
        resync = parsed.policy.resync_seconds
        gateway = await gateway_for(memo, loop.key[0], parsed)
        if isinstance(gateway, Failure):
            # Refused by the namespace's binding: no Google call at all, and no audit wake-ups
            # for this service (the audit feed finds loops by their ref).
            loop.ref = None
            memo.pacer.forget(loop.key)
            update = failed(gateway, (Event("Warning", gateway.reason, gateway.message),))
        else:
            desired = parsed
    if desired is not None and isinstance(gateway, Gateway):
        loop.ref = desired.ref
        # The region's read budget may not afford every resync: check less often, evenly.
        pacer: Pacer = memo.pacer
        pacer.enroll(loop.key, desired.ref.region, resync)
        period = pacer.period(desired.ref.region, resync)
        desired = replace(desired, owner=ownership.owner_id(config.cluster_name, *loop.key))
        listener: AuditListener | None = memo.get("audit")
        # Without the audit feed, fights are still seen: by the repairs themselves.
        detector: fights.FightDetector | None = memo.get("fights")
        if listener is not None:
            hold = listener.begin_check(desired.ref, reasons)
        elif detector is not None:
            hold = fights.begin(detector, desired.ref, reasons, time.time())
        else:
            hold = None
        if hold is not None:
            desired = fights.observe_only(desired)  # a DriftFight hold: report, do not repair
        try:
            update = await reconcile.reconcile(
                gateway,
                desired,
                status.managed_of(history, desired.role),
                status.prior_of(history, generation),
            )
        except Exception as exc:  # a bug must not stop the loop nor leave status stale
            log.exception("check_crashed", k8s_ref=ref_of(loop), error=type(exc).__name__)
            message = f"internal error ({type(exc).__name__}); see the controller log"
            update = failed(Failure(Reason.INTERNAL_ERROR, message, Retry.TRANSIENT), ())
        if listener is not None:
            update = listener.end_check(desired.ref, update, hold)
        elif detector is not None:
            if update.drift.repaired and update.drift.by:
                # No audit entry names who undid the spec: the service's last modifier does.
                detector.saw(desired.ref, update.drift.by, time.time())
            update, new_hold = fights.end(detector, desired.ref, update, hold, time.time())
            if new_hold is not None:
                log.warning(
                    "drift_fight",
                    k8s_ref=ref_of(loop),
                    service=str(desired.ref),
                    principals=list(new_hold.principals),
                    repairs=new_hold.repairs,
                    backoff_seconds=new_hold.backoff,
                )
    elapsed = time.monotonic() - started

    # Leave out only what both the live status and our unseen patches already hold: the watch
    # may lag behind a patch of ours that changed a key back from the value it still shows.
    now = datetime.now(UTC)
    status_patch = status.build_patch(
        history, update, generation, now, current=(live_status, history)
    )
    # Steady state: nothing but lastSyncTime moved; refresh that once per heartbeat only.
    status_patch = status.economize(status_patch, history, now, config.status_heartbeat)
    loop.written.update(status_patch)
    if update.wrote.generation is not None or update.wrote.iam_etag is not None:
        loop.last_write = update.wrote
    delay = loop.schedule(
        period, update.failure, generation=generation, rolling_out=update.rolling_out
    )
    for event in loop.events_to_post(update.events):
        post_event(event)

    result = _result(update, desired)
    metrics.reconciles(result).inc()
    metrics.RECONCILE_SECONDS.observe(elapsed)
    for aspect in update.drift.aspects:
        metrics.DRIFT_REPAIRS.labels(aspect=aspect.value).inc()
    ready = "True" if update.ready.status else "False"
    metrics.set_ready(loop.key[0], loop.key[1], ready, str(update.ready.reason))

    if result == "synced" and not logging.getLogger(LOGGER).isEnabledFor(logging.DEBUG):
        return status_patch  # the steady state: nothing to log at INFO
    ref_log = log.bind(k8s_ref=ref_of(loop))
    fields: dict[str, Any] = {
        "result": result,
        "reason": str(update.ready.reason),
        "woken_by": list(reasons),
        "seconds": round(elapsed, 3),
        "next_check_in": round(delay, 1) if delay != float("inf") else None,
    }
    if update.drift.detected:
        fields["drift"] = list(update.drift.detected)
    if update.pending:
        fields["pending"] = list(update.pending)
    if update.failure is not None:
        ref_log.warning("check_failed", message=update.failure.message, **fields)
    elif result in ("repaired", "applied", "pending"):
        ref_log.info("check", **fields)
    else:
        ref_log.debug("check", **fields)
    return status_patch


async def gateway_for(memo: Any, namespace: str, desired: Desired) -> Gateway | Failure:
    """The gateway acting as the namespace's Google identity, or why the namespace's binding
    refuses this Orchestrator (controller.domain.tenancy). Without bindings in ``memo`` (a
    caller that wires none), the process's own gateway."""
    bindings: NamespaceBindings | None = memo.get("namespaces")
    gateways: Gateways | None = memo.get("gateways")
    if bindings is None or gateways is None:
        default: Gateway = memo.gateway
        return default
    try:
        binding = await bindings.get(namespace)
    except Exception as exc:  # the apiserver is away: like any outage, retried with backoff
        return Failure(
            Reason.UNAVAILABLE,
            f"cannot read namespace {namespace} for its binding: {type(exc).__name__}",
            Retry.TRANSIENT,
        )
    refused = refusal(binding, desired, bindings.mode)
    if refused is not None:
        return refused
    account = binding.service_account
    if account is not None:
        listener: AuditListener | None = memo.get("audit")
        if listener is not None:  # its writes as the tenant are Runwarden's own
            listener.router.own.add_identity(account)
    return gateways.for_account(account)


def ref_of(loop: DriftLoop) -> dict[str, str]:
    return {"namespace": loop.key[0], "name": loop.key[1]}


def _parse(
    loop: DriftLoop, body: Mapping[str, Any], generation: int, resync_override: float | None
) -> Desired | spec.InvalidSpec:
    """The spec as Desired (or why it is invalid), parsed once per generation: every change of
    an Orchestrator's spec bumps metadata.generation."""
    if loop.parsed is not None and generation and loop.parsed[0] == generation:
        cached = loop.parsed[1]
        if isinstance(cached, Desired | spec.InvalidSpec):
            return cached
    raw_spec = copy.deepcopy(dict(body.get("spec") or {}))
    try:
        result: Desired | spec.InvalidSpec = spec.parse(raw_spec, resync_override)
    except spec.InvalidSpec as exc:
        result = exc
    loop.parsed = (generation, result)
    return result


def _result(update: StatusUpdate, desired: Desired | None) -> str:
    if update.failure is not None:
        return "error"
    if desired is not None and desired.policy.mode is Mode.OBSERVE and update.pending:
        return "pending"
    if update.drift.repaired:
        return "repaired"
    if update.wrote.generation is not None or update.wrote.iam_etag is not None:
        return "applied"
    return "synced"
