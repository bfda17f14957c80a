"""The kopf handlers: the operator layer, with login.py and storage.py the only kopf importers.

Shape of the drift loop:
  Each Orchestrator gets one loop (controller.schedule.drift_loop.DriftLoop) that checks "at once
  when woken, else when the resync is due", run by a kopf *daemon*: kopf starts it for each
  object (on create and on resume) and stops it on deletion and exit. Each check is
  controller.check.check (kopf-free); the daemon writes its status itself
  (controller.kube.status_writer, one merge patch) rather than through kopf's handler ``patch``,
  which kopf applies only when a handler returns and, per call, at a cost comparable to a check's
  own (bench/results/notes.md). Daemon kwargs (body, spec, status) are live views, so a woken
  check sees the newest spec.

  Spec changes (create/update/resume, spec only: status patches do not trigger them) just wake
  the loop, with the object's generation: a check that has already read that generation (the
  first check of a new or resumed object usually has) is not repeated. Anything else can wake it
  via ``controller.schedule.drift_loop.wake(project, region, service)`` — the hook for the Cloud
  Audit Log listener. Checks and the deletion handler for one object share the loop's lock, so
  they never run concurrently.

Start-up: kopf starts only once the apiserver serves the Orchestrator resource (see
controller.kube.crd_gate for why kopf cannot be left to notice a CRD created after it started).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from controller import reconcile
from controller.audit import listener as audit_listener
from controller.audit.fights import FightPolicy
from controller.audit.listener import AuditListener
from controller.check import DEFAULT_RESYNC, check, log, ref_of
from controller.domain import spec
from controller.domain.model import DeletionPolicy, Desired, Event, Failure, Reason, Retry
from controller.gcp.budget import Pacer
from controller.gcp.clients import Clients, make_clients
from controller.gcp.errors import GatewayError
from controller.gcp.gateway import Gateway
from controller.kube import crd_gate, credentials, status_patch, status_writer
from controller.obs import metrics
from controller.operator.login import kube_credentials, login
from controller.operator.storage import LeanDiffBaseStorage, LeanProgressStorage
from controller.schedule.backoff import next_delay
from controller.schedule.drift_loop import REGISTRY, ROLLOUT_WAKE, DriftLoop
from controller.settings import Settings

__all__ = [
    "cleanup",
    "deleted",
    "drift_loop",
    "kube_credentials",
    "login",
    "run",
    "spec_changed",
    "startup",
]

GROUP, VERSION, PLURAL = "runwarden.dev", "v1alpha1", "orchestrators"
FINALIZER = "runwarden.dev/finalizer"


def run(settings: Settings) -> None:
    """Run the operator until SIGTERM/SIGINT, from when the apiserver serves Orchestrators.

    Exits non-zero (SystemExit) when the apiserver refuses the credentials or there are none
    (CONTRACT §6.2): liveness fails first, for crd_gate.REFUSED_GRACE seconds.
    """
    resource = crd_gate.ApiResource(GROUP, VERSION, PLURAL)
    connect = credentials.connect
    served = asyncio.run(crd_gate.wait_until_served(resource, connect, liveness=settings.liveness))
    if served:
        stop = threading.Event()
        threading.Thread(target=_stop_when_refused, args=(stop,), daemon=True).start()
        kopf.run(
            standalone=settings.standalone,
            namespaces=list(settings.namespaces),
            clusterwide=settings.all_namespaces and not settings.namespaces,
            liveness_endpoint=settings.liveness,
            memo=kopf.Memo(config=settings),
            stop_flag=stop,
        )
    if credentials.REFUSALS.failed:
        raise SystemExit(f"runwarden: {credentials.REFUSALS.message}")


def _stop_when_refused(stop: threading.Event) -> None:
    """Once the credentials are refused while kopf runs: liveness fails (login.kube_credentials;
    kopf caches probe results for 10 s), then kopf is stopped and run() exits non-zero."""
    credentials.REFUSALS.event.wait()
    time.sleep(crd_gate.REFUSED_GRACE)
    stop.set()


# ---------------------------------------------------------------------- operator lifecycle


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: Settings = memo.config
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = LeanProgressStorage(prefix="runwarden.dev")
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(
        prefix="runwarden.dev", key="last-handled-configuration"
    )
    # On deletion kopf waits for the drift-loop daemon to exit before releasing the finalizer; it
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
    # A rollout started by a check ends in the background: wake that Orchestrator's loop then.
    memo.gateway = Gateway(
        clients, pacer=memo.pacer, on_rollout=lambda ref: REGISTRY.wake_service(ref, ROLLOUT_WAKE)
    )
    memo.status_writer = status_writer.StatusWriter(credentials.connect, GROUP, VERSION, PLURAL)
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port)
    if config.audit_subscription:
        memo.audit = await audit_listener.start(
            config.audit_subscription,
            own_principal=config.own_principal,
            gcp_endpoint=config.gcp_endpoint,
            debounce=config.audit_debounce,
            last_write=REGISTRY.last_write,
            wake=REGISTRY.wake_service,
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
    gateway: Gateway | None = memo.get("gateway")
    if gateway is not None:
        await gateway.close()
    clients: Clients | None = memo.get("clients")
    if clients is not None:
        await clients.close()
    writer: status_writer.StatusWriter | None = memo.get("status_writer")
    if writer is not None:
        await writer.close()
    log.info("stopped")


# ---------------------------------------------------------------------- spec changes


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def spec_changed(
    body: kopf.Body, namespace: str | None, name: str, reason: str, **_: Any
) -> None:
    """Check this Orchestrator at once (the drift loop picks up the new spec), unless a check
    has read this generation already. (kopf calls update handlers only when the spec, labels or
    annotations change, never for status; filtering on field="spec" would cost a field match
    per watch event, i.e. per check, for nothing: a label change is a seen generation.)"""
    generation = int(body.metadata.get("generation") or 0) or None
    REGISTRY.loop(namespace or "", name).wake(f"spec-{reason}", generation=generation)


# ---------------------------------------------------------------------- the drift loop


@kopf.daemon(GROUP, VERSION, PLURAL, id="drift-loop")
async def drift_loop(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: Any,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    """Check one Orchestrator whenever it is woken or due, until it is deleted or the operator
    stops (see the module docstring)."""
    loop = REGISTRY.loop(namespace or "", name)
    loop.stopping = False  # a new daemon for this object (e.g. after the operator paused)
    # One task for the daemon's life turns kopf's stop flag into the loop's stop.
    stopping = asyncio.ensure_future(_stopped(stopped))
    stopping.add_done_callback(lambda _: loop.stop())
    try:
        while reasons := await loop.wait():
            async with loop.lock:
                if loop.stopping or body.metadata.get("deletionTimestamp"):
                    return
                try:
                    patch = await check(loop, body, memo, reasons, _poster(body))
                    if patch:
                        await _write_status(loop, memo.status_writer, patch)
                except Exception as exc:  # a bug must not end the loop: retry with backoff
                    log.exception("loop_crashed", k8s_ref=ref_of(loop))
                    message = f"internal error ({type(exc).__name__})"
                    failure = Failure(Reason.INTERNAL_ERROR, message, Retry.TRANSIENT)
                    loop.schedule(DEFAULT_RESYNC, failure)
    finally:
        stopping.cancel()


async def _stopped(stopped: kopf.DaemonStopped) -> None:
    await stopped.wait()


def _poster(body: kopf.Body) -> Any:
    """Post a check's Events on its object, through kopf (which batches and names the source)."""

    def post(event: Event) -> None:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    return post


async def _write_status(
    loop: DriftLoop, writer: status_writer.StatusWriter, patch: dict[str, Any]
) -> None:
    """Write a check's status (the writer retries transient failures for a while). A write that
    still fails is logged and made again by the next check: the loop keeps it as written
    (history), and the live status still differs from it."""
    try:
        await writer.patch(*loop.key, patch)
    except (status_writer.StatusWriteError, aiohttp.ClientError, TimeoutError) as exc:
        log.warning(
            "status_write_failed", k8s_ref=ref_of(loop), error=str(exc) or type(exc).__name__
        )


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
            removed = await reconcile.revoke(gateway, target, status_patch.managed_of(history))
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
