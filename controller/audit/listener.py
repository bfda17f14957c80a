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
from typing import Any

from controller.audit import entries
from controller.audit.entries import Parsed
from controller.audit.fights import FightDetector, FightPolicy, Hold
from controller.audit.provenance import OwnWrites
from controller.audit.router import (
    DEFAULT_DEBOUNCE,
    EMULATOR_PRINCIPAL,
    RESUBSCRIBE_BACKOFF,
    AuditRouter,
)
from controller.domain.model import ServiceRef, StatusUpdate, WriteRecord
from controller.obs import logs

log = logs.get("runwarden.audit")


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

    # Delegates for the drift check (check.py).
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
        parsed = entries.parse(message.data)
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
    last_write: Callable[[ServiceRef], WriteRecord | None],
    wake: Callable[[ServiceRef, str], int],
    fight_policy: FightPolicy | None = None,
    project_allowed: Callable[[str], bool] | None = None,
) -> AuditListener:
    """Build and start the listener (on the running event loop). ``wake`` wakes the drift loops
    of a service (how many it woke); ``last_write`` is what Runwarden last wrote to it."""
    principal = await asyncio.to_thread(resolve_own_principal, own_principal, gcp_endpoint)
    router = AuditRouter(
        OwnWrites(principal),
        FightDetector(fight_policy),
        debounce=debounce,
        last_write=last_write,
        wake=wake,
        project_allowed=project_allowed,
    )
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
