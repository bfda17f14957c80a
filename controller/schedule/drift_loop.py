"""Drift loops: "check when due, or at once when woken", for every Orchestrator of the process.

One ``DriftLoop`` per Orchestrator, in this process's memory, and one ``Scheduler`` that runs
all their checks (at most MAX_CONCURRENT_CHECKS at once) from one timer: a loop is only data
while it waits (issue 17: no task, future or timer per Orchestrator). The operator layer feeds
each loop its object's newest body and wakes it on spec changes; so can anything else that
learns a service has changed, e.g. a Cloud Audit Log listener::

    from controller.schedule import drift_loop
    drift_loop.wake("my-project", "us-west2", "my-service", reason="audit")

``wake`` must be called from the operator's event loop thread (from another thread use
``loop.call_soon_threadsafe(drift_loop.wake, ...)``). It never blocks and never fails: an unknown
service simply wakes nothing (it returns how many loops it woke).

Order: woken loops first (a new Orchestrator's first check, a spec change, an audit entry), in
the order they were woken, then due resyncs, earliest first. A loop never runs two checks at
once: a wake during its check makes one more check after it.

A spec wake carries the object's ``metadata.generation``; a check records the generation it read.
A spec wake for a generation a check has already seen is dropped: a watch event may deliver a
spec the running check is already reading, and a second check right after it would only repeat
the same reads.

A rollout wake (ROLLOUT_WAKE: a rollout this process started has ended) counts only when the last
check left a rollout under way (it said Progressing). When the check's read-back already saw the
rollout end, a second check would only repeat its reads, and replace what it reported (e.g.
DriftRepaired) by Synced at once. A rollout ending while a check runs is judged by that check.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.domain.model import Event, Failure, ServiceRef, WriteRecord
from controller.schedule.backoff import MAX_WAIT, Streak, first_delay, next_delay
from controller.schedule.events import WarningKey, warnings_to_post

ObjectKey = tuple[str, str]  # (namespace, name)
ROLLOUT_WAKE = "rollout"  # the wake reason when a rollout started by a check has ended
# At most this many checks run at once; the rest wait their turn. Every Orchestrator of a new or
# restarted controller is due at once: 10,000 checks in flight together held ~15 KB each
# (coroutines, gRPC calls, replies) only to queue for the one CPU anyway (issue 17: peak RSS).
MAX_CONCURRENT_CHECKS = 128


@dataclass(slots=True)
class DriftLoop:
    """The schedule, wake-ups and check state of one Orchestrator.

    One per Orchestrator, for the process's life: slotted, and only data (issue 17: memory per
    Orchestrator); the Registry's Scheduler runs its checks.
    """

    key: ObjectKey
    _ref: ServiceRef | None = None  # the service it manages, as its last check parsed it
    body: Any = None  # the object as its newest watch event showed it (the operator sets it)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    due: float = 0.0  # loop.time() of the next regular check; 0 = at once
    streak: Streak = field(
        default_factory=Streak
    )  # failed checks in a row (of one class), for the backoff
    warned: frozenset[WarningKey] = frozenset()  # the Warning Events of the last check
    last_write: WriteRecord = field(default_factory=WriteRecord)
    deleted: bool = False
    stopping: bool = False  # stop() was called: no further check starts
    checks: int = 0  # completed checks since this process started
    checked_generation: int | None = None  # metadata.generation the last check read
    rolling_out: bool = False  # the last check left a rollout of ours under way
    parsed: tuple[int, object] | None = None  # (generation, its parsed spec), for the wiring
    # Status this process wrote that the watch may not have delivered yet (top-level keys).
    written: dict[str, Any] = field(default_factory=dict)
    running: bool = False  # taken by the scheduler: its check runs (or is about to)
    queued: bool = False  # in the registry's queue of woken loops (once, however many wakes)
    _woken: bool = False  # a wake (or stop) not yet consumed by a check
    _wakes: list[tuple[str, int | None]] = field(default_factory=list)  # (reason, generation)
    _registry: Registry | None = None  # the registry that schedules it (None: not scheduled)

    @property
    def ref(self) -> ServiceRef | None:
        return self._ref

    @ref.setter
    def ref(self, ref: ServiceRef | None) -> None:
        """Set by each check (None: the namespace's binding refuses it); the registry finds
        the loops of a service by it (audit entries, rollouts)."""
        if ref != self._ref and self._registry is not None:
            self._registry.refer(self, self._ref, None if self.deleted else ref)
        self._ref = ref

    def wake(self, reason: str = "wake", generation: int | None = None) -> None:
        """Check at once (or as soon as the running check finishes).

        ``generation``: for a spec change, the object's ``metadata.generation``; the wake is
        dropped if a check has read that generation (or a newer one) by then.
        """
        self._wakes.append((reason, generation))
        self._woken = True
        if self._registry is not None:
            self._registry.ready(self)

    def take(self, now: float) -> tuple[str, ...]:
        """Why a check should run now (wake reasons, or ("resync",) when due), consuming the
        wakes; an empty tuple if none should (stopped, or neither woken nor due)."""
        if self.stopping:
            return ()
        self._drop_seen_wakes()
        if not (self._woken or self.due <= now):
            return ()
        reasons = tuple(dict.fromkeys(reason for reason, _ in self._wakes)) or ("resync",)
        self._wakes.clear()
        self._woken = False
        return reasons

    def stop(self) -> None:
        """No further check (the object is gone or the operator exits); a running one ends."""
        self.stopping = True

    def events_to_post(self, events: Iterable[Event]) -> tuple[Event, ...]:
        """The check's Events minus Warnings repeated from the last check (see
        ``warnings_to_post``); call after ``schedule``, which counts the streak."""
        post, self.warned = warnings_to_post(events, self.warned, self.streak)
        return post

    def _drop_seen_wakes(self) -> None:
        """Forget spec wakes for a generation the last check already read, and rollout wakes
        unless the last check left a rollout under way."""
        seen = self.checked_generation
        if seen is not None:
            self._wakes = [(r, g) for r, g in self._wakes if g is None or g > seen]
        if not self.rolling_out:
            self._wakes = [(r, g) for r, g in self._wakes if r != ROLLOUT_WAKE]
        if not self._wakes:
            self._woken = False

    def history(self, live: Mapping[str, Any]) -> dict[str, Any]:
        """The status as this process last left it: the live one overlaid with what was written
        since and not seen back yet. Counters and transition times build on this."""
        if all(live.get(k) == v for k, v in self.written.items()):
            self.written.clear()  # the watch has caught up
        return {**live, **self.written}

    def schedule(
        self,
        resync: float,
        failure: Failure | None,
        rng: random.Random | None = None,
        *,
        generation: int | None = None,
        rolling_out: bool = False,
    ) -> float:
        """Set when the next check is due after a check that read ``generation`` of the spec;
        returns the delay in seconds.

        ``rolling_out``: the check left a rollout of ours under way. That is not a success yet
        (the failed-rollout streak stays as it is, so retries keep backing off); the end of the
        rollout wakes the loop, the resync is only the fallback.
        """
        self.checks += 1
        self.rolling_out = rolling_out
        if generation is not None:
            if self.checked_generation is not None and generation != self.checked_generation:
                # A new spec: its failures (and their Events) start over.
                self.streak = Streak()
                self.warned = frozenset()
            self.checked_generation = generation
        if not (rolling_out and failure is None):
            self.streak = self.streak.after(failure)
        if failure is None and self.checks == 1:
            delay = first_delay(resync, rng)
        else:
            delay = next_delay(resync, failure, self.streak.count, rng)
        self.due = asyncio.get_running_loop().time() + delay
        if self._registry is not None:
            self._registry.due(self)
        return delay


class Registry:
    """All drift loops of this process, by object and by service, and their order: the woken
    ones (first come, first served), then the due ones (earliest first)."""

    def __init__(self) -> None:
        self._loops: dict[ObjectKey, DriftLoop] = {}
        # The loops of each service (usually one; two Orchestrators may name one service): a
        # rollout's end or an audit entry finds them without a scan of every loop (issue 17).
        self._by_ref: dict[ServiceRef, list[DriftLoop]] = {}
        self._woken: deque[DriftLoop] = deque()
        self._timeline: list[tuple[float, int, DriftLoop]] = []  # a heap; stale entries skipped
        self._order = itertools.count()  # ties in the heap go first come, first served
        # A loop was woken (called with -inf) or scheduled (with its due time).
        self.on_change: Callable[[float], None] | None = None

    def loop(self, namespace: str, name: str) -> DriftLoop:
        """The loop of one Orchestrator, created on first use."""
        key = (namespace, name)
        found = self._loops.get(key)
        if found is None or found.deleted:
            found = self._loops[key] = DriftLoop(key, _registry=self)
        return found

    def get(self, namespace: str, name: str) -> DriftLoop | None:
        return self._loops.get((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        found = self._loops.pop((namespace, name), None)
        if found is not None:
            found.ref = None
            found.deleted = True  # a check still running no longer enters it by its ref
            found.stop()

    def wake_object(self, namespace: str, name: str, reason: str = "wake") -> bool:
        found = self._loops.get((namespace, name))
        if found is None:
            return False
        found.wake(reason)
        return True

    def in_namespace(self, namespace: str) -> list[DriftLoop]:
        """The loops of one namespace's Orchestrators."""
        return [found for key, found in self._loops.items() if key[0] == namespace]

    def refer(self, loop: DriftLoop, old: ServiceRef | None, new: ServiceRef | None) -> None:
        """``loop`` now manages ``new`` instead of ``old`` (DriftLoop.ref's setter)."""
        if old is not None and loop in (same := self._by_ref.get(old, [])):
            same.remove(loop)
            if not same:
                del self._by_ref[old]
        if new is not None:
            self._by_ref.setdefault(new, []).append(loop)

    def wake_service(self, ref: ServiceRef, reason: str = "wake") -> int:
        found = list(self._by_ref.get(ref, ()))
        for loop in found:
            loop.wake(reason)
        return len(found)

    def last_write(self, ref: ServiceRef) -> WriteRecord | None:
        """What Runwarden itself last wrote to this service (to recognise its own audit
        entries)."""
        found = self._by_ref.get(ref)
        return found[0].last_write if found else None

    def __len__(self) -> int:
        return len(self._loops)

    # ------------------------------------------------------------------ the order of checks

    def ready(self, loop: DriftLoop) -> None:
        """``loop`` was woken: queue it (once; a running one is queued again when it ends)."""
        if not loop.running and not loop.stopping and not loop.queued:
            loop.queued = True
            self._woken.append(loop)
            if self.on_change is not None:
                self.on_change(-math.inf)

    def due(self, loop: DriftLoop) -> None:
        """``loop`` was scheduled: enter its due time (an infinite one waits for a wake)."""
        if math.isfinite(loop.due):
            heapq.heappush(self._timeline, (loop.due, next(self._order), loop))
            if self.on_change is not None:
                self.on_change(loop.due)  # the scheduler may sleep past this due time

    def take(self, now: float) -> tuple[DriftLoop, tuple[str, ...]] | None:
        """The next loop whose check should start at ``now``, marked running, and why; None if
        none should yet. Call ``done`` when its check ends."""
        while self._woken:
            found = self._woken.popleft()
            found.queued = False
            if not found.running and (reasons := found.take(now)):
                found.running = True
                return found, reasons
        timeline = self._timeline
        while timeline and timeline[0][0] <= now:
            due, _, found = heapq.heappop(timeline)
            # An entry is stale once the loop was scheduled again; a running loop's is entered
            # again by done().
            if due == found.due and not found.running and (reasons := found.take(now)):
                found.running = True
                return found, reasons
        return None

    def done(self, loop: DriftLoop) -> None:
        """``loop``'s check has ended: queue it again if woken meanwhile, and enter its due
        time."""
        loop.running = False
        if loop.stopping:
            return
        if loop._woken:
            self.ready(loop)
        self.due(loop)

    def next_due(self) -> float | None:
        """The earliest due time entered (possibly stale: take() skips those), or None."""
        return self._timeline[0][0] if self._timeline else None


