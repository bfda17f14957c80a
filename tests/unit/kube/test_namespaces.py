"""controller.kube.namespaces.NamespaceBindings: watched bindings stay, read ones are read again
after the TTL, a missing namespace is unbound; against a local HTTP server answering like
kube-apiserver (the e2e tests use the real one)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from controller.domain.tenancy import BindingMode
from controller.kube.namespaces import NamespaceBindings
from controller.kube.status_writer import StatusWriteError

Server = tuple[str, dict[str, dict[str, str] | int], list[str]]  # base, namespaces, reads


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    namespaces: dict[str, dict[str, str] | int] = {}
    reads: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        reads.append(name)
        found = namespaces.get(name)
        if found is None:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        if isinstance(found, int):
            return web.json_response({"kind": "Status", "message": "boom"}, status=found)
        return web.json_response({"metadata": {"name": name, "annotations": found}})

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/{name}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", namespaces, reads
    await runner.cleanup()


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def bindings(server: Server) -> AsyncIterator[tuple[NamespaceBindings, Clock]]:
    base = server[0]
    clock = Clock()

    async def connect(fresh: bool) -> tuple[str, aiohttp.ClientSession]:
        return base, aiohttp.ClientSession()

    found = NamespaceBindings(connect, BindingMode.REQUIRED, ttl=30, clock=clock)
    yield found, clock
    await found.close()


async def test_a_namespace_not_watched_yet_is_read_then_cached_for_the_ttl(
    server: Server, bindings: tuple[NamespaceBindings, Clock]
) -> None:
    _, namespaces, reads = server
    b, clock = bindings
    namespaces["team-a"] = {"runwarden.dev/projects": "a-prj"}
    assert (await b.get("team-a")).projects == frozenset({"a-prj"})
    assert (await b.get("team-a")).projects == frozenset({"a-prj"})
    assert reads == ["team-a"]
    namespaces["team-a"] = {"runwarden.dev/projects": "b-prj"}
    clock.now += 31
    assert (await b.get("team-a")).projects == frozenset({"b-prj"})
    assert reads == ["team-a", "team-a"]


async def test_what_the_watch_delivered_is_not_read_again(
    server: Server, bindings: tuple[NamespaceBindings, Clock]
) -> None:
    _, _, reads = server
    b, clock = bindings
    assert b.seen("team-a", {"runwarden.dev/projects": "a-prj"})
    assert not b.seen("team-a", {"runwarden.dev/projects": "a-prj"})  # unchanged
    clock.now += 10_000
    assert (await b.get("team-a")).projects == frozenset({"a-prj"})
    assert reads == []
    assert b.project_allowed("a-prj") and not b.project_allowed("b-prj")
    b.gone("team-a")
    assert not b.project_allowed("a-prj")


async def test_a_missing_namespace_is_unbound_and_errors_raise(
    server: Server, bindings: tuple[NamespaceBindings, Clock]
) -> None:
    _, namespaces, _ = server
    b, _ = bindings
    assert (await b.get("nowhere")).projects is None
    namespaces["broken"] = 500
    with pytest.raises(StatusWriteError, match="namespace broken"):
        await b.get("broken")


async def test_the_watch_delivering_a_namespace_a_check_is_reading_is_no_change() -> None:
    """At start-up the namespace watch may deliver a namespace while a check is reading it:
    the check takes the watch's binding and nothing is woken for a second check; a change the
    watch delivers afterwards still is one."""
    import asyncio
    from collections.abc import Mapping

    started, release = asyncio.Event(), asyncio.Event()

    class SlowRead(NamespaceBindings):
        async def _read(self, name: str) -> Mapping[str, str]:
            started.set()
            await release.wait()
            return {"runwarden.dev/projects": "stale-prj"}

    b = SlowRead(None, BindingMode.REQUIRED)
    reading = asyncio.create_task(b.get("team-a"))
    await started.wait()  # the check's read is in flight
    assert b.seen("team-a", {"runwarden.dev/projects": "a-prj"}) is False
    release.set()
    assert (await reading).projects == frozenset({"a-prj"})  # the watch's, not the read's
    assert b.seen("team-a", {"runwarden.dev/projects": "b-prj"}) is True
    # With no read in flight, a namespace seen first is new (as before): its loops are woken.
    assert b.seen("team-b", {"runwarden.dev/projects": "a-prj"}) is True
