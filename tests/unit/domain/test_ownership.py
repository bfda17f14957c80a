"""One owner per service (CONTRACT §6.1), role-aware ownership, and pinned traffic: the pure
parts (ownership decisions, the role move in the planner, the ServingSynced outcome)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.domain import ownership
from controller.domain.model import (
    OWNED_ANNOTATION,
    OWNER_ANNOTATION,
    Aspect,
    Condition,
    Desired,
    EnvValue,
    InvokerPolicy,
    Managed,
    Observed,
    Plan,
    Policy,
    ServiceRef,
    StatusUpdate,
    TrafficShare,
)
from controller.domain.outcome import CONDITION_TYPES, serving, with_serving
from controller.domain.ownership import Standing
from controller.domain.plan import plan, revoke_plan, simulate

REF = ServiceRef("my-project", "us-west2", "svc")
ME = "default/team-a/orch"
OTHER = "default/team-b/orch"
OLD_ROLE = "roles/run.invoker"
NEW_ROLE = "roles/run.developer"
SA = "serviceAccount:pusher@my-project.iam.gserviceaccount.com"
FOREIGN = "user:someone@example.com"


def desired(
    owner: str = ME, take_over: bool = False, role: str = OLD_ROLE, **kw: object
) -> Desired:
    return Desired(
        ref=REF,
        owner=owner,
        role=role,
        policy=Policy(take_over=take_over),
        **kw,  # type: ignore[arg-type]
    )


def observed(owner: str = "", owned: Managed | None = None, **kw: object) -> Observed:
    base = Observed(ref=REF, container="", env={}, settings={}, bindings={})
    return replace(base, owner=owner, owned=owned, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the claim


@pytest.mark.parametrize(
    ("owner", "on_service", "take_over", "expected"),
    [
        (ME, "", False, Standing.UNCLAIMED),
        (ME, ME, False, Standing.OURS),
        (ME, OTHER, False, Standing.ELSEWHERE),
        (ME, OTHER, True, Standing.TAKE_OVER),
        (ME, ME, True, Standing.OURS),
        ("", OTHER, False, Standing.OURS),  # claims off (pure tests only)
    ],
)
def test_standing(owner: str, on_service: str, take_over: bool, expected: Standing) -> None:
    assert ownership.standing(desired(owner, take_over), observed(on_service)) is expected


def test_owned_elsewhere_names_the_owner_and_the_fix() -> None:
    failure = ownership.owned_elsewhere(observed(OTHER))
    assert failure.reason == "OwnedElsewhere"
    assert OTHER in failure.message and "takeOver" in failure.message


def test_owner_id() -> None:
    assert ownership.owner_id("prod-eu", "team-a", "orch") == "prod-eu/team-a/orch"


RECORD = Managed(env=frozenset({"A", "B"}), grants=frozenset({(OLD_ROLE, SA), (NEW_ROLE, FOREIGN)}))


def test_owned_record_round_trips_and_is_compact_and_stable() -> None:
    text = ownership.render_owned(RECORD)
    assert " " not in text
    assert text == (
        '{"env":["A","B"],"invokers":{"roles/run.developer":["user:someone@example.com"],'
        '"roles/run.invoker":["serviceAccount:pusher@my-project.iam.gserviceaccount.com"]}}'
    )
    assert ownership.parse_owned(text) == RECORD


@pytest.mark.parametrize("text", [None, "", "not json", "[]", '{"env": 3}', '{"invokers": []}'])
def test_unreadable_record_is_none(text: str | None) -> None:
    assert ownership.parse_owned(text) is None


def test_the_record_on_the_service_survives_a_lost_status() -> None:
    # Status lost (restored from a backup): the record on the service still says what we own.
    ours = observed(ME, RECORD)
    assert ownership.effective_managed(Managed(), desired(), ours) == RECORD
    # Someone else's record is never inherited, not even when taking over.
    theirs = observed(OTHER, RECORD)
    assert ownership.effective_managed(Managed(), desired(take_over=True), theirs) == Managed()


def test_a_lost_status_still_prunes_what_the_record_owns() -> None:
    d = desired(env={"A": EnvValue.literal("1")})
    o = observed(
        ME,
        Managed(env=frozenset({"A", "GONE"})),
        env={
            "A": EnvValue.literal("1"),
            "GONE": EnvValue.literal("x"),
            "FOREIGN": EnvValue.literal("y"),
        },
    )
    p = plan(d, o, ownership.effective_managed(Managed(), d, o))
    assert p.env_remove == {"GONE"}


def test_claim_is_written_only_when_the_service_does_not_hold_it() -> None:
    d = desired(env={"A": EnvValue.literal("1")})
    p = plan(d, observed(), Managed())
    claim = ownership.claim_for(d, observed(), p)
    assert claim is not None and claim.owner == ME and claim.owned.env == {"A"}
    assert ownership.claim_annotations(claim) == {
        OWNER_ANNOTATION: ME,
        OWNED_ANNOTATION: '{"env":["A"],"invokers":{}}',
    }
    held = observed(ME, p.managed)
    assert ownership.claim_for(d, held, p) is None
    assert ownership.claim_for(replace(d, owner=""), observed(), p) is None


def test_release_only_of_our_own_claim() -> None:
    assert ownership.release_for(desired(), observed(OTHER)) is None
    assert ownership.release_for(desired(), observed("")) is None
    release = ownership.release_for(desired(), observed(ME, RECORD))
    assert release is not None and release.release and ownership.claim_annotations(release) == {}
    after = simulate(observed(ME, RECORD), Plan(claim=release))
    assert after.owner == "" and after.owned is None


# ---------------------------------------------------------------------- role moves (item 3)


def test_role_edit_moves_owned_grants_and_leaves_foreign_ones() -> None:
    o = observed(bindings={OLD_ROLE: frozenset({SA, FOREIGN}), NEW_ROLE: frozenset({FOREIGN})})
    owned = Managed.of(role=OLD_ROLE, members=frozenset({SA}))
    d = desired(role=NEW_ROLE, invokers=frozenset({SA}))
    p = plan(d, o, owned)
    assert p.invokers_add == {SA} and p.role == NEW_ROLE
    assert p.grants_remove == {(OLD_ROLE, SA)}
    assert f"invoker {SA} ({OLD_ROLE}) no longer declared" in p.lines()
    after = simulate(o, p)
    assert after.members(OLD_ROLE) == {FOREIGN}
    assert after.members(NEW_ROLE) == {SA, FOREIGN}
    assert p.managed.grants == {(NEW_ROLE, SA)}
    assert plan(d, after, p.managed).empty


def test_revoke_removes_each_grant_under_its_own_role() -> None:
    o = observed(bindings={OLD_ROLE: frozenset({SA, FOREIGN}), NEW_ROLE: frozenset({SA})})
    owned = Managed(grants=frozenset({(OLD_ROLE, SA), (NEW_ROLE, SA)}))
    p = revoke_plan(o, NEW_ROLE, owned)
    after = simulate(o, p)
    assert after.members(OLD_ROLE) == {FOREIGN}
    assert after.members(NEW_ROLE) == frozenset()


roles = st.sampled_from([OLD_ROLE, NEW_ROLE, "roles/viewer"])
people = st.sampled_from([SA, FOREIGN, "user:a@example.com", "group:g@example.com"])


@settings(max_examples=300)
@given(
    st.dictionaries(roles, st.frozensets(people, max_size=3), max_size=3),
    st.frozensets(st.tuples(roles, people), max_size=5),
    roles,
    st.frozensets(people, max_size=3),
    st.sampled_from(list(InvokerPolicy)),
)
def test_a_plan_never_removes_a_grant_it_does_not_own_outside_its_role(
    bindings: dict[str, frozenset[str]],
    grants: frozenset[tuple[str, str]],
    role: str,
    members: frozenset[str],
    mode: InvokerPolicy,
) -> None:
    o = observed(bindings=bindings)
    d = replace(desired(role=role, invokers=members), policy=Policy(invokers=mode))
    p = plan(d, o, Managed(grants=grants))
    assert p.grants_remove <= grants
    after = simulate(o, p)
    for other in {*bindings, role} - {role}:
        for m in o.members(other):
            assert m in after.members(other) or (other, m) in grants
    second = plan(d, after, p.managed)
    assert second.empty, second.lines()


# ---------------------------------------------------------------------- traffic (item 6)


def ready_update() -> StatusUpdate:
    return StatusUpdate(
        ready=Condition("Ready", True, "Synced", "the service holds the spec"),
        aspects={a: Condition(CONDITION_TYPES[a], True, "Synced", "in sync") for a in Aspect},
        checked=True,
    )


LATEST = "svc-00003-new"


def serving_of(*shares: TrafficShare) -> Observed:
    return observed(latest_ready_revision=LATEST, traffic=shares)


@pytest.mark.parametrize(
    ("shares", "pinned"),
    [
        ((TrafficShare(LATEST, 100, latest=True),), False),
        ((TrafficShare(LATEST, 100),), False),  # pinned by name, but to the right revision
        ((TrafficShare(LATEST, 100, True), TrafficShare("svc-00001-old", 0, tag="old")), False),
        ((TrafficShare("svc-00001-old", 100),), True),  # --no-traffic deploy
        ((TrafficShare("svc-00001-old", 90), TrafficShare(LATEST, 10, True)), True),  # canary
        ((), False),
    ],
)
def test_serving_synced(shares: tuple[TrafficShare, ...], pinned: bool) -> None:
    c = serving(serving_of(*shares))
    assert c.type == "ServingSynced" and c.status is not pinned
    if pinned:
        assert c.reason == "TrafficPinned"
        for s in shares:
            if s.revision != LATEST:
                assert f"{s.revision} {s.percent}%" in c.message
        assert LATEST in c.message


def test_pinned_traffic_makes_ready_false_but_never_hides_another_failure() -> None:
    pinned = serving_of(TrafficShare("svc-00001-old", 100))
    update = with_serving(ready_update(), pinned)
    assert update.serving is not None and not update.serving.status
    assert not update.ready.status and update.ready.reason == "TrafficPinned"
    assert "svc-00001-old 100%" in update.ready.message
    assert [e.reason for e in update.events] == ["TrafficPinned"]
    assert all(c.status for c in update.aspects.values())  # the template holds the spec
    failing = replace(ready_update(), ready=Condition("Ready", False, "Unavailable", "x"))
    assert with_serving(failing, pinned).ready.reason == "Unavailable"
    served = with_serving(ready_update(), serving_of(TrafficShare(LATEST, 100, True)))
    assert served.ready.status and served.serving is not None and served.serving.status
