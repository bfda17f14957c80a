"""The planner: PURE. plan(desired, observed, managed) -> Plan.

No kopf, no Google, no asyncio (an import-linter contract keeps it so). This is where the
ownership rules of CONTRACT §1 live; everything else only moves data in and out.
"""

from __future__ import annotations

import re
from dataclasses import replace
from decimal import Decimal, InvalidOperation

from controller.domain.model import (
    INVOKER_IAM_DISABLED,
    SERVICE_ASPECTS,
    Aspect,
    Change,
    ChangeKind,
    Desired,
    EnvPolicy,
    EnvValue,
    Grant,
    InvokerPolicy,
    Managed,
    Note,
    Observed,
    Plan,
    Reason,
    Rollout,
    RolloutRetry,
    SettingValue,
)


def plan(desired: Desired, observed: Observed, managed: Managed) -> Plan:
    """The writes that make ``observed`` hold ``desired``, given what this Orchestrator owns.

    Merge env / Additive invokers never remove anything outside ``managed``; Authoritative modes
    remove everything undeclared (for invokers: within ``desired.role`` only). When the service's
    latest revision failed, the UpdateService also retries the rollout with the next attempt
    number, even if nothing else needs writing: the template holds the spec but does not serve.
    """
    changes: list[Change] = []

    env_set: dict[str, EnvValue] = {}
    for name, want in desired.env.items():
        have = observed.env.get(name)
        if have is None:
            env_set[name] = want
            changes.append(Change(Aspect.ENV, name, ChangeKind.MISSING))
        elif not env_equal(desired.ref.project, want, have):
            env_set[name] = want
            changes.append(Change(Aspect.ENV, name, ChangeKind.CHANGED))
    undeclared_env = observed.env.keys() - desired.env.keys()
    if desired.policy.env is EnvPolicy.AUTHORITATIVE:
        env_remove = frozenset(undeclared_env)
    else:
        env_remove = frozenset(undeclared_env & managed.env)
    changes += [Change(Aspect.ENV, n, _removal_kind(n, managed.env)) for n in env_remove]

    present = observed.members(desired.role)
    conditional = observed.conditional.get(desired.role, frozenset())
    owned_here = managed.members(desired.role)
    invokers_add = desired.invokers - present
    changes += [
        Change(
            Aspect.INVOKERS,
            m,
            ChangeKind.CONDITIONAL_ONLY if m in conditional else ChangeKind.MISSING,
        )
        for m in invokers_add
    ]
    if desired.policy.invokers is InvokerPolicy.AUTHORITATIVE:
        invokers_remove = present - desired.invokers
    else:
        invokers_remove = (present - desired.invokers) & owned_here
    changes += [Change(Aspect.INVOKERS, m, _removal_kind(m, owned_here)) for m in invokers_remove]
    # Grants this Orchestrator made under another role (spec.invokers.role was edited): they move
    # to the new role, i.e. leave the old one. Only owned grants; nobody else's ever change.
    grants_remove = moved_grants(managed, desired.role, observed)
    changes += [
        Change(Aspect.INVOKERS, grant_name(g), ChangeKind.PRUNED) for g in sorted(grants_remove)
    ]
    notes = _conditional_notes(desired, conditional, invokers_add)

    # invoker_iam_disabled makes every invoker binding moot: anyone can invoke. Only
    # allowPublicInvokers may leave it so (still reported); otherwise it is invoker drift.
    invoker_iam_disabled: bool | None = None
    if observed.invoker_iam_disabled:
        if desired.policy.allow_public_invokers:
            notes.append(
                Note(
                    Aspect.INVOKERS,
                    Reason.INVOKER_IAM_DISABLED,
                    f"{INVOKER_IAM_DISABLED} is true: anyone can invoke the service, invoker "
                    "IAM is not checked (allowed by spec.policy.allowPublicInvokers)",
                )
            )
        else:
            invoker_iam_disabled = False
            changes.append(Change(Aspect.INVOKERS, INVOKER_IAM_DISABLED, ChangeKind.IAM_DISABLED))

    settings_set: dict[str, SettingValue] = {}
    for key, want_setting in desired.settings.items():
        have_setting = observed.settings.get(key)
        if have_setting is None or not setting_equal(key, want_setting, have_setting):
            settings_set[key] = want_setting
            kind = ChangeKind.MISSING if have_setting is None else ChangeKind.CHANGED
            changes.append(Change(Aspect.SETTINGS, key, kind))

    return Plan(
        env_set=env_set,
        env_remove=env_remove,
        settings_set=settings_set,
        role=desired.role,
        invokers_add=frozenset(invokers_add),
        invokers_remove=frozenset(invokers_remove),
        grants_remove=grants_remove,
        changes=tuple(sorted(changes)),
        managed=Managed.of(frozenset(desired.env), desired.role, desired.invokers),
        rollout_retry=rollout_retry(observed.rollout),
        invoker_iam_disabled=invoker_iam_disabled,
        notes=tuple(sorted(notes)),
    )


