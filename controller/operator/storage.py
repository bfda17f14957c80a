"""kopf's diff-base storage, replaced: Runwarden needs none (see NoDiffBase). kopf is the only
library it touches, which is why it lives in the operator layer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import kopf


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base at all: Runwarden has no create/update/resume handlers (a watch-event
    handler compares generations instead, operator/handlers.py), so the essence kopf would
    store in an annotation after each new spec is never read. Storing it cost one apiserver
    write per new Orchestrator and per spec change, and a JSON encoding and decoding of the
    essence per watch event (issue 17).

    The essence is always the empty one, stored or not: to kopf's change detection every event
    is then "no essential change" (no handler, no log line), except a deletion, which it
    detects from deletionTimestamp alone."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return cast(kopf.BodyEssence, {})

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None
