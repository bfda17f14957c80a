"""The kopf handlers: the operator layer, with login.py and storage.py the only kopf importers.

Shape of the drift loop:
  Each Orchestrator gets one loop (controller.schedule.drift_loop.DriftLoop) that checks "at once
  when woken, else when the resync is due", run by a kopf *daemon*: kopf starts it for each
  object (on create and on resume) and stops it on deletion and exit. Each check is
  controller.check.check (kopf-free); the daemon writes its status itself
  (controller.kube.status_writer, one merge patch) rather than through kopf's handler ``patch``,
  which kopf applies only when a handler returns and, per call, at a cost comparable to a check's
  own (bench/results/notes.md). Daemon kwargs (body, spec, status) are live views, so a woken
  check sees the newest spec. Memory per Orchestrator (issue 17): kopf keeps each body without
  managedFields and with shared strings (lean_bodies.py); a daemon waits on its loop only (one
  future while it sleeps), and kopf's stop flags are polled by one task for all daemons, a
  deletion stopping its loop at once from the watch event.

  Spec changes (create/update/resume, spec only: status patches do not trigger them) just wake
  the loop, with the object's generation: a check that has already read that generation (the
  first check of a new or resumed object usually has) is not repeated. Anything else can wake it
  via ``controller.schedule.drift_loop.wake(project, region, service)`` — the hook for the Cloud
  Audit Log listener. Checks and the deletion handler for one object share the loop's lock, so
  they never run concurrently.

Start-up: kopf starts only once the apiserver serves the Orchestrator resource (see
controller.kube.crd_gate for why kopf cannot be left to notice a CRD created after it started)
and, with --leader-election, once this replica holds the Lease (controller.kube.lease): a
standby runs no handler and no drift loop at all. The holder's gateway asks the Lease before
every Google write (fencing); losing the Lease stops kopf and exits LEASE_LOST_EXIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import signal
import sys
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

from controller import reconcile
from controller.audit import listener as audit_listener
from controller.audit.fights import FightDetector, FightPolicy
from controller.audit.listener import AuditListener
from controller.check import DEFAULT_RESYNC, check, gateway_for, log, ref_of
from controller.domain import ownership, spec
from controller.domain.model import (
    DeletionPolicy,
    Desired,
    Event,
    Failure,
    Reason,
    Retry,
    ServiceRef,
)
from controller.gcp.budget import Pacer
from controller.gcp.errors import GatewayError
from controller.gcp.gateway import Gateway
from controller.gcp.identity import Gateways
from controller.kube import crd_gate, credentials, status_patch, status_writer
from controller.kube.lease import Lease
from controller.kube.namespaces import NamespaceBindings
from controller.obs import metrics
from controller.operator import lean_bodies
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
    "namespace_event",
    "run",
    "spec_changed",
    "startup",
    "watched",
]

GROUP, VERSION, PLURAL = "runwarden.dev", "v1alpha1", "orchestrators"
FINALIZER = "runwarden.dev/finalizer"
# The emulator attributes a gRPC write to this request metadata (CONTRACT §3).
PRINCIPAL_METADATA = "x-emulator-principal"
LEASE_LOST_EXIT = 3  # the exit code after losing the leader Lease


def run(settings: Settings) -> None:
    """Run the operator until SIGTERM/SIGINT, from when the apiserver serves Orchestrators (and,
    with --leader-election, from when this replica holds the Lease). Exits non-zero when the
    Lease is lost: the pod restarts as a standby (client-go's leader election does the same);
    and (SystemExit) when the apiserver refuses the credentials or there are none (CONTRACT
    §6.2): liveness fails first, for crd_gate.REFUSED_GRACE seconds."""
    code = asyncio.run(_serve(settings))
    if credentials.REFUSALS.failed:
        raise SystemExit(f"runwarden: {credentials.REFUSALS.message}")
    if code:
        sys.exit(code)


async def _serve(settings: Settings) -> int:
    resource = crd_gate.ApiResource(GROUP, VERSION, PLURAL)
    connect = credentials.connect
    if not await crd_gate.wait_until_served(resource, connect, liveness=settings.liveness):
        return 0  # stopped while waiting for the CRD (or refused credentials: see run)
    lease: Lease | None = None
    if settings.leader_election:
        lease = Lease(
            connect,
            settings.leader_election_namespace,
            settings.leader_election_name,
            settings.leader_election_identity,
            duration=settings.lease_seconds,
        )
        if not await _stand_by(lease, settings.liveness):
            await lease.close()
            return 0  # stopped while standing by (or refused credentials: see run)
    stop = asyncio.Event()
    lost = asyncio.Event()
    lean_bodies.install()  # kopf keeps every object's body: without managedFields, interned
    tasks = [asyncio.create_task(_stop_when_refused(stop))]
    if lease is not None:

        async def keep(held: Lease) -> None:
            await held.keep()
            lost.set()
            stop.set()  # kopf stops its daemons; the gateway's fence already refuses writes

        tasks.append(asyncio.create_task(keep(lease)))
    try:
        with contextlib.suppress(asyncio.CancelledError):  # as kopf.run does
            await kopf.operator(
                standalone=settings.standalone,
                namespaces=list(settings.namespaces),
                clusterwide=settings.all_namespaces and not settings.namespaces,
                liveness_endpoint=settings.liveness,
                memo=kopf.Memo(config=settings, lease=lease),
                stop_flag=stop,
            )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if lease is not None:
            if not lost.is_set() and not credentials.REFUSALS.failed:
                await lease.release()  # a clean stop: the standby takes over at once
            await lease.close()
    if lost.is_set():
        log.error("exiting", reason="leader Lease lost", message="restart to stand by again")
        return LEASE_LOST_EXIT
    return 0


async def _stop_when_refused(stop: asyncio.Event) -> None:
    """Once the credentials are refused while kopf runs: liveness fails (login.kube_credentials;
    kopf caches probe results for 10 s), then kopf is stopped and run() exits non-zero."""
    await credentials.REFUSALS.wait()
    await asyncio.sleep(crd_gate.REFUSED_GRACE)
    stop.set()


async def _stand_by(lease: Lease, liveness: str | None) -> bool:
    """Wait until this replica holds the Lease (True), alive meanwhile, or a stop signal or
    refused credentials (False)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    refused = asyncio.create_task(_stop_when_refused(stop))
    try:
        async with crd_gate.alive(liveness, {"standby": lease.identity}):
            return await lease.acquire(stop)
    finally:
        refused.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _wake_rollout_ended(ref: ServiceRef) -> None:
    """Gateway on_rollout: a rollout ended; the loop of the Orchestrator of ``ref`` checks."""
    REGISTRY.wake_service(ref, ROLLOUT_WAKE)


# ---------------------------------------------------------------------- operator lifecycle


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: Settings = memo.config
    settings.persistence.finalizer = FINALIZER
    if config.selector:
        # Shards: the apiserver filters the watch, so this process never sees (nor holds in
        # memory, nor touches the finalizer of) another shard's Orchestrators. An object
        # relabelled out of the selection arrives as DELETED (see watched); relabelled in, it
        # arrives as new and is resumed.
        settings.watching.label_selectors[GROUP, PLURAL] = config.selector
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
    memo.pacer = Pacer(config.reads_per_minute, config.writes_per_minute)
    lease: Lease | None = memo.get("lease")
    # With the emulator, name our identity on writes as its audit entries will show it (a
    # tenant's impersonated token names the tenant's account instead: the emulator prefers it).
    principal = config.own_principal if config.gcp_endpoint else None
    gateways = Gateways(
        config.gcp_endpoint,
        memo.pacer,
        transport=config.gcp_transport,
        iam_credentials_endpoint=config.iam_credentials_endpoint,
        gateway_options={
            # Leader election: every Google write first checks the Lease is still held.
            "fence": lease.remaining if lease is not None else None,
            "write_metadata": ((PRINCIPAL_METADATA, principal),) if principal else (),
            # A rollout started by a check ends in the background (whichever identity wrote
            # it): wake that Orchestrator's loop then.
            "on_rollout": _wake_rollout_ended,
        },
    )
    memo.gateways = gateways
    memo.gateway = gateways.default
    memo.namespaces = NamespaceBindings(credentials.connect, config.namespace_binding)
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
            project_allowed=memo.namespaces.project_allowed,
        )
    else:
        # No audit feed: checks still detect fights, from their own repairs (check.py).
        memo.fights = FightDetector(
            FightPolicy(threshold=config.fight_threshold, window=config.fight_window)
        )
    log.info(
        "started",
        gcp="emulator" if config.gcp_endpoint else "google",
        gcp_transport=config.gcp_transport,
        namespaces=list(config.namespaces) or "*",
        resync_override=config.resync_override,
        reads_per_minute=config.reads_per_minute,
        writes_per_minute=config.writes_per_minute,
        metrics_port=config.metrics_port,
        audit_subscription=config.audit_subscription,
        status_heartbeat=config.status_heartbeat,
        selector=config.selector or None,
        leader=lease.identity if lease is not None else None,
        namespace_binding=str(config.namespace_binding),
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    listener: AuditListener | None = memo.get("audit")
    if listener is not None:
        await listener.stop()
    gateways: Gateways | None = memo.get("gateways")
    if gateways is not None:
        await gateways.close()  # every gateway's background rollout waits, then its clients
    namespaces: NamespaceBindings | None = memo.get("namespaces")
    if namespaces is not None:
        await namespaces.close()
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


# ---------------------------------------------------------------------- namespace bindings


@kopf.on.event("", "v1", "namespaces")
async def namespace_event(
    event: Mapping[str, Any], name: str, annotations: Mapping[str, str], memo: Any, **_: Any
) -> None:
    """Keep namespace bindings current (controller.kube.namespaces); a changed binding wakes its
    namespace's Orchestrators, so it takes effect at once, without a restart."""
    bindings: NamespaceBindings | None = memo.get("namespaces")
    if bindings is None:
        return
    if event.get("type") == "DELETED":
        bindings.gone(name)
        return
    if bindings.seen(name, annotations):
        for loop in REGISTRY.in_namespace(name):
            loop.wake("namespace-binding")


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
    lease: Lease | None = memo.get("lease")
    loop.stopping = False  # a new daemon for this object (e.g. after the operator paused)
    # kopf's stop flag becomes the loop's stop by one poller for all daemons (a task per daemon
    # waiting on its flag cost ~2 KB per Orchestrator: issue 17); a deletion stops the loop at
    # once from its watch event (watched).
    _STOP_FLAGS[loop.key] = (loop, stopped)
    _ensure_stop_poller()
    try:
        while reasons := await loop.wait():
            # A turn among the checks first, then the object's lock: a check queued for its turn
            # must not hold the lock its object's deletion handler waits on.
            async with _checks_running(), loop.lock:
                if loop.stopping or body.metadata.get("deletionTimestamp"):
                    return
                if lease is not None and not lease.held:
                    # Fenced: no valid Lease (the operator is stopping). Neither Google nor the
                    # status may be written; look again shortly.
                    loop.schedule(lease.retry, None)
                    continue
                try:
                    patch = await check(loop, body, memo, reasons, _poster(body))
                    if patch and (lease is None or lease.held):
                        await _write_status(loop, memo.status_writer, patch)
                except Exception as exc:  # a bug must not end the loop: retry with backoff
                    log.exception("loop_crashed", k8s_ref=ref_of(loop))
                    message = f"internal error ({type(exc).__name__})"
                    failure = Failure(Reason.INTERNAL_ERROR, message, Retry.TRANSIENT)
                    loop.schedule(DEFAULT_RESYNC, failure)
    finally:
        if _STOP_FLAGS.get(loop.key, (None, None))[0] is loop:
            del _STOP_FLAGS[loop.key]


# At most this many checks run at once; the rest wait their turn (FIFO). Every Orchestrator of a
# new or restarted controller is due at once: 10,000 checks in flight together held ~15 KB each
# (coroutines, gRPC calls, replies) only to queue for the one CPU anyway (issue 17: peak RSS).
MAX_CONCURRENT_CHECKS = 128
_check_slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _checks_running() -> asyncio.Semaphore:
    running = asyncio.get_running_loop()
    slots = _check_slots.get(running)
    if slots is None:
        _check_slots.clear()  # one operator per event loop; an earlier loop has ended
        slots = _check_slots[running] = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)
    return slots


