"""Per-Orchestrator drift loops: "check when due, or at once when woken".

One ``DriftLoop`` per Orchestrator, in this process's memory. The kopf wiring (handlers.py)
runs each loop's checks; spec changes wake it; so can anything else that learns a service has
changed, e.g. a Cloud Audit Log listener::

    from controller import loops
    loops.wake("my-project", "us-west2", "my-service", reason="audit")

``wake`` must be called from the operator's event loop thread (from another thread use
``loop.call_soon_threadsafe(loops.wake, ...)``). It never blocks and never fails: an unknown
service simply wakes nothing (it returns how many loops it woke).

A spec wake carries the object's ``metadata.generation``; a check records the generation it read.
A spec wake for a generation a check has already seen is dropped: on create (and on resume) kopf
calls the spec handler while the loop's first check is already reading that very spec, and a
second check right after it would only repeat the same reads.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.model import Event, Failure, Retry, ServiceRef, WriteRecord

ObjectKey = tuple[str, str]  # (namespace, name)

# Backoff after failures: (first delay, cap) in seconds.
TRANSIENT_BACKOFF = (1.0, 60.0)
# Cloud Run's quotas are per minute: waiting longer than one window after a refusal gains
# nothing and starves the Orchestrator while others take the budget.
QUOTA_BACKOFF = (5.0, 60.0)
SLOW_CAP = 3600.0
MAX_WAIT = 86400.0  # a wait timer's longest sleep (an infinite delay wakes daily to re-check)


@dataclass(frozen=True)
class Streak:
    """Failed checks in a row of one retry class: the backoff's attempt number.

    Each class keeps its own count, so the first quota refusal after a run of outages backs off
    as a first quota refusal, not as the n-th failure of any kind. A success or a failure of
    another class starts over.
    """

    retry: Retry | None = None  # the class of the failures counted; None after a success
    count: int = 0

    def after(self, failure: Failure | None) -> Streak:
        """The streak once a check has ended with ``failure`` (None: it succeeded)."""
        if failure is None:
            return Streak()
        if failure.retry is self.retry:
            return Streak(failure.retry, self.count + 1)
        return Streak(failure.retry, 1)


WarningKey = tuple[str, str]  # (reason, message) of a Warning Event


def warnings_to_post(
    events: Iterable[Event], warned: frozenset[WarningKey], streak: Streak
) -> tuple[tuple[Event, ...], frozenset[WarningKey]]:
    """The Events of a check worth posting, and the Warnings to remember for the next check.

    A Warning identical (reason and message) to one of the previous check's is not posted again
    on every retry of a failure that persists, only on a rising schedule: at the 2nd, 4th, 8th,
    ... failure in a row (``streak``), so a week of PermissionDenied posts a dozen Events, not
    thousands. A changed reason or message, and every Normal Event, is posted at once.
    """
    events = tuple(events)
    current = frozenset((e.reason, e.message) for e in events if e.type == "Warning")
    rising = streak.count > 0 and streak.count & (streak.count - 1) == 0  # a power of two
    post = tuple(
        e for e in events if e.type != "Warning" or rising or (e.reason, e.message) not in warned
    )
    return post, current


@dataclass
class DriftLoop:
    """The schedule and wake-up of one Orchestrator's checks."""

    key: ObjectKey
    ref: ServiceRef | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    due: float = 0.0  # loop.time() of the next regular check; 0 = at once
    streak: Streak = Streak()  # failed checks in a row (of one class), for the backoff
    warned: frozenset[WarningKey] = frozenset()  # the Warning Events of the last check
    last_write: WriteRecord = field(default_factory=WriteRecord)
    deleted: bool = False
    stopping: bool = False  # stop() was called: wait() returns () from now on
    checks: int = 0  # completed checks since this process started
    checked_generation: int | None = None  # metadata.generation the last check read
    parsed: tuple[int, object] | None = None  # (generation, its parsed spec), for the wiring
    # Status this process wrote that the watch may not have delivered yet (top-level keys).
    written: dict[str, Any] = field(default_factory=dict)
    _event: asyncio.Event = field(default_factory=asyncio.Event)
    _wakes: list[tuple[str, int | None]] = field(default_factory=list)  # (reason, generation)

    def wake(self, reason: str = "wake", generation: int | None = None) -> None:
        """Check at once (or as soon as the running check finishes).

        ``generation``: for a spec change, the object's ``metadata.generation``; the wake is
        dropped if a check has read that generation (or a newer one) by then.
        """
        self._wakes.append((reason, generation))
        self._event.set()

    async def wait(self) -> tuple[str, ...]:
        """Sleep until woken or due; returns why (wake reasons, or ("resync",)), or an empty
        tuple once ``stop`` was called: the caller should exit.

        One future and one timer per wait (no tasks): with hundreds of loops checking every
        minute, waiting is a measurable part of a check's CPU.
        """
        loop = asyncio.get_running_loop()
        while not self.stopping:
            self._drop_seen_wakes()
            delay = self.due - loop.time()
            if self._event.is_set() or delay <= 0:
                break
            timer = loop.call_later(min(delay, MAX_WAIT), self._event.set)
            try:
                await self._event.wait()
            finally:
                timer.cancel()
        if self.stopping:
            return ()
        reasons = tuple(dict.fromkeys(reason for reason, _ in self._wakes)) or ("resync",)
        self._wakes.clear()
        self._event.clear()
        return reasons

    def stop(self) -> None:
        """End the current and every later ``wait`` (the object is gone or the operator exits)."""
        self.stopping = True
        self._event.set()

    def events_to_post(self, events: Iterable[Event]) -> tuple[Event, ...]:
        """The check's Events minus Warnings repeated from the last check (see
        ``warnings_to_post``); call after ``schedule``, which counts the streak."""
        post, self.warned = warnings_to_post(events, self.warned, self.streak)
        return post

    def _drop_seen_wakes(self) -> None:
        """Forget spec wakes for a generation the last check already read."""
        seen = self.checked_generation
        if seen is not None:
            self._wakes = [(r, g) for r, g in self._wakes if g is None or g > seen]
        if not self._wakes:
            self._event.clear()

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
    ) -> float:
        """Set when the next check is due after a check that read ``generation`` of the spec;
        returns the delay in seconds."""
        self.checks += 1
        if generation is not None:
            if self.checked_generation is not None and generation != self.checked_generation:
                # A new spec: its failures (and their Events) start over.
                self.streak = Streak()
                self.warned = frozenset()
            self.checked_generation = generation
        self.streak = self.streak.after(failure)
        if failure is None and self.checks == 1:
            delay = first_delay(resync, rng)
        else:
            delay = next_delay(resync, failure, self.streak.count, rng)
        self.due = asyncio.get_running_loop().time() + delay
        return delay


