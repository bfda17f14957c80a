"""controller.kube.StatusWriter on the real kube-apiserver: the status write of every check."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
import yaml

from controller.kube import StatusWriteError, StatusWriter
from tests.fixtures.k8s import ControlPlane

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "runwarden.dev", "v1alpha1", "orchestrators"
BODY: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "Orchestrator",
    "metadata": {"name": "writer"},
    "spec": {"service": {"project": "runwarden-e2e", "region": "us-west2", "name": "svc"}},
}


def _connect(kubeconfig: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The controller's own connect (kopf's credentials from KUBECONFIG)."""
    from controller import handlers  # imports kopf: only inside the test

    monkeypatch.setenv("KUBECONFIG", kubeconfig)
    return handlers._connect


def _status(cp: ControlPlane, namespace: str) -> dict[str, Any]:
    out = cp.kubectl("get", "orchestrator", "writer", "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out).get("status") or {})


async def test_merge_patches_status_and_reports_a_missing_object(
    crds: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(BODY))
    writer = StatusWriter(_connect(crds.kubeconfig, monkeypatch), GROUP, VERSION, PLURAL)
    try:
        stamp = "2026-11-28T18:00:00Z"
        assert await writer.patch(
            namespace, "writer", {"lastSyncTime": stamp, "drift": {"count": 1}}
        )
        assert await writer.patch(namespace, "writer", {"drift": {"count": 2}})
        status = _status(crds, namespace)
        assert status["lastSyncTime"] == stamp  # a merge patch: other keys stay
        assert status["drift"] == {"count": 2}

        assert (
            await writer.patch(namespace, "no-such-orchestrator", {"drift": {"count": 1}}) is False
        )

        with pytest.raises(StatusWriteError) as refused:
            await writer.patch(namespace, "writer", {"drift": {"count": "many"}})
        assert refused.value.code == 422
        assert "status.drift.count" in str(refused.value)  # the apiserver names the field
    finally:
        await writer.close()


async def test_reconnects_once_on_401(
    crds: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotated credentials: the first session's token is refused, the writer connects again."""
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(BODY))
    good = _connect(crds.kubeconfig, monkeypatch)
    calls: list[str] = []

    def connect() -> tuple[str, aiohttp.ClientSession] | None:
        calls.append("connect")
        if len(calls) == 1:
            stale = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=False),
                headers={"Authorization": "Bearer expired-token"},
            )
            return crds.server, stale
        found: tuple[str, aiohttp.ClientSession] | None = good()
        return found

    writer = StatusWriter(connect, GROUP, VERSION, PLURAL)
    try:
        assert await writer.patch(namespace, "writer", {"lastSyncTime": "2026-11-28T18:05:00Z"})
        assert calls == ["connect", "connect"]
        assert _status(crds, namespace)["lastSyncTime"] == "2026-11-28T18:05:00Z"
    finally:
        await writer.close()