# The running drift-loop daemons' kopf stop flags, polled by one task (_poll_stop_flags).
_STOP_FLAGS: dict[tuple[str, str], tuple[DriftLoop, kopf.DaemonStopped]] = {}
STOP_POLL_SECONDS = 0.5  # kopf checks a stopping daemon every cancellation_polling (1 s)
_stop_poller: asyncio.Task[None] | None = None


def _ensure_stop_poller() -> None:
    global _stop_poller
    running = asyncio.get_running_loop()
    if _stop_poller is None or _stop_poller.done() or _stop_poller.get_loop() is not running:
        _stop_poller = running.create_task(_poll_stop_flags(), name="drift-loop stop flags")


async def _poll_stop_flags() -> None:
    """Stop the loop of every daemon kopf asked to stop (operator exit, pause), until no daemon
    is left."""
    while _STOP_FLAGS:
        await asyncio.sleep(STOP_POLL_SECONDS)
        for key, (loop, stopped) in list(_STOP_FLAGS.items()):
            if stopped:
                loop.stop()
                if _STOP_FLAGS.get(key, (None, None))[0] is loop:
                    del _STOP_FLAGS[key]


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


@kopf.on.event(GROUP, VERSION, PLURAL)
async def watched(
    type: str, body: kopf.Body, namespace: str | None, name: str, memo: Any, **_: Any
) -> None:
    """Every watch event of an Orchestrator. Marked for deletion: stop its drift loop now.
    Gone from this process's view without being deleted: relabelled out of --selector, the
    apiserver's filtered watch reports it DELETED. kopf stops daemons only for deletions
    (deletionTimestamp), so stop its drift loop here and forget its budget share and metric;
    relabelled back in, it arrives as a new object."""
    key = (namespace or "", name)
    if body.metadata.get("deletionTimestamp"):
        # Marked for deletion: its loop stops now (a running check completes first); kopf
        # then stops the daemon and calls `deleted`.
        found = REGISTRY.get(*key)
        if found is not None and not found.stopping:
            found.stop()
        return
    if type != "DELETED":
        return
    if REGISTRY.get(*key) is not None:
        log.info("unselected", k8s_ref={"namespace": key[0], "name": name})
        REGISTRY.forget(*key)
        memo.pacer.forget(key)
        metrics.set_ready(*key, None)


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
        try:
            ref = spec.parse_ref(raw_spec)
        except spec.InvalidSpec as exc:
            ref_log.warning("revoke_skipped", message=exc.message)
            return
        container = raw_spec.get("service", {}).get("container") or ""
        config: Settings = memo.config
        target = Desired(
            ref=ref,
            container=container,
            role=spec.parse_role(raw_spec),
            owner=ownership.owner_id(config.cluster_name, namespace, name),
        )
        found = await gateway_for(memo, namespace, target)
        if not isinstance(found, Gateway):  # the binding refuses it: touch nothing
            ref_log.warning("revoke_skipped", message=found.message)
            kopf.event(body, type="Warning", reason=found.reason, message=found.message)
            return
        gateway: Gateway = found
        if spec.parse_deletion(raw_spec) is not DeletionPolicy.REVOKE:
            await _release(body, gateway, target, retry, ref_log)
            return
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


