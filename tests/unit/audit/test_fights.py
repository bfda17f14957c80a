"""controller.audit.fights: more than N repairs of one service in a window -> exponential hold."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.audit.fights import (
    DRIFT_FIGHT,
    FightDetector,
    FightPolicy,
    Hold,
    held,
    message,
    observe_only,
    started,
)
from controller.domain.model import (
    Aspect,
    Condition,
    Desired,
    DriftReport,
    Event,
    Failure,
    Mode,
    Reason,
    ServiceRef,
    StatusUpdate,
)

REF = ServiceRef("nba-props-platform", "us-west2", "phase3-to-phase4")
OTHER = ServiceRef("nba-props-platform", "us-west2", "other")
T0 = 1_800_000_000.0


def repairs(
    detector: FightDetector, times: list[float], ref: ServiceRef = REF
) -> list[Hold | None]:
    return [detector.repaired(ref, t) for t in times]


def test_five_repairs_in_the_window_are_not_a_fight_the_sixth_is() -> None:
    d = FightDetector()
    d.saw(REF, "deployer@example.com", T0)
    holds = repairs(d, [T0 + i for i in range(6)])
    assert holds[:5] == [None] * 5
    hold = holds[5]
    assert hold is not None
    assert hold.backoff == 60.0
    assert hold.until == T0 + 5 + 60
    assert hold.repairs == 6
    assert hold.principals == ("deployer@example.com",)
    assert d.holding(REF, T0 + 6) == hold
    assert d.holding(REF, T0 + 65) is None  # expired
    assert d.holding(OTHER, T0 + 6) is None  # per service


def test_repairs_spread_wider_than_the_window_never_fight() -> None:
    d = FightDetector()
    assert repairs(d, [T0 + i * 121 for i in range(30)]) == [None] * 30  # 5 per 10 minutes


def test_backoff_doubles_while_the_fight_goes_on_and_is_capped() -> None:
    d = FightDetector(FightPolicy(threshold=5, window=600, first_backoff=60, max_backoff=300))
    t = T0
    for _ in range(5):
        assert d.repaired(REF, t) is None
        t += 1
    backoffs = []
    for _ in range(5):
        hold = d.repaired(REF, t)
        assert hold is not None
        backoffs.append(hold.backoff)
        t = hold.until + 1  # the first repair after each hold expires
    assert backoffs == [60, 120, 240, 300, 300]


def test_a_quiet_window_after_the_hold_ends_the_fight() -> None:
    d = FightDetector()
    hold = repairs(d, [T0 + i for i in range(6)])[-1]
    assert hold is not None
    later = hold.until + 601
    assert repairs(d, [later + i for i in range(5)]) == [None] * 5
    again = d.repaired(REF, later + 5)
    assert again is not None and again.backoff == 60.0  # a new fight starts from the beginning


def test_threshold_zero_disables() -> None:
    d = FightDetector(FightPolicy(threshold=0))
    assert repairs(d, [T0 + i for i in range(50)]) == [None] * 50


def test_principals_are_those_seen_within_the_window() -> None:
    d = FightDetector()
    d.saw(REF, "old@example.com", T0 - 700)
    d.saw(REF, "ci@p.iam.gserviceaccount.com", T0)
    d.saw(REF, "deployer@example.com", T0 + 1)
    d.saw(REF, "", T0 + 2)
    d.saw(OTHER, "elsewhere@example.com", T0)
    hold = repairs(d, [T0 + i for i in range(6)])[-1]
    assert hold is not None
    assert hold.principals == (
        "an unknown principal",
        "ci@p.iam.gserviceaccount.com",
        "deployer@example.com",
    )


@given(st.lists(st.floats(min_value=0, max_value=7200, allow_nan=False), max_size=60))
def test_never_a_fight_with_at_most_threshold_repairs_per_window(offsets: list[float]) -> None:
    times = sorted(T0 + o for o in offsets)
    d = FightDetector()
    for i, t in enumerate(times):
        in_window = [x for x in times[: i + 1] if x >= t - 600]
        hold = d.repaired(REF, t)
        if len(in_window) <= 5 and hold is not None:
            # only allowed as the continuation of an earlier fight
            assert any(
                len([x for x in times[: j + 1] if x >= times[j] - 600]) > 5 for j in range(i)
            )


# ---------------------------------------------------------------------- status and Events


def repaired_update() -> StatusUpdate:
    return StatusUpdate(
        ready=Condition("Ready", True, Reason.DRIFT_REPAIRED, "repaired drift: env A missing"),
        aspects={a: Condition(a.value, True, Reason.SYNCED) for a in Aspect},
        checked=True,
        drift=DriftReport(detected=("env A missing",), repaired=True, aspects=frozenset()),
        events=(Event("Normal", Reason.DRIFT_REPAIRED, "repaired: env A missing"),),
    )


HOLD = Hold(
    until=T0 + 60,
    backoff=60,
    repairs=6,
    window=600,
    principals=("deployer@example.com",),
)


def test_started_sets_the_reason_and_posts_a_warning_naming_the_principal() -> None:
    update = started(repaired_update(), HOLD)
    assert update.ready.type == "Ready"
    assert (update.ready.status, update.ready.reason) == (False, DRIFT_FIGHT)
    warning = update.events[-1]
    assert (warning.type, warning.reason) == ("Warning", "DriftFight")
    assert "deployer@example.com" in warning.message
    assert "6 repairs in 10m" in warning.message
    assert "not repairing for 1m" in warning.message
    assert update.events[0].reason == Reason.DRIFT_REPAIRED  # the repair itself is still told


def test_message_without_known_principals() -> None:
    text = message(Hold(until=T0, backoff=120, repairs=7, window=600, principals=()))
    assert "an unknown principal" in text
    assert "for 2m" in text


def test_held_reports_pending_drift_under_drift_fight() -> None:
    observe = StatusUpdate(
        ready=Condition("Ready", False, Reason.DRIFT_DETECTED, "1 change(s) pending"),
        aspects={a: Condition(a.value, True, Reason.SYNCED) for a in Aspect},
        checked=True,
        pending=("env A missing",),
        drift=DriftReport(detected=("env A missing",)),
        events=(Event("Warning", Reason.DRIFT_DETECTED, "Observe mode, not repairing: x"),),
    )
    update = held(observe, HOLD)
    assert (update.ready.status, update.ready.reason) == (False, DRIFT_FIGHT)
    assert "env A missing" in update.ready.message
    assert "deployer@example.com" in update.ready.message
    assert "Observe mode" not in update.events[0].message
    assert "DriftFight" in update.events[0].message
    assert update.pending == ("env A missing",)


@pytest.mark.parametrize(
    "update",
    [
        StatusUpdate(
            ready=Condition("Ready", True, Reason.SYNCED),
            aspects={},
            checked=True,
            pending=(),
        ),
        StatusUpdate(
            ready=Condition("Ready", False, Reason.UNAVAILABLE),
            aspects={},
            checked=False,
            failure=Failure(Reason.UNAVAILABLE, "down"),
        ),
    ],
    ids=["in-sync", "failed"],
)
def test_held_leaves_other_outcomes_alone(update: StatusUpdate) -> None:
    assert held(update, HOLD) == update


def test_observe_only() -> None:
    desired = Desired(ref=REF)
    assert observe_only(desired).policy.mode is Mode.OBSERVE
    assert desired.policy.mode is Mode.ENFORCE


# ---------------------------------------------------------------------- without the audit feed


def test_repairs_at_every_check_are_a_fight_without_any_audit_entry() -> None:
    """No audit feed: the check path counts its own repairs (fights.begin/end)."""
    from controller.audit import fights as f
    from controller.domain.model import Aspect, Condition, DriftReport, ServiceRef, StatusUpdate

    ref = ServiceRef("my-project", "us-west2", "svc")
    detector = f.FightDetector(f.FightPolicy(threshold=2, window=600, first_backoff=60))
    repaired = StatusUpdate(
        ready=Condition("Ready", True, "DriftRepaired", "repaired drift: env A missing"),
        aspects={},
        checked=True,
        drift=DriftReport(
            detected=("env A missing",), repaired=True, aspects=frozenset({Aspect.ENV})
        ),
    )
    now = 1000.0
    for i in range(2):
        assert f.begin(detector, ref, ("resync",), now + i) is None
        update, hold = f.end(detector, ref, repaired, None, now + i)
        assert hold is None and update.ready.reason == "DriftRepaired"
    update, hold = f.end(detector, ref, repaired, None, now + 2)
    assert hold is not None
    assert update.ready.reason == "DriftFight" and not update.ready.status
    assert "an unknown principal" in update.ready.message
    assert [e.reason for e in update.events] == ["DriftFight"]
    # During the hold the check runs as Observe; a spec change is applied all the same.
    assert f.begin(detector, ref, ("resync",), now + 3) == hold
    assert f.begin(detector, ref, ("spec-update",), now + 3) is None
    assert f.begin(detector, ref, ("resync",), hold.until + 1) is None


def test_without_the_audit_feed_a_clean_check_in_between_is_no_fight() -> None:
    from controller.audit import fights as f
    from controller.domain.model import Aspect, Condition, DriftReport, ServiceRef, StatusUpdate

    ref = ServiceRef("my-project", "us-west2", "svc")
    detector = f.FightDetector(f.FightPolicy(threshold=2, window=600, first_backoff=60))
    repaired = StatusUpdate(
        ready=Condition("Ready", True, "DriftRepaired", "repaired drift: env A missing"),
        aspects={},
        checked=True,
        drift=DriftReport(
            detected=("env A missing",), repaired=True, aspects=frozenset({Aspect.ENV})
        ),
    )
    clean = StatusUpdate(ready=Condition("Ready", True, "Synced", ""), aspects={}, checked=True)
    for i in range(10):  # drift now and then, each time found and repaired once
        update, hold = f.end(detector, ref, repaired, None, 1000.0 + 2 * i)
        assert hold is None and update.ready.reason == "DriftRepaired"
        f.end(detector, ref, clean, None, 1001.0 + 2 * i)
