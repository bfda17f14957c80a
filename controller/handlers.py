"""The kopf wiring: the only module that imports kopf.

Shape of the drift loop (why a timer and not a daemon):
  Each Orchestrator gets one loop (controller.loops.DriftLoop) that checks "at once when woken,
  else when the resync is due". kopf applies a daemon's ``patch`` only when the daemon function
  returns, so a forever-running daemon could not write status through kopf; a timer's patch is
  applied after every call. So the loop is a kopf *timer* whose call blocks until the loop is
  woken or due, runs ONE check, and returns — kopf then applies that check's status patch and
  calls again after a short gap. It behaves like a daemon loop but writes status the kopf way,
  and kopf still owns its lifecycle (started for each object, stopped on deletion and exit).
  Timer kwargs (body, spec, status) are live views, so a woken check sees the newest spec.

  Spec changes (create/update/resume, spec only: status patches do not trigger them) just wake
  the loop, with the object's generation: a check that has already read that generation (the
  first check of a new or resumed object usually has) is not repeated. Anything else can wake it
  via ``controller.loops.wake(project, region, service)`` — the hook for the Cloud Audit Log
  listener. Checks and the deletion handler for one object share the loop's lock, so they never
  run concurrently.

Start-up: kopf starts only once the apiserver serves the Orchestrator resource (see
controller.crdwait for why kopf cannot be left to notice a CRD created after it started).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
import kopf

from controller import auditsub, crdwait, fight, logs, metrics, reconcile, spec, status
from controller.auditsub import AuditListener
from controller.clients import Clients, make_clients
from controller.fight import FightPolicy
from controller.gateway import Gateway, GatewayError
from controller.loops import REGISTRY, DriftLoop, next_delay
from controller.model import (
    DeletionPolicy,
    Desired,
    Failure,
    Mode,
    Reason,
    Retry,
    StatusUpdate,
)
from controller.pacing import Pacer
from controller.settings import Settings

GROUP, VERSION, PLURAL = "runwarden.dev", "v1alpha1", "orchestrators"
FINALIZER = "runwarden.dev/finalizer"
LOOP_GAP = 0.05  # seconds between a timer call returning and the next one starting to wait
DEFAULT_RESYNC = 60.0
# Connections to kube-apiserver. kopf's own pool is unbounded: with hundreds of Orchestrators
# finishing checks together it held one TLS connection per concurrent status patch, each with a
# 256 KiB read buffer and OpenSSL state (1,000 Orchestrators: ~450 MB RSS instead of ~150 MB).
KUBE_CONNECTIONS = 16

log = logs.get("runwarden.controller")


def run(settings: Settings) -> None:
    """Run the operator until SIGTERM/SIGINT, from when the apiserver serves Orchestrators."""
    resource = crdwait.ApiResource(GROUP, VERSION, PLURAL)
    if not asyncio.run(crdwait.wait_until_served(resource, _connect, liveness=settings.liveness)):
        return  # stopped while waiting for the CRD
    kopf.run(
        standalone=settings.standalone,
        namespaces=list(settings.namespaces),
        clusterwide=settings.all_namespaces and not settings.namespaces,
        liveness_endpoint=settings.liveness,
        memo=kopf.Memo(config=settings),
    )


# ---------------------------------------------------------------------- operator lifecycle


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: Settings = memo.config
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="runwarden.dev")
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(
        prefix="runwarden.dev", key="last-handled-configuration"
    )
    # On deletion kopf waits for the drift-loop timer to exit before releasing the finalizer; it
    # exits within milliseconds, so check for that often instead of kopf's default 60 s.
    settings.background.instant_exit_timeout = 0.5
    settings.background.cancellation_polling = 1.0
    # kopf would also post its own log lines as Events; ours are the contract's Events only.
    # (posting.enabled=False would also silence kopf.event(), which posts ours.)
    settings.posting.level = logging.CRITICAL
    settings.posting.reporting_component = "runwarden"  # the "From" of our Events
    clients = make_clients(config.gcp_endpoint)
    memo.clients = clients
    memo.pacer = Pacer(config.reads_per_minute, config.writes_per_minute)
    memo.gateway = Gateway(clients, pacer=memo.pacer)
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port)
    if config.audit_subscription:
        memo.audit = await auditsub.start(
            config.audit_subscription,
            own_principal=config.own_principal,
            gcp_endpoint=config.gcp_endpoint,
            debounce=config.audit_debounce,
            fight_policy=FightPolicy(threshold=config.fight_threshold, window=config.fight_window),
        )
    log.info(
        "started",
        gcp="emulator" if config.gcp_endpoint else "google",
        namespaces=list(config.namespaces) or "*",
        resync_override=config.resync_override,
        reads_per_minute=config.reads_per_minute,
        writes_per_minute=config.writes_per_minute,
        metrics_port=config.metrics_port,
        audit_subscription=config.audit_subscription,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    listener: AuditListener | None = memo.get("audit")
    if listener is not None:
        await listener.stop()
    clients: Clients | None = memo.get("clients")
    if clients is not None:
        await clients.close()
    log.info("stopped")


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base (the same essence, the same annotation), built without deep-copying
    what the essence leaves out anyway.

    kopf builds the essence of every watch event it sees — one per status patch, so one per
    check — starting with a deep copy of the whole body, metadata.managedFields and status
    included, only to delete most of it (py-spy: ~6% of a steady-state check's CPU, now ~2%).
    """

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[Any] | None = None,
    ) -> kopf.BodyEssence:
        extra = list(extra_fields or ())
        meta = body.get("metadata") or {}
        lean: dict[str, Any] = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        lean["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
        if any(_field_root(f) == "status" for f in extra) and "status" in body:
            lean["status"] = body["status"]
        return super().build(body=kopf.Body(cast(kopf.RawBody, lean)), extra_fields=extra)


def _field_root(field: Any) -> str:
    """'status.x' / ('status', 'x') / ['status'] -> 'status'."""
    if isinstance(field, str):
        return field.split(".", 1)[0]
    return str(next(iter(field), ""))


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's own credentials in an HTTP session with a bounded connection pool (see
    KUBE_CONNECTIONS)."""
    info = _credentials(**kwargs)
    if info is None:
        return None
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
        aiohttp_session=_session(info),
    )


def _credentials(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else KUBECONFIG: the one kopf would prefer."""
    found = [
        info
        for info in (
            kopf.login_with_service_account(**kwargs),
            kopf.login_with_kubeconfig(**kwargs),
        )
        if info is not None
    ]
    return max(found, key=lambda i: i.priority) if found else None


