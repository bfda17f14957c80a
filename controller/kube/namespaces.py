"""Namespace bindings (controller.domain.tenancy) as the apiserver has them, cached.

The operator layer feeds every namespace watch event into ``NamespaceBindings.seen`` (so an
annotation change takes effect without a restart, and wakes the namespace's Orchestrators); a
check asks ``get``, which answers from the cache and reads the namespace itself when the watch has
not delivered it yet. What the watch delivered stays until the watch says otherwise (kopf
re-lists after a reconnect); what a read found is read again after ``ttl``, so that without a
watch a revoked binding does not stay in force for long.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from controller.domain.tenancy import Binding, BindingMode, project_allowed_anywhere
from controller.kube import credentials
from controller.kube.status_writer import TIMEOUT, Connect, StatusWriteError
from controller.obs import logs

log = logs.get("runwarden.kube")

DEFAULT_TTL = 60.0


class NamespaceBindings:
    """The bindings of the namespaces seen so far, by name."""

    def __init__(
        self,
        connect: Connect | None,
        mode: BindingMode = BindingMode.OPTIONAL,
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self._connect = connect
        self._conn: tuple[str, aiohttp.ClientSession] | None = None
        self._ttl = ttl
        self._clock = clock
        self._bindings: dict[str, Binding] = {}
        self._expires: dict[str, float] = {}
        self._reading: dict[str, int] = {}  # namespace -> reads in flight (checks awaiting get)

    def seen(
        self, name: str, annotations: Mapping[str, str] | None, *, watched: bool = True
    ) -> bool:
        """A namespace as the watch (or a read) delivered it; True if its binding changed.

        A namespace the watch delivers first while checks are reading it is no change: those
        checks take the watch's binding (see ``get``), so waking them would only check again.
        """
        binding = Binding.of(name, annotations)
        before = self._bindings.get(name)
        if before is None and watched and self._reading.get(name):
            self._bindings[name] = binding
            self._expires[name] = float("inf")
            return False
        self._bindings[name] = binding
        self._expires[name] = float("inf") if watched else self._clock() + self._ttl
        if before is not None and before != binding:
            log.info(
                "namespace_binding_changed",
                namespace=name,
                projects=sorted(binding.projects) if binding.projects is not None else None,
                google_service_account=binding.service_account,
                allow_public_invokers=binding.allow_public,
            )
        return before != binding

    def gone(self, name: str) -> None:
        self._bindings.pop(name, None)
        self._expires.pop(name, None)

    async def get(self, name: str) -> Binding:
        """The namespace's binding; raises StatusWriteError (or aiohttp.ClientError,
        TimeoutError) when it is not cached and cannot be read."""
        cached = self._bindings.get(name)
        if cached is not None and self._clock() < self._expires.get(name, 0.0):
            return cached
        self._reading[name] = self._reading.get(name, 0) + 1
        try:
            annotations = await self._read(name)
        finally:
            self._reading[name] -= 1
            if not self._reading[name]:
                del self._reading[name]
        if self._expires.get(name) == float("inf"):
            return self._bindings[name]  # the watch delivered it meanwhile: the newer one
        self.seen(name, annotations, watched=False)
        return self._bindings[name]

    def project_allowed(self, project: str) -> bool:
        """Whether any namespace seen so far may touch ``project`` (the audit feed's filter)."""
        return project_allowed_anywhere(self._bindings, project, self.mode)

    async def _read(self, name: str) -> Mapping[str, str]:
        if self._connect is None:
            return {}
        for fresh in (False, True):
            if self._conn is None or fresh:
                old, self._conn = self._conn, None
                if old is not None:
                    await old[1].close()
                try:
                    self._conn = await self._connect(fresh)
                except credentials.NoCredentials as exc:
                    credentials.REFUSALS.missing(str(exc))
                    raise StatusWriteError(401, str(exc)) from exc
            server, session = self._conn
            async with session.get(f"{server}/api/v1/namespaces/{name}", timeout=TIMEOUT) as resp:
                text = (await resp.read()).decode(errors="replace")
                if resp.status == 401 and not fresh:
                    continue
                if resp.status == 401:
                    # Refused with credentials loaded again: the process ends (CONTRACT §6.2).
                    credentials.REFUSALS.refuse(401, f"GET namespaces/{name}", text[:200])
                if resp.status == 404:
                    return {}  # no such namespace (yet): no binding
                if resp.status >= 300:
                    raise StatusWriteError(resp.status, f"reading namespace {name}: {text[:200]}")
                body: dict[str, Any] = json.loads(text)
                return dict((body.get("metadata") or {}).get("annotations") or {})
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn[1].close()
            self._conn = None
