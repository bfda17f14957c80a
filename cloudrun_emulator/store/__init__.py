"""The emulator's in-memory world, one part per resource. Everything runs on one asyncio loop,
so there are no locks.

Behaviour mirrors Cloud Run where a client can tell (see CONTRACT §3). The surfaces
(`cloudrun_emulator.surfaces`) call the parts through a `Store`; the store reports each
successful write to the audit sink it is given and knows nothing of any wire format.
"""

from __future__ import annotations

import random

from ..events import AuditSink, emitter
from .accounts import ServiceAccounts
from .directory import Directory
from .iam import Policies
from .operations import Operations
from .revisions import Revisions
from .services import Services
from .tokens import Credentials

__all__ = ["Store"]


class Store:
    """The parts, wired together: `services`, `policies`, `operations`, `accounts`, `revisions`
    (rollouts and the failNextRevision fault), `credentials` (impersonation tokens and project
    grants), over one `directory` of services by name."""

    def __init__(
        self,
        *,
        rollout_ms: int = 0,
        rng: random.Random | None = None,
        audit: AuditSink | None = None,
    ) -> None:
        emit = emitter(audit)
        self.accounts = ServiceAccounts()
        self.credentials = Credentials(self.accounts)
        self.directory = Directory(self.accounts)
        self.operations = Operations()
        self.revisions = Revisions(
            self.directory, self.operations, emit, rollout_ms=rollout_ms, rng=rng or random.Random()
        )
        self.policies = Policies(self.directory, emit)
        self.services = Services(
            self.directory, self.accounts, self.operations, self.revisions, emit
        )
