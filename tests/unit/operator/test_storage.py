"""The lean diff base (controller.operator.storage.LeanDiffBaseStorage) builds exactly kopf's
essence.

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

    from controller.operator.storage import LeanDiffBaseStorage

    kw = {"prefix": "runwarden.dev", "key": "last-handled-configuration"}
    body = kopf.Body(BODY)  # type: ignore[arg-type]
    want = kopf.AnnotationsDiffBaseStorage(**kw).build(body=body, extra_fields=extra)
    got = LeanDiffBaseStorage(**kw).build(body=body, extra_fields=extra)
    assert got == want


def test_does_not_copy_managed_fields_or_status() -> None:
    import kopf

    from controller.operator.storage import LeanDiffBaseStorage

    essence = LeanDiffBaseStorage(prefix="runwarden.dev").build(body=kopf.Body(BODY))  # type: ignore[arg-type]
    assert "status" not in essence and "managedFields" not in essence.get("metadata", {})


def _body(**changes: Any) -> Any:
    import copy

    import kopf

    raw = copy.deepcopy(BODY)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value
    return kopf.Body(raw)  # type: ignore[arg-type]


def test_essence_rebuilt_only_when_its_inputs_change() -> None:
    import kopf

    from controller.operator.storage import LeanDiffBaseStorage

    kw = {"prefix": "runwarden.dev", "key": "last-handled-configuration"}
    lean, plain = LeanDiffBaseStorage(**kw), kopf.AnnotationsDiffBaseStorage(**kw)
    first = lean.build(body=_body())
    # A status write (new status, resourceVersion, managedFields): the same essence object.
    status_only = _body(status__lastSyncTime="2026-11-28T18:01:00Z", metadata__resourceVersion="9")
    assert lean.build(body=status_only) is first
    for changed in (
        _body(spec__env=[{"name": "A", "value": "2"}]),
        _body(metadata__labels={"team": "ml"}),
        _body(metadata__annotations={"note": "changed"}),
    ):
        got = lean.build(body=changed)
        assert got == plain.build(body=changed)
        assert got != first
    # Extra fields are part of the inputs.
    with_status = lean.build(body=status_only, extra_fields=["status.drift"])
    assert with_status == plain.build(body=status_only, extra_fields=["status.drift"])


def test_fetch_decodes_like_kopf() -> None:
    import kopf

    from controller.operator.storage import LeanDiffBaseStorage

    kw = {"prefix": "runwarden.dev", "key": "last-handled-configuration"}
    lean, plain = LeanDiffBaseStorage(**kw), kopf.AnnotationsDiffBaseStorage(**kw)
    stored = '{"spec":{"service":{"name":"s"}}}'
    for body in (
        _body(),
        _body(metadata__annotations={"runwarden.dev/last-handled-configuration": stored}),
        _body(metadata__annotations={}),
    ):
        assert lean.fetch(body=body) == plain.fetch(body=body)
        assert lean.fetch(body=body) == plain.fetch(body=body)  # from the cache


@pytest.mark.parametrize(
    "essence",
    [
        {"spec": {"a": 1}},
        {"spec": {"a": 1}, "metadata": {"labels": {"x": "y"}}},
        {"spec": {}, "metadata": {"annotations": {"runwarden.dev/drift-loop": "{}"}}},
        {"metadata": {"annotations": {"runwarden.dev/x": "1", "other/y": "2"}, "labels": {}}},
        {"spec": {"a": 1}, "status": {}},
        {},
    ],
)
def test_progress_clear_same_as_kopf_without_mutating(essence: dict[str, Any]) -> None:
    import copy

    import kopf

    from controller.operator.storage import LeanProgressStorage

    before = copy.deepcopy(essence)
    want = kopf.AnnotationsProgressStorage(prefix="runwarden.dev").clear(essence=essence)  # type: ignore[arg-type]
    got = LeanProgressStorage(prefix="runwarden.dev").clear(essence=essence)  # type: ignore[arg-type]
    assert got == want
    assert essence == before
