"""`runwarden export`: live Cloud Run services -> Orchestrator YAML that changes nothing.

Adoption must be a no-op: the exported Orchestrator, applied and later switched to Enforce, makes
zero GCP writes. So every service is read with the controller's own gateway and conversion, the
spec is built from what was read, and then parsed and planned exactly as the controller would
(Enforce mode, nothing owned yet): an export whose plan is not empty is refused, as is anything an
Orchestrator cannot declare (another container's env, conditional bindings of the invoker role, a
claim by another owner). Settings the CRD cannot express are left undeclared, which the
controller then never touches. Messages name services and fields, never env values.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

import yaml  # type: ignore[import-untyped]

from controller.domain import spec
from controller.domain.model import (
    DEFAULT_ROLE,
    OWNER_ANNOTATION,
    PUBLIC_MEMBERS,
    Managed,
    Mode,
    Observed,
    ServiceRef,
)
from controller.domain.plan import plan
from controller.domain.tenancy import PROJECTS_ANNOTATION, PUBLIC_ANNOTATION, Binding, BindingMode
from controller.gcp import convert
from controller.gcp.clients import make_clients
from controller.gcp.errors import GatewayError
from controller.gcp.gateway import Gateway
from controller.kube import namespace_annotations as namespaces

API_VERSION = "runwarden.dev/v1alpha1"
ENV_GCP_ENDPOINT = "RUNWARDEN_GCP_ENDPOINT"
ENV_CLUSTER_NAME = "RUNWARDEN_CLUSTER_NAME"
# Integer settings whose 0 in the v2 API means "not set" (Cloud Run's default applies); the CRD
# refuses 0 for them, and an undeclared setting is never touched.
_UNSET_WHEN_ZERO = ("timeoutSeconds", "maxInstances", "concurrency")


class Refused(Exception):
    """One service cannot be exported faithfully; ``reasons`` say why and what to do."""

    def __init__(self, ref: ServiceRef, reasons: Sequence[str]) -> None:
        super().__init__(f"{ref}: " + "; ".join(reasons))
        self.ref = ref
        self.reasons = tuple(reasons)


@dataclass(frozen=True)
class Target:
    """Where the Orchestrators go and whose claim on a service counts as theirs."""

    mode: Mode = Mode.OBSERVE
    namespace: str | None = None
    cluster_name: str = "default"
    # The namespace's binding (None: no --namespace, tenancy not checked here).
    binding: Binding | None = None


@dataclass
class Result:
    documents: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left undeclared, and why
    refused: list[Refused] = field(default_factory=list)


def orchestrator(
    observed: Observed, facts: convert.AdoptionFacts, target: Target
) -> tuple[dict[str, Any], list[str]]:
    """The Orchestrator for one observed service, and notes on what it leaves undeclared.

    Raises Refused when the service holds what no Orchestrator can declare, or when applying the
    result in Enforce mode would change the service.
    """
    ref = observed.ref
    reasons = _unrepresentable(ref, facts, target)
    service: dict[str, Any] = {"project": ref.project, "region": ref.region, "name": ref.name}
    if len(facts.containers) > 1:
        service["container"] = facts.managed_container
    body: dict[str, Any] = {"service": service}

    env: list[dict[str, Any]] = []
    for name, value in observed.env.items():
        if value.secret is not None:
            ref_ = {"secret": value.secret.secret, "version": value.secret.version}
            env.append({"name": name, "secretKeyRef": ref_})
        else:
            env.append({"name": name, "value": value.value or ""})
    if env:
        body["env"] = env

    members = sorted(observed.members(DEFAULT_ROLE))
    public = sorted(set(members) & PUBLIC_MEMBERS)
    if members:
        body["invokers"] = {"role": DEFAULT_ROLE, "members": members}

    settings, notes = _settings(ref, observed.settings)
    if settings:
        body["settings"] = settings

    policy: dict[str, Any] = {
        "mode": target.mode.value,
        "env": "Merge",
        "invokers": "Additive",
        "deletion": "Abandon",
    }
    if observed.invoker_iam_disabled:
        # Anyone may invoke (invokerIamDisabled): only allowPublicInvokers leaves it so.
        public.append("invokerIamDisabled")
    if public:
        policy["allowPublicInvokers"] = True
        if target.binding is not None and not target.binding.allow_public:
            reasons.append(
                f"the service is public ({', '.join(public)}) and "
                f"namespace {target.namespace} lacks the annotation "
                f'{PUBLIC_ANNOTATION}: "true"; a cluster admin must set it '
                "before an Orchestrator there may keep public invokers"
            )
    body["policy"] = policy
    if reasons:
        raise Refused(ref, reasons)

    metadata: dict[str, Any] = {"name": ref.name}
    if target.namespace:
        metadata["namespace"] = target.namespace
    document = {"apiVersion": API_VERSION, "kind": "Orchestrator", "metadata": metadata}
    document["spec"] = body
    _verify_no_writes(document, observed)
    return document, notes


def _unrepresentable(ref: ServiceRef, facts: convert.AdoptionFacts, target: Target) -> list[str]:
    reasons = []
    for container, names in sorted(facts.other_env.items()):
        reasons.append(
            f"container {container} has env vars ({', '.join(names)}) besides the managed "
            f"container {facts.managed_container}: an Orchestrator declares the env of one "
            "container (spec.service.container) and a service has one owner, so they cannot "
            f"be exported; move them into {facts.managed_container} or keep this service "
            "out of Runwarden"
        )
    if facts.conditional_bindings:
        reasons.append(
            f"{DEFAULT_ROLE} has {facts.conditional_bindings} conditional binding(s): "
            "spec.invokers declares unconditional members only; remove the condition(s) "
            "(gcloud run services remove-iam-policy-binding --condition=...) or keep this "
            "service out of Runwarden"
        )
    if facts.owner:
        own = f"{target.cluster_name}/{target.namespace}/{ref.name}" if target.namespace else None
        if facts.owner != own:
            reasons.append(
                f"the service is claimed by Orchestrator {facts.owner} (annotation "
                f"{OWNER_ANNOTATION}); an Orchestrator elsewhere would report "
                "OwnedElsewhere: export it with the --namespace (and --cluster-name) of that "
                "owner, or release the claim first (delete that Orchestrator)"
            )
    return reasons


def _settings(ref: ServiceRef, observed: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The observed settings the CRD can declare (nested labels); notes for the rest."""
    settings: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in observed.items():
        if key in _UNSET_WHEN_ZERO and value == 0:
            continue
        if key.startswith("labels."):
            label = key.removeprefix("labels.")
            candidate: dict[str, Any] = {"labels": {label: value}}
            shown = f"settings.labels.{label}"
        else:
            candidate = {key: value}
            shown = f"settings.{key}"
        try:
            spec.parse({"service": _service_spec(ref), "settings": candidate})
        except spec.InvalidSpec as exc:
            notes.append(
                f"{ref}: {shown} left undeclared ({exc.message}); Runwarden will not manage it"
            )
            continue
        if "labels" in candidate:
            settings.setdefault("labels", {}).update(candidate["labels"])
        else:
            settings[key] = value
    return settings, notes


