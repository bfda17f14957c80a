"""The status write after every check: one JSON merge patch of the status subresource.

Why not kopf's handler ``patch``: kopf applies it by deep-copying the whole patched object to
diff it for JSON-patch transformations we never use, and tracks the write for its own
consistency checks; after the two Google reads that was the largest cost of a steady-state
check (bench/results/notes.md). A merge patch of just the keys that moved is the same write.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import yarl
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from controller.kube import credentials
from controller.obs import logs

# (server URL, a new session with the current credentials; ``fresh``: loaded again first).
# Raises credentials.NoCredentials when there are none.
Connect = Callable[[bool], Awaitable[tuple[str, aiohttp.ClientSession]]]
TIMEOUT = aiohttp.ClientTimeout(total=30)
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}
# A write the apiserver could not take (down, overloaded, timed out) is retried for ~20 s; a
# write still failing then is left to the next check, which writes the status again.
RETRY_ATTEMPTS = 6
RETRY_SECONDS = 20.0
TRANSIENT_CODES = frozenset({429, 500, 502, 503, 504})
URL_CACHE = 10_000

log = logs.get("runwarden.kube")


class StatusWriteError(Exception):
    """The apiserver refused or failed a status write."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"HTTP {code}: {message}")
        self.code = code


class StatusWriter:
    """Merge-patches ``.status`` of one custom resource kind."""

    def __init__(self, connect: Connect, group: str, version: str, plural: str) -> None:
        self._connect = connect
        self._path = f"/apis/{group}/{version}/namespaces/{{namespace}}/{plural}/{{name}}/status"
        self._conn: tuple[str, aiohttp.ClientSession] | None = None
        self._urls: dict[tuple[str, str, str], yarl.URL] = {}

    async def patch(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        """Write ``status`` (a merge patch of .status); False if the object is gone.

        Transient failures are retried with backoff (see RETRY_SECONDS); raises StatusWriteError
        for a refusal, aiohttp.ClientError or TimeoutError when the apiserver stays unreachable.
        """
        try:  # the usual case, without building tenacity's state machine for every write
            return await self._patch_once(namespace, name, status)
        except Exception as exc:
            if not _transient(exc):
                raise
        # At once again (a keep-alive connection the apiserver closed), then with backoff.
        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(RETRY_SECONDS),
            wait=wait_exponential_jitter(multiplier=0.5, max=8.0),
            before_sleep=_log_retry(namespace, name),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._patch_once(namespace, name, status)
        raise AssertionError("unreachable")

    async def _patch_once(self, namespace: str, name: str, status: Mapping[str, Any]) -> bool:
        """One write; a 401 (rotated credentials) reconnects with fresh ones and tries again. A
        401 with fresh ones is refused credentials (credentials.REFUSALS: the process ends)."""
        body = json.dumps({"status": status}, separators=(",", ":"))
        for fresh in (False, True):
            server, session = await self._session(fresh)
            async with session.patch(
                self._url(server, namespace, name), data=body, headers=MERGE_PATCH, timeout=TIMEOUT
            ) as resp:
                # The reply is the whole object; the watch brings it to kopf anyway.
                text = (await resp.read()).decode(errors="replace")
                if resp.status < 300:
                    return True
                if resp.status == 404:
                    return False
                if resp.status == 401 and not fresh:
                    continue
                if resp.status == 401:
                    where = f"PATCH orchestrators/status {namespace}/{name}"
                    credentials.REFUSALS.refuse(401, where, _message(text))
                raise StatusWriteError(resp.status, _message(text))
        raise AssertionError("unreachable")

    def _url(self, server: str, namespace: str, name: str) -> yarl.URL:
        """The status URL, parsed once per object (names are DNS labels: nothing to quote)."""
        key = (server, namespace, name)
        url = self._urls.get(key)
        if url is None:
            if len(self._urls) >= URL_CACHE:
                self._urls.clear()
            path = self._path.format(namespace=namespace, name=name)
            url = self._urls[key] = yarl.URL(server + path, encoded=True)
        return url

    async def _session(self, fresh: bool) -> tuple[str, aiohttp.ClientSession]:
        if self._conn is None or fresh:
            try:
                conn = await self._connect(fresh)
            except credentials.NoCredentials as exc:
                credentials.REFUSALS.missing(str(exc))
                raise StatusWriteError(401, str(exc)) from exc
            old, self._conn = self._conn, conn
            if old is not None:
                log.info("kube_reconnected")
                _close_later(old[1])
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn[1].close()
            self._conn = None


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, StatusWriteError):
        return exc.code in TRANSIENT_CODES
    return isinstance(exc, aiohttp.ClientError | TimeoutError)


def _log_retry(namespace: str, name: str) -> Any:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.info(
            "status_write_retry",
            k8s_ref={"namespace": namespace, "name": name},
            attempt=state.attempt_number,
            error=str(exc) or type(exc).__name__,
        )

    return before_sleep


def _message(text: str) -> str:
    """The apiserver's Status message, else the start of the body."""
    try:
        found = json.loads(text).get("message")
    except (ValueError, AttributeError):
        found = None
    return str(found or text[:200])


_CLOSING: set[asyncio.Task[None]] = set()


def _close_later(session: aiohttp.ClientSession) -> None:
    """Close a replaced session in the background (its connections go with it)."""
    task = asyncio.get_running_loop().create_task(session.close())
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)
