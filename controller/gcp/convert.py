"""Pure conversion between Cloud Run / IAM protos and the domain model (no I/O).

Reading: a Service and its IAM policy become an ``Observed``. Writing: a plan's env and settings
are edited into the Service's template in place, and invoker deltas into a copy of the policy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from google.protobuf import duration_pb2

from controller.domain import ownership
from controller.domain.model import (
    OWNED_ANNOTATION,
    OWNER_ANNOTATION,
    ROLLOUT_ATTEMPT_ANNOTATION,
    Claim,
    EnvValue,
    Grant,
    Observed,
    Rollout,
    RolloutState,
    ServiceRef,
    SettingValue,
    TrafficShare,
)
from controller.gcp.errors import Invalid

INGRESS_TO_API = {
    "all": run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL,
    "internal": run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY,
    "internal-and-cloud-load-balancing": (
        run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER
    ),
}
INGRESS_FROM_API = {int(v): k for k, v in INGRESS_TO_API.items()}


def container_of(service: Any, name: str) -> Any:
    """The managed container: by name, else the ingress one (with a port), else the only one."""
    containers = service.template.containers
    if name:
        for c in containers:
            if c.name == name:
                return c
        raise Invalid(f"spec.service.container {name} names no container of the service")
    for c in containers:
        if len(c.ports):
            return c
    if len(containers) == 1:
        return containers[0]
    if not len(containers):
        raise Invalid("the service has no container")
    raise Invalid(
        "the service has several containers and none serves a port; set spec.service.container"
    )


def observed(ref: ServiceRef, container: str, service: Any, policy: Any) -> Observed:
    pb = run_v2.Service.pb(service) if isinstance(service, run_v2.Service) else service
    c = container_of(pb, container)
    env: dict[str, EnvValue] = {}
    for e in c.env:
        if e.HasField("value_source"):
            ref_ = e.value_source.secret_key_ref
            env[e.name] = EnvValue.from_secret(ref_.secret, ref_.version or "latest")
        else:
            env[e.name] = EnvValue.literal(e.value)
    return Observed(
        ref=ref,
        container=c.name if container else container,
        env=env,
        settings=settings_of(pb, c),
        bindings=bindings_of(policy) if policy is not None else {},
        conditional=conditional_of(policy) if policy is not None else {},
        invoker_iam_disabled=bool(pb.invoker_iam_disabled),
        uri=pb.uri,
        latest_ready_revision=pb.latest_ready_revision.rsplit("/", 1)[-1],
        generation=int(pb.generation),
        iam_etag=bytes(policy.etag) if policy is not None else b"",
        rollout=rollout_of(pb),
        owner=pb.annotations.get(OWNER_ANNOTATION, ""),
        owned=ownership.parse_owned(pb.annotations.get(OWNED_ANNOTATION)),
        traffic=traffic_of(pb),
        last_modifier=pb.last_modifier,
        service_handle=pb,
        policy_handle=policy,
    )


def rollout_of(service: Any) -> Rollout:
    """The rollout as Cloud Run reports it. Failed: no longer reconciling, the terminal condition
    failed, and the latest created revision is not the latest ready one (the older one serves).
    A rollout still under way (reconciling) is never failed, whatever its conditions say."""
    created = service.latest_created_revision.rsplit("/", 1)[-1]
    ready = service.latest_ready_revision.rsplit("/", 1)[-1]
    try:
        attempt = int(service.template.annotations.get(ROLLOUT_ATTEMPT_ANNOTATION, "0"))
    except ValueError:
        attempt = 0  # not ours to read: the next retry starts over at 1
    if service.reconciling:
        state = RolloutState.IN_PROGRESS
    elif (
        created
        and created != ready
        and service.terminal_condition.state == run_v2.Condition.State.CONDITION_FAILED
    ):
        state = RolloutState.FAILED
    else:
        state = RolloutState.READY
    return Rollout(state=state, latest_created_revision=created, attempt=max(0, attempt))


# googleapis google/cloud/run/v2/traffic_target.proto, TrafficTargetAllocationType.
_LATEST = int(run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST)


def traffic_of(service: Any) -> tuple[TrafficShare, ...]:
    """Where requests go (Service.traffic_statuses, the observed routing). A LATEST target
    serves "the Service's latest ready Revision" (traffic_target.proto); when its status does
    not name it, it is the service's latest_ready_revision."""
    latest_ready = service.latest_ready_revision.rsplit("/", 1)[-1]
    shares = []
    for t in service.traffic_statuses:
        latest = int(t.type_) == _LATEST
        revision = t.revision.rsplit("/", 1)[-1] or (latest_ready if latest else "")
        shares.append(TrafficShare(revision, int(t.percent), latest, t.tag))
    return tuple(shares)


