"""The lean diff base (controller.handlers.LeanDiffBaseStorage) builds exactly kopf's essence.

kopf is imported inside the tests, not at collection: importing it installs kopf's Event-posting
log handler, which other unit tests (fake kopf records) do not expect.
"""

from __future__ import annotations

from typing import Any

import pytest

BODY: dict[str, Any] = {
    "apiVersion": "runwarden.dev/v1alpha1",
    "kind": "Orchestrator",
    "metadata": {
        "name": "a",
        "namespace": "n",
        "generation": 3,
        "labels": {"team": "data"},
        "annotations": {
            "runwarden.dev/last-handled-configuration": '{"spec":{}}\n',
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "note": "kept",
        },
        "managedFields": [{"manager": "kopf", "fieldsV1": {"f:status": {"f:drift": {}}}}],
        "finalizers": ["runwarden.dev/finalizer"],
    },
    "spec": {"service": {"name": "s"}, "env": [{"name": "A", "value": "1"}]},
    "status": {"lastSyncTime": "2026-11-28T18:00:00Z", "drift": {"count": 2}},
}


@pytest.mark.parametrize(
    "extra", [[], ["spec"], ["status.drift"], [("status", "drift")], ["metadata.generation"]]
)
def test_same_essence_as_kopf(extra: list[Any]) -> None:
    import kopf

    from controller.handlers import LeanDiffBaseStorage

    kw = {"prefix": "runwarden.dev", "key": "last-handled-configuration"}
    body = kopf.Body(BODY)  # type: ignore[arg-type]
    want = kopf.AnnotationsDiffBaseStorage(**kw).build(body=body, extra_fields=extra)
    got = LeanDiffBaseStorage(**kw).build(body=body, extra_fields=extra)
    assert got == want


def test_does_not_copy_managed_fields_or_status() -> None:
    import kopf

    from controller.handlers import LeanDiffBaseStorage

    essence = LeanDiffBaseStorage(prefix="runwarden.dev").build(body=kopf.Body(BODY))  # type: ignore[arg-type]
    assert "status" not in essence and "managedFields" not in essence.get("metadata", {})