def _service_spec(ref: ServiceRef) -> dict[str, str]:
    return {"project": ref.project, "region": ref.region, "name": ref.name}


def _verify_no_writes(document: Mapping[str, Any], observed: Observed) -> None:
    """Parse and plan the document as the controller would in Enforce mode, owning nothing yet:
    anything but an empty plan means adoption would write to GCP, so the export is refused."""
    try:
        desired = spec.parse(document["spec"])
    except spec.InvalidSpec as exc:
        raise Refused(
            observed.ref, [f"the service holds what an Orchestrator cannot declare: {exc.message}"]
        ) from None
    desired = replace(desired, policy=replace(desired.policy, mode=Mode.ENFORCE))
    p = plan(desired, observed, Managed())
    if p.rollout_retry is not None:
        raise Refused(
            observed.ref,
            [
                f"its latest revision {p.rollout_retry.failed_revision} failed and an older one "
                "serves; Enforce would retry the rollout: fix or roll back the service first"
            ],
        )
    if not p.empty:
        raise Refused(observed.ref, [f"Enforce would change {', '.join(p.lines())}"])


async def export(
    gateway: Gateway, project: str, region: str, names: Sequence[str], target: Target
) -> Result:
    """Export the named services (all of the project's in the region when none are named)."""
    result = Result()
    if not names:
        names = await gateway.list_services(project, region)
    for name in names:
        ref = ServiceRef(project, region, name)
        try:
            observed = await gateway.observe(ref, "")
            facts = convert.adoption_facts(observed, DEFAULT_ROLE)
            if len(facts.containers) > 1:
                observed = await gateway.observe(ref, facts.managed_container)
            document, notes = orchestrator(observed, facts, target)
        except GatewayError as exc:
            result.refused.append(Refused(ref, [f"{exc.reason}: {exc.message}"]))
        except Refused as exc:
            result.refused.append(exc)
        else:
            result.documents.append(document)
            result.notes += notes
    return result


