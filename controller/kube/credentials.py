"""Kubernetes credentials: loaded by the ``kubernetes`` package, shared by everything that talks
to the apiserver (kopf, via controller.operator.login; the status writer; the CRD gate).

Why the ``kubernetes`` package and not kopf's own ``login_with_kubeconfig``: kopf's rudimentary
loader understands tokens, basic auth and client certificates only. A GKE kubeconfig's user is an
exec credential plugin (``gke-gcloud-auth-plugin``); kopf skipped it and every request went out
anonymous. The ``kubernetes`` package runs exec plugins (client.authentication.k8s.io v1beta1/v1),
auth providers (oidc, gcp), token files, and reports the token's expiry, so the credentials are
loaded again before they expire.

Loading is blocking (file reads, an exec plugin subprocess): ``load()`` runs it in a thread, never
on the event loop. In-cluster (the pod's service account) first, else ``KUBECONFIG`` (or
``~/.kube/config``), as kubectl does.

Credentials the apiserver refuses (HTTP 401/403 where any authenticated identity is allowed, e.g.
API discovery; or 401 after loading them again) are not a wait-and-see condition: ``REFUSALS``
records the first one; liveness then fails and the process exits non-zero (CONTRACT §6.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import ssl
import threading
from dataclasses import dataclass

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config import kube_config
from yarl import URL

from controller.obs import logs

# Load credentials again this long before they expire (exec plugins' tokens last about an hour).
EXPIRY_MARGIN = datetime.timedelta(seconds=60)

log = logs.get("runwarden.kube")


# KUBECONFIG is read at each load (the kubernetes package reads it once, when imported).
DEFAULT_KUBECONFIG = "~/.kube/config"


class NoCredentials(Exception):
    """Neither in-cluster credentials nor a usable kubeconfig."""


@dataclass(frozen=True)
class Credentials:
    """What a client needs to reach the apiserver, as the ``kubernetes`` package loaded it."""

    server: str
    source: str  # "in-cluster" | "kubeconfig"
    ca_path: str | None = None
    insecure: bool = False
    scheme: str | None = None  # "Bearer", "Basic"
    token: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    proxy_url: str | None = None
    expiration: datetime.datetime | None = None  # UTC; None = until the apiserver refuses them

    def expired(self, now: datetime.datetime | None = None) -> bool:
        """Whether to load them again before the next use (within EXPIRY_MARGIN of expiry)."""
        if self.expiration is None:
            return False
        now = now or datetime.datetime.now(datetime.UTC)
        return now >= self.expiration - EXPIRY_MARGIN


def load_blocking() -> Credentials:
    """In-cluster credentials, else the kubeconfig's current context (runs exec plugins).

    Blocking: call it through ``load()``. Raises NoCredentials naming what was tried.
    """
    config = k8s_client.Configuration()
    expiry: datetime.datetime | None = None
    try:
        k8s_config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
        source = "in-cluster"
    except k8s_config.ConfigException as in_cluster:
        try:
            # What load_kube_config() does, keeping the loader to read the token's expiry (an
            # exec plugin's expirationTimestamp, an auth provider's expiry), which the public
            # function drops. KUBECONFIG may list several files; the loader merges them.
            loader = kube_config._get_kube_config_loader(  # type: ignore[no-untyped-call]
                filename=os.environ.get("KUBECONFIG", DEFAULT_KUBECONFIG),
                persist_config=False,
            )
            loader.load_and_set(config)
        except (k8s_config.ConfigException, OSError) as kubeconfig:
            raise NoCredentials(
                f"no Kubernetes credentials: not in a cluster ({in_cluster}) and no usable "
                f"kubeconfig ({kubeconfig}); set KUBECONFIG to a kubeconfig file"
            ) from kubeconfig
        source = "kubeconfig"
        found = getattr(loader, "expiry", None)
        if isinstance(found, datetime.datetime):
            expiry = found if found.tzinfo else found.replace(tzinfo=datetime.UTC)
    # For exec plugins and auth providers the header comes from a hook that refreshes it; the
    # ``kubernetes`` package keeps it under "BearerToken" since 36.0.1 ("authorization" before).
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
        "authorization"
    )
    scheme, token = _split_header(header)
    if source == "kubeconfig" and token is None and not config.cert_file:
        _require_exec_result(loader)
    if not config.host:
        raise NoCredentials("the kubeconfig's current context names no cluster server")
    return Credentials(
        server=str(config.host),
        source=source,
        ca_path=config.ssl_ca_cert or None,
        insecure=not config.verify_ssl,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file or None,
        private_key_path=config.key_file or None,
        proxy_url=config.proxy or None,
        expiration=expiry,
    )


def _require_exec_result(loader: object) -> None:
    """An exec plugin that fails leaves the ``kubernetes`` package without credentials (it logs
    and goes on): every request would go out anonymous. Say so instead."""
    user = getattr(loader, "_user", None)
    plugin = user.safe_get("exec") if user is not None else None
    if plugin:
        command = plugin.get("command") if hasattr(plugin, "get") else None
        raise NoCredentials(
            f"the kubeconfig's exec credential plugin ({command or 'users[].user.exec'}) "
            "returned no credentials; run it by hand to see why (for GKE: install "
            "gke-gcloud-auth-plugin and run `gcloud auth login`)"
        )


def _split_header(header: str | None) -> tuple[str | None, str | None]:
    """An Authorization header value as (scheme, credentials) (RFC 7235)."""
    if not header:
        return None, None
    parts = header.split(" ", 1)
    if len(parts) == 1:
        return "Bearer", parts[0]
    return parts[0], parts[1]


class Source:
    """The process's current credentials, loaded again when they expire or are refused.

    One instance serves kopf's login, the status writer and the CRD gate, so a token one of them
    refreshed is the token all of them use next.
    """

    def __init__(self) -> None:
        self._current: Credentials | None = None
        self._lock = asyncio.Lock()

    async def get(self, fresh: bool = False) -> Credentials:
        """The current credentials; loaded again (off the event loop) when ``fresh``, expired or
        never loaded. Raises NoCredentials."""
        async with self._lock:
            current = self._current
            if fresh or current is None or current.expired():
                current = self._current = await asyncio.to_thread(load_blocking)
                log.debug(
                    "kube_credentials_loaded",
                    source=current.source,
                    server=current.server,
                    expires=current.expiration.isoformat() if current.expiration else None,
                )
            return current


SOURCE = Source()


def ssl_context(creds: Credentials) -> ssl.SSLContext:
    """TLS as the kubeconfig says: its CA (else the system's), its client certificate if any."""
    if creds.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=creds.ca_path)
    if creds.certificate_path:
        context.load_cert_chain(creds.certificate_path, creds.private_key_path)
    return context


