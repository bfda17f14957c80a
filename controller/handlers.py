"""The kopf wiring: the only module that imports kopf.

Shape of the drift loop:
  Each Orchestrator gets one loop (controller.loops.DriftLoop) that checks "at once when woken,
  else when the resync is due", run by a kopf *daemon*: kopf starts it for each object (on
  create and on resume) and stops it on deletion and exit. The daemon writes each check's status
  itself (controller.kube, one merge patch) rather than through kopf's handler ``patch``, which
  kopf applies only when a handler returns and, per call, at a cost comparable to a check's
  own (bench/results/notes.md). Daemon kwargs (body, spec, status) are live views, so a woken
  check sees the newest spec.

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
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

import aiohttp
import kopf

from controller import auditsub, crdwait, fight, kube, logs, metrics, reconcile, spec, status
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
DEFAULT_RESYNC = 60.0
# Connections to kube-apiserver. kopf's own pool is unbounded: with hundreds of Orchestrators
# finishing checks together it held one TLS connection per concurrent status patch, each with a
# 256 KiB read buffer and OpenSSL state (1,000 Orchestrators: ~450 MB RSS instead of ~150 MB).
KUBE_CONNECTIONS = 16
# Orchestrators whose diff-base essence is kept between watch events (more only cost a rebuild).
ESSENCE_CACHE = 10_000
V = TypeVar("V")

LOGGER = "runwarden.controller"
log = logs.get(LOGGER)


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
    memo.gateway = Gateway(clients, pacer=memo.pacer)
    memo.status_writer = kube.StatusWriter(_connect, GROUP, VERSION, PLURAL)
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
    writer: kube.StatusWriter | None = memo.get("status_writer")
    if writer is not None:
        await writer.close()
    log.info("stopped")


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base (the same essence, the same annotation), built once per change of the
    fields it depends on, not once per watch event.

    kopf builds and decodes the essence for every watch event it sees — one per status write,
    so one per check — starting with a deep copy of the whole body, metadata.managedFields and
    status included, only to delete most of it (py-spy: ~6% of a steady-state check's CPU).
    Here the essence is rebuilt only when its inputs (everything but status and metadata, plus
    labels, annotations and any extra field) differ from the last event of the same object;
    kopf only reads an essence, so the same one is returned again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._built: LRU[tuple[Any, Any]] = LRU(ESSENCE_CACHE)
        self._decoded: LRU[kopf.BodyEssence] = LRU(ESSENCE_CACHE)

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[Any] | None = None,
    ) -> kopf.BodyEssence:
        extra = list(extra_fields or ())
        meta = body.get("metadata") or {}
        lean: dict[str, Any] = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        lean["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        if any(_field_root(f) == "status" for f in extra) and "status" in body:
            lean["status"] = body["status"]
        for f in extra:  # other extra fields, e.g. metadata.generation
            if _field_root(f) == "metadata":
                lean["metadata"] = meta
        inputs = (lean, extra)
        key = str(meta.get("uid") or (meta.get("namespace"), meta.get("name")))
        cached = self._built.get(key)
        if cached is not None and cached[0] == inputs:
            essence: kopf.BodyEssence = cached[1]
            return essence
        essence = super().build(body=kopf.Body(cast(kopf.RawBody, lean)), extra_fields=extra)
        # A copy of the inputs: what is compared next time must not share dicts with a body.
        self._built.put(key, (copy.deepcopy(inputs), essence))
        return essence

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """The stored essence, decoded once per distinct annotation value."""
        annotations = body.metadata.annotations
        for full_key in self.make_keys(self.key, body=body):
            encoded = annotations.get(full_key)
            if encoded is None:
                continue
            decoded = self._decoded.get(encoded)
            if decoded is None:
                decoded = super().fetch(body=body)
                if decoded is not None:
                    self._decoded.put(encoded, decoded)
            return decoded
        return None


class LeanProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's progress storage; ``clear`` (called twice per watch event) builds the cleared
    essence without kopf's deep copy of it: essences are only read."""

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        result = cast(dict[str, Any], dict(essence))
        meta = result.get("metadata")
        if isinstance(meta, Mapping):
            meta = result["metadata"] = dict(meta)
            annotations = meta.get("annotations") or {}
            mine = f"{self.prefix}/" if self.prefix else None
            if mine is not None and any(k.startswith(mine) for k in annotations):
                meta["annotations"] = {
                    k: v for k, v in annotations.items() if not k.startswith(mine)
                }
        cleared = cast(kopf.BodyEssence, result)
        self.remove_empty_stanzas(cleared)
        return cleared


class LRU(Generic[V]):
    """A small least-recently-used map (kopf's storages are called from one event loop)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, V] = OrderedDict()

    def get(self, key: str) -> V | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: str, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


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
        cookie_jar=aiohttp.DummyCookieJar(),  # the apiserver sets none; skip the jar per request
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
                    status_patch = await _check(loop, body, memo, reasons)
                    if status_patch:
                        await _write_status(loop, memo.status_writer, status_patch)
                except Exception as exc:  # a bug must not end the loop: retry with backoff
                    log.exception("loop_crashed", k8s_ref=_ref(loop))
                    message = f"internal error ({type(exc).__name__})"
                    failure = Failure(Reason.INTERNAL_ERROR, message, Retry.TRANSIENT)
                    loop.schedule(DEFAULT_RESYNC, failure)
    finally:
        stopping.cancel()


async def _stopped(stopped: kopf.DaemonStopped) -> None:
    await stopped.wait()


async def _write_status(
    loop: DriftLoop, writer: kube.StatusWriter, status_patch: dict[str, Any]
) -> None:
    """Write a check's status (the writer retries transient failures for a while). A write that
    still fails is logged and made again by the next check: the loop keeps it as written
    (history), and the live status still differs from it."""
    try:
        await writer.patch(*loop.key, status_patch)
    except (kube.StatusWriteError, aiohttp.ClientError, TimeoutError) as exc:
        log.warning("status_write_failed", k8s_ref=_ref(loop), error=str(exc) or type(exc).__name__)


async def _check(
    loop: DriftLoop, body: kopf.Body, memo: Any, reasons: tuple[str, ...]
) -> dict[str, Any]:
    config: Settings = memo.config
    gateway: Gateway = memo.gateway
    # A consistent snapshot: the live body may change while we await Google. kopf replaces the
    # live body's source with each watch event's freshly decoded object and never changes a
    # delivered one in place, so the status dict taken now stays as it is (and is only read).
    generation = int(body.metadata.get("generation") or 0)
    parsed = _parse(loop, body, generation, config.resync_override)
    live_status = dict(body.get("status") or {})
    history = loop.history(live_status)

    started = time.monotonic()
    resync = config.resync_override or DEFAULT_RESYNC
    period = resync
    desired: Desired | None = None
    if isinstance(parsed, spec.InvalidSpec):
        update = reconcile.failed(Failure(parsed.reason, parsed.message, Retry.SPEC_CHANGE), ())
    else:
        desired = parsed
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
            log.exception("check_crashed", k8s_ref=_ref(loop), error=type(exc).__name__)
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

    if result == "synced" and not logging.getLogger(LOGGER).isEnabledFor(logging.DEBUG):
        return status_patch  # the steady state: nothing to log at INFO
    ref_log = log.bind(k8s_ref=_ref(loop))
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


def _ref(loop: DriftLoop) -> dict[str, str]:
    return {"namespace": loop.key[0], "name": loop.key[1]}


def _parse(
    loop: DriftLoop, body: kopf.Body, generation: int, resync_override: float | None
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
