"""The kopf handlers: the operator layer, with login.py and storage.py the only kopf importers.

Shape of the drift loops:
  Each Orchestrator gets one loop (controller.schedule.drift_loop.DriftLoop) that checks "at once
  when woken, else when the resync is due"; one Scheduler runs every loop's checks (no kopf
  daemon per object: a daemon's task, coroutines, kwargs and logger were most of the memory per
  Orchestrator, issue 17). Each check is controller.check.check (kopf-free), and its status is
  written by the operator (controller.kube.status_writer, one merge patch) rather than through
  kopf's handler ``patch``, which kopf applies only when a handler returns and, per call, at a
  cost comparable to a check's own (bench/results/notes.md).

  One watch-event handler (``watched``) feeds each loop its object's newest body and wakes it,
  with the object's generation, when the spec is new to it: a check that has already read that
  generation is not repeated. No create/update/resume handlers, so kopf keeps no diff base
  (storage.NoDiffBase): one apiserver write less per new Orchestrator and per spec change. A loop
  starts checking once kopf's finalizer is on the object, so that the deletion handler is sure
  to run for anything a check wrote. Anything else can wake a loop via
  ``controller.schedule.drift_loop.wake(project, region, service)`` — the hook for the Cloud
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
import functools
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
from controller.operator.storage import NoDiffBase
from controller.schedule.backoff import next_delay
from controller.schedule.drift_loop import REGISTRY, ROLLOUT_WAKE, DriftLoop, Scheduler
from controller.settings import Settings

__all__ = [
    "cleanup",
    "deleted",
    "kube_credentials",
    "login",
    "namespace_event",
    "run",
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
            stop.set()  # kopf stops (cleanup stops the checks); the fence already refuses writes

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
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="runwarden.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
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
    # Started by the first watch event (see watched).
    memo.scheduler = Scheduler(REGISTRY, functools.partial(_check_one, memo=memo))
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
    scheduler: Scheduler | None = memo.get("scheduler")
    if scheduler is not None:
        await scheduler.close(grace=CHECK_GRACE)
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


# On exit, running checks get this long to end (their Google calls have their own deadlines).
CHECK_GRACE = 30.0


async def _check_one(loop: DriftLoop, reasons: tuple[str, ...], memo: Any) -> None:
    """One check of one Orchestrator (run by the Scheduler), and its status write."""
    lease: Lease | None = memo.get("lease")
    async with loop.lock:
        body = loop.body
        if loop.stopping or body is None or body.metadata.get("deletionTimestamp"):
            return
        if lease is not None and not lease.held:
            # Fenced: no valid Lease (the operator is stopping). Neither Google nor the status
            # may be written; look again shortly.
            loop.schedule(lease.retry, None)
            return
        try:
            patch = await check(loop, body, memo, reasons, _poster(body))
            if patch and (lease is None or lease.held):
                await _write_status(loop, memo.status_writer, patch)
        except Exception as exc:  # a bug must not end the loop: retry with backoff
            log.exception("loop_crashed", k8s_ref=ref_of(loop))
            message = f"internal error ({type(exc).__name__})"
            failure = Failure(Reason.INTERNAL_ERROR, message, Retry.TRANSIENT)
            loop.schedule(DEFAULT_RESYNC, failure)


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


# The wake reason of a spec new to a loop, by watch event type (None: kopf's initial listing).
SPEC_WAKES = {None: "spec-resume", "ADDED": "spec-create"}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def watched(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, memo: Any, **_: Any
) -> None:
    """Every watch event of an Orchestrator: its loop gets the newest body, and is woken when
    the spec (generation) is new to it.

    Marked for deletion: its loop stops now (a running check completes first); kopf then calls
    `deleted`. Gone from this process's view without being deleted: relabelled out of
    --selector, the apiserver's filtered watch reports it DELETED, so its loop stops and its
    budget share and metric are forgotten; relabelled back in, it arrives as a new object."""
    scheduler: Scheduler = memo.scheduler
    if not scheduler.started:
        # From here, not from startup: the checks run in copies of this context, where kopf
        # has set the queue that kopf.event() posts through (the checks' Events).
        scheduler.start()
    key = (namespace or "", name)
    meta = body.metadata
    if meta.get("deletionTimestamp"):
        found = REGISTRY.get(*key)
        if found is not None:
            found.body = body
            found.stop()
        return
    if type == "DELETED":
        if REGISTRY.get(*key) is not None:
            log.info("unselected", k8s_ref={"namespace": key[0], "name": name})
            REGISTRY.forget(*key)
            memo.pacer.forget(key)
            metrics.set_ready(*key, None)
        return
    if FINALIZER not in (meta.get("finalizers") or ()):
        return  # kopf adds it first (its own patch); the next event brings it
    found = REGISTRY.get(*key)
    fresh = found is None
    loop = REGISTRY.loop(*key)
    loop.body = body
    generation = int(meta.get("generation") or 0) or None
    seen = loop.checked_generation
    if fresh or generation is None or seen is None or generation > seen:
        loop.wake(SPEC_WAKES.get(type, "spec-update") if fresh else "spec-update", generation)


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
