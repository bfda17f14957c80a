"""The planner: ownership tables, then the invariants as hypothesis properties."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.domain.model import (
    Aspect,
    Desired,
    EnvPolicy,
    EnvValue,
    InvokerPolicy,
    Managed,
    Observed,
    Policy,
    Rollout,
    RolloutRetry,
    RolloutState,
    ServiceRef,
)
from controller.domain.plan import (
    managed_after,
    plan,
    restrict,
    revoke_plan,
    setting_equal,
    simulate,
    without_members,
)

REF = ServiceRef("my-project", "us-west2", "svc")
ROLE = "roles/run.invoker"
OTHER_ROLE = "roles/run.developer"
SA = "serviceAccount:pusher@my-project.iam.gserviceaccount.com"
FOREIGN = "user:someone@example.com"


def lit(value: str) -> EnvValue:
    return EnvValue.literal(value)


def desired(
    env: dict[str, EnvValue] | None = None,
    invokers: frozenset[str] = frozenset(),
    settings: dict[str, int | str] | None = None,
    env_policy: EnvPolicy = EnvPolicy.MERGE,
    invoker_policy: InvokerPolicy = InvokerPolicy.ADDITIVE,
) -> Desired:
    return Desired(
        ref=REF,
        env=env or {},
        invokers=invokers,
        settings=settings or {},
        policy=Policy(env=env_policy, invokers=invoker_policy),
    )


def observed(
    env: dict[str, EnvValue] | None = None,
    bindings: dict[str, frozenset[str]] | None = None,
    settings: dict[str, int | str] | None = None,
    rollout: Rollout | None = None,
) -> Observed:
    return Observed(
        ref=REF,
        container="app",
        env=env or {},
        settings=settings or {},
        bindings=bindings or {},
        rollout=rollout or Rollout(),
    )


FAILED = Rollout(RolloutState.FAILED, "svc-00002-abc")


# --- tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("want", "have", "owned", "policy", "set_", "remove", "lines"),
    [
        pytest.param(
            {"A": lit("1")}, {"A": lit("1")}, set(), EnvPolicy.MERGE, {}, set(), [], id="in-sync"
        ),
        pytest.param(
            {"A": lit("1")},
            {},
            set(),
            EnvPolicy.MERGE,
            {"A": lit("1")},
            set(),
            ["env A missing"],
            id="missing",
        ),
        pytest.param(
            {"A": lit("1")},
            {"A": lit("2")},
            {"A"},
            EnvPolicy.MERGE,
            {"A": lit("1")},
            set(),
            ["env A changed"],
            id="changed",
        ),
        pytest.param(
            {"A": lit("1")},
            {"A": EnvValue.from_secret("s")},
            {"A"},
            EnvPolicy.MERGE,
            {"A": lit("1")},
            set(),
            ["env A changed"],
            id="literal-vs-secret",
        ),
        pytest.param(
            {}, {"F": lit("x")}, set(), EnvPolicy.MERGE, {}, set(), [], id="merge-keeps-foreign"
        ),
        pytest.param(
            {},
            {"OLD": lit("x")},
            {"OLD"},
            EnvPolicy.MERGE,
            {},
            {"OLD"},
            ["env OLD no longer declared"],
            id="merge-prunes-owned",
        ),
        pytest.param({}, {}, {"GONE"}, EnvPolicy.MERGE, {}, set(), [], id="owned-already-absent"),
        pytest.param(
            {"A": lit("1")},
            {"A": lit("1"), "F": lit("x")},
            set(),
            EnvPolicy.AUTHORITATIVE,
            {},
            {"F"},
            ["env F not declared"],
            id="authoritative-removes-foreign",
        ),
    ],
)
def test_env_table(want, have, owned, policy, set_, remove, lines):  # type: ignore[no-untyped-def]
    p = plan(
        desired(env=want, env_policy=policy), observed(env=have), Managed(env=frozenset(owned))
    )
    assert dict(p.env_set) == set_
    assert p.env_remove == frozenset(remove)
    assert p.lines() == lines
    assert p.managed.env == frozenset(want)


@pytest.mark.parametrize(
    ("want", "have", "owned", "policy", "add", "remove"),
    [
        pytest.param({SA}, {ROLE: {SA}}, set(), InvokerPolicy.ADDITIVE, set(), set(), id="in-sync"),
        pytest.param({SA}, {}, set(), InvokerPolicy.ADDITIVE, {SA}, set(), id="missing"),
        pytest.param(
            {SA},
            {ROLE: {SA, FOREIGN}},
            set(),
            InvokerPolicy.ADDITIVE,
            set(),
            set(),
            id="additive-keeps-foreign",
        ),
        pytest.param(
            set(),
            {ROLE: {SA, FOREIGN}},
            {SA},
            InvokerPolicy.ADDITIVE,
            set(),
            {SA},
            id="additive-prunes-owned",
        ),
        pytest.param(
            {SA},
            {ROLE: {SA, FOREIGN}},
            set(),
            InvokerPolicy.AUTHORITATIVE,
            set(),
            {FOREIGN},
            id="authoritative-removes-foreign",
        ),
        pytest.param(
            {SA},
            {OTHER_ROLE: {FOREIGN}},
            set(),
            InvokerPolicy.AUTHORITATIVE,
            {SA},
            set(),
            id="other-role-untouched",
        ),
    ],
)
def test_invoker_table(want, have, owned, policy, add, remove):  # type: ignore[no-untyped-def]
    bindings = {role: frozenset(m) for role, m in have.items()}
    p = plan(
        desired(invokers=frozenset(want), invoker_policy=policy),
        observed(bindings=bindings),
        Managed.of(members=frozenset(owned)),
    )
    assert p.invokers_add == frozenset(add)
    assert p.invokers_remove == frozenset(remove)
    assert p.role == ROLE


def test_settings_only_declared_fields_are_compared() -> None:
    p = plan(
        desired(settings={"maxInstances": 10, "memory": "512Mi", "labels.team": "data"}),
        observed(
            settings={
                "maxInstances": 3,
                "memory": "512Mi",
                "minInstances": 7,
                "labels.team": "data",
                "labels.other": "x",
            }
        ),
        Managed(),
    )
    assert dict(p.settings_set) == {"maxInstances": 10}
    assert p.lines() == ["setting maxInstances changed"]
    assert not p.touches_iam


@pytest.mark.parametrize(
    ("key", "a", "b", "equal"),
    [
        ("cpu", "1", "1000m", True),
        ("cpu", "0.5", "500m", True),
        ("cpu", "2", "1", False),
        ("memory", "1Gi", "1024Mi", True),
        ("memory", "512Mi", "512M", False),
        ("maxInstances", 10, 10, True),
        ("timeoutSeconds", 540, "540", True),
        ("ingress", "all", "internal", False),
    ],
)
def test_setting_equality_in_units(key: str, a: int | str, b: int | str, equal: bool) -> None:
    assert setting_equal(key, a, b) is equal


def test_lines_name_fields_never_values() -> None:
    p = plan(
        desired(env={"TOKEN": lit("s3cr3t-value")}, settings={"maxInstances": 10}),
        observed(env={"TOKEN": lit("old-s3cr3t")}),
        Managed(),
    )
    text = " ".join(p.lines())
    assert "TOKEN" in text
    assert "s3cr3t" not in text


def test_one_service_write_covers_env_and_settings() -> None:
    p = plan(desired(env={"A": lit("1")}, settings={"concurrency": 1}), observed(), Managed())
    assert p.touches_service and not p.touches_iam
    assert p.aspects == {Aspect.ENV, Aspect.SETTINGS}


def test_revoke_removes_only_owned_and_present() -> None:
    obs = observed(
        env={"MINE": lit("1"), "THEIRS": lit("2")},
        bindings={ROLE: frozenset({SA, FOREIGN}), OTHER_ROLE: frozenset({SA})},
    )
    p = revoke_plan(
        obs, ROLE, Managed.of(env=frozenset({"MINE", "ABSENT"}), members=frozenset({SA}))
    )
    assert p.env_remove == {"MINE"}
    assert p.invokers_remove == {SA}
    after = simulate(obs, p)
    assert after.env == {"THEIRS": lit("2")}
    assert after.bindings == {ROLE: frozenset({FOREIGN}), OTHER_ROLE: frozenset({SA})}


def test_restrict_and_without_members() -> None:
    other_sa = "serviceAccount:other@my-project.iam.gserviceaccount.com"
    p = plan(
        desired(env={"A": lit("1")}, invokers=frozenset({SA, other_sa})), observed(), Managed()
    )
    assert restrict(p, frozenset({Aspect.ENV})).touches_iam is False
    q = without_members(p, frozenset({SA}))
    assert q.invokers_add == {other_sa}
    assert SA not in " ".join(q.lines())


@pytest.mark.parametrize(
    ("rollout", "want"),
    [
        pytest.param(Rollout(), None, id="ready"),
        pytest.param(
            Rollout(RolloutState.IN_PROGRESS, "svc-00002-abc"), None, id="in-progress-is-left"
        ),
        pytest.param(FAILED, RolloutRetry("svc-00002-abc", 1), id="failed-first-retry"),
        pytest.param(
            Rollout(RolloutState.FAILED, "svc-00009-xyz", attempt=3),
            RolloutRetry("svc-00009-xyz", 4),
            id="failed-next-attempt",
        ),
    ],
)
def test_failed_rollout_is_retried_even_when_the_template_holds_the_spec(
    rollout: Rollout, want: RolloutRetry | None
) -> None:
    d = desired(env={"A": lit("1")}, settings={"maxInstances": 3})
    o = observed(env={"A": lit("1")}, settings={"maxInstances": 3}, rollout=rollout)
    p = plan(d, o, Managed(env=frozenset({"A"})))
    assert p.rollout_retry == want
    assert p.changes == ()  # nothing drifted: the template holds the spec
    assert p.touches_service is (want is not None)
    assert p.empty is (want is None)
    assert not p.touches_iam


def test_rollout_retry_rides_along_with_drift_in_one_update() -> None:
    p = plan(desired(env={"A": lit("2")}), observed(env={"A": lit("1")}, rollout=FAILED), Managed())
    assert p.rollout_retry == RolloutRetry("svc-00002-abc", 1)
    assert p.lines() == ["env A changed"]
    assert restrict(p, frozenset({Aspect.SETTINGS})).rollout_retry == p.rollout_retry
    assert restrict(p, frozenset({Aspect.INVOKERS})).rollout_retry is None


def test_a_served_retry_plans_nothing_more() -> None:
    d = desired(env={"A": lit("1")})
    o = observed(env={"A": lit("1")}, rollout=replace(FAILED, attempt=2))
    first = plan(d, o, Managed())
    after = simulate(o, first)
    assert after.rollout == Rollout(attempt=3)
    assert plan(d, after, first.managed).empty


def test_managed_after_failed_aspect_keeps_old_and_new() -> None:
    p = plan(
        desired(env={"NEW": lit("1")}),
        observed(env={"OLD": lit("1")}),
        Managed(env=frozenset({"OLD"})),
    )
    assert managed_after(Managed(env=frozenset({"OLD"})), p, frozenset()).env == {"OLD", "NEW"}
    assert managed_after(Managed(env=frozenset({"OLD"})), p, frozenset(Aspect)).env == {"NEW"}


# --- properties -------------------------------------------------------------------------------

names = st.sampled_from(["A", "B", "C", "D", "E", "F"])
values = st.one_of(
    st.sampled_from(["1", "2", ""]).map(EnvValue.literal),
    st.sampled_from(["s1", "s2"]).map(EnvValue.from_secret),
)
envs = st.dictionaries(names, values, max_size=6)
members = st.frozensets(
    st.sampled_from(
        [
            SA,
            FOREIGN,
            "group:g@example.com",
            "domain:example.com",
            "serviceAccount:x@p.iam.gserviceaccount.com",
        ]
    ),
    max_size=5,
)
bindings = st.dictionaries(st.sampled_from([ROLE, OTHER_ROLE]), members.filter(bool), max_size=2)
setting_maps = st.fixed_dictionaries(
    {},
    optional={
        "maxInstances": st.integers(0, 20),
        "minInstances": st.integers(0, 5),
        "memory": st.sampled_from(["512Mi", "1Gi", "1024Mi"]),
        "cpu": st.sampled_from(["1", "1000m", "2"]),
        "labels.team": st.sampled_from(["data", "web"]),
    },
)
env_policies = st.sampled_from(list(EnvPolicy))
invoker_policies = st.sampled_from(list(InvokerPolicy))
manageds = st.builds(Managed.of, env=st.frozensets(names), members=members)
rollouts = st.builds(
    Rollout,
    state=st.sampled_from(list(RolloutState)),
    latest_created_revision=st.sampled_from(["", "svc-00003-abc"]),
    attempt=st.integers(0, 3),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Desired, Observed, Managed]:
    d = desired(
        env=draw(envs),
        invokers=draw(members),
        settings=draw(setting_maps),
        env_policy=draw(env_policies),
        invoker_policy=draw(invoker_policies),
    )
    o = observed(
        env=draw(envs),
        bindings=draw(bindings),
        settings=draw(setting_maps),
        rollout=draw(rollouts),
    )
    return d, o, draw(manageds)


@settings(max_examples=300)
@given(scenarios())
def test_never_removes_what_it_does_not_own(case: tuple[Desired, Observed, Managed]) -> None:
    d, o, m = case
    p = plan(d, o, m)
    if d.policy.env is EnvPolicy.MERGE:
        assert p.env_remove <= m.env - d.env.keys()
    if d.policy.invokers is InvokerPolicy.ADDITIVE:
        assert p.invokers_remove <= m.invokers - d.invokers
    # Never a declared thing, whatever the mode.
    assert not p.env_remove & d.env.keys()
    assert not p.invokers_remove & d.invokers


@settings(max_examples=300)
@given(scenarios())
def test_other_roles_and_undeclared_settings_survive(
    case: tuple[Desired, Observed, Managed],
) -> None:
    d, o, m = case
    after = simulate(o, plan(d, o, m))
    assert after.members(OTHER_ROLE) == o.members(OTHER_ROLE)
    for key, value in o.settings.items():
        if key not in d.settings:
            assert after.settings[key] == value


@settings(max_examples=300)
@given(scenarios())
def test_authoritative_converges_to_exactly_the_spec(
    case: tuple[Desired, Observed, Managed],
) -> None:
    d, o, m = case
    d = replace(d, policy=Policy(env=EnvPolicy.AUTHORITATIVE, invokers=InvokerPolicy.AUTHORITATIVE))
    after = simulate(o, plan(d, o, m))
    assert dict(after.env) == dict(d.env)
    assert after.members(d.role) == d.invokers


@settings(max_examples=300)
@given(scenarios())
def test_merge_converges_keeping_the_foreign(case: tuple[Desired, Observed, Managed]) -> None:
    d, o, m = case
    after = simulate(o, plan(d, o, m))
    for name, value in d.env.items():
        assert after.env[name] == value
    if d.policy.env is EnvPolicy.MERGE:
        for name in o.env.keys() - d.env.keys() - m.env:
            assert after.env[name] == o.env[name]
    assert d.invokers <= after.members(d.role)


@settings(max_examples=300)
@given(scenarios())
def test_apply_then_plan_again_is_empty(case: tuple[Desired, Observed, Managed]) -> None:
    d, o, m = case
    first = plan(d, o, m)
    second = plan(d, simulate(o, first), first.managed)
    assert second.empty, second.lines()
    assert second.changes == ()


# ----------------------------------------------------------------------------- issue 15


def test_secret_in_the_services_own_project_by_full_name_is_the_same_secret() -> None:
    """SecretKeySelector.secret: "{secret_name} if the secret is in the same project.
    projects/{project}/secrets/{secret_name} if the secret is in a different project"
    (google/cloud/run/v2/k8s.min.proto); Cloud Run keeps the form it was given."""
    short = EnvValue.from_secret("slack", "latest")
    full = EnvValue.from_secret(f"projects/{REF.project}/secrets/slack", "latest")
    elsewhere = EnvValue.from_secret("projects/other-project/secrets/slack", "latest")
    for want, have in ((short, full), (full, short)):
        assert plan(desired(env={"S": want}), observed(env={"S": have}), Managed()).empty
    assert not plan(desired(env={"S": short}), observed(env={"S": elsewhere}), Managed()).empty
    newer = EnvValue.from_secret(f"projects/{REF.project}/secrets/slack", "3")
    assert not plan(desired(env={"S": short}), observed(env={"S": newer}), Managed()).empty


def test_cpu_and_memory_in_cloud_runs_units_are_in_sync() -> None:
    """Cloud Run v2 reports cpu "1000m" and memory "512Mi" for a default container (Config
    Connector recording: basic/run/v1beta1/runservice/runservicesecret/_http.log)."""
    have = observed(settings={"cpu": "1000m", "memory": "512Mi"})
    assert plan(desired(settings={"cpu": "1", "memory": "512Mi"}), have, Managed()).empty
    assert not plan(desired(settings={"cpu": "2"}), have, Managed()).empty


def test_a_declared_member_holding_the_role_only_under_a_condition_is_said() -> None:
    have = replace(observed(), conditional={ROLE: frozenset({SA})})
    p = plan(desired(invokers=frozenset({SA})), have, Managed())
    assert p.invokers_add == {SA}  # granted unconditionally, as declared
    assert p.lines() == [f"invoker {SA} holds the role only under a condition"]
    assert len(p.notes) == 1 and SA in p.notes[0].text
    assert p.notes[0].reason == "ConditionalBinding"
    # Once it holds the role unconditionally too, there is nothing to say.
    held = replace(have, bindings={ROLE: frozenset({SA})})
    assert plan(desired(invokers=frozenset({SA})), held, Managed()).notes == ()


def test_authoritative_invokers_say_which_conditional_members_survive() -> None:
    have = replace(
        observed(bindings={ROLE: frozenset({SA, FOREIGN})}),
        conditional={ROLE: frozenset({"user:temp@example.com"}), OTHER_ROLE: frozenset({FOREIGN})},
    )
    want = desired(invokers=frozenset({SA}), invoker_policy=InvokerPolicy.AUTHORITATIVE)
    p = plan(want, have, Managed())
    assert p.invokers_remove == {FOREIGN}
    assert [n.reason for n in p.notes] == ["ConditionalBinding"]
    assert "user:temp@example.com" in p.notes[0].text and FOREIGN not in p.notes[0].text
    # Additive mode says nothing about undeclared conditional members.
    assert plan(desired(invokers=frozenset({SA})), have, Managed()).notes == ()


def test_invoker_iam_disabled_is_invoker_drift_unless_public_invokers_are_allowed() -> None:
    public = replace(observed(bindings={ROLE: frozenset({SA})}), invoker_iam_disabled=True)
    p = plan(desired(invokers=frozenset({SA})), public, Managed())
    assert p.invoker_iam_disabled is False and p.touches_service
    assert p.aspects == {Aspect.INVOKERS} and p.service_aspects == {Aspect.INVOKERS}
    assert p.lines() == [
        "invoker invokerIamDisabled true: anyone can invoke, invoker IAM is not checked"
    ]
    assert simulate(public, p).invoker_iam_disabled is False
    assert plan(desired(invokers=frozenset({SA})), simulate(public, p), Managed()).empty
    assert restrict(p, frozenset({Aspect.ENV})).invoker_iam_disabled is None

    allowed = replace(desired(invokers=frozenset({SA})), policy=Policy(allow_public_invokers=True))
    q = plan(allowed, public, Managed())
    assert q.empty and q.invoker_iam_disabled is None
    assert [n.reason for n in q.notes] == ["InvokerIamDisabled"]
    assert "allowPublicInvokers" in q.notes[0].text
