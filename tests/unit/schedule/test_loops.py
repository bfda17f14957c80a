"""Drift loops: backoff schedule, wake-ups by object and by service."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from typing import Any

import pytest

from controller.domain.model import Event, Failure, Retry, ServiceRef, WriteRecord
from controller.schedule.backoff import QUOTA_BACKOFF, SLOW_CAP, Streak, first_delay, next_delay
from controller.schedule.drift_loop import ROLLOUT_WAKE, DriftLoop, Registry, Scheduler
from controller.schedule.events import warnings_to_post

REF = ServiceRef("my-project", "us-west2", "svc")


def failure(retry: Retry) -> Failure:
    return Failure("X", "x", retry)


def test_healthy_resync_is_jittered_around_the_period() -> None:
    rng = random.Random(1)
    delays = [next_delay(60, None, 0, rng) for _ in range(200)]
    assert all(54 <= d <= 66 for d in delays)
    assert len({round(d, 3) for d in delays}) > 100
    assert all(30 <= first_delay(60, rng) <= 60 for _ in range(100))


def test_transient_backoff_grows_capped_by_resync() -> None:
    rng = random.Random(2)
    highs = [next_delay(60, failure(Retry.TRANSIENT), n, rng) for n in range(1, 12)]
    assert highs[0] <= 1.0
    assert max(highs) <= 60
    assert highs[-1] >= 30  # reached the cap (jitter 0.5..1)
    assert all(next_delay(2, failure(Retry.TRANSIENT), n, rng) <= 2 for n in range(1, 10))


def test_quota_backs_off_harder_and_beyond_resync() -> None:
    rng = random.Random(3)
    assert next_delay(2, failure(Retry.QUOTA), 1, rng) >= 2.5
    assert 30 <= next_delay(2, failure(Retry.QUOTA), 20, rng) <= 60  # beyond resync, one window
    assert max(next_delay(300, failure(Retry.QUOTA), n, rng) for n in range(1, 12)) <= 60


@pytest.mark.parametrize(
    ("checks", "want"),
    [
        pytest.param([], Streak(), id="fresh"),
        pytest.param([Retry.TRANSIENT] * 3, Streak(Retry.TRANSIENT, 3), id="same-class-counts"),
        pytest.param(
            [Retry.TRANSIENT] * 6 + [Retry.QUOTA],
            Streak(Retry.QUOTA, 1),
            id="class-change-restarts",
        ),
        pytest.param(
            [Retry.QUOTA, Retry.QUOTA, Retry.TRANSIENT, Retry.QUOTA],
            Streak(Retry.QUOTA, 1),
            id="interrupted-run-restarts",
        ),
        pytest.param([Retry.QUOTA, Retry.QUOTA, None], Streak(), id="success-resets"),
        pytest.param([None, Retry.SLOWLY, Retry.SLOWLY], Streak(Retry.SLOWLY, 2), id="after-ok"),
    ],
)
def test_failures_are_counted_per_retry_class(checks: list[Retry | None], want: Streak) -> None:
    streak = Streak()
    for retry in checks:
        streak = streak.after(None if retry is None else failure(retry))
    assert streak == want


async def test_first_quota_refusal_after_transient_failures_backs_off_as_the_first() -> None:
    """Six outages in a row, then a quota refusal: the first quota step (5-10 s), not 5 s * 2**6
    capped at a quota window."""
    loop_ = DriftLoop(("ns", "a"))
    rng = random.Random(4)
    for _ in range(6):
        loop_.schedule(60, failure(Retry.TRANSIENT), rng)
    delay = loop_.schedule(60, failure(Retry.QUOTA), rng)
    first = QUOTA_BACKOFF[0]
    assert first / 2 <= delay <= first, delay
    assert first <= loop_.schedule(60, failure(Retry.QUOTA), rng) <= 2 * first
    assert loop_.schedule(60, None, rng) >= 54  # success: back to the resync


def test_slow_backoff_doubles_from_the_resync_each_retry_later() -> None:
    """A failed rollout is retried after the resync, then twice that, ...: each retry clearly
    later than the one before, up to an hour."""
    rng = random.Random(5)
    for _ in range(200):
        delays = [next_delay(2, failure(Retry.SLOWLY), n, rng) for n in range(1, 8)]
        assert 1.8 <= delays[0] <= 2.2
        assert all(b >= 1.6 * a for a, b in itertools.pairwise(delays)), delays
    assert 3240 <= next_delay(60, failure(Retry.SLOWLY), 30, rng) <= 3960


def test_spec_errors_wait_for_a_spec_change() -> None:
    assert math.isinf(next_delay(60, failure(Retry.SPEC_CHANGE), 1))


@pytest.mark.parametrize("resync", [2.0, 60.0])
def test_failures_someone_must_fix_back_off_from_the_resync(resync: float) -> None:
    """ServiceNotFound, ServiceAccountNotFound, PermissionDenied: the first retry after the
    resync, then each clearly later than the one before, up to an hour, jittered."""
    rng = random.Random(6)
    for _ in range(200):
        delays = [next_delay(resync, failure(Retry.RESYNC), n, rng) for n in range(1, 6)]
        assert 0.9 * resync <= delays[0] <= 1.1 * resync
        assert all(b >= 1.6 * a for a, b in itertools.pairwise(delays)), delays
    capped = [next_delay(resync, failure(Retry.RESYNC), 40, rng) for _ in range(200)]
    assert all(0.9 * SLOW_CAP <= d <= 1.1 * SLOW_CAP for d in capped)
    assert len({round(d, 3) for d in capped}) > 100  # jittered


async def test_resync_class_backoff_resets_on_success_and_on_a_spec_change() -> None:
    rng = random.Random(7)
    loop_ = DriftLoop(("ns", "a"))
    loop_.schedule(2, None, rng, generation=1)
    denied = failure(Retry.RESYNC)
    delays = [loop_.schedule(2, denied, rng, generation=1) for _ in range(4)]
    assert loop_.streak == Streak(Retry.RESYNC, 4)
    assert delays[-1] >= 12  # 2 s * 2**3, -10 %
    assert 1.8 <= loop_.schedule(2, denied, rng, generation=2) <= 2.2  # a new spec
    assert loop_.streak == Streak(Retry.RESYNC, 1)
    loop_.schedule(2, denied, rng, generation=2)
    assert loop_.schedule(2, None, rng, generation=2) <= 2.2  # success
    assert 1.8 <= loop_.schedule(2, denied, rng, generation=2) <= 2.2


def test_a_repeated_warning_is_posted_on_a_rising_schedule_only() -> None:
    denied = Event("Warning", "UpdateFailed", "SetIamPolicy: permission denied")
    synced = Event("Normal", "Synced", "the service holds the spec")
    warned: frozenset[tuple[str, str]] = frozenset()
    posted = []
    for n in range(1, 18):
        post, warned = warnings_to_post([denied], warned, Streak(Retry.RESYNC, n))
        if post:
            posted.append(n)
    assert posted == [1, 2, 4, 8, 16]
    # A changed message, or a Normal Event, is posted at once.
    other = Event("Warning", "UpdateFailed", "SetIamPolicy: not found")
    post, warned = warnings_to_post([other, synced], warned, Streak(Retry.RESYNC, 17))
    assert post == (other, synced)
    # After a check without that Warning, it is news again.
    _, warned = warnings_to_post([], warned, Streak())
    post, _ = warnings_to_post([denied], warned, Streak(Retry.RESYNC, 3))
    assert post == (denied,)


async def test_loop_forgets_posted_warnings_on_a_spec_change() -> None:
    loop_ = DriftLoop(("ns", "a"))
    denied = Event("Warning", "UpdateFailed", "SetIamPolicy: permission denied")
    for _ in range(2):
        loop_.schedule(2, failure(Retry.RESYNC), generation=1)
        loop_.events_to_post([denied])
    loop_.schedule(2, failure(Retry.RESYNC), generation=1)  # the 3rd in a row
    assert loop_.events_to_post([denied]) == ()
    loop_.schedule(2, failure(Retry.RESYNC), generation=2)
    assert loop_.events_to_post([denied]) == (denied,)


def taken(registry: Registry, at: float = 0.0) -> tuple[str, tuple[str, ...]] | None:
    """The next check the registry starts at loop time ``at`` (its loop's name and reasons),
    ended at once without scheduling another (as for a spec error); None if none should
    start."""
    picked = registry.take(at)
    if picked is None:
        return None
    found, reasons = picked
    found.due = math.inf
    registry.done(found)
    return found.key[1], reasons


LATER = 3600.0  # due long after any ``taken(..., at)`` of these tests


def test_wake_by_service_and_object() -> None:
    registry = Registry()
    a = registry.loop("ns", "a")
    b = registry.loop("ns", "b")
    a.ref = REF
    b.ref = ServiceRef("my-project", "us-west2", "other")
    a.due = b.due = LATER
    assert taken(registry) is None
    assert registry.wake_service(REF, reason="audit") == 1
    assert taken(registry) == ("a", ("audit",))
    assert registry.wake_object("ns", "b", reason="spec-update")
    assert taken(registry) == ("b", ("spec-update",))
    assert taken(registry) is None
    assert registry.wake_service(ServiceRef("x-project", "us-west2", "none")) == 0
    assert not registry.wake_object("ns", "nope")


def test_the_loops_of_a_service_follow_their_ref_and_their_forgetting() -> None:
    """wake_service and last_write find a service's loops by an index (no scan of every loop):
    it follows a ref that changes, holds both Orchestrators that name one service, and drops a
    forgotten loop, also when a check still running sets its ref afterwards."""
    registry = Registry()
    a, b = registry.loop("ns", "a"), registry.loop("ns", "b")
    other = ServiceRef("my-project", "us-west2", "other")
    a.ref = b.ref = REF
    a.due = b.due = LATER
    b.last_write = WriteRecord(generation=7)
    assert registry.wake_service(REF) == 2
    a.ref = other
    assert registry.wake_service(REF) == 1
    assert registry.last_write(REF) == WriteRecord(generation=7)
    assert registry.wake_service(other) == 1
    registry.forget("ns", "b")
    b.ref = REF  # its check was still running
    assert registry.wake_service(REF) == 0
    assert registry.last_write(REF) is None
    a.ref = None
    assert registry.wake_service(other) == 0


async def test_due_checks_run_earliest_first_and_a_stopped_loop_never() -> None:
    registry = Registry()
    a, b, c = (registry.loop("ns", n) for n in "abc")
    now = asyncio.get_running_loop().time()
    for found, delay in ((a, 50), (b, 10), (c, 30)):
        found.schedule(delay, failure(Retry.RESYNC), random.Random(0))
    assert taken(registry, now) is None
    c.stop()
    order = [taken(registry, now + 100) for _ in range(3)]
    assert order == [("b", ("resync",)), ("a", ("resync",)), None]
    c.wake("audit")  # a stopped loop stays stopped
    assert taken(registry, now + 100) is None


def test_woken_loops_go_before_due_ones_in_the_order_woken() -> None:
    registry = Registry()
    due, first, second = (registry.loop("ns", n) for n in ("due", "first", "second"))
    due.due, first.due, second.due = 1.0, LATER, LATER
    registry.due(due)
    second.wake("audit")
    first.wake("spec-create", generation=1)
    second.wake("spec-update", generation=1)  # queued already: one check, both reasons
    assert [taken(registry, 5.0) for _ in range(4)] == [
        ("second", ("audit", "spec-update")),
        ("first", ("spec-create",)),
        ("due", ("resync",)),
        None,
    ]


def test_a_wake_during_a_check_checks_once_more_after_it() -> None:
    registry = Registry()
    a = registry.loop("ns", "a")
    a.due = LATER
    a.wake("spec-create", generation=1)
    picked = registry.take(0.0)
    assert picked is not None and picked[0] is a
    a.wake("audit")
    a.wake("audit")
    assert registry.take(0.0) is None  # never two checks of one loop at once
    registry.done(a)
    assert taken(registry) == ("a", ("audit",))
    assert taken(registry) is None


def test_infinite_delay_waits_until_woken() -> None:
    registry = Registry()
    loop_ = registry.loop("ns", "a")
    loop_.due = math.inf  # a spec error: only a spec change wakes the loop
    registry.due(loop_)
    assert registry.next_due() is None
    assert taken(registry, 1e12) is None
    loop_.wake("spec-update", generation=2)
    assert taken(registry) == ("a", ("spec-update",))


def test_forget_stops_and_marks_deleted() -> None:
    registry = Registry()
    loop_ = registry.loop("ns", "a")
    loop_.wake("audit")
    registry.forget("ns", "a")
    assert loop_.deleted and loop_.stopping
    assert registry.get("ns", "a") is None
    assert registry.loop("ns", "a") is not loop_
    assert taken(registry) is None  # its queued wake starts nothing


def test_a_loop_woken_many_times_is_queued_once() -> None:
    """Every wake of a waiting loop (audit entries, watch events) counts, but it enters the
    queue of woken loops once: the queue stays as long as the loops waiting, not the wakes."""
    registry = Registry()
    a, b = registry.loop("ns", "a"), registry.loop("ns", "b")
    a.due = b.due = LATER
    for reason in ("audit", "audit", "namespace-binding"):
        a.wake(reason)
    b.wake("audit")
    a.wake("audit")
    assert len(registry._woken) == 2
    assert taken(registry) == ("a", ("audit", "namespace-binding"))
    assert taken(registry) == ("b", ("audit",))
    assert taken(registry) is None
    a.wake("audit")  # queued again once taken
    assert taken(registry) == ("a", ("audit",))


async def test_scheduler_runs_every_check_at_most_slots_at_once() -> None:
    registry = Registry()
    loops = [registry.loop("ns", f"o{i}") for i in range(7)]
    running: set[str] = set()
    most = 0
    checked: list[str] = []
    release = asyncio.Event()

    async def run(found: DriftLoop, reasons: tuple[str, ...]) -> None:
        nonlocal most
        running.add(found.key[1])
        most = max(most, len(running))
        await release.wait()
        running.discard(found.key[1])
        checked.append(found.key[1])
        found.schedule(LATER, None)

    scheduler = Scheduler(registry, run, slots=3)
    scheduler.start()
    for found in loops[:4]:
        found.wake("spec-create", generation=1)
    for found in loops[4:]:
        found.schedule(0.0, None)  # due at once, behind the woken ones
    await wait_until(lambda: len(running) == 3)
    # Full: no timer (one for the due loops would fire at once, again and again); the next
    # check to end starts the next one.
    assert scheduler._timer_at == -math.inf
    release.set()
    await wait_until(lambda: len(checked) == 7)
    assert most == 3
    assert sorted(checked) == sorted(found.key[1] for found in loops)
    await scheduler.close(grace=1)


async def test_scheduler_runs_the_resyncs_a_check_schedules() -> None:
    """A due time entered while the scheduler sleeps (with nothing else due) still wakes it."""
    registry = Registry()
    checks: list[tuple[str, ...]] = []

    async def run(found: DriftLoop, reasons: tuple[str, ...]) -> None:
        checks.append(reasons)
        found.schedule(0.02, None)

    scheduler = Scheduler(registry, run)
    scheduler.start()
    registry.loop("ns", "a").wake("spec-create", generation=1)
    await wait_until(lambda: len(checks) >= 3)
    assert checks[:3] == [("spec-create",), ("resync",), ("resync",)]
    await scheduler.close(grace=1)


async def test_scheduler_timed_for_a_later_check_runs_one_scheduled_before_it() -> None:
    """The scheduler's timer is set for the earliest due time; a loop scheduled earlier than
    that brings it forward, one scheduled later does not need to (and is still run when
    due)."""
    registry = Registry()
    checks: list[str] = []

    async def run(found: DriftLoop, reasons: tuple[str, ...]) -> None:
        checks.append(found.key[1])
        found.schedule(LATER, None)

    scheduler = Scheduler(registry, run)
    scheduler.start()
    registry.loop("ns", "far").schedule(LATER, None)
    await wait_until(lambda: math.isfinite(scheduler._timer_at))  # set for when "far" is due
    registry.loop("ns", "later").schedule(0.1, None)
    registry.loop("ns", "soon").schedule(0.02, None)
    await wait_until(lambda: len(checks) == 2)
    assert checks == ["soon", "later"]
    await scheduler.close(grace=1)


async def test_scheduler_close_waits_for_running_checks_then_cancels() -> None:
    registry = Registry()
    started, ended, cancelled = asyncio.Event(), [], []

    async def run(found: DriftLoop, reasons: tuple[str, ...]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # a check that never ends by itself
        except asyncio.CancelledError:
            cancelled.append(found.key[1])
            raise
        ended.append(found.key[1])

    scheduler = Scheduler(registry, run)
    scheduler.start()
    registry.loop("ns", "a").wake("audit")
    await asyncio.wait_for(started.wait(), 5)
    await scheduler.close(grace=0.05)
    assert cancelled == ["a"] and ended == []
    registry.loop("ns", "b").wake("audit")  # closed: nothing starts
    assert len(cancelled) == 1


async def wait_until(condition: Any, deadline: float = 5.0) -> None:
    """Until ``condition()`` holds, letting the scheduler run (fails after ``deadline`` s)."""
    aio = asyncio.get_running_loop()
    end = aio.time() + deadline
    while not condition():
        assert aio.time() < end, "condition not reached"
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("retry", list(Retry))
def test_every_retry_kind_gives_a_positive_delay(retry: Retry) -> None:
    assert next_delay(5, failure(retry), 1) > 0


async def test_spec_wake_for_a_generation_already_checked_is_dropped() -> None:
    """A watch event may deliver the spec the running check already reads: the wake must not
    cause a second check."""
    registry = Registry()
    loop_ = registry.loop("ns", "a")
    picked = registry.take(0.0)
    assert picked is None
    loop_.wake("spec-create", generation=3)
    picked = registry.take(0.0)
    assert picked is not None
    loop_.wake("spec-update", generation=3)  # arrives during the first check ...
    loop_.schedule(3600, None, generation=3)  # ... which read generation 3
    registry.done(loop_)
    assert loop_.checked_generation == 3
    now = asyncio.get_running_loop().time()
    assert taken(registry, now) is None  # not woken: nothing new
    assert loop_.due - now > 1000  # still due only at the resync

    loop_.wake("spec-update", generation=2)  # an older event delivered late: also seen
    assert taken(registry, now) is None
    loop_.wake("spec-update", generation=4)  # a newer spec: check
    assert taken(registry, now) == ("a", ("spec-update",))

    loop_.schedule(3600, None, generation=4)
    loop_.wake("spec-resume", generation=4)
    loop_.wake("audit")  # not a spec wake: always checks (and the seen spec wake is dropped)
    assert taken(registry, now) == ("a", ("audit",))


# ------------------------------------------------- issue 15.5: a verification that keeps failing


def unverified(message: str = "read-back after the write does not hold the spec: x") -> Failure:
    return Failure("VerificationFailed", message, Retry.UNVERIFIED)


def test_identical_verification_failures_back_off_from_the_resync_doubling() -> None:
    """Each retry of a write that does not stick is one more revision: the same verification
    failure again waits resync, 2x, 4x, ... (capped), never one write per resync."""
    rng = random.Random(4)
    streak = Streak()
    delays = []
    for _ in range(6):
        streak = streak.after(unverified())
        delays.append(next_delay(60, unverified(), streak.count, rng))
    assert streak == Streak(Retry.UNVERIFIED, 6, ("VerificationFailed", unverified().message))
    for n, delay in enumerate(delays):
        assert 0.9 * 60 * 2**n <= delay <= 1.1 * 60 * 2**n
    assert next_delay(60, unverified(), 40, rng) <= 1.1 * SLOW_CAP


def test_a_different_verification_failure_starts_the_streak_over() -> None:
    streak = Streak().after(unverified("a")).after(unverified("a"))
    assert streak.count == 2
    assert streak.after(unverified("b")).count == 1
    assert streak.after(None) == Streak()


async def test_a_repeated_verification_failure_warns_once() -> None:
    loop_ = DriftLoop(("ns", "a"))
    warning = Event("Warning", "VerificationFailed", unverified().message)
    posted = 0
    for _ in range(17):
        loop_.schedule(60, unverified(), generation=1)
        posted += len(loop_.events_to_post([warning]))
    assert posted == 1
    # A different failure is news: posted at once.
    other = Event("Warning", "VerificationFailed", "other")
    loop_.schedule(60, unverified("other"), generation=1)
    assert loop_.events_to_post([other]) == (other,)


def test_owned_elsewhere_is_checked_at_the_resync_without_backoff() -> None:
    """A claim held elsewhere is a standing state: reads at the resync, so that a released
    claim is taken at the next check, however long it was held."""
    from controller.domain import ownership
    from controller.domain.model import Observed, ServiceRef
    from controller.schedule.backoff import next_delay

    ref = ServiceRef("my-project", "us-west2", "svc")
    failure = ownership.owned_elsewhere(
        Observed(ref=ref, container="", env={}, settings={}, bindings={}, owner="c/ns/other")
    )
    for attempt in (1, 5, 20):
        assert 27.0 <= next_delay(30.0, failure, attempt) <= 33.0


async def test_a_rollout_under_way_keeps_the_failed_rollout_streak() -> None:
    """Failed rollout, retry (its rollout under way: no failure yet), failed again: the second
    failure backs off as the second, not as a first after a success."""
    loop_ = DriftLoop(("ns", "a"))
    rng = random.Random(5)
    loop_.schedule(60, failure(Retry.SLOWLY), rng)
    loop_.schedule(60, None, rng, rolling_out=True)
    assert loop_.streak == Streak(Retry.SLOWLY, 1)
    assert loop_.schedule(60, failure(Retry.SLOWLY), rng) >= 2 * 60 * 0.9
    loop_.schedule(60, None, rng)  # served at last: a success resets
    assert loop_.streak == Streak()


async def test_a_rollout_wake_counts_only_after_a_check_that_said_progressing() -> None:
    """A rollout that ended before the check's read-back (it reported DriftRepaired, Synced)
    wakes nothing: a second check would repeat its reads and replace DriftRepaired by Synced
    at once. One the check saw under way (Progressing) wakes the loop when it ends, also when
    it ends while that check is still running."""
    registry = Registry()
    loop_ = registry.loop("ns", "a")
    loop_.ref = REF
    now = asyncio.get_running_loop().time()
    registry.wake_service(REF, ROLLOUT_WAKE)  # ended during a check that saw it end
    loop_.schedule(3600, None, generation=1, rolling_out=False)
    assert taken(registry, now) is None
    registry.wake_service(REF, ROLLOUT_WAKE)  # a late wake of an earlier rollout: nothing
    assert taken(registry, now) is None
    registry.wake_service(REF, "audit")  # any other wake still checks
    assert taken(registry, now) == ("a", ("audit",))

    registry.wake_service(REF, ROLLOUT_WAKE)  # ended during a check that saw it under way
    loop_.schedule(3600, None, generation=1, rolling_out=True)
    assert taken(registry, now) == ("a", (ROLLOUT_WAKE,))
    loop_.schedule(3600, None, generation=1, rolling_out=True)  # still under way
    assert taken(registry, now) is None
    registry.wake_service(REF, ROLLOUT_WAKE)  # ends after the check: checks at once
    assert taken(registry, now) == ("a", (ROLLOUT_WAKE,))
