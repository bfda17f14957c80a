"""controller.kube.lease on the real apiserver: one holder at a time, takeover after expiry by the
candidate's own clock, release on a clean stop, and fencing by the holder's own clock."""

from __future__ import annotations

import asyncio
import json

import pytest

from controller.kube.credentials import connect
from controller.kube.lease import Lease, LeaseError
from tests.fixtures.k8s import ControlPlane

pytestmark = pytest.mark.e2e


class Clock:
    """A clock the test moves (the Lease's own view of time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def holder(cp: ControlPlane, namespace: str, name: str) -> dict[str, object]:
    out = cp.kubectl("get", "lease", name, "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out)["spec"])


async def test_one_holder_takeover_after_expiry_release_and_fencing(
    control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", control_plane.kubeconfig)
    clock_a, clock_b = Clock(), Clock()
    a = Lease(connect, namespace, "lease-test", "a", duration=10, clock=clock_a)
    b = Lease(connect, namespace, "lease-test", "b", duration=10, clock=clock_b)
    stop = asyncio.Event()
    try:
        assert await a.acquire(stop)
        assert a.held and 0 < a.remaining() <= 10 * 2 / 3
        spec = holder(control_plane, namespace, "lease-test")
        assert spec["holderIdentity"] == "a" and spec["leaseDurationSeconds"] == 10

        # b sees a valid Lease held by a: it does not take it, however often it tries.
        assert not await b._try()
        clock_b.now += 9  # 9 s of b's own observation of an unchanged record: not yet expired
        assert not await b._try() and b.holder == "a" and not b.held

        # a renews: the record changes, so b's observation starts over.
        assert await a._try()
        clock_b.now += 9
        assert not await b._try()

        # Fencing by a's own clock: past 2/3 of the duration since its last renewal, a may
        # not write, although nobody took the Lease yet.
        clock_a.now += 10 * 2 / 3 + 0.01
        assert a.remaining() == 0 and not a.held

        # a stops renewing; once b has seen the same record for the whole duration, it takes it.
        clock_b.now += 10.01
        assert await b._try() and b.held
        spec = holder(control_plane, namespace, "lease-test")
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1

        # a's renewal loop finds another holder and ends (the operator then stops and exits).
        a.retry = 0.01
        await asyncio.wait_for(a.keep(), 30)
        assert not a.held

        # A clean stop releases the Lease: a takes it at its next try, without waiting.
        await b.release()
        assert not b.held
        assert holder(control_plane, namespace, "lease-test").get("holderIdentity") is None
        assert await a._try() and a.held
    finally:
        await a.close()
        await b.close()


async def test_a_missing_namespace_is_reported_with_the_fix(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", control_plane.kubeconfig)
    lease = Lease(connect, "no-such-namespace-x", "runwarden", "a", duration=10)
    try:
        with pytest.raises(LeaseError, match=r"HTTP 404.*--leader-election-namespace"):
            await lease._try_once(0.0)
        assert not await lease._try()  # logged, retried by the caller
    finally:
        await lease.close()
