"""controller.kube.StatusWriter's retry and error mapping, against a local HTTP server that
answers like kube-apiserver would (the e2e tests use the real one)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from controller.kube import StatusWriteError, StatusWriter

PATH = "/apis/runwarden.dev/v1alpha1/namespaces/ns/orchestrators/{name}/status"


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[tuple[int, str]], list[str]]]:
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


def writer_for(base: str) -> StatusWriter:
    return StatusWriter(
        lambda: (base, aiohttp.ClientSession()), "runwarden.dev", "v1alpha1", "orchestrators"
    )


async def test_transient_failures_are_retried(
    server: tuple[str, list[tuple[int, str]], list[str]],
) -> None:
    base, answers, received = server
    answers += [(503, "etcd leader changed"), (429, "too many requests")]
    writer = writer_for(base)
    try:
        assert await writer.patch("ns", "a", {"lastSyncTime": "2026-11-28T18:00:00Z"})
    finally:
        await writer.close()
    assert len(received) == 3
    assert json.loads(received[-1]) == {"status": {"lastSyncTime": "2026-11-28T18:00:00Z"}}


async def test_a_refusal_is_not_retried_and_names_the_field(
    server: tuple[str, list[tuple[int, str]], list[str]],
) -> None:
    base, answers, received = server
    answers.append((422, 'Orchestrator "a" is invalid: status.drift.count: Invalid value'))
    writer = writer_for(base)
    try:
        with pytest.raises(StatusWriteError, match=r"status\.drift\.count") as refused:
            await writer.patch("ns", "a", {"drift": {"count": "x"}})
    finally:
        await writer.close()
    assert refused.value.code == 422 and len(received) == 1


async def test_a_deleted_object_is_not_an_error(
    server: tuple[str, list[tuple[int, str]], list[str]],
) -> None:
    base, answers, _ = server
    answers.append((404, "not found"))
    writer = writer_for(base)
    try:
        assert await writer.patch("ns", "gone", {"drift": {"count": 1}}) is False
    finally:
        await writer.close()
