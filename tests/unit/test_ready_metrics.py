"""Ready by reason in the metrics (controller.obs.metrics.set_ready): counts per status and
reason, and one not-Ready series per object that goes away once it is Ready or forgotten."""

from __future__ import annotations

from prometheus_client import REGISTRY

from controller.obs import metrics


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def not_ready(ns: str, name: str, reason: str) -> float | None:
    return value(
        "runwarden_orchestrator_not_ready",
        orchestrator_namespace=ns,
        orchestrator_name=name,
        reason=reason,
    )


def test_ready_by_reason_follows_each_object():
    ns = "unit-ready-metrics"
    base_true = value("runwarden_orchestrators", ready="True") or 0
    base_false = value("runwarden_orchestrators", ready="False") or 0

    metrics.set_ready(ns, "a", "False", "ServiceNotFound")
    metrics.set_ready(ns, "b", "False", "ServiceNotFound")
    assert value("runwarden_orchestrators_by_reason", ready="False", reason="ServiceNotFound") == 2
    assert not_ready(ns, "a", "ServiceNotFound") == 1
    assert value("runwarden_orchestrators", ready="False") == base_false + 2

    # Same status, another reason: the reason counts move, the status count does not.
    metrics.set_ready(ns, "a", "False", "Unavailable")
    assert value("runwarden_orchestrators_by_reason", ready="False", reason="ServiceNotFound") == 1
    assert value("runwarden_orchestrators_by_reason", ready="False", reason="Unavailable") == 1
    assert not_ready(ns, "a", "ServiceNotFound") is None
    assert not_ready(ns, "a", "Unavailable") == 1
    assert value("runwarden_orchestrators", ready="False") == base_false + 2

    metrics.set_ready(ns, "a", "True", "Synced")
    assert not_ready(ns, "a", "Unavailable") is None
    assert value("runwarden_orchestrators_by_reason", ready="False", reason="Unavailable") == 0
    assert value("runwarden_orchestrators", ready="True") == base_true + 1

    metrics.set_ready(ns, "b", None)
    metrics.set_ready(ns, "a", None)
    assert not_ready(ns, "b", "ServiceNotFound") is None
    assert value("runwarden_orchestrators", ready="True") == base_true
    assert value("runwarden_orchestrators", ready="False") == base_false
    assert value("runwarden_orchestrators_by_reason", ready="True", reason="Synced") == 0