def render(documents: Sequence[Mapping[str, Any]], source: str) -> str:
    """Multi-document YAML, each document headed by a comment naming its service."""
    parts = []
    for doc in documents:
        name = doc["spec"]["service"]["name"]
        head = f"# runwarden export of {source}/services/{name}\n"
        parts.append(head + yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False))
    return "---\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runwarden export",
        description="Print Orchestrator YAML for live Cloud Run services, such that applying it "
        "(and later switching to Enforce) changes nothing. Refuses what it cannot represent.",
    )
    parser.add_argument("--project", required=True, metavar="P", help="GCP project id")
    parser.add_argument("--region", required=True, metavar="R", help="Cloud Run region")
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="a service to export (repeatable; default: every service in the project/region)",
    )
    parser.add_argument(
        "--namespace",
        metavar="NS",
        help="put the Orchestrators in NS; refused unless NS's runwarden.dev/projects "
        "annotation lists the project (read with your kubeconfig)",
    )
    parser.add_argument(
        "--mode",
        choices=[m.value for m in (Mode.OBSERVE, Mode.ENFORCE)],
        default=Mode.OBSERVE.value,
        help="spec.policy.mode of the exported Orchestrators (default Observe)",
    )
    parser.add_argument(
        "--gcp-endpoint",
        metavar="HOST:PORT",
        help=f"insecure gRPC endpoint of an emulator (default Google with ADC); env "
        f"{ENV_GCP_ENDPOINT}",
    )
    parser.add_argument(
        "--cluster-name",
        metavar="NAME",
        help="the controller's --cluster-name, to recognise this namespace's own claims on "
        f"services (default: env {ENV_CLUSTER_NAME}, else default)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command; 0 = everything exported, 1 = some services refused, 2 = nothing done."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec.parse_ref({"service": {"project": args.project, "region": args.region, "name": "x"}})
    except spec.InvalidSpec as exc:
        parser.error(exc.message.replace("spec.service.", "--"))
    binding: Binding | None = None
    if args.namespace:
        try:
            binding = namespaces.read_binding(args.namespace)
        except namespaces.NamespaceError as exc:
            print(f"runwarden export: {exc}", file=err)
            return 2
        if not binding.allows(args.project, BindingMode.REQUIRED):
            listed = sorted(binding.projects or ())
            print(
                f"runwarden export: namespace {args.namespace} does not list project "
                f"{args.project} in its {PROJECTS_ANNOTATION} annotation (it lists: "
                f"{', '.join(listed) or 'nothing'}); Orchestrators there would be refused "
                f"(ProjectNotAllowed). A cluster admin adds it with: kubectl annotate namespace "
                f"{args.namespace} --overwrite "
                f"{PROJECTS_ANNOTATION}={','.join([*listed, args.project])}",
                file=err,
            )
            return 2
    target = Target(
        mode=Mode(args.mode),
        namespace=args.namespace,
        cluster_name=args.cluster_name or os.environ.get(ENV_CLUSTER_NAME) or "default",
        binding=binding,
    )
    endpoint = args.gcp_endpoint or os.environ.get(ENV_GCP_ENDPOINT) or None
    try:
        result = asyncio.run(_export(endpoint, args.project, args.region, args.service, target))
    except GatewayError as exc:
        print(f"runwarden export: {exc.reason}: {exc.message}", file=err)
        return 2
    source = f"projects/{args.project}/locations/{args.region}"
    if result.documents:
        out.write(render(result.documents, source))
    for note in result.notes:
        print(f"runwarden export: note: {note}", file=err)
    for refused in result.refused:
        print(f"runwarden export: refused {refused}", file=err)
    if not result.documents and not result.refused:
        print(f"runwarden export: no services in {source}", file=err)
    print(
        f"runwarden export: {len(result.documents)} exported, {len(result.refused)} refused",
        file=err,
    )
    return 1 if result.refused else 0


async def _export(
    endpoint: str | None, project: str, region: str, names: Sequence[str], target: Target
) -> Result:
    async with make_clients(endpoint) as clients:
        return await export(Gateway(clients), project, region, names, target)
