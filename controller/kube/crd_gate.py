"""Before kopf starts: wait until the apiserver serves the Orchestrator resource.

Why not let kopf notice the CRD itself: kopf picks the resources it serves from API discovery
once when it starts, and reads discovery again only when a CRD watch event arrives. The apiserver
publishes a new CRD in discovery asynchronously, a moment after the CRD's last watch event
(Established=True). When kopf's re-scan for that event runs first, it finds nothing, no further
event comes, and the operator never serves the resource until it is restarted (it logged
"Unresolved resources cannot be served" and then handled nothing). A CRD created between kopf's
first scan and the start of its CRD watch is missed the same way: kopf ignores the objects of the
watch's initial listing.

So the controller starts kopf only once discovery lists the resource where kopf looks (the group
and version in ``/apis``, the plural in ``/apis/GROUP/VERSION``): kopf's first scan then finds
it. Until then the process waits, alive (its liveness endpoint answers: waiting is not a fault a
restart would fix) and says what it is waiting for. Discovery is readable by every authenticated
identity (``system:discovery``), so this needs no RBAC of its own.

Which is also why a 401 or 403 here is not "not served yet": the apiserver refused the
credentials (a kubeconfig whose exec plugin gave nothing goes out anonymous: 403). After one
attempt with credentials loaded again, that is an error naming the status code: liveness fails
(REFUSED_GRACE, so a probe sees it) and the wait ends; the caller exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.web

from controller.kube import credentials
from controller.obs import logs

POLL_SECONDS = 1.0  # how soon after the CRD is served the controller starts serving it
REMIND_SECONDS = 60.0  # repeat the "waiting" line this often
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
REFUSED_CODES = frozenset({401, 403})
# After refused credentials: liveness fails this long before the process exits (CONTRACT §6.2:
# exit within 60 s), so that a probe, or a person, sees why.
REFUSED_GRACE = 20.0

log = logs.get("runwarden.crdwait")

# (server URL, a new session) with the current credentials (``fresh``: loaded again first);
# raises credentials.NoCredentials when there are none.
Connect = Callable[[bool], Awaitable[tuple[str, aiohttp.ClientSession]]]


@dataclass(frozen=True)
class ApiResource:
    group: str
    version: str
    plural: str

    @property
    def crd(self) -> str:
        return f"{self.plural}.{self.group}"


async def served(session: aiohttp.ClientSession, server: str, resource: ApiResource) -> bool:
    """Whether API discovery lists ``resource`` where kopf's scan looks for it."""
    base = server.rstrip("/")
    groups = await _get_json(session, f"{base}/apis")
    versions = {
        v.get("version")
        for g in (groups or {}).get("groups") or []
        if g.get("name") == resource.group
        for v in g.get("versions") or []
    }
    if resource.version not in versions:
        return False
    listing = await _get_json(session, f"{base}/apis/{resource.group}/{resource.version}")
    names = {r.get("name") for r in (listing or {}).get("resources") or []}
    return resource.plural in names


async def wait_until_served(
    resource: ApiResource,
    connect: Connect,
    *,
    liveness: str | None = None,
    poll: float = POLL_SECONDS,
    remind: float = REMIND_SECONDS,
) -> bool:
    """Return once the apiserver serves ``resource``: True; or False when SIGTERM/SIGINT came
    first, or there are no credentials, or the apiserver refused them (then the caller should
    exit without starting kopf; ``credentials.REFUSALS`` tells a refusal apart).

    Errors reaching the apiserver are logged and retried; they never end the wait.
    """
    started = time.monotonic()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        found = await _check(resource, connect)
        if found is None:
            return await _refused(liveness, resource, stop)
        if found:
            return True
        log.warning(
            "waiting_for_crd",
            crd=resource.crd,
            message=f"waiting for CRD {resource.crd} to be established and served "
            f"(apply crds/{resource.crd}.yaml); Orchestrators are served from then on",
        )
        async with alive(liveness, {"waiting_for_crd": resource.crd}):
            reminded = time.monotonic()
            while True:
                try:
                    await asyncio.wait_for(stop.wait(), poll)
                except TimeoutError:
                    pass
                else:
                    log.info("stopped", waiting_for_crd=resource.crd)
                    return False
                quiet = time.monotonic() - reminded < remind
                found = await _check(resource, connect, quiet=quiet)
                if found is None:  # liveness fails from now on (see alive)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), REFUSED_GRACE)
                    return False
                if found:
                    log.info(
                        "crd_served",
                        crd=resource.crd,
                        waited_seconds=round(time.monotonic() - started, 1),
                    )
                    return True
                if not quiet:
                    reminded = time.monotonic()
                    log.info(
                        "waiting_for_crd",
                        crd=resource.crd,
                        message=f"waiting for CRD {resource.crd} to be established and served",
                        waited_seconds=round(time.monotonic() - started, 1),
                    )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _refused(endpoint: str | None, resource: ApiResource, stop: asyncio.Event) -> bool:
    """Without usable credentials: liveness fails for REFUSED_GRACE (or until SIGTERM), then
    False."""
    async with alive(endpoint, {"waiting_for_crd": resource.crd}):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REFUSED_GRACE)
    return False


async def _check(resource: ApiResource, connect: Connect, quiet: bool = False) -> bool | None:
    """True/False: served or not; None: no credentials, or the apiserver refused them (logged
    as an error; see credentials.REFUSALS). Any other failed request is False (logged unless
    ``quiet``)."""
    for fresh in (False, True):
        try:
            server, session = await connect(fresh)
        except credentials.NoCredentials as exc:
            credentials.REFUSALS.missing(str(exc))
            return None
        async with session:
            try:
                return await served(session, server, resource)
            except aiohttp.ClientResponseError as exc:
                if exc.status not in REFUSED_CODES:
                    if not quiet:
                        log.warning("crd_check_failed", crd=resource.crd, error=_describe(exc))
                    return False
                if fresh:
                    credentials.REFUSALS.refuse(
                        exc.status, "GET /apis (API discovery)", exc.message
                    )
                    return None
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                if not quiet:
                    log.warning("crd_check_failed", crd=resource.crd, error=_describe(exc))
                return False
    raise AssertionError("unreachable")


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The JSON at ``url``; None when it is not found (a group or version not served yet)."""
    async with session.get(url, timeout=REQUEST_TIMEOUT) as response:
        if response.status == 404:
            return None
        response.raise_for_status()
        body = await response.json()
    return body if isinstance(body, dict) else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}"
    return f"{type(exc).__name__}: {exc}"


@contextlib.asynccontextmanager
async def alive(endpoint: str | None, payload: dict[str, Any]) -> AsyncIterator[None]:
    """Answer the liveness endpoint (``--liveness``, as kopf parses it) with ``payload`` while
    waiting (for the CRD, or as a leader election standby); kopf's own probe takes the same
    endpoint over when it starts."""
    if not endpoint:
        yield
        return
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http":
        yield  # kopf rejects it when it starts; nothing to serve meanwhile
        return

    async def healthy(_: aiohttp.web.Request) -> aiohttp.web.Response:
        refusals = credentials.REFUSALS
        if refusals.failed:
            return aiohttp.web.json_response({"error": refusals.message}, status=503)
        return aiohttp.web.json_response(payload)

    app = aiohttp.web.Application()
    app.add_routes([aiohttp.web.get(parts.path or "/", healthy)])
    runner = aiohttp.web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await aiohttp.web.TCPSite(runner, parts.hostname or "localhost", parts.port or 80).start()
        yield
    finally:
        await runner.cleanup()
