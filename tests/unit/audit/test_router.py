"""controller.audit.router.AuditRouter on a real event loop: debounce, own writes, holds, metrics.

The Pub/Sub side is left out (tests/e2e/test_audit.py runs it on the real Pub/Sub emulator); the
wake and the registry lookup are fakes, the debounce is shortened.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from controller.audit.entries import AuditEntry, Ignored, Result
from controller.audit.fights import FightDetector, FightPolicy
from controller.audit.provenance import OwnWrites
from controller.audit.router import MAX_DEFERRALS, AuditRouter
from controller.domain.model import (
    Aspect,
    Condition,
    DriftReport,
    Reason,
    ServiceRef,
    StatusUpdate,
    WriteRecord,
)
from tests.fixtures.wait import wait_until

REF = ServiceRef("p-audit", "us-west2", "svc")
UNMANAGED = ServiceRef("p-audit", "us-west2", "nobody-manages-me")
OWN = "runwarden@example.com"
DEBOUNCE = 0.05
UPDATE = "google.cloud.run.v2.Services.UpdateService"


class Harness:
    def __init__(self, fights: FightPolicy | None = None) -> None:
        self.records: dict[ServiceRef, WriteRecord] = {REF: WriteRecord()}
        self.woken: list[tuple[ServiceRef, str]] = []
        self.now = 1_800_000_000.0
        self.router = AuditRouter(
            OwnWrites(OWN),
            FightDetector(fights),
            debounce=DEBOUNCE,
            last_write=self.records.get,
            wake=self.wake,
            clock=lambda: self.now,
        )

    def wake(self, ref: ServiceRef, reason: str) -> int:
        self.woken.append((ref, reason))
        return 1

    def entry(self, principal: str = "deployer@example.com", **kw: object) -> AuditEntry:
        base: dict[str, object] = {
            "ref": REF,
            "method": UPDATE,
            "principal": principal,
            "generation": 2,
            "timestamp": self.now,
        }
        return AuditEntry(**{**base, **kw})  # type: ignore[arg-type]


def count(result: Result) -> float:
    return REGISTRY.get_sample_value("runwarden_audit_events_total", {"result": result.value}) or 0


async def until(predicate: Callable[[], object], within: float = 5.0) -> None:
    await wait_until(predicate, within)


async def idle(h: Harness) -> None:
    """Until no timer of the router is left: from then on nothing wakes by itself."""
    await until(lambda: h.router.pending == 0)


def repaired(wrote: WriteRecord | None = None) -> StatusUpdate:
    return StatusUpdate(
        ready=Condition("Ready", True, Reason.DRIFT_REPAIRED, "repaired"),
        aspects={a: Condition(a.value, True, Reason.SYNCED) for a in Aspect},
        checked=True,
        drift=DriftReport(detected=("env A missing",), repaired=True),
        wrote=wrote or WriteRecord(),
    )


async def test_a_burst_of_foreign_entries_wakes_once_after_the_debounce() -> None:
    h = Harness()
    before = count(Result.MATCHED)
    for method in (UPDATE, "google.cloud.run.v2.Services.SetIamPolicy", UPDATE):
        h.router.receive(h.entry(method=method))
    assert h.woken == []  # not before the window closes
    await until(lambda: h.woken)
    await idle(h)
    assert h.woken == [(REF, "audit")]
    assert count(Result.MATCHED) == before + 3


async def test_unmanaged_and_malformed_wake_nothing() -> None:
    h = Harness()
    unmatched, malformed = count(Result.UNMATCHED), count(Result.MALFORMED)
    h.router.receive(h.entry(ref=UNMANAGED))
    h.router.receive(Ignored(Result.MALFORMED, "not JSON"))
    h.router.receive(Ignored(Result.UNMATCHED, "method GetService"))
    await idle(h)
    assert h.woken == []
    assert count(Result.UNMATCHED) == unmatched + 2
    assert count(Result.MALFORMED) == malformed + 1


async def test_own_recorded_write_is_ignored() -> None:
    h = Harness()
    h.records[REF] = WriteRecord(generation=3)
    own = count(Result.OWN)
    h.router.receive(h.entry(OWN, generation=3))
    await idle(h)
    assert h.woken == []
    assert count(Result.OWN) == own + 1


async def test_own_entry_arriving_before_the_write_is_recorded_waits_for_the_record() -> None:
    h = Harness()
    h.records[REF] = WriteRecord(generation=3)
    own = count(Result.OWN)
    h.router.receive(h.entry(OWN, generation=4))  # the reconcile is still verifying
    await until(lambda: h.router.deferrals(REF) >= 2)  # put off twice, not taken as foreign
    assert h.woken == []
    h.router.end_check(REF, repaired(WriteRecord(generation=4)))  # now it is recorded
    await until(lambda: count(Result.OWN) == own + 1)
    await idle(h)
    assert h.woken == []


async def test_own_identity_with_a_write_never_recorded_is_someone_elses() -> None:
    h = Harness()
    h.router.receive(h.entry(OWN, generation=99))
    await until(lambda: h.woken, within=DEBOUNCE * (MAX_DEFERRALS + 2) + 5)
    assert h.woken == [(REF, "audit")]


async def test_repair_latency_is_measured_from_the_entry() -> None:
    h = Harness()
    samples = REGISTRY.get_sample_value("runwarden_drift_repair_seconds_count") or 0
    total = REGISTRY.get_sample_value("runwarden_drift_repair_seconds_sum") or 0
    h.router.receive(h.entry(timestamp=h.now - 0.25))
    await until(lambda: h.woken)
    assert h.router.begin_check(REF, ("audit",)) is None
    h.now += 1.0
    h.router.end_check(REF, repaired())
    assert REGISTRY.get_sample_value("runwarden_drift_repair_seconds_count") == samples + 1
    observed = REGISTRY.get_sample_value("runwarden_drift_repair_seconds_sum") - total
    assert observed == pytest.approx(1.25)
    # A check without a preceding audit entry observes nothing.
    h.router.begin_check(REF, ("resync",))
    h.router.end_check(REF, repaired())
    assert REGISTRY.get_sample_value("runwarden_drift_repair_seconds_count") == samples + 1


async def test_a_fight_holds_repairs_names_the_principal_and_looks_again_after() -> None:
    h = Harness(FightPolicy(threshold=2, window=600, first_backoff=0.3, max_backoff=10))
    h.router.receive(h.entry("ci@pipeline.example.com"))
    await until(lambda: h.woken)
    results = []
    for _ in range(3):
        hold = h.router.begin_check(REF, ("audit",))
        assert hold is None
        results.append(h.router.end_check(REF, repaired()))
        h.now += 0.01
    assert [r.ready.reason for r in results] == ["DriftRepaired", "DriftRepaired", "DriftFight"]
    fight = results[-1]
    assert fight.events[-1].reason == "DriftFight"
    assert "ci@pipeline.example.com" in fight.events[-1].message

    # During the hold: audit entries wake nothing, checks are told to only report ...
    h.woken.clear()
    assert h.router.pending == 1  # the hold's own timer
    h.router.receive(h.entry("ci@pipeline.example.com"))
    await until(lambda: h.router.pending == 1)  # the entry's debounce is over
    assert h.woken == []
    hold = h.router.begin_check(REF, ("resync",))
    assert hold is not None
    # ... except after a spec change.
    assert h.router.begin_check(REF, ("spec-update",)) is None
    # When the hold is over the router wakes the loop to look again.
    await until(lambda: (REF, "fight-hold-over") in h.woken, within=5)


async def test_close_cancels_pending_wakes() -> None:
    h = Harness()
    h.router.receive(h.entry())
    assert h.router.pending == 1
    h.router.close()
    assert h.router.pending == 0  # cancelled: nothing left to fire
    assert h.woken == []


async def test_an_entry_for_a_project_no_namespace_may_touch_wakes_nothing() -> None:
    """Tenancy: the namespace bindings (controller.kube.namespaces) decide; an entry for an
    unbound project is dropped before anything else, even for a service a loop claims."""
    h = Harness()
    bound = {"p-audit"}
    h.router = AuditRouter(
        OwnWrites(OWN),
        debounce=DEBOUNCE,
        last_write=h.records.get,
        wake=h.wake,
        clock=lambda: h.now,
        project_allowed=lambda project: project in bound,
    )
    stranger = ServiceRef("p-stranger", "us-west2", "svc")
    h.records[stranger] = WriteRecord()
    before = count(Result.UNMATCHED)
    h.router.receive(h.entry(ref=stranger))
    assert h.router.pending == 0  # nothing debouncing: dropped at once
    assert count(Result.UNMATCHED) == before + 1
    h.router.receive(h.entry())
    await until(lambda: h.woken)
    await idle(h)
    assert h.woken == [(REF, "audit")]


def test_writes_as_an_impersonated_tenant_account_are_own() -> None:
    """Runwarden acting as a namespace's account: those entries are its own too."""
    own = OwnWrites(OWN)
    tenant = "runner@tenant-a-prj.iam.gserviceaccount.com"
    entry = AuditEntry(ref=REF, method=UPDATE, principal=tenant, generation=2, timestamp=1.0)
    own.record(REF, WriteRecord(generation=2))
    assert own.origin(entry).value == "foreign"
    own.add_identity(f"serviceAccount:{tenant}")
    assert own.origin(entry).value == "own"
