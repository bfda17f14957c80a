"""Leader election on a coordination.k8s.io/v1 Lease, with fencing.

The algorithm is client-go's (k8s.io/client-go/tools/leaderelection): a candidate takes the Lease
when it is free, released, or its record has not changed for ``leaseDurationSeconds`` *by the
candidate's own clock* (it never compares its clock with the holder's timestamps); the holder
renews it every ``retry`` seconds with an optimistic-concurrency update (resourceVersion), so two
candidates can never both succeed at the same revision.

Fencing, which client-go leaves to the caller: the holder counts its lease valid only until
``renew_deadline`` (< the lease duration) after the start of its last successful renewal, by its
own monotonic clock, which keeps counting while the process is stopped (CLOCK_BOOTTIME on Linux
also counts a suspended machine). ``remaining()`` is what the Google gateway asks before every
write: a leader paused past its lease (SIGSTOP, a long GC pause, a frozen VM) finds on waking
that the time is up and writes nothing, while a standby can only have taken over after the full
lease duration of its own observation, which starts no earlier than that renewal.

Why not the ``kubernetes`` package's leaderelection module: it runs in a thread with blocking
calls and callbacks, and does not expose the time of the last successful renewal that fencing
needs; the controller is asyncio, and already talks to the apiserver with its own credentials
(controller.kube.credentials.connect), as the status writer does. A 401 loads the credentials
again; refused once more, it is recorded (credentials.REFUSALS: the process ends).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp

from controller.kube import credentials
from controller.obs import logs

# (server URL, a new session) with the current credentials (``fresh``: loaded again first);
# raises credentials.NoCredentials when there are none.
Connect = Callable[[bool], Awaitable[tuple[str, aiohttp.ClientSession]]]
log = logs.get("runwarden.lease")
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def clock() -> float:
    """Seconds on a clock that never goes back and keeps counting while the process is stopped."""
    return time.clock_gettime(_CLOCK)


def micro_time(now: datetime | None = None) -> str:
    """A metav1.MicroTime (RFC 3339 with microseconds, UTC), as the Lease's times are written."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseError(Exception):
    """The apiserver refused a Lease request (the message names the status and the fix)."""


