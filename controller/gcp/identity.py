"""Per-namespace Google identities: one Gateway per impersonated service account, cached.

A namespace's Orchestrators act as the account its ``runwarden.dev/google-service-account``
annotation names (controller.domain.tenancy), by service account impersonation: google-auth's
``impersonated_credentials.Credentials`` calls IAM Credentials ``GenerateAccessToken`` with the
controller's own credentials, which need only ``roles/iam.serviceAccountTokenCreator`` on each
tenant account (https://cloud.google.com/iam/docs/service-account-impersonation). The credentials
are kept per account and refreshed by google-auth before their token expires (``valid`` turns
False within its refresh threshold of the expiry), so a token is generated about once an hour
per account, not per call.

Against the emulator, ``iam_credentials_endpoint`` is its base URL (the emulator serves
``/v1/projects/-/serviceAccounts/{email}:generateAccessToken`` on its admin port) and the
controller's own token is a fixed placeholder: the emulator attributes calls made with a token
it issued to the impersonated account.
"""

from __future__ import annotations

from typing import Any

import google.auth
import google.auth.credentials
from google.auth import impersonated_credentials
from google.oauth2 import credentials as oauth2_credentials

from controller.gcp.budget import Pacer
from controller.gcp.clients import Clients, make_clients
from controller.gcp.gateway import Gateway
from controller.obs import logs

log = logs.get("runwarden.gcp")

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
TOKEN_LIFETIME = 3600  # seconds; Google's default maximum without the org policy extension
GOOGLE_IAM_CREDENTIALS = "https://iamcredentials.googleapis.com"
# What the controller presents to the emulator's GenerateAccessToken as its own identity.
EMULATOR_SOURCE_TOKEN = "runwarden-controller"


def token_url(base: str, account: str) -> str:
    """GenerateAccessToken's REST URL for ``account`` under ``base``."""
    return f"{base.rstrip('/')}/v1/projects/-/serviceAccounts/{account}:generateAccessToken"


class Gateways:
    """The process's own gateway, and one per tenant account (made on first use)."""

    def __init__(
        self,
        endpoint: str | None,
        pacer: Pacer,
        *,
        transport: str = "grpc",
        iam_credentials_endpoint: str | None = None,
        gateway_options: dict[str, Any] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._transport = transport
        self._pacer = pacer
        self._iam_base = iam_credentials_endpoint
        self._options = gateway_options or {}
        self._source: google.auth.credentials.Credentials | None = None
        self.clients: dict[str | None, Clients] = {None: make_clients(endpoint, transport)}
        self._gateways: dict[str | None, Gateway] = {
            None: Gateway(self.clients[None], pacer=pacer, **self._options)
        }

    @property
    def default(self) -> Gateway:
        return self._gateways[None]

    def for_account(self, account: str | None) -> Gateway:
        """The gateway acting as ``account`` (None: the controller's own identity)."""
        found = self._gateways.get(account)
        if found is None:
            assert account is not None
            clients = make_clients(self._endpoint, self._transport, self.credentials(account))
            self.clients[account] = clients
            found = self._gateways[account] = Gateway(clients, pacer=self._pacer, **self._options)
            log.info("identity_added", google_service_account=account)
        return found

    def credentials(self, account: str) -> impersonated_credentials.Credentials:
        """Impersonated credentials for ``account`` (no call yet: the first use refreshes)."""
        override = token_url(self._iam_base, account) if self._iam_base else None
        return impersonated_credentials.Credentials(  # type: ignore[no-untyped-call]
            source_credentials=self._source_credentials(),
            target_principal=account,
            target_scopes=SCOPES,
            lifetime=TOKEN_LIFETIME,
            iam_endpoint_override=override,
        )

    def _source_credentials(self) -> google.auth.credentials.Credentials:
        if self._source is None:
            if self._endpoint is not None:
                self._source = oauth2_credentials.Credentials(  # type: ignore[no-untyped-call]
                    token=EMULATOR_SOURCE_TOKEN
                )
            else:
                self._source, _ = google.auth.default(scopes=SCOPES)
        return self._source

    async def close(self) -> None:
        """Stop every gateway's background rollout waits, then close every client."""
        for gateway in self._gateways.values():
            await gateway.close()
        self._gateways.clear()
        for clients in self.clients.values():
            await clients.close()
        self.clients.clear()
