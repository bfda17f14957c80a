"""The event-loop side of the audit feed: classify each entry (whose write? which Orchestrator?),
debounce per service, wake drift loops; hold a fight, measure repair latency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from controller.audit import fights
from controller.audit.entries import AuditEntry, Ignored, Parsed, Result
from controller.audit.fights import FightDetector, Hold
from controller.audit.provenance import Origin, OwnWrites
from controller.domain.model import ServiceRef, StatusUpdate, WriteRecord
from controller.obs import logs, metrics

log = logs.get("runwarden.audit")

EMULATOR_PRINCIPAL = "runwarden@example.com"
DEFAULT_DEBOUNCE = 1.0
# An own-identity entry newer than the recorded write waits this many debounce windows for the
# write's record (the reconcile is still verifying) before it counts as someone else's.
MAX_DEFERRALS = 8
RESUBSCRIBE_BACKOFF = (1.0, 60.0)


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
        last_write: Callable[[ServiceRef], WriteRecord | None],
        wake: Callable[[ServiceRef, str], int],
        clock: Callable[[], float] = time.time,
        project_allowed: Callable[[str], bool] | None = None,
    ) -> None:
        self.own = own
        self.fights = fights or FightDetector()
        self.debounce = debounce
        self._last_write = last_write
        self._wake = wake
        self._clock = clock
        # Tenancy (controller.domain.tenancy): whether any namespace may touch a project. An
        # entry for a project none may touch wakes nothing, whoever's loop claims the service.
        self._project_allowed = project_allowed
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
        if self._project_allowed is not None and not self._project_allowed(entry.ref.project):
            self._count(Result.UNMATCHED)
            log.debug("audit_entry_unbound", service=str(entry.ref), method=entry.short_method)
            return
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
            log.info("audit_wake_held", until=fights._stamp(hold.until), **fields)
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
            return fights.held(update, hold)
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
        return fights.started(update, started)

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

    def deferrals(self, ref: ServiceRef) -> int:
        """How many times the entries for ``ref`` not yet told own or foreign were put off."""
        batch = self._batches.get(ref)
        return batch.deferrals if batch is not None else 0

    def close(self) -> None:
        for handle in list(self._timers):
            handle.cancel()
        self._timers.clear()
        self._batches.clear()

    @staticmethod
    def _count(result: Result, n: int = 1) -> None:
        metrics.AUDIT_EVENTS.labels(result=result.value).inc(n)