class Lease:
    """This process's candidacy for (and, once acquired, its hold of) one Lease."""

    def __init__(
        self,
        connect: Connect,
        namespace: str,
        name: str,
        identity: str,
        *,
        duration: float = 10.0,
        clock: Callable[[], float] = clock,
    ) -> None:
        if not identity:
            raise ValueError("a leader election identity is required (--leader-election-identity)")
        self.namespace, self.name, self.identity = namespace, name, identity
        self.duration = duration
        # client-go's defaults keep these ratios (15 s lease, 10 s deadline, 2 s retry).
        self.renew_deadline = duration * 2 / 3
        self.retry = duration / 5
        self._connect = connect
        self._conn: tuple[str, aiohttp.ClientSession] | None = None
        self._conn_fresh = False  # the session's credentials were loaded again (after a 401)
        self._refresh = False  # the apiserver said 401: load the credentials again first
        self._clock = clock
        self._valid_from: float | None = None  # clock() at the start of the last renewal that held
        self._observed: tuple[str, float] | None = None  # (resourceVersion, clock() first seen)
        self.holder: str = ""  # the holder as last seen ("" = none)
        self._timeout = aiohttp.ClientTimeout(total=max(1.0, self.retry))

    # ------------------------------------------------------------------ fencing

    def remaining(self) -> float:
        """Seconds this process may still act as the leader (0 when it does not hold the Lease)."""
        if self._valid_from is None:
            return 0.0
        return max(0.0, self._valid_from + self.renew_deadline - self._clock())

    @property
    def held(self) -> bool:
        return self.remaining() > 0

    # ------------------------------------------------------------------ the election

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the Lease (True) or ``stop`` is set (False)."""
        announced = ""
        while not stop.is_set():
            if await self._try():
                log.info("leader_elected", lease=self._ref(), identity=self.identity)
                return True
            if self.holder != announced:
                announced = self.holder
                log.info("standby", lease=self._ref(), identity=self.identity, leader=self.holder)
            try:
                await asyncio.wait_for(stop.wait(), self.retry)
            except TimeoutError:
                pass
        return False

    async def keep(self) -> None:
        """Renew the Lease every ``retry`` seconds; return when it is lost (another holder took
        it, or no renewal succeeded within ``renew_deadline``)."""
        while True:
            await asyncio.sleep(self.retry)
            held_before = self.held
            renewed = await self._try()
            if renewed:
                continue
            if self.holder and self.holder != self.identity:
                log.warning(
                    "leader_lost", lease=self._ref(), identity=self.identity, leader=self.holder
                )
                self._valid_from = None
                return
            if not self.held:
                log.warning(
                    "leader_lost",
                    lease=self._ref(),
                    identity=self.identity,
                    message=f"could not renew the Lease within {self.renew_deadline:g}s"
                    if held_before
                    else "the Lease expired while this process was not running",
                )
                self._valid_from = None
                return

    async def release(self) -> None:
        """Give the Lease up (on a clean exit) so that a standby takes over at once."""
        if self._valid_from is None:
            return
        self._valid_from = None
        try:
            lease = await self._get()
            if lease is None or _spec(lease).get("holderIdentity") != self.identity:
                return
            spec = _spec(lease)
            spec.update(holderIdentity=None, leaseDurationSeconds=1, renewTime=micro_time())
            await self._put(lease)
            log.info("leader_released", lease=self._ref(), identity=self.identity)
        except (LeaseError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("lease_release_failed", lease=self._ref(), error=str(exc) or repr(exc))

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn[1].close()
            self._conn = None

    # ------------------------------------------------------------------ one attempt

    async def _try(self) -> bool:
        """One try to acquire or renew (client-go's tryAcquireOrRenew); True when held."""
        started = self._clock()
        try:
            return await self._try_once(started)
        except (aiohttp.ClientError, TimeoutError, LeaseError) as exc:
            log.warning("lease_request_failed", lease=self._ref(), error=str(exc) or repr(exc))
            if isinstance(exc, aiohttp.ClientError):
                await self._reconnect()
            return False

    async def _try_once(self, started: float) -> bool:
        lease = await self._get()
        now = micro_time()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": _whole(self.duration),
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }
            if await self._create(body):
                return self._won(started)
            return False
        spec = _spec(lease)
        version = str(lease.get("metadata", {}).get("resourceVersion", ""))
        if self._observed is None or self._observed[0] != version:
            self._observed = (version, started)
        holder = spec.get("holderIdentity") or ""
        self.holder = holder
        if holder and holder != self.identity:
            term = float(spec.get("leaseDurationSeconds") or self.duration)
            if self._observed[1] + term > started:
                return False  # held by another and not expired by our observation
        if holder != self.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        elif self._valid_from is None:
            # Our own name from an earlier life of this identity (a restarted pod keeps its
            # name): take it back only as a new term, so the old process's term is not ours.
            spec["acquireTime"] = now
        spec.update(
            holderIdentity=self.identity,
            leaseDurationSeconds=_whole(self.duration),
            renewTime=now,
        )
        if await self._put(lease):
            return self._won(started)
        return False

    def _won(self, started: float) -> bool:
        self._valid_from = started
        self.holder = self.identity
        return True

    # ------------------------------------------------------------------ HTTP

    def _url(self, server: str, name: str | None = None) -> str:
        base = (
            f"{server.rstrip('/')}/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"
        )
        return f"{base}/{name}" if name else base

    async def _session(self) -> tuple[str, aiohttp.ClientSession]:
        if self._conn is None or self._refresh:
            fresh, self._refresh = self._refresh, False
            await self._reconnect()
            try:
                self._conn = await self._connect(fresh)
            except credentials.NoCredentials as exc:
                credentials.REFUSALS.missing(str(exc))
                raise LeaseError(f"no Kubernetes credentials: {exc}") from exc
            self._conn_fresh = fresh
        return self._conn

    async def _reconnect(self) -> None:
        old, self._conn = self._conn, None
        if old is not None:
            await old[1].close()

    async def _get(self) -> dict[str, Any] | None:
        server, session = await self._session()
        async with session.get(self._url(server, self.name), timeout=self._timeout) as resp:
            text = await resp.text()
            if resp.status == 404:
                return None
            self._check(resp.status, text, "get")
            found = json.loads(text)
            return found if isinstance(found, dict) else None

    async def _create(self, body: dict[str, Any]) -> bool:
        server, session = await self._session()
        async with session.post(self._url(server), json=body, timeout=self._timeout) as resp:
            text = await resp.text()
            if resp.status == 409:
                return False  # another candidate created it first
            self._check(resp.status, text, "create")
            return True

    async def _put(self, lease: dict[str, Any]) -> bool:
        server, session = await self._session()
        url = self._url(server, self.name)
        async with session.put(url, json=lease, timeout=self._timeout) as resp:
            text = await resp.text()
            if resp.status == 409:
                return False  # someone updated it since our read: re-read next time
            self._check(resp.status, text, "update")
            return True

    def _check(self, status: int, text: str, verb: str) -> None:
        if status < 300:
            return
        try:
            message = str(json.loads(text).get("message") or text[:200])
        except (ValueError, AttributeError):
            message = text[:200]
        hint = ""
        if status == 401:
            if self._conn_fresh:
                where = f"{verb} Lease {self._ref()}"
                credentials.REFUSALS.refuse(401, where, message)
            else:
                self._refresh = True  # rotated credentials: load them again and retry
        if status in (401, 403):
            hint = (
                f"; grant get, create and update on leases.coordination.k8s.io in namespace "
                f"{self.namespace} (manifests/rbac.yaml: Role runwarden-leader-election), or set "
                "--leader-election-namespace"
            )
        elif status == 404:
            hint = f"; create namespace {self.namespace} or set --leader-election-namespace"
        raise LeaseError(f"{verb} Lease {self._ref()}: HTTP {status}: {message}{hint}")

    def _ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def _spec(lease: dict[str, Any]) -> dict[str, Any]:
    spec = lease.setdefault("spec", {})
    return spec if isinstance(spec, dict) else {}


def _whole(seconds: float) -> int:
    return max(1, round(seconds))
