"""Lean bodies (controller.operator.lean_bodies): kopf keeps each object's body without
managedFields and with shared strings; nothing else about the body changes.

kopf is imported inside the tests, not at collection (see test_storage.py).
"""

from __future__ import annotations

import copy
import json
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
        "annotations": {"runwarden.dev/last-handled-configuration": '{"spec":{}}\n' + "x" * 80},
        "managedFields": [{"manager": "kopf", "fieldsV1": {"f:status": {"f:drift": {}}}}],
        "finalizers": ["runwarden.dev/finalizer"],
    },
    "spec": {"service": {"name": "s"}, "env": [{"name": "A", "value": "1"}], "n": 1.5},
    "status": {"conditions": [{"type": "Ready", "status": "True"}], "drift": {"count": 2}},
}


def decoded() -> dict[str, Any]:
    """A body as kopf's watch stream decodes it: new strings for every document."""
    result: dict[str, Any] = json.loads(json.dumps(BODY))
    return result


def test_lean_object_drops_managed_fields_only() -> None:
    from controller.operator.lean_bodies import lean_object

    raw = decoded()
    lean = lean_object(raw)
    want = copy.deepcopy(BODY)
    del want["metadata"]["managedFields"]
    assert lean == want
    assert raw == BODY  # the input is not changed


def test_equal_strings_are_shared_between_bodies() -> None:
    from controller.operator.lean_bodies import lean_object

    one, two = lean_object(decoded()), lean_object(decoded())
    # Decoded separately, each body had its own copy of every key and value.
    a, b = decoded(), decoded()
    assert next(iter(a)) is not next(iter(b))
    assert next(iter(one)) is next(iter(two))
    assert one["apiVersion"] is two["apiVersion"]
    assert one["status"]["conditions"][0]["status"] is two["status"]["conditions"][0]["status"]
    # Long strings (messages, kopf's diff base) are left alone.
    note = "runwarden.dev/last-handled-configuration"
    assert one["metadata"]["annotations"][note] == BODY["metadata"]["annotations"][note]


def test_non_objects_pass_through() -> None:
    from controller.operator.lean_bodies import lean_object

    assert lean_object(None) is None
    assert lean_object({"kind": "Status"}) == {"kind": "Status"}


async def test_installed_processor_sees_lean_objects() -> None:
    from controller.operator import lean_bodies

    seen: list[Any] = []

    async def processor(*, raw_event: Any, other: int) -> str:
        seen.append(raw_event)
        return f"done {other}"

    wrapped = lean_bodies.wrap(processor)
    assert lean_bodies.wrap(wrapped) is wrapped  # idempotent
    event = {"type": "MODIFIED", "object": decoded()}
    assert await wrapped(raw_event=event, other=1) == "done 1"
    [got] = seen
    assert got["type"] == "MODIFIED" and "managedFields" not in got["object"]["metadata"]
    assert event["object"]["metadata"]["managedFields"]  # the caller's event is not changed


def test_install_replaces_what_kopf_runs() -> None:
    """kopf's operator spawns its watchers with ``processing.process_resource_event`` looked up
    at that time (kopf/_core/reactor/running.py): replacing the attribute is what feeds it lean
    objects. If a kopf upgrade changes that, this fails."""
    import inspect

    from kopf._core.reactor import processing, running

    from controller.operator import lean_bodies

    assert "functools.partial(processing.process_resource_event" in inspect.getsource(running)
    original = processing.process_resource_event
    try:
        lean_bodies.install()
        lean_bodies.install()
        installed = processing.process_resource_event
        assert getattr(installed, "runwarden_lean", False)
        assert installed.__wrapped__ is original or getattr(original, "runwarden_lean", False)
    finally:
        processing.process_resource_event = original  # type: ignore[assignment]


@pytest.mark.parametrize("value", [1, 1.5, True, None, "x" * 65])
def test_scalars_unchanged(value: Any) -> None:
    from controller.operator.lean_bodies import lean

    assert lean(value) == value
