"""No diff base (controller.operator.storage.NoDiffBase): kopf sees no essential change in any
event, stores nothing, and still detects a deletion.

kopf is imported inside the tests, not at collection: importing it installs kopf's Event-posting
log handler, which other unit tests (fake kopf records) do not expect.
"""

from __future__ import annotations

from typing import Any

import pytest


def _body(spec: dict[str, Any], **meta: Any) -> Any:
    import kopf

    raw = {
        "apiVersion": "runwarden.dev/v1alpha1",
        "kind": "Orchestrator",
        "metadata": {"namespace": "ns", "name": "a", "uid": "u1", "generation": 2, **meta},
        "spec": spec,
    }
    return kopf.Body(raw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("event_type", "meta", "want"),
    [
        pytest.param("ADDED", {}, "noop", id="created"),
        pytest.param("MODIFIED", {"labels": {"x": "y"}}, "noop", id="spec-changed"),
        pytest.param(
            "MODIFIED",
            {"deletionTimestamp": "2026-12-02T00:00:00Z", "finalizers": ["runwarden.dev/f"]},
            "delete",
            id="marked-for-deletion",
        ),
    ],
)
def test_kopf_sees_only_deletions(event_type: str, meta: dict[str, Any], want: str) -> None:
    from kopf._cogs.structs import diffs
    from kopf._core.intents import causes

    from controller.operator.storage import NoDiffBase

    storage = NoDiffBase()
    body = _body({"service": {"name": f"svc-{event_type}"}}, **meta)
    old, new = storage.fetch(body=body), storage.build(body=body)
    cause = causes.detect_changing_cause(
        finalizer="runwarden.dev/f",
        raw_event={"type": event_type, "object": dict(body)},  # type: ignore[typeddict-item]
        body=body,
        old=old,
        new=new,
        diff=diffs.diff(old, new),
        resource=None,
        indices=None,
        logger=None,
        patch=None,
        memo=None,
    )
    assert cause.reason.value == want


def test_nothing_is_stored() -> None:
    import kopf

    from controller.operator.storage import NoDiffBase

    body = _body({"a": 1})
    patch = kopf.Patch()
    NoDiffBase().store(body=body, patch=patch, essence=NoDiffBase().build(body=body))
    assert not patch