def _session(info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KUBE_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )


def _connect() -> tuple[str, aiohttp.ClientSession] | None:
    """The same credentials before kopf runs (for controller.crdwait)."""
    info = _credentials(settings=kopf.OperatorSettings())
    return (info.server, _session(info)) if info is not None else None


# ---------------------------------------------------------------------- spec changes


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def spec_changed(
    body: kopf.Body, namespace: str | None, name: str, reason: str, **_: Any
) -> None:
    """Check this Orchestrator at once (the drift loop picks up the new spec), unless a check
    has read this generation already."""
    generation = int(body.metadata.get("generation") or 0) or None
    REGISTRY.loop(namespace or "", name).wake(f"spec-{reason}", generation=generation)


# ---------------------------------------------------------------------- the drift loop


@kopf.timer(GROUP, VERSION, PLURAL, id="drift-loop", interval=LOOP_GAP)
async def drift_loop(
    body: kopf.Body,
    patch: kopf.Patch,
    namespace: str | None,
    name: str,
    memo: Any,
    **kwargs: Any,
) -> None:
    """One check of one Orchestrator, once it is woken or due (see the module docstring)."""
    stopped: kopf.DaemonStopped = kwargs["stopped"]
    loop = REGISTRY.loop(namespace or "", name)
    reasons = await loop.wait(stopped.wait)
    if not reasons or stopped or loop.deleted:
        return
    async with loop.lock:
        if stopped or loop.deleted or body.metadata.get("deletionTimestamp"):
            return
        status_patch = await _check(loop, body, memo, reasons)
    if status_patch:
        patch.status.update(status_patch)


