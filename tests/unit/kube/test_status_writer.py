"""controller.kube.status_writer.StatusWriter's retry and error mapping, against a local HTTP
server that answers like kube-apiserver would (the e2e tests use the real one)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from controller.kube.status_writer import StatusWriteError, StatusWriter

Server = tuple[str, list[tuple[int, str]], list[str]]  # base URL, answers, bodies received
PATH = "/apis/runwarden.dev/v1alpha1/namespaces/ns/orchestrators/{name}/status"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """(base URL, answers to give in order (status, message), bodies received)."""
    answers: list[tuple[int, str]] = []
    received: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(await request.text())
        assert request.headers["Content-Type"] == "application/merge-patch+json"
        code, message = answers.pop(0) if answers else (200, "")
        body = {"kind": "Status", "message": message} if code >= 300 else {"status": {}}
        return web.json_response(body, status=code)

    app = web.Application()
    app.router.add_patch(PATH.format(name="{name}"), handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", answers, received
    await runner.cleanup()


@pytest.fixture
async def writer(server: Server) -> AsyncIterator[StatusWriter]:
    base = server[0]

    async def connect(fresh: bool) -> tuple[str, aiohttp.ClientSession]:
        return base, aiohttp.ClientSession()

    found = StatusWriter(connect, "runwarden.dev", "v1alpha1", "orchestrators")
    yield found
    await found.close()


async def test_transient_failures_are_retried(server: Server, writer: StatusWriter) -> None:
    _, answers, received = server
    answers += [(503, "etcd leader changed"), (429, "too many requests")]
    assert await writer.patch("ns", "a", {"lastSyncTime": "2026-11-28T18:00:00Z"})
    assert len(received) == 3
    assert json.loads(received[-1]) == {"status": {"lastSyncTime": "2026-11-28T18:00:00Z"}}


async def test_a_refusal_is_not_retried_and_names_the_field(
    server: Server, writer: StatusWriter
) -> None:
    _, answers, received = server
    answers.append((422, 'Orchestrator "a" is invalid: status.drift.count: Invalid value'))
    with pytest.raises(StatusWriteError, match=r"status\.drift\.count") as refused:
        await writer.patch("ns", "a", {"drift": {"count": "x"}})
    assert refused.value.code == 422 and len(received) == 1


async def test_a_deleted_object_is_not_an_error(server: Server, writer: StatusWriter) -> None:
    _, answers, _ = server
    answers.append((404, "not found"))
    assert await writer.patch("ns", "gone", {"drift": {"count": 1}}) is False