# Abandon releases the claim on the service; a release that keeps failing must not keep the
# object (Abandon never blocked a deletion): a lasting failure (permission denied, ...) at once,
# a transient one after this many attempts, and the finalizer goes anyway.
RELEASE_ATTEMPTS = 5


async def _release(
    body: kopf.Body, gateway: Gateway, target: Desired, retry: int, ref_log: Any
) -> None:
    """Deletion policy Abandon: GCP stays as it is, except that the claim is released (CONTRACT
    §6.1), so another Orchestrator may take the service over."""
    try:
        released = await reconcile.release(gateway, target)
    except GatewayError as exc:
        lasting = exc.failure().retry not in (Retry.TRANSIENT, Retry.QUOTA)
        if lasting or retry + 1 >= RELEASE_ATTEMPTS:
            ref_log.warning("release_given_up", message=exc.message, attempts=retry + 1)
            kopf.event(
                body,
                type="Warning",
                reason="UpdateFailed",
                message=f"release of the claim on service {target.ref} failed; the annotation "
                f"runwarden.dev/owner stays (remove it by hand or use takeOver): {exc.message}",
            )
            return
        delay = next_delay(DEFAULT_RESYNC, exc.failure(), retry + 1)
        ref_log.warning("release_failed", message=exc.message, retry_in=round(delay, 1))
        raise kopf.TemporaryError(exc.message, delay=delay) from exc
    ref_log.info("deleted", deletion="Abandon", released=released)