class Scheduler:
    """Runs every loop's checks, at most ``slots`` at once (see the module docstring for the
    order). ``run(loop, reasons)`` is one check; it must call ``loop.schedule`` (when the loop is
    not stopping), or the loop waits for a wake.

    No task of its own: checks are started by one timer (the earliest due time), by a wake, and
    by a check that ends and frees its slot (issue 17: the scheduler's cost per check is a timer
    callback, bench overhead)."""

    def __init__(
        self,
        registry: Registry,
        run: Callable[[DriftLoop, tuple[str, ...]], Awaitable[None]],
        slots: int = MAX_CONCURRENT_CHECKS,
    ) -> None:
        self._registry = registry
        self._run = run
        self._slots = slots
        self._running: set[asyncio.Task[None]] = set()
        self._clock: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None
        self._timer: asyncio.TimerHandle | None = None
        # When the timer fires; inf: none is set (nothing due); -inf: none is needed (every slot
        # is taken: the next check to end pumps).
        self._timer_at = math.inf
        self._pump_soon = False  # a pump is scheduled (call_soon) already
        self._closing = False

    @property
    def started(self) -> bool:
        return self._clock is not None

    def start(self) -> None:
        """Start running checks. Every check runs in a copy of the caller's context variables
        (whoever woke it: kopf.event() posts through one set in kopf's watch-event context)."""
        self._clock = asyncio.get_running_loop()
        self._context = contextvars.copy_context()
        self._registry.on_change = self._changed
        self._pump()

    async def close(self, grace: float) -> None:
        """Start no more checks; wait up to ``grace`` seconds for the running ones, then cancel
        them."""
        self._closing = True
        if self._registry.on_change == self._changed:
            self._registry.on_change = None
        if self._timer is not None:
            self._timer.cancel()
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def _changed(self, at: float) -> None:
        """Registry.on_change: a loop can be taken from ``at`` (loop time). Only a timer set
        past that is brought forward: a check that ends schedules its loop a resync later, which
        changes nothing here."""
        if at < self._timer_at and not self._pump_soon and self._clock is not None:
            # Not at once: the caller may be in the middle of waking several loops.
            self._pump_soon = True
            self._clock.call_soon(self._pump, context=self._context)

    def _pump(self) -> None:
        """Start the checks that should start now (as slots allow), then set the timer for the
        next due time."""
        self._pump_soon = False
        clock, context = self._clock, self._context
        if self._closing or clock is None or context is None:
            return
        now = clock.time()
        while len(self._running) < self._slots:
            picked = self._registry.take(now)
            if picked is None:
                break
            task = clock.create_task(self._check(*picked), context=context.copy())
            self._running.add(task)
        if len(self._running) >= self._slots:
            at = -math.inf  # no timer: a check that ends pumps (and changes need not)
        else:
            due = self._registry.next_due()
            at = math.inf if due is None else min(due, now + MAX_WAIT)
        if at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = clock.call_at(at, self._fire) if math.isfinite(at) else None
            self._timer_at = at

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._pump()

    async def _check(self, loop: DriftLoop, reasons: tuple[str, ...]) -> None:
        try:
            await self._run(loop, reasons)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)
            self._registry.done(loop)
            self._pump()  # its slot is free


REGISTRY = Registry()


def wake(project: str, region: str, service: str, *, reason: str = "external") -> int:
    """Wake the drift loops of every Orchestrator managing this Cloud Run service at once.

    Returns how many were woken (0 if no Orchestrator here manages it).
    """
    return REGISTRY.wake_service(ServiceRef(project, region, service), reason)


def wake_object(namespace: str, name: str, *, reason: str = "external") -> bool:
    """Wake one Orchestrator's drift loop by its namespace and name."""
    return REGISTRY.wake_object(namespace, name, reason)
