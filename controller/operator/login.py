"""kopf's Kubernetes credentials: the ones controller.kube.credentials loads with the
``kubernetes`` package (exec plugins such as GKE's, auth providers, token refresh), shared with
the status writer and the CRD gate.

Why not ``kopf.login_via_client``: it does use the ``kubernetes`` package, but it loads into the
package's process-wide default configuration, on the event loop (an exec plugin is a subprocess
that may take seconds), and hands kopf no expiry, so an exec plugin's token was only replaced
after the apiserver had refused it. Here the loading runs in a thread, and kopf gets the token's
expiry: kopf calls this handler again before it expires (and after any 401).
"""

from __future__ import annotations

from typing import Any

import kopf

from controller.kube import credentials
from controller.obs import logs

log = logs.get("runwarden.kube")


@kopf.on.login()
async def login(**_: Any) -> kopf.AiohttpSession | None:
    """Fresh credentials for kopf (first login, expiry, or a 401), in a session with a bounded
    connection pool (see credentials.KUBE_CONNECTIONS)."""
    try:
        creds = await credentials.SOURCE.get(fresh=True)
    except credentials.NoCredentials as exc:
        log.error("kube_credentials_missing", message=str(exc))
        return None
    return kopf.AiohttpSession(
        server=creds.server,
        expiration=creds.expiration,
        priority=100,  # above kopf's own login handlers, were any registered
        aiohttp_session=credentials.session(creds, credentials.KUBE_CONNECTIONS),
    )


@kopf.on.probe(id="kubeCredentials")
def kube_credentials(**_: Any) -> str:
    """Liveness fails once the apiserver has refused the controller's credentials."""
    if credentials.REFUSALS.failed:
        raise kopf.PermanentError(credentials.REFUSALS.message)
    return "ok"