def _conditional_notes(
    desired: Desired, conditional: frozenset[str], granting: frozenset[str]
) -> list[Note]:
    """What conditional bindings of the managed role mean for this spec (they are never
    changed): a declared member that holds the role only under a condition (granted
    unconditionally now), and, in Authoritative mode, undeclared members that keep the role
    under a condition."""
    notes: list[Note] = []
    role = desired.role
    only = sorted(granting & conditional)
    if only:
        notes.append(
            Note(
                Aspect.INVOKERS,
                Reason.CONDITIONAL_BINDING,
                f"declared invoker(s) {', '.join(only)} held {role} only under an IAM "
                "condition; granted unconditionally as declared (the conditional binding is "
                "left as it is)",
            )
        )
    if desired.policy.invokers is InvokerPolicy.AUTHORITATIVE:
        kept = sorted(conditional - desired.invokers)
        if kept:
            notes.append(
                Note(
                    Aspect.INVOKERS,
                    Reason.CONDITIONAL_BINDING,
                    f"undeclared member(s) {', '.join(kept)} keep {role} under an IAM "
                    "condition: Authoritative invokers never change conditional bindings",
                )
            )
    return notes


def env_equal(project: str, want: EnvValue, have: EnvValue) -> bool:
    """One variable's value as Cloud Run means it. A secret named ``S`` and one named
    ``projects/<the service's project>/secrets/S`` are the same secret: SecretKeySelector.secret
    is "{secret_name} if the secret is in the same project.
    projects/{project}/secrets/{secret_name} if the secret is in a different project"
    (google/cloud/run/v2/k8s.min.proto), and Cloud Run keeps the form it was given (a
    Config Connector recording of real traffic writes projects/<number>/secrets/S and reads it
    back unchanged: basic/run/v1beta1/runjob/jobwithsecretmanagersecret/_http.log)."""
    if want.secret is None or have.secret is None:
        return want == have
    return want.secret.version == have.secret.version and _secret_id(
        project, want.secret.secret
    ) == _secret_id(project, have.secret.secret)


def _secret_id(project: str, secret: str) -> str:
    prefix = f"projects/{project}/secrets/"
    return secret.removeprefix(prefix) if secret.startswith(prefix) else secret


def moved_grants(managed: Managed, role: str, observed: Observed) -> frozenset[Grant]:
    """Owned grants under roles other than ``role`` that the service still holds."""
    return frozenset((r, m) for r, m in managed.grants if r != role and m in observed.members(r))


def grant_name(grant: Grant) -> str:
    """A grant under a role other than the spec's, for messages: "member (role)"."""
    return f"{grant[1]} ({grant[0]})"


def rollout_retry(rollout: Rollout) -> RolloutRetry | None:
    """A failed rollout is retried with the next attempt number; one in progress is left alone."""
    if not rollout.failed:
        return None
    return RolloutRetry(rollout.latest_created_revision, rollout.attempt + 1)


def revoke_plan(observed: Observed, role: str, managed: Managed) -> Plan:
    """Deletion policy Revoke: remove exactly the owned env vars and members that are present,
    each member from the role it was granted under."""
    env_remove = frozenset(managed.env & observed.env.keys())
    invokers_remove = managed.members(role) & observed.members(role)
    grants_remove = moved_grants(managed, role, observed)
    changes = [Change(Aspect.ENV, n, ChangeKind.PRUNED) for n in env_remove]
    changes += [Change(Aspect.INVOKERS, m, ChangeKind.PRUNED) for m in invokers_remove]
    changes += [
        Change(Aspect.INVOKERS, grant_name(g), ChangeKind.PRUNED) for g in sorted(grants_remove)
    ]
    return Plan(
        env_remove=env_remove,
        role=role,
        invokers_remove=invokers_remove,
        grants_remove=grants_remove,
        changes=tuple(sorted(changes)),
        managed=Managed(),
    )


