"""Tenancy: which projects a namespace's Orchestrators may touch, as whom. Pure.

A namespace is bound by its annotations (namespaces are cluster-scoped, so the people who edit
Orchestrators in it cannot change them; CONTRACT §6.2):

- ``runwarden.dev/projects``: comma-separated project ids, ``*`` = any;
- ``runwarden.dev/google-service-account``: the account its Orchestrators act as (impersonated);
- ``runwarden.dev/allow-public-invokers: "true"``: before ``spec.policy.allowPublicInvokers`` may
  take effect.

With ``--namespace-binding required`` an Orchestrator whose project its namespace does not list
is refused (``ProjectNotAllowed``) before any Google call. With ``optional`` (the CLI default, for
single-tenant use) a namespace without ``runwarden.dev/projects`` is unbound: no checks, the
controller's own identity; a namespace that has the annotation is held to all of it, the
public-invoker gate included. The admission policy in manifests/admission/ refuses
the same objects at admission; this is the second refusal, for objects stored before it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from controller.domain.model import PUBLIC_MEMBERS, Desired, Failure, Reason, Retry

PROJECTS_ANNOTATION = "runwarden.dev/projects"
SERVICE_ACCOUNT_ANNOTATION = "runwarden.dev/google-service-account"
PUBLIC_ANNOTATION = "runwarden.dev/allow-public-invokers"
ANY = "*"


class BindingMode(enum.StrEnum):
    REQUIRED = "required"
    OPTIONAL = "optional"


@dataclass(frozen=True)
class Binding:
    """One namespace's binding, from its annotations."""

    namespace: str
    projects: frozenset[str] | None = None  # None: the annotation is absent
    service_account: str | None = None
    allow_public: bool = False

    @classmethod
    def of(cls, namespace: str, annotations: Mapping[str, str] | None) -> Binding:
        annotations = annotations or {}
        raw = annotations.get(PROJECTS_ANNOTATION)
        projects = (
            None if raw is None else frozenset(p.strip() for p in raw.split(",") if p.strip())
        )
        account = (annotations.get(SERVICE_ACCOUNT_ANNOTATION) or "").strip() or None
        public = (annotations.get(PUBLIC_ANNOTATION) or "").strip().lower() == "true"
        return cls(namespace, projects, account, public)

    def allows(self, project: str, mode: BindingMode) -> bool:
        """Whether this namespace's Orchestrators may touch ``project``."""
        if self.projects is None:
            return mode is BindingMode.OPTIONAL
        return ANY in self.projects or project in self.projects


def refusal(binding: Binding, desired: Desired, mode: BindingMode) -> Failure | None:
    """Why the namespace may not have this Orchestrator enforced (None: it may).

    Messages name the annotation, the namespace and the project, never a value of the spec's env.
    """
    if mode is BindingMode.OPTIONAL and binding.projects is None:
        return None  # an unbound namespace, and binding is optional
    project = desired.ref.project
    if not binding.allows(project, mode):
        listed = (
            f"lists {', '.join(sorted(binding.projects))}"
            if binding.projects
            else "is not set"
            if binding.projects is None
            else "is empty"
        )
        return Failure(
            Reason.PROJECT_NOT_ALLOWED,
            f"project {project} is not allowed in namespace {binding.namespace}: its annotation "
            f"{PROJECTS_ANNOTATION} {listed}; a cluster administrator must add {project} to it",
            Retry.RESYNC,
        )
    public = sorted(desired.invokers & PUBLIC_MEMBERS)
    if public and not binding.allow_public:
        return Failure(
            Reason.PUBLIC_INVOKER_REFUSED,
            f"spec.invokers.members lists {', '.join(public)}, but namespace "
            f'{binding.namespace} lacks the annotation {PUBLIC_ANNOTATION}: "true"; a cluster '
            "administrator must set it before spec.policy.allowPublicInvokers takes effect",
            Retry.RESYNC,
        )
    return None


def project_allowed_anywhere(
    bindings: Mapping[str, Binding], project: str, mode: BindingMode
) -> bool:
    """Whether any known namespace may touch ``project`` (the audit feed's filter)."""
    if mode is BindingMode.OPTIONAL:
        # A namespace without the annotation may touch anything, and a namespace may be unknown.
        return True
    return any(b.allows(project, mode) for b in bindings.values())
