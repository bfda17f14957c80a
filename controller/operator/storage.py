"""kopf's annotation storages, made lean for a controller whose every check writes status.

Subclasses of kopf's own storage classes (see each docstring for what they save); kopf is the
only library they touch, which is why they live in the operator layer.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar, cast

import kopf

# Orchestrators whose diff-base essence is kept between watch events (more only cost a rebuild).
# With the status heartbeat an Orchestrator in steady state has a watch event every few minutes,
# not one per check; the cache is for bursts (start-up, repairs), and bounded so that 10,000
# Orchestrators do not keep ~4 KB each in it (issue 17).
ESSENCE_CACHE = 1_000
V = TypeVar("V")


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base (the same essence, the same annotation), built once per change of the
    fields it depends on, not once per watch event.

    kopf builds and decodes the essence for every watch event it sees — one per status write,
    so one per check — starting with a deep copy of the whole body, metadata.managedFields and
    status included, only to delete most of it (py-spy: ~6% of a steady-state check's CPU).
    Here the essence is rebuilt only when its inputs (everything but status and metadata, plus
    labels, annotations and any extra field) differ from the last event of the same object;
    kopf only reads an essence, so the same one is returned again.

    Memory (issue 17): per object it keeps a digest of those inputs, not a copy of them, and
    the decoded annotation by the digest of its text, not under a second copy of the text.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._built: LRU[tuple[bytes, kopf.BodyEssence]] = LRU(ESSENCE_CACHE)
        self._decoded: LRU[kopf.BodyEssence] = LRU(ESSENCE_CACHE)

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[Any] | None = None,
    ) -> kopf.BodyEssence:
        extra = list(extra_fields or ())
        meta = body.get("metadata") or {}
        lean: dict[str, Any] = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        lean["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        if any(_field_root(f) == "status" for f in extra) and "status" in body:
            lean["status"] = body["status"]
        for f in extra:  # other extra fields, e.g. metadata.generation
            if _field_root(f) == "metadata":
                lean["metadata"] = meta
        inputs = _digest(json.dumps((lean, extra), sort_keys=True, default=repr))
        key = str(meta.get("uid") or (meta.get("namespace"), meta.get("name")))
        cached = self._built.get(key)
        if cached is not None and cached[0] == inputs:
            essence: kopf.BodyEssence = cached[1]
            return essence
        essence = super().build(body=kopf.Body(cast(kopf.RawBody, lean)), extra_fields=extra)
        self._built.put(key, (inputs, essence))
        return essence

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """The stored essence, decoded once per distinct annotation value."""
        annotations = body.metadata.annotations
        for full_key in self.make_keys(self.key, body=body):
            encoded = annotations.get(full_key)
            if encoded is None:
                continue
            digest = _digest(encoded)
            decoded = self._decoded.get(digest)
            if decoded is None:
                decoded = super().fetch(body=body)
                if decoded is not None:
                    self._decoded.put(digest, decoded)
            return decoded
        return None


class LeanProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's progress storage; ``clear`` (called twice per watch event) builds the cleared
    essence without kopf's deep copy of it: essences are only read."""

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        result = cast(dict[str, Any], dict(essence))
        meta = result.get("metadata")
        if isinstance(meta, Mapping):
            meta = result["metadata"] = dict(meta)
            annotations = meta.get("annotations") or {}
            mine = f"{self.prefix}/" if self.prefix else None
            if mine is not None and any(k.startswith(mine) for k in annotations):
                meta["annotations"] = {
                    k: v for k, v in annotations.items() if not k.startswith(mine)
                }
        cleared = cast(kopf.BodyEssence, result)
        self.remove_empty_stanzas(cleared)
        return cleared


class LRU(Generic[V]):
    """A small least-recently-used map (kopf's storages are called from one event loop)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str | bytes, V] = OrderedDict()

    def get(self, key: str | bytes) -> V | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: str | bytes, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


def _digest(text: str) -> bytes:
    """16 bytes that stand for ``text`` (equal texts, equal digests; a collision is as unlikely
    as for any 128-bit hash)."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _field_root(field: Any) -> str:
    """'status.x' / ('status', 'x') / ['status'] -> 'status'."""
    if isinstance(field, str):
        return field.split(".", 1)[0]
    return str(next(iter(field), ""))
