"""One owner per service, recorded on the service (CONTRACT §6.1). Pure.

The claim is two SERVICE-level annotations (Service.annotations, never the revision template's,
so they never make a revision by themselves; googleapis google/cloud/run/v2/service.proto: the
``template`` is "the template used to create revisions for this Service", ``annotations`` are the
service's own "unstructured key value map that may be set by external tools"):

- ``runwarden.dev/owner``: ``<cluster>/<namespace>/<name>`` of the owning Orchestrator;
- ``runwarden.dev/owned``: compact JSON of the names it owns,
  ``{"env":["A","B"],"invokers":{"roles/run.invoker":["serviceAccount:x@y"]}}`` (keys and lists
  sorted), so what it may prune or revoke survives a lost ``status`` (restore from a backup, a
  re-created object). ``status.managed`` mirrors it.

A deploy that sends the whole Service back (gcloud run deploy, Terraform) keeps them; a claim is
written with the Orchestrator's first write and refreshed with every later write whose record
differs; it is removed when the Orchestrator is deleted (Abandon and Revoke alike).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any

from controller.domain.model import (
    OWNED_ANNOTATION,
    OWNER_ANNOTATION,
    Claim,
    Desired,
    Failure,
    Managed,
    Observed,
    Plan,
    Reason,
    Retry,
)


class Standing(enum.StrEnum):
    """Where an Orchestrator stands towards the service's claim."""

    UNCLAIMED = "unclaimed"  # nobody claims it: the first write claims it
    OURS = "ours"
    ELSEWHERE = "elsewhere"  # another owner claims it: write nothing
    TAKE_OVER = "take-over"  # another owner claims it and spec.policy.takeOver says take it


def owner_id(cluster: str, namespace: str, name: str) -> str:
    """The value of the owner annotation for one Orchestrator."""
    return f"{cluster}/{namespace}/{name}"


def standing(desired: Desired, observed: Observed) -> Standing:
    if not desired.owner:
        return Standing.OURS  # claims off (pure tests): behave as the owner
    if not observed.owner:
        return Standing.UNCLAIMED
    if observed.owner == desired.owner:
        return Standing.OURS
    return Standing.TAKE_OVER if desired.policy.take_over else Standing.ELSEWHERE


def owned_elsewhere(observed: Observed) -> Failure:
    """The Ready=False failure of an Orchestrator whose service another owner claims."""
    return Failure(
        Reason.OWNED_ELSEWHERE,
        f"service {observed.ref} is owned by {observed.owner} (annotation {OWNER_ANNOTATION}); "
        "this Orchestrator writes nothing to it. Delete the other Orchestrator, or set "
        "spec.policy.takeOver: true here to take the claim",
        Retry.STEADY,
    )


def effective_managed(status_managed: Managed, desired: Desired, observed: Observed) -> Managed:
    """What this Orchestrator owns: status.managed, plus the record on the service when the
    claim there is its own (so a lost status loses nothing). A taken-over claim's record is the
    previous owner's: never inherited."""
    if standing(desired, observed) is Standing.OURS and observed.owned is not None:
        return status_managed.union(observed.owned)
    return status_managed


def claim_for(desired: Desired, observed: Observed, p: Plan) -> Claim | None:
    """The claim to write with this reconcile's writes; None when the service holds it already
    (or claims are off). The record is what status.managed becomes once ``p`` is applied."""
    if not desired.owner:
        return None
    if observed.owner == desired.owner and observed.owned == p.managed:
        return None
    return Claim(desired.owner, p.managed)


def release_for(desired: Desired, observed: Observed) -> Claim | None:
    """On deletion: remove the claim if (and only if) it is this Orchestrator's."""
    if not desired.owner or observed.owner != desired.owner:
        return None
    return Claim(desired.owner, Managed(), release=True)


def claim_annotations(claim: Claim) -> dict[str, str]:
    """The annotations a claim sets (empty for a release: both are removed)."""
    if claim.release:
        return {}
    return {OWNER_ANNOTATION: claim.owner, OWNED_ANNOTATION: render_owned(claim.owned)}


def render_owned(managed: Managed) -> str:
    """The owned names as compact, sorted JSON (stable: an unchanged record is not rewritten)."""
    invokers: dict[str, list[str]] = {}
    for role, member in sorted(managed.grants):
        invokers.setdefault(role, []).append(member)
    return json.dumps(
        {"env": sorted(managed.env), "invokers": invokers}, separators=(",", ":"), sort_keys=True
    )


def parse_owned(text: str | None) -> Managed | None:
    """The owned-names annotation as Managed; None when absent or not ours to read."""
    if not text:
        return None
    try:
        raw: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(raw, Mapping):
        return None
    env = raw.get("env", [])
    invokers = raw.get("invokers", {})
    if not isinstance(env, list) or not isinstance(invokers, Mapping):
        return None
    grants = frozenset(
        (role, m)
        for role, members in invokers.items()
        if isinstance(role, str) and isinstance(members, list)
        for m in members
        if isinstance(m, str)
    )
    return Managed(env=frozenset(n for n in env if isinstance(n, str)), grants=grants)