def headers(creds: Credentials) -> dict[str, str]:
    if creds.token is None:
        return {}
    return {"Authorization": f"{creds.scheme or 'Bearer'} {creds.token}"}


def proxy_for(creds: Credentials) -> tuple[str | None, aiohttp.BasicAuth | None]:
    """The proxy to the apiserver: the kubeconfig's proxy-url, else HTTPS_PROXY/NO_PROXY as
    kubectl honours them (None: direct)."""
    if creds.proxy_url:
        return creds.proxy_url, None
    try:
        proxy, auth = get_env_proxy_for_url(URL(creds.server))
    except LookupError:
        return None, None
    return str(proxy), auth


def session(creds: Credentials, limit: int) -> aiohttp.ClientSession:
    """An HTTP session to the apiserver with these credentials and at most ``limit``
    connections."""
    # The proxy is looked up once, here: aiohttp's trust_env would look it up and read ~/.netrc
    # in a thread on every request (7 % of the controller's CPU while it repairs 10,000
    # services, issue 17).
    proxy, proxy_auth = proxy_for(creds)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=ssl_context(creds)),
        headers=headers(creds),
        cookie_jar=aiohttp.DummyCookieJar(),  # the apiserver sets none; skip the jar per request
        proxy=proxy,
        proxy_auth=proxy_auth,
    )


# Connections to kube-apiserver per session. kopf's own pool is unbounded: with hundreds of
# Orchestrators finishing checks together it held one TLS connection per concurrent status patch,
# each with a 256 KiB read buffer and OpenSSL state (1,000 Orchestrators: ~450 MB RSS instead of
# ~150 MB).
KUBE_CONNECTIONS = 16


async def connect(fresh: bool = False) -> tuple[str, aiohttp.ClientSession]:
    """(server URL, a new session) with the process's current credentials (``fresh``: loaded
    again first, e.g. after a 401). Raises NoCredentials."""
    creds = await SOURCE.get(fresh)
    return creds.server, session(creds, KUBE_CONNECTIONS)


class Refusals:
    """Whether this process's Kubernetes credentials are unusable: refused by the apiserver
    (401/403), or missing. Thread-safe; the first one is logged, as an error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.code: int | None = None  # the HTTP status of the refusal; None: not refused
        self.message = ""
        self.event = threading.Event()  # set once failed
        # Coroutines in wait(), woken through their own loops (a refusal may come off-loop).
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def refuse(self, code: int, where: str, detail: str = "") -> None:
        """The apiserver refused the credentials with ``code`` (401 or 403) at ``where``."""
        message = (
            f"the Kubernetes API server refused the controller's credentials with HTTP {code} "
            f"({where}{': ' + detail if detail else ''}); check the kubeconfig's user (for GKE: "
            "gke-gcloud-auth-plugin on PATH and `gcloud auth login`) or the pod's service "
            "account token"
        )
        if self._record(message, code):
            log.error("kube_credentials_refused", status=code, where=where, message=message)

    def missing(self, message: str) -> None:
        """There are no credentials to use at all."""
        if self._record(message, None):
            log.error("kube_credentials_missing", message=message)

    async def wait(self) -> None:
        """Return once the credentials have failed (recorded on any thread)."""
        loop = asyncio.get_running_loop()
        waiter = (loop, asyncio.Event())
        with self._lock:
            if self.event.is_set():
                return
            self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _record(self, message: str, code: int | None) -> bool:
        with self._lock:
            if self.event.is_set():
                return False
            self.code, self.message = code, message
            self.event.set()
            waiters = list(self._waiters)
        for loop, woken in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(woken.set)
        return True

    @property
    def failed(self) -> bool:
        return self.event.is_set()


REFUSALS = Refusals()
