"""Event-driven drift repair: Cloud Audit Log entries from a Pub/Sub subscription wake the drift
loop of the Orchestrator whose service someone else just changed.

    Pub/Sub streaming pull (google-cloud-pubsub's threads)
      -> audit.parse (pure) -> ack -> loop.call_soon_threadsafe
      -> AuditRouter.receive (the operator's event loop): whose write? which Orchestrator?
      -> debounce per service (~1 s: one deploy is several entries) -> loops.wake(...)
    drift loop check: begin_check (a fight hold?) -> reconcile -> end_check (latency, fights)

Ack policy: every message is acked as soon as it is parsed, malformed ones included. A redelivered
entry could only cause a check that the first delivery already caused, and the periodic check
stays the safety net for anything lost; a nack would only turn a bad message into a hot loop.

Runwarden's own writes wake nothing: an entry by ``own_principal`` whose generation / IAM etag is
not newer than what Runwarden recorded writing is counted as ``own``. Its entries often arrive
before the reconcile that wrote has recorded the write, so such an entry waits (a few debounce
windows) for the record before it is believed to be someone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from controller import audit, fight, logs, metrics
from controller.audit import AuditEntry, Ignored, Origin, OwnWrites, Parsed, Result
from controller.fight import FightDetector, FightPolicy, Hold
from controller.loops import REGISTRY
from controller.model import ServiceRef, StatusUpdate, WriteRecord

log = logs.get("runwarden.audit")

EMULATOR_PRINCIPAL = "runwarden@example.com"
DEFAULT_DEBOUNCE = 1.0
# An own-identity entry newer than the recorded write waits this many debounce windows for the
# write's record (the reconcile is still verifying) before it counts as someone else's.
MAX_DEFERRALS = 8
RESUBSCRIBE_BACKOFF = (1.0, 60.0)


def _registry_wake(ref: ServiceRef, reason: str) -> int:
    return REGISTRY.wake_service(ref, reason)


@dataclass
class _Batch:
    foreign: list[AuditEntry] = field(default_factory=list)
    unconfirmed: list[AuditEntry] = field(default_factory=list)
    deferrals: int = 0
    handle: asyncio.TimerHandle | None = None


class AuditRouter:
    """The event-loop side: classify, debounce, wake; fight holds and repair latency.

    All methods run on the operator's event loop thread.
    """

    def __init__(
        self,
        own: OwnWrites,
        fights: FightDetector | None = None,
        *,
        debounce: float = DEFAULT_DEBOUNCE,
        last_write: Callable[[ServiceRef], WriteRecord | None] = REGISTRY.last_write,
        wake: Callable[[ServiceRef, str], int] = _registry_wake,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.own = own
        self.fights = fights or FightDetector()
        self.debounce = debounce
        self._last_write = last_write
        self._wake = wake
        self._clock = clock
        self._batches: dict[ServiceRef, _Batch] = {}
        self._since: dict[ServiceRef, float] = {}  # earliest foreign write not yet checked
        self._inflight: dict[ServiceRef, float] = {}  # ... taken by the running check
        self._timers: set[asyncio.TimerHandle] = set()

    # ------------------------------------------------------------------ entries

    def receive(self, parsed: Parsed, received: float | None = None) -> None:
        """One parsed message (from the subscriber thread via call_soon_threadsafe)."""
        if isinstance(parsed, Ignored):
            self._count(parsed.result)
            if parsed.result is Result.MALFORMED:
                log.warning("audit_entry_malformed", why=parsed.why)
            else:
                log.debug("audit_entry_ignored", why=parsed.why)
            return
        entry = parsed
        recorded = self._last_write(entry.ref)
        if recorded is None:  # no Orchestrator here manages this service (yet)
            self._count(Result.UNMATCHED)
            log.debug("audit_entry_unmanaged", service=str(entry.ref), method=entry.short_method)
            return
        self.own.record(entry.ref, recorded)
        origin = self.own.origin(entry)
        if origin is Origin.OWN:
            self._count(Result.OWN)
            return
        if received is not None and entry.timestamp is None:
            entry = replace(entry, timestamp=received)
        batch = self._batches.setdefault(entry.ref, _Batch())
        (batch.foreign if origin is Origin.FOREIGN else batch.unconfirmed).append(entry)
        if batch.handle is None:
            batch.handle = self._later(self.debounce, self._flush, entry.ref)

    def _flush(self, ref: ServiceRef) -> None:
        batch = self._batches.pop(ref, None)
        if batch is None:
            return
        self.own.record(ref, self._last_write(ref))
        foreign = list(batch.foreign)
        waiting: list[AuditEntry] = []
        for entry in batch.unconfirmed:
            origin = self.own.origin(entry)
            if origin is Origin.OWN:
                self._count(Result.OWN)
            elif origin is Origin.UNCONFIRMED and batch.deferrals < MAX_DEFERRALS:
                waiting.append(entry)
            else:
                foreign.append(entry)
        if waiting:
            later = self._batches.setdefault(ref, _Batch())
            later.unconfirmed.extend(waiting)
            later.deferrals = batch.deferrals + 1
            if later.handle is None:
                later.handle = self._later(self.debounce, self._flush, ref)
        if foreign:
            self._foreign(ref, foreign)

    def _foreign(self, ref: ServiceRef, entries: list[AuditEntry]) -> None:
        now = self._clock()
        self._count(Result.MATCHED, len(entries))
        for entry in entries:
            self.fights.saw(ref, entry.principal, entry.timestamp or now)
        earliest = min(e.timestamp or now for e in entries)
        self._since[ref] = min(earliest, self._since.get(ref, earliest))
        fields: dict[str, Any] = {
            "service": str(ref),
            "principals": sorted({e.principal or "?" for e in entries}),
            "methods": sorted({e.short_method for e in entries}),
            "age_seconds": round(max(0.0, now - earliest), 3),
        }
        hold = self.fights.holding(ref, now)
        if hold is not None:
            log.info("audit_wake_held", until=fight._stamp(hold.until), **fields)
            return
        woken = self._wake(ref, "audit")
        log.info("audit_wake", woken=woken, **fields)

    # ------------------------------------------------------------------ checks

    def begin_check(self, ref: ServiceRef, reasons: tuple[str, ...] = ()) -> Hold | None:
        """Before a check: the hold in force (the check must only report), or None.

        A spec change is applied even during a hold: someone acted on the spec.
        """
        since = self._since.pop(ref, None)
        if since is not None:
            self._inflight[ref] = since
        if any(r.startswith("spec-") for r in reasons):
            return None
        return self.fights.holding(ref, self._clock())

    def end_check(
        self, ref: ServiceRef, update: StatusUpdate, hold: Hold | None = None
    ) -> StatusUpdate:
        """After a check: record Runwarden's writes, observe the repair latency, detect fights;
        returns the update as it should be reported."""
        now = self._clock()
        self.own.record(ref, update.wrote)
        since = self._inflight.pop(ref, None)
        if since is not None and update.drift.repaired:
            latency = max(0.0, now - since)
            metrics.DRIFT_REPAIR_SECONDS.observe(latency)
            log.info("audit_drift_repaired", service=str(ref), seconds=round(latency, 3))
        elif since is not None and hold is not None and update.pending:
            self._since[ref] = min(since, self._since.get(ref, since))  # still to be repaired
        if hold is not None:
            return fight.held(update, hold)
        if not update.drift.repaired:
            return update
        started = self.fights.repaired(ref, now)
        if started is None:
            return update
        log.warning(
            "drift_fight",
            service=str(ref),
            principals=list(started.principals),
            repairs=started.repairs,
            backoff_seconds=started.backoff,
        )
        # When the hold ends, look again (the pipeline may have stopped, or not).
        self._later(started.remaining(now) + 0.5, self._wake, ref, "fight-hold-over")
        return fight.started(update, started)

    # ------------------------------------------------------------------ plumbing

    def _later(self, delay: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        handle: asyncio.TimerHandle

        def run() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = asyncio.get_running_loop().call_later(delay, run)
        self._timers.add(handle)
        return handle

    @property
    def pending(self) -> int:
        """Debounce, deferral and hold timers still to fire (0: nothing will wake by itself)."""
        return len(self._timers)

    def close(self) -> None:
        for handle in list(self._timers):
            handle.cancel()
        self._timers.clear()
        self._batches.clear()

    @staticmethod
    def _count(result: Result, n: int = 1) -> None:
        metrics.AUDIT_EVENTS.labels(result=result.value).inc(n)


class AuditListener:
    """The Pub/Sub side: a streaming pull on ``subscription``, bridged into the event loop.

    The subscriber runs on google-cloud-pubsub's own threads; each message is parsed and acked
    there and handed to the router on the loop. A failed stream (subscription missing, no
    permission, network) is logged and re-opened with a capped backoff; it never stops the
    operator, and the periodic checks go on meanwhile.
    """

    def __init__(self, subscription: str, router: AuditRouter) -> None:
        self.subscription = subscription
        self.router = router
        self.received = 0
        self.failures = 0  # streams that failed (and were re-opened)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    # Delegates for the drift loop (handlers.py).
    def begin_check(self, ref: ServiceRef, reasons: tuple[str, ...] = ()) -> Hold | None:
        return self.router.begin_check(ref, reasons)

    def end_check(
        self, ref: ServiceRef, update: StatusUpdate, hold: Hold | None = None
    ) -> StatusUpdate:
        return self.router.end_check(ref, update, hold)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="runwarden-audit-subscriber")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._task, timeout=10)
        self.router.close()

    def _on_message(self, message: Any) -> None:
        """google-cloud-pubsub's callback thread: parse, ack, hand over."""
        received = time.time()
        parsed = audit.parse(message.data)
        message.ack()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._deliver, parsed, received)

    def _deliver(self, parsed: Parsed, received: float) -> None:
        self.received += 1
        try:
            self.router.receive(parsed, received)
        except Exception:  # one odd entry must never stop the listener
            log.exception("audit_entry_failed")

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            opened = time.monotonic()
            try:
                error = await self._stream()
            except Exception as exc:  # e.g. no credentials: keep trying, polling goes on
                error = exc
            if self._stopping.is_set():
                break
            self.failures += 1
            # A stream that lived a while and then broke is retried quickly again.
            attempt = 1 if time.monotonic() - opened > RESUBSCRIBE_BACKOFF[1] else attempt + 1
            first, cap = RESUBSCRIBE_BACKOFF
            delay = min(cap, first * 2 ** (attempt - 1))
            log.warning(
                "audit_subscription_failed",
                subscription=self.subscription,
                error=repr(error),
                retry_in=delay,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        log.info("audit_unsubscribed", subscription=self.subscription)

    async def _stream(self) -> BaseException | None:
        """One streaming pull, until it fails (returns why) or the listener stops (None)."""
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]

        client = pubsub_v1.SubscriberClient()
        try:
            future = client.subscribe(
                self.subscription,
                callback=self._on_message,
                flow_control=pubsub_v1.types.FlowControl(max_messages=500),
            )
            log.info(
                "audit_subscribed",
                subscription=self.subscription,
                emulator=os.environ.get("PUBSUB_EMULATOR_HOST") or None,
            )
            stream = asyncio.wrap_future(future)
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait({stream, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            error: BaseException | None = None
            if stream.done() and not stream.cancelled():
                error = stream.exception()
            future.cancel()  # non-blocking: the manager shuts down on its own thread
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(stream, timeout=10)
            return error
        finally:
            await asyncio.get_running_loop().run_in_executor(None, client.close)


def resolve_own_principal(explicit: str | None, gcp_endpoint: str | None) -> str | None:
    """``--own-principal``; else with an emulator ``runwarden@example.com``; else the service
    account of the Application Default Credentials (Workload Identity's GSA). None if unknown.

    Blocking (it may ask the metadata server): call it from a worker thread.
    """
    if explicit:
        return explicit
    if gcp_endpoint:
        return EMULATOR_PRINCIPAL
    try:
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default()
        email = getattr(credentials, "service_account_email", None)
        if not email or email == "default":  # GCE / Workload Identity: known after a refresh
            credentials.refresh(google.auth.transport.requests.Request())  # type: ignore[no-untyped-call]
            email = getattr(credentials, "service_account_email", None)
    except Exception as exc:
        log.warning("own_principal_unknown", error=repr(exc))
        return None
    if not email or email == "default":
        log.warning("own_principal_unknown", error="the credentials name no service account")
        return None
    return str(email)


async def start(
    subscription: str,
    *,
    own_principal: str | None,
    gcp_endpoint: str | None,
    debounce: float = DEFAULT_DEBOUNCE,
    fight_policy: FightPolicy | None = None,
) -> AuditListener:
    """Build and start the listener (on the running event loop)."""
    principal = await asyncio.to_thread(resolve_own_principal, own_principal, gcp_endpoint)
    router = AuditRouter(OwnWrites(principal), FightDetector(fight_policy), debounce=debounce)
    listener = AuditListener(subscription, router)
    await listener.start()
    log.info(
        "audit_listener_started",
        subscription=subscription,
        own_principal=principal,
        debounce_seconds=debounce,
        fight_threshold=router.fights.policy.threshold,
        fight_window_seconds=router.fights.policy.window,
    )
    return listener
