"""A namespace's tenancy binding (CONTRACT §6.2), read with the ``kubernetes`` package.

What the annotations mean is ``controller.domain.tenancy.Binding``'s to say, as for the
controller; this module only reads them.

Synchronous on purpose: the one caller is the ``runwarden export`` command, not the event loop.
Credentials as kubectl finds them: KUBECONFIG (exec plugins included), else in-cluster.
"""

from __future__ import annotations

from controller.domain.tenancy import PROJECTS_ANNOTATION, Binding


class NamespaceError(Exception):
    """The namespace cannot be read; the message says why and what to do."""


def read_binding(namespace: str) -> Binding:
    """The namespace's binding; raises NamespaceError naming the namespace and the fix."""
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
    return Binding.of(namespace, metadata.annotations if metadata is not None else None)