async def _check(
    loop: DriftLoop, body: kopf.Body, memo: Any, reasons: tuple[str, ...]
) -> dict[str, Any]:
    config: Settings = memo.config
    gateway: Gateway = memo.gateway
    # A consistent snapshot: the live body may change while we await Google.
    raw_spec = copy.deepcopy(dict(body.get("spec") or {}))
    generation = int(body.metadata.get("generation") or 0)
    live_status = copy.deepcopy(dict(body.get("status") or {}))
    history = loop.history(live_status)
    ref_log = log.bind(k8s_ref={"namespace": loop.key[0], "name": loop.key[1]})

    started = time.monotonic()
    resync = config.resync_override or DEFAULT_RESYNC
    period = resync
    desired: Desired | None = None
    try:
        desired = spec.parse(raw_spec, config.resync_override)
    except spec.InvalidSpec as exc:
        update = reconcile.failed(Failure(exc.reason, exc.message, Retry.SPEC_CHANGE), ())
    else:
        loop.ref = desired.ref
        resync = desired.policy.resync_seconds
        # The region's read budget may not afford every resync: check less often, evenly.
        pacer: Pacer = memo.pacer
        pacer.enroll(loop.key, desired.ref.region, resync)
        period = pacer.period(desired.ref.region, resync)
        listener: AuditListener | None = memo.get("audit")
        hold = listener.begin_check(desired.ref, reasons) if listener is not None else None
        if hold is not None:
            desired = fight.observe_only(desired)  # a DriftFight hold: report, do not repair
        try:
            update = await reconcile.reconcile(
                gateway,
                desired,
                status.managed_of(history),
                status.prior_of(history, generation),
            )
        except Exception as exc:  # a bug must not stop the loop nor leave status stale
            ref_log.exception("check_crashed", error=type(exc).__name__)
            message = f"internal error ({type(exc).__name__}); see the controller log"
            update = reconcile.failed(Failure(Reason.INTERNAL_ERROR, message, Retry.TRANSIENT), ())
        if listener is not None:
            update = listener.end_check(desired.ref, update, hold)
    elapsed = time.monotonic() - started

    # Leave out only what both the live status and our unseen patches already hold: the watch
    # may lag behind a patch of ours that changed a key back from the value it still shows.
    status_patch = status.build_patch(
        history, update, generation, datetime.now(UTC), current=(live_status, history)
    )
    loop.written.update(status_patch)
    if update.wrote.generation is not None or update.wrote.iam_etag is not None:
        loop.last_write = update.wrote
    delay = loop.schedule(period, update.failure, generation=generation)
    for event in loop.events_to_post(update.events):
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    result = _result(update, desired)
    metrics.RECONCILES.labels(result=result).inc()
    metrics.RECONCILE_SECONDS.observe(elapsed)
    for aspect in update.drift.aspects:
        metrics.DRIFT_REPAIRS.labels(aspect=aspect.value).inc()
    metrics.set_ready(loop.key[0], loop.key[1], "True" if update.ready.status else "False")

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


# ---------------------------------------------------------------------- deletion


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def deleted(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: Any,
    retry: int,
    **_: Any,
) -> None:
    """Deletion policy: Abandon leaves GCP as it is; Revoke removes what this Orchestrator owns
    (status.managed) before the finalizer goes."""
    namespace = namespace or ""
    loop = REGISTRY.loop(namespace, name)
    ref_log = log.bind(k8s_ref={"namespace": namespace, "name": name})
    raw_spec: Mapping[str, Any] = copy.deepcopy(dict(body.get("spec") or {}))
    async with loop.lock:
        history = loop.history(copy.deepcopy(dict(body.get("status") or {})))
        REGISTRY.forget(namespace, name)
        memo.pacer.forget((namespace, name))
        metrics.set_ready(namespace, name, None)
        if spec.parse_deletion(raw_spec) is not DeletionPolicy.REVOKE:
            ref_log.info("deleted", deletion="Abandon")
            return
        try:
            ref = spec.parse_ref(raw_spec)
        except spec.InvalidSpec as exc:
            ref_log.warning("revoke_skipped", message=exc.message)
            return
        container = raw_spec.get("service", {}).get("container") or ""
        target = Desired(ref=ref, container=container, role=spec.parse_role(raw_spec))
        gateway: Gateway = memo.gateway
        try:
            removed = await reconcile.revoke(gateway, target, status.managed_of(history))
        except GatewayError as exc:
            delay = next_delay(DEFAULT_RESYNC, exc.failure(), retry + 1)
            ref_log.warning("revoke_failed", message=exc.message, retry_in=round(delay, 1))
            kopf.event(
                body, type="Warning", reason="UpdateFailed", message=f"revoke: {exc.message}"
            )
            raise kopf.TemporaryError(exc.message, delay=delay) from exc
        message = f"removed from service {ref}: " + (", ".join(removed) or "nothing left to remove")
        kopf.event(body, type="Normal", reason="Revoked", message=message)
        ref_log.info("deleted", deletion="Revoke", removed=list(removed))