def next_delay(
    resync: float,
    failure: Failure | None,
    attempt: int,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the next check.

    Healthy: resync, jittered ±10% so loops started together drift apart. Transient failures:
    capped exponential backoff with jitter, never longer than the resync (the regular check would
    come then anyway) nor than the cap. Quota: harder backoff, may exceed the resync — extra
    reads would only burn more quota. A write that keeps failing for good (a failed rollout), and
    what only someone else can fix (ServiceNotFound, ServiceAccountNotFound, PermissionDenied):
    from the resync up, doubling per failure in a row, up to an hour (a success or a spec
    change starts over; the spec change also wakes the loop at once). A spec that can only be
    fixed by a new spec: never (the spec change wakes the loop).
    """
    uniform = rng.uniform if rng is not None else random.uniform
    if failure is None:
        return resync * uniform(0.9, 1.1)
    if failure.retry is Retry.SPEC_CHANGE:
        return math.inf
    if failure.retry in (Retry.SLOWLY, Retry.RESYNC):
        # Resync-scale and rarely correlated across Orchestrators (a failed rollout, a missing
        # service or account, a denied permission: someone has to act): jittered like the
        # resync, so that each retry comes clearly later than the one before (x1.6 at least;
        # 0.5..1 jitter could make two in a row nearly equal).
        slow: float = min(max(resync, SLOW_CAP), resync * 2.0 ** max(0, attempt - 1))
        return slow * uniform(0.9, 1.1)
    if failure.retry is Retry.QUOTA:
        first, cap = QUOTA_BACKOFF
    else:
        first, cap = TRANSIENT_BACKOFF[0], min(resync, TRANSIENT_BACKOFF[1])
    base: float = min(cap, first * 2.0 ** max(0, attempt - 1))
    return max(0.05, base * uniform(0.5, 1.0))


def first_delay(resync: float, rng: random.Random | None = None) -> float:
    """The first drift check after the initial sync: anywhere in one period, so a restart with
    many Orchestrators does not check them all at the same moment."""
    uniform = rng.uniform if rng is not None else random.uniform
    return resync * uniform(0.5, 1.0)


class Registry:
    """All drift loops of this process, by object and by service."""

    def __init__(self) -> None:
        self._loops: dict[ObjectKey, DriftLoop] = {}

    def loop(self, namespace: str, name: str) -> DriftLoop:
        """The loop of one Orchestrator, created on first use."""
        key = (namespace, name)
        found = self._loops.get(key)
        if found is None or found.deleted:
            found = self._loops[key] = DriftLoop(key)
        return found

    def get(self, namespace: str, name: str) -> DriftLoop | None:
        return self._loops.get((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        found = self._loops.pop((namespace, name), None)
        if found is not None:
            found.deleted = True
            found.stop()

    def wake_object(self, namespace: str, name: str, reason: str = "wake") -> bool:
        found = self._loops.get((namespace, name))
        if found is None:
            return False
        found.wake(reason)
        return True

    def wake_service(self, ref: ServiceRef, reason: str = "wake") -> int:
        woken = 0
        for found in list(self._loops.values()):
            if found.ref == ref:
                found.wake(reason)
                woken += 1
        return woken

    def last_write(self, ref: ServiceRef) -> WriteRecord | None:
        """What Runwarden itself last wrote to this service (to recognise its own audit
        entries)."""
        for found in self._loops.values():
            if found.ref == ref:
                return found.last_write
        return None

    def __len__(self) -> int:
        return len(self._loops)


REGISTRY = Registry()


def wake(project: str, region: str, service: str, *, reason: str = "external") -> int:
    """Wake the drift loops of every Orchestrator managing this Cloud Run service at once.

    Returns how many were woken (0 if no Orchestrator here manages it).
    """
    return REGISTRY.wake_service(ServiceRef(project, region, service), reason)


def wake_object(namespace: str, name: str, *, reason: str = "external") -> bool:
    """Wake one Orchestrator's drift loop by its namespace and name."""
    return REGISTRY.wake_object(namespace, name, reason)
