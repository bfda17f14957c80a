"""Lean bodies: what kopf keeps of every watched object, without what nobody reads.

kopf keeps the last body of every object it serves for the object's life (the drift loop's live
body); at 10,000 Orchestrators that is most of the controller's memory (issue 17,
bench/results/notes.md). A decoded body is ~370 Python objects: ``metadata.managedFields``
(server-side apply's field ownership, one entry per manager and subresource: the largest part,
and read by neither kopf nor Runwarden) and, since ``json.loads`` makes new strings for every
document, its own copy of every key ("apiVersion", "metadata", "conditions", ...) and of every
repeated value ("runwarden.dev/v1alpha1", "True", a project id, ...).

``install()`` wraps kopf's per-event processor (``kopf._core.reactor.processing
.process_resource_event``, looked up by kopf when the operator starts) so that each raw event's
object is replaced by a lean copy before kopf sees it: managedFields dropped, keys and short
strings interned (one shared copy per distinct string). The content kopf and the handlers see is
otherwise the same. It must be called before ``kopf.operator`` (handlers.run does).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from kopf._core.reactor import processing  # the one private kopf module we touch; see install()

# Strings up to this length are interned: keys, enum-like values, names, projects, timestamps.
# Longer ones (messages, kopf's diff-base annotation) are usually unique to one object.
INTERN_MAX = 64
DROPPED_METADATA = ("managedFields",)


def lean(raw: Any) -> Any:
    """A copy of a decoded JSON value with interned keys and short strings."""
    if isinstance(raw, dict):
        return {sys.intern(k) if isinstance(k, str) else k: lean(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [lean(v) for v in raw]
    if isinstance(raw, str) and len(raw) <= INTERN_MAX:
        return sys.intern(raw)
    return raw


def lean_object(obj: Any) -> Any:
    """The lean copy of one object of a watch event: managedFields dropped, strings shared."""
    if not isinstance(obj, dict):
        return obj
    meta = obj.get("metadata")
    if isinstance(meta, dict) and any(k in meta for k in DROPPED_METADATA):
        meta = {k: v for k, v in meta.items() if k not in DROPPED_METADATA}
        obj = {**obj, "metadata": meta}
    return lean(obj)


Processor = Callable[..., Awaitable[Any]]


def wrap(process: Processor) -> Processor:
    """kopf's processor, fed lean objects."""
    if getattr(process, "runwarden_lean", False):
        return process

    @functools.wraps(process)
    async def process_lean(*args: Any, raw_event: Any, **kwargs: Any) -> Any:
        if isinstance(raw_event, dict) and isinstance(raw_event.get("object"), dict):
            raw_event = {**raw_event, "object": lean_object(raw_event["object"])}
        return await process(*args, raw_event=raw_event, **kwargs)

    process_lean.runwarden_lean = True  # type: ignore[attr-defined]
    return process_lean


def install() -> None:
    """Make kopf process lean objects (idempotent). kopf's operator looks the processor up as
    ``processing.process_resource_event`` when it spawns its watchers (kopf 1.45,
    _core/reactor/running.py), so replacing the module attribute is enough;
    tests/unit/operator/test_lean_bodies.py holds kopf to that."""
    processing.process_resource_event = wrap(processing.process_resource_event)  # type: ignore[assignment]