def edit_claim(service: Any, claim: Claim) -> None:
    """Set (or, for a release, remove) the claim's SERVICE-level annotations; the revision
    template is not touched, so the claim alone makes no revision."""
    for key in (OWNER_ANNOTATION, OWNED_ANNOTATION):
        if key in service.annotations:
            del service.annotations[key]
    service.annotations.update(ownership.claim_annotations(claim))


def rolled_out_revision(operation: Any) -> str:
    """The revision an UpdateService operation rolled out ("" if it does not say): the
    operation's metadata is the Service as the update left it."""
    try:
        service = operation.metadata
    except (TypeError, ValueError):
        return ""
    name = getattr(service, "latest_created_revision", "") or ""
    return str(name).rsplit("/", 1)[-1]


def settings_of(service: Any, container: Any) -> dict[str, SettingValue]:
    t = service.template
    settings: dict[str, SettingValue] = {
        "timeoutSeconds": int(t.timeout.seconds),
        "minInstances": int(t.scaling.min_instance_count),
        "maxInstances": int(t.scaling.max_instance_count),
        "concurrency": int(t.max_instance_request_concurrency),
    }
    if t.service_account:
        settings["serviceAccount"] = t.service_account
    for key in ("cpu", "memory"):
        if key in container.resources.limits:
            settings[key] = container.resources.limits[key]
    if int(service.ingress) in INGRESS_FROM_API:
        settings["ingress"] = INGRESS_FROM_API[int(service.ingress)]
    for key, value in service.labels.items():
        settings[f"labels.{key}"] = value
    return settings


def bindings_of(policy: Any) -> dict[str, frozenset[str]]:
    """Role -> members of the unconditional bindings (conditional ones are not ours)."""
    bindings: dict[str, frozenset[str]] = {}
    for b in policy.bindings:
        if b.HasField("condition"):
            continue
        bindings[b.role] = bindings.get(b.role, frozenset()) | frozenset(b.members)
    return bindings


def conditional_of(policy: Any) -> dict[str, frozenset[str]]:
    """Role -> members of the conditional bindings (reported, never changed)."""
    conditional: dict[str, frozenset[str]] = {}
    for b in policy.bindings:
        if b.HasField("condition"):
            conditional[b.role] = conditional.get(b.role, frozenset()) | frozenset(b.members)
    return conditional


def edit_env(container: Any, env_set: Mapping[str, EnvValue], remove: frozenset[str]) -> None:
    """Set/replace/remove variables in place; everything else keeps its value and order."""
    kept = [e for e in container.env if e.name not in remove]
    by_name = {e.name: e for e in kept}
    for name, value in env_set.items():
        e = by_name.get(name)
        if e is None:
            e = run_v2.EnvVar.pb()(name=name)
            kept.append(e)
        e.ClearField("value")
        e.ClearField("value_source")
        if value.secret is not None:
            e.value_source.secret_key_ref.secret = value.secret.secret
            e.value_source.secret_key_ref.version = value.secret.version
        else:
            e.value = value.value or ""
    new = [copy.deepcopy(e) for e in kept]
    del container.env[:]
    container.env.extend(new)


