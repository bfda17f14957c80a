"""Kubernetes credentials for kopf and for the controller's own status writer and CRD gate."""

from __future__ import annotations

from typing import Any

import aiohttp
import kopf

# Connections to kube-apiserver. kopf's own pool is unbounded: with hundreds of Orchestrators
# finishing checks together it held one TLS connection per concurrent status patch, each with a
# 256 KiB read buffer and OpenSSL state (1,000 Orchestrators: ~450 MB RSS instead of ~150 MB).
KUBE_CONNECTIONS = 16


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's own credentials in an HTTP session with a bounded connection pool (see
    KUBE_CONNECTIONS)."""
    info = _credentials(**kwargs)
    if info is None:
        return None
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
        aiohttp_session=_session(info),
    )


def _credentials(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else KUBECONFIG: the one kopf would prefer."""
    found = [
        info
        for info in (
            kopf.login_with_service_account(**kwargs),
            kopf.login_with_kubeconfig(**kwargs),
        )
        if info is not None
    ]
    return max(found, key=lambda i: i.priority) if found else None


def _session(info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KUBE_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        cookie_jar=aiohttp.DummyCookieJar(),  # the apiserver sets none; skip the jar per request
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )


def connect() -> tuple[str, aiohttp.ClientSession] | None:
    """The same credentials before kopf runs (for controller.kube.crd_gate)."""
    info = _credentials(settings=kopf.OperatorSettings())
    return (info.server, _session(info)) if info is not None else None
