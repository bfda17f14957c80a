"""Issue 15.5: a verification that keeps failing the same way, through the drift check the
operator runs (controller.check: reconcile -> status patch -> schedule -> Events), against the
emulator with the real google clients. Kubernetes plays no part in the schedule, so the object's
body is handed over as the mapping kopf would hand over.

Without a backoff each failure is retried within seconds and every retry is one UpdateService,
one new revision: the checks must come later and later, and warn once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from cloudrun_emulator.testing import EmulatorProcess
from controller.check import check
from controller.domain.model import Event, Observed, Plan
from controller.gcp.budget import Pacer
from controller.gcp.clients import Clients, make_clients
from controller.gcp.gateway import Gateway
from controller.schedule.drift_loop import DriftLoop
from controller.settings import Settings
from tests.e2e.test_reconcile_emulator import PROJECT, REGION, RUN, SA, spec

RESYNC = 5.0


class Undone(Gateway):
    """The real gateway; after each of its UpdateServices, before the read-back, the service is
    set back the way Cloud Run would "normalise" it (the same difference every time)."""

    def __init__(self, clients: Clients, emulator: EmulatorProcess) -> None:
        super().__init__(clients, rollout_timeout=30, pacer=Pacer(None, None))
        self.emulator = emulator

    async def update_service(self, observed: Observed, plan: Plan) -> Observed:
        after = await super().update_service(observed, plan)
        ref = observed.ref
        self.emulator.admin.put_service(ref.project, ref.region, ref.name, env={"MODE": "other"})
        return after


class Memo(dict[str, Any]):
    """kopf's memo: attribute access over a dict."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


@pytest.fixture
async def clients(emulator: EmulatorProcess) -> AsyncIterator[Clients]:
    made = make_clients(emulator.grpc_endpoint)
    try:
        yield made
    finally:
        await made.close()


async def test_identical_verification_failures_back_off_and_warn_once(
    clients: Clients, emulator: EmulatorProcess, unique_name: Callable[[str], str]
) -> None:
    name = unique_name("unverified")
    emulator.admin.put_service_account(SA)
    emulator.admin.put_service(PROJECT, REGION, name, env={"MODE": "other"})
    gateway = Undone(clients, emulator)
    memo = Memo(config=Settings(resync_override=RESYNC), gateway=gateway, pacer=Pacer(None, None))
    body = {
        "metadata": {"namespace": "ns", "name": name, "generation": 1},
        "spec": spec(name, env=[{"name": "MODE", "value": "prod"}], invokers={"members": []}),
        "status": {},
    }
    loop = DriftLoop(("ns", name))
    posted: list[Event] = []
    delays: list[float] = []
    before = emulator.admin.calls().get(f"{RUN}UpdateService", 0)
    now = asyncio.get_running_loop().time
    for _ in range(5):
        patch = await check(loop, body, memo, ("resync",), posted.append)
        delays.append(loop.due - now())
        ready = next(c for c in patch.get("conditions", []) if c["type"] == "Ready")
        assert ready["reason"] == "VerificationFailed", ready
    writes = emulator.admin.calls().get(f"{RUN}UpdateService", 0) - before
    assert writes == 5  # one per check, and the checks are spaced out:
    # resync, then twice as long after each identical failure in a row (jitter +-10%).
    for n, delay in enumerate(delays):
        assert 0.85 * RESYNC * 2**n <= delay <= 1.15 * RESYNC * 2**n, delays
    warnings = [e.reason for e in posted if e.type == "Warning"]
    assert warnings.count("VerificationFailed") == 1, warnings
    assert "env MODE changed" in next(e.message for e in posted if e.reason == "VerificationFailed")
