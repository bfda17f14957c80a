"""A namespace's tenancy annotations (CONTRACT §6.2), read with the ``kubernetes`` package.

Synchronous on purpose: the one caller is the ``runwarden export`` command, not the event loop.
Credentials as kubectl finds them: KUBECONFIG (exec plugins included), else in-cluster.
"""

from __future__ import annotations

from collections.abc import Mapping

PROJECTS_ANNOTATION = "runwarden.dev/projects"
ALLOW_PUBLIC_ANNOTATION = "runwarden.dev/allow-public-invokers"


class NamespaceError(Exception):
    """The namespace cannot be read; the message says why and what to do."""


def read_annotations(namespace: str) -> Mapping[str, str]:
    """The namespace's annotations; raises NamespaceError naming the namespace and the fix."""
    from kubernetes import client, config  # imported here: the controller process never needs it
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    except (ConfigException, FileNotFoundError):
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except ConfigException:
            raise NamespaceError(
                f"--namespace {namespace}: no Kubernetes credentials to read the namespace "
                "(set KUBECONFIG, or run in a pod)"
            ) from None
    api = client.CoreV1Api()
    try:
        found = api.read_namespace(namespace, _request_timeout=30)
    except ApiException as exc:
        if exc.status == 404:
            raise NamespaceError(
                f"--namespace {namespace}: no such namespace; create it (a cluster admin sets "
                f"its {PROJECTS_ANNOTATION} annotation)"
            ) from None
        raise NamespaceError(
            f"--namespace {namespace}: reading the namespace failed with HTTP {exc.status} "
            f"{exc.reason}; export needs `get` on namespaces"
        ) from None
    metadata = found.metadata
    return dict((metadata.annotations if metadata is not None else None) or {})


def projects_allowed(annotations: Mapping[str, str]) -> frozenset[str]:
    """The projects a namespace may manage (``*`` = any); empty if it lists none."""
    raw = annotations.get(PROJECTS_ANNOTATION, "")
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


def allows_project(annotations: Mapping[str, str], project: str) -> bool:
    allowed = projects_allowed(annotations)
    return "*" in allowed or project in allowed


def allows_public_invokers(annotations: Mapping[str, str]) -> bool:
    return annotations.get(ALLOW_PUBLIC_ANNOTATION, "").strip().lower() == "true"