def edit_settings(service: Any, container: Any, settings: Mapping[str, SettingValue]) -> None:
    t = service.template
    for key, value in settings.items():
        if key == "serviceAccount":
            t.service_account = str(value)
        elif key == "timeoutSeconds":
            t.timeout.CopyFrom(duration_pb2.Duration(seconds=int(value)))
        elif key == "minInstances":
            t.scaling.min_instance_count = int(value)
        elif key == "maxInstances":
            t.scaling.max_instance_count = int(value)
        elif key == "concurrency":
            t.max_instance_request_concurrency = int(value)
        elif key in ("cpu", "memory"):
            container.resources.limits[key] = str(value)
        elif key == "ingress":
            service.ingress = INGRESS_TO_API[str(value)]
        elif key.startswith("labels."):
            service.labels[key.removeprefix("labels.")] = str(value)
        else:
            raise ValueError(f"unknown setting {key}")


def edit_policy(
    policy: policy_pb2.Policy,
    role: str,
    add: frozenset[str],
    remove: frozenset[str],
    grants_remove: frozenset[Grant] = frozenset(),
) -> policy_pb2.Policy | None:
    """The policy with the delta applied to ``role``'s unconditional binding, and the
    ``grants_remove`` (role, member) pairs removed from their roles' unconditional bindings;
    None if a no-op."""
    edited = policy_pb2.Policy()
    edited.CopyFrom(policy)
    changed = False
    deltas: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    for r, m in grants_remove:
        kept_add, kept_remove = deltas.get(r, (frozenset(), frozenset()))
        deltas[r] = (kept_add, kept_remove | {m})
    deltas[role] = (add, remove | deltas.get(role, (frozenset(), frozenset()))[1])
    for r, (r_add, r_remove) in sorted(deltas.items()):
        binding = next(
            (b for b in edited.bindings if b.role == r and not b.HasField("condition")), None
        )
        current = set(binding.members) if binding is not None else set()
        wanted = (current - r_remove) | r_add
        if wanted == current:
            continue
        changed = True
        if binding is None:
            binding = edited.bindings.add(role=r)
        del binding.members[:]
        binding.members.extend(sorted(wanted))
        if not wanted:
            edited.bindings.remove(binding)
    if not changed:
        return None
    if any(b.HasField("condition") for b in edited.bindings):
        edited.version = 3
    return edited


@dataclass(frozen=True)
class AdoptionFacts:
    """What ``runwarden export`` must know about a live service beyond its ``Observed``: the
    parts an Orchestrator cannot declare. Names and counts only, never values."""

    containers: tuple[str, ...]  # every container's name, in the template's order
    managed_container: str  # the container an Orchestrator without spec.service.container manages
    other_env: Mapping[str, tuple[str, ...]]  # another container's name -> its env var names
    conditional_bindings: int  # bindings of the role that carry an IAM condition
    owner: str  # the runwarden.dev/owner annotation ("" = unclaimed)


def adoption_facts(observed: Observed, role: str) -> AdoptionFacts:
    """The facts of ``observed`` (as read by the gateway) that decide whether it can be exported."""
    service: Any = observed.service_handle
    policy: Any = observed.policy_handle
    managed = container_of(service, observed.container)
    containers = tuple(c.name for c in service.template.containers)
    # Cloud Run requires distinct container names once there are several.
    other_env = {
        c.name: tuple(e.name for e in c.env)
        for c in service.template.containers
        if len(containers) > 1 and c.name != managed.name and len(c.env)
    }
    conditional = 0
    if policy is not None:
        conditional = sum(1 for b in policy.bindings if b.role == role and b.HasField("condition"))
    return AdoptionFacts(
        containers=containers,
        managed_container=managed.name,
        other_env=other_env,
        conditional_bindings=conditional,
        owner=str(service.annotations.get(OWNER_ANNOTATION, "")),
    )
