"""Per-Orchestrator drift loops: "check when due, or at once when woken".

One ``DriftLoop`` per Orchestrator, in this process's memory. The kopf wiring (operator/handlers.py)
runs each loop's checks; spec changes wake it; so can anything else that learns a service has
changed, e.g. a Cloud Audit Log listener::

    from controller.schedule import drift_loop
    drift_loop.wake("my-project", "us-west2", "my-service", reason="audit")

``wake`` must be called from the operator's event loop thread (from another thread use
``loop.call_soon_threadsafe(drift_loop.wake, ...)``). It never blocks and never fails: an unknown
service simply wakes nothing (it returns how many loops it woke).

A spec wake carries the object's ``metadata.generation``; a check records the generation it read.
A spec wake for a generation a check has already seen is dropped: on create (and on resume) kopf
calls the spec handler while the loop's first check is already reading that very spec, and a
second check right after it would only repeat the same reads.

A rollout wake (ROLLOUT_WAKE: a rollout this process started has ended) counts only when the last
check left a rollout under way (it said Progressing). When the check's read-back already saw the
rollout end, a second check would only repeat its reads, and replace what it reported (e.g.
DriftRepaired) by Synced at once. A rollout ending while a check runs is judged by that check.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.domain.model import Event, Failure, ServiceRef, WriteRecord
from controller.schedule.backoff import MAX_WAIT, Streak, first_delay, next_delay
from controller.schedule.events import WarningKey, warnings_to_post

ObjectKey = tuple[str, str]  # (namespace, name)
ROLLOUT_WAKE = "rollout"  # the wake reason when a rollout started by a check has ended


@dataclass(slots=True)
class DriftLoop:
    """The schedule and wake-up of one Orchestrator's checks.

    One per Orchestrator, for the process's life: slotted, and a waiting loop holds one future
    and one timer handle only while it waits (issue 17: memory per Orchestrator).
    """

    key: ObjectKey
    ref: ServiceRef | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    due: float = 0.0  # loop.time() of the next regular check; 0 = at once
    streak: Streak = field(
        default_factory=Streak
    )  # failed checks in a row (of one class), for the backoff
    warned: frozenset[WarningKey] = frozenset()  # the Warning Events of the last check
    last_write: WriteRecord = field(default_factory=WriteRecord)
    deleted: bool = False
    stopping: bool = False  # stop() was called: wait() returns () from now on
    checks: int = 0  # completed checks since this process started
    checked_generation: int | None = None  # metadata.generation the last check read
    rolling_out: bool = False  # the last check left a rollout of ours under way
    parsed: tuple[int, object] | None = None  # (generation, its parsed spec), for the wiring
    # Status this process wrote that the watch may not have delivered yet (top-level keys).
    written: dict[str, Any] = field(default_factory=dict)
    _woken: bool = False  # a wake (or stop) not yet consumed by wait()
    _waiter: asyncio.Future[None] | None = None  # what a running wait() sleeps on
    _wakes: list[tuple[str, int | None]] = field(default_factory=list)  # (reason, generation)

    def wake(self, reason: str = "wake", generation: int | None = None) -> None:
        """Check at once (or as soon as the running check finishes).

        ``generation``: for a spec change, the object's ``metadata.generation``; the wake is
        dropped if a check has read that generation (or a newer one) by then.
        """
        self._wakes.append((reason, generation))
        self._set()

    def _set(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
            if self._woken or delay <= 0:
                break
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(min(delay, MAX_WAIT), self._set)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self.stopping:
            return ()
        reasons = tuple(dict.fromkeys(reason for reason, _ in self._wakes)) or ("resync",)
        self._wakes.clear()
        self._woken = False
        return reasons

    def stop(self) -> None:
        """End the current and every later ``wait`` (the object is gone or the operator exits)."""
        self.stopping = True
        self._set()

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
        return delay


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

    def in_namespace(self, namespace: str) -> list[DriftLoop]:
        """The loops of one namespace's Orchestrators."""
        return [found for key, found in self._loops.items() if key[0] == namespace]

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