def restrict(p: Plan, aspects: frozenset[Aspect]) -> Plan:
    """The part of a plan that concerns only ``aspects``."""
    return replace(
        p,
        env_set=p.env_set if Aspect.ENV in aspects else {},
        env_remove=p.env_remove if Aspect.ENV in aspects else frozenset(),
        settings_set=p.settings_set if Aspect.SETTINGS in aspects else {},
        invokers_add=p.invokers_add if Aspect.INVOKERS in aspects else frozenset(),
        invokers_remove=p.invokers_remove if Aspect.INVOKERS in aspects else frozenset(),
        grants_remove=p.grants_remove if Aspect.INVOKERS in aspects else frozenset(),
        changes=tuple(c for c in p.changes if c.aspect in aspects),
        rollout_retry=p.rollout_retry if aspects & SERVICE_ASPECTS else None,
        invoker_iam_disabled=p.invoker_iam_disabled if Aspect.INVOKERS in aspects else None,
        notes=tuple(n for n in p.notes if n.aspect in aspects),
    )


def without_members(p: Plan, members: frozenset[str]) -> Plan:
    """The plan minus grants that cannot be made (e.g. service accounts that do not exist)."""
    if not members & p.invokers_add:
        return p
    dropped = {
        Change(Aspect.INVOKERS, m, kind)
        for m in members
        for kind in (ChangeKind.MISSING, ChangeKind.CONDITIONAL_ONLY)
    }
    return replace(
        p,
        invokers_add=p.invokers_add - members,
        changes=tuple(c for c in p.changes if c not in dropped),
    )


def simulate(observed: Observed, p: Plan) -> Observed:
    """What the service looks like once ``p`` is applied: the model of a correct gateway."""
    env = {n: v for n, v in observed.env.items() if n not in p.env_remove}
    env.update(p.env_set)
    settings = dict(observed.settings)
    settings.update(p.settings_set)
    bindings = dict(observed.bindings)
    for role, member in p.grants_remove:
        left = bindings.get(role, frozenset()) - {member}
        if left:
            bindings[role] = left
        else:
            bindings.pop(role, None)
    members = (bindings.get(p.role, frozenset()) - p.invokers_remove) | p.invokers_add
    if members:
        bindings[p.role] = members
    else:
        bindings.pop(p.role, None)
    rollout = observed.rollout
    if p.touches_service:  # a successful UpdateService: its new revision serves
        attempt = p.rollout_retry.attempt if p.rollout_retry is not None else rollout.attempt
        rollout = Rollout(attempt=attempt)
    iam_disabled = observed.invoker_iam_disabled
    if p.invoker_iam_disabled is not None:
        iam_disabled = p.invoker_iam_disabled
    owner, owned = observed.owner, observed.owned
    if p.claim is not None:
        owner = "" if p.claim.release else p.claim.owner
        owned = None if p.claim.release else p.claim.owned
    return replace(
        observed,
        env=env,
        settings=settings,
        bindings=bindings,
        rollout=rollout,
        invoker_iam_disabled=iam_disabled,
        owner=owner,
        owned=owned,
    )


def setting_equal(key: str, want: SettingValue, have: SettingValue) -> bool:
    """Equality in the setting's own units: "1" CPU equals "1000m", "1Gi" equals "1024Mi"."""
    if key == "cpu":
        return _cpu(want) == _cpu(have)
    if key == "memory":
        return _bytes(want) == _bytes(have)
    if isinstance(want, int) or isinstance(have, int):
        return _int(want) == _int(have)
    return want == have


def _removal_kind(name: str, owned: frozenset[str]) -> ChangeKind:
    return ChangeKind.PRUNED if name in owned else ChangeKind.UNDECLARED


def _int(value: SettingValue) -> int | str:
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def _cpu(value: SettingValue) -> Decimal | str:
    text = str(value).strip()
    try:
        if text.endswith("m"):
            return Decimal(text[:-1]) / 1000
        return Decimal(text)
    except InvalidOperation:
        return text


_MEMORY_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
}
_MEMORY = re.compile(r"^(\d+)(Ki|Mi|Gi|k|M|G|)$")


def _bytes(value: SettingValue) -> int | str:
    match = _MEMORY.match(str(value).strip())
    if match is None:
        return str(value)
    return int(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def is_empty_for(p: Plan, aspects: frozenset[Aspect]) -> bool:
    """True if ``p`` has nothing to do for any of ``aspects``."""
    return not any(c.aspect in aspects for c in p.changes)


def managed_after(before: Managed, p: Plan, succeeded: frozenset[Aspect]) -> Managed:
    """status.managed after applying ``p`` where only ``succeeded`` aspects were written.

    An aspect whose write failed keeps owning both the old and the new names: whatever was
    meant to be pruned may still be there and must still be prunable next time.
    """
    env = p.managed.env if Aspect.ENV in succeeded else before.env | p.managed.env
    grants = p.managed.grants if Aspect.INVOKERS in succeeded else before.grants | p.managed.grants
    return Managed(env=env, grants=grants)
