"""controller.kube.status_writer.StatusWriter on the real kube-apiserver: the status write of
every check."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controller.kube.status_writer import Connect, StatusWriteError, StatusWriter
from tests.fixtures.bodies import orchestrator
from tests.fixtures.k8s import ControlPlane

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "runwarden.dev", "v1alpha1", "orchestrators"
BODY = orchestrator("writer", "svc", project="runwarden-e2e", region="us-west2")


def _connect(kubeconfig: str, tmp: Path) -> Connect:
    """A session with the kubeconfig's client certificate. (Not the controller's own connect:
    that imports kopf, whose Event-posting log handler later unit tests do not expect.)"""
    config = json.loads(Path(kubeconfig).read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    files = {}
    for key, name in (
        ("certificate-authority-data", "ca.crt"),
        ("client-certificate-data", "client.crt"),
        ("client-key-data", "client.key"),
    ):
        files[name] = tmp / name
        files[name].write_bytes(base64.b64decode(cluster.get(key) or user[key]))
    context = ssl.create_default_context(cafile=str(files["ca.crt"]))
    context.load_cert_chain(str(files["client.crt"]), str(files["client.key"]))

    async def connect(fresh: bool) -> tuple[str, aiohttp.ClientSession]:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        return str(cluster["server"]), session

    return connect


def _status(cp: ControlPlane, namespace: str) -> dict[str, Any]:
    out = cp.kubectl("get", "orchestrator", "writer", "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out).get("status") or {})


async def test_merge_patches_status_and_reports_a_missing_object(
    crds: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(BODY))
    writer = StatusWriter(_connect(crds.kubeconfig, tmp_path), GROUP, VERSION, PLURAL)
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


async def test_reconnects_once_on_401(crds: ControlPlane, namespace: str, tmp_path: Path) -> None:
    """Rotated credentials: the first session's token is refused, the writer connects again."""
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(BODY))
    good = _connect(crds.kubeconfig, tmp_path)
    calls: list[str] = []

    async def connect(fresh: bool) -> tuple[str, aiohttp.ClientSession]:
        calls.append("connect")
        if len(calls) == 1:
            stale = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=False),
                headers={"Authorization": "Bearer expired-token"},
            )
            return crds.server, stale
        return await good(fresh)

    writer = StatusWriter(connect, GROUP, VERSION, PLURAL)
    try:
        assert await writer.patch(namespace, "writer", {"lastSyncTime": "2026-11-28T18:05:00Z"})
        assert calls == ["connect", "connect"]
        assert _status(crds, namespace)["lastSyncTime"] == "2026-11-28T18:05:00Z"
    finally:
        await writer.close()
