"""Own-write provenance: which audit entries record Runwarden's own writes (they wake nothing)."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from controller.audit.entries import OWN_CAPABLE, AuditEntry
from controller.domain.model import ServiceRef, WriteRecord


class Origin(enum.StrEnum):
    OWN = "own"  # Runwarden's write, already recorded: nothing to do
    FOREIGN = "foreign"  # someone else's: check the service now
    UNCONFIRMED = "unconfirmed"  # Runwarden's identity, but newer than its last recorded write


def normalize_principal(principal: str) -> str:
    """``serviceAccount:X`` / ``user:X`` / ``X`` -> ``x`` (emails compare case-insensitively)."""
    _, _, email = principal.rpartition(":")
    return email.strip().casefold()


@dataclass
class OwnWrites:
    """What Runwarden wrote to each service, to tell its own audit entries apart.

    The highest service generation it produced, and its last few IAM etags (an etag has no
    order, and the entry of an older write may arrive after a newer write is recorded).
    """

    principal: str | None  # Runwarden's identity; None = unknown (every entry is foreign)
    keep_etags: int = 16
    # The tenant accounts Runwarden impersonates (controller.gcp.identity): its writes as them
    # are its own too.
    impersonated: set[str] = field(default_factory=set)
    _generation: dict[ServiceRef, int] = field(default_factory=dict)
    _etags: dict[ServiceRef, deque[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.principal is not None:
            self.principal = normalize_principal(self.principal) or None

    def record(self, ref: ServiceRef, wrote: WriteRecord | None) -> None:
        """Remember one reconcile's writes (a no-op for a reconcile that wrote nothing)."""
        if wrote is None:
            return
        if wrote.generation is not None:
            self._generation[ref] = max(wrote.generation, self._generation.get(ref, 0))
        if wrote.iam_etag:
            etags = self._etags.setdefault(ref, deque(maxlen=self.keep_etags))
            if wrote.iam_etag not in etags:
                etags.append(wrote.iam_etag)

    def add_identity(self, principal: str) -> None:
        """An account Runwarden acts as (impersonation): its entries may be Runwarden's own."""
        self.impersonated.add(normalize_principal(principal))

    def forget(self, ref: ServiceRef) -> None:
        self._generation.pop(ref, None)
        self._etags.pop(ref, None)

    def origin(self, entry: AuditEntry) -> Origin:
        """Own only when the identity is Runwarden's AND the write is not newer than what it
        recorded; its identity with a newer write is UNCONFIRMED (the record may still come:
        the entry can arrive before the reconcile that wrote it has finished)."""
        who = normalize_principal(entry.principal)
        if (self.principal is None or who != self.principal) and who not in self.impersonated:
            return Origin.FOREIGN
        if entry.method not in OWN_CAPABLE:
            return Origin.FOREIGN
        if entry.iam:
            known = entry.iam_etag is not None and entry.iam_etag in self._etags.get(entry.ref, ())
        else:
            last = self._generation.get(entry.ref)
            known = entry.generation is not None and last is not None and entry.generation <= last
        return Origin.OWN if known else Origin.UNCONFIRMED
