"""The one place the Google API clients are built: real Google (ADC) or the local emulator."""

from __future__ import annotations

import functools
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import grpc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import iam_admin_v1, run_v2
from google.cloud.iam_admin_v1.services.iam.transports.grpc_asyncio import IAMGrpcAsyncIOTransport
from google.cloud.run_v2.services.services.transports.grpc_asyncio import (
    ServicesGrpcAsyncIOTransport,
)


class _Closable(Protocol):
    """A transport's close(), as the grpc_asyncio transports implement it (the generated code
    leaves it unannotated): it returns the channel's close() coroutine."""

    def close(self) -> Awaitable[None]: ...


@dataclass
class Clients:
    """Cloud Run and IAM async clients sharing a lifetime.

    Note: in google-cloud-run 0.16 `ServicesAsyncClient.wait_operation` returns raw bytes (its
    stub has no deserializer); wait on a write with `await (await op).result()` instead.
    """

    run: run_v2.ServicesAsyncClient
    iam: iam_admin_v1.IAMAsyncClient
    endpoint: str | None = None

    async def close(self) -> None:
        """Close both clients' channels."""
        await cast(_Closable, self.run.transport).close()
        await cast(_Closable, self.iam.transport).close()

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _insecure_channel(host: str, **kwargs: Any) -> grpc.aio.Channel:
    """Channel factory for the transports: plaintext, credentials ignored (emulator only)."""
    return grpc.aio.insecure_channel(host, options=kwargs.get("options"))


def make_clients(endpoint: str | None) -> Clients:
    """Build both async clients; `endpoint` ("HOST:PORT") means an insecure local emulator,
    None means Google with Application Default Credentials. Call inside a running event loop."""
    if not endpoint:
        return Clients(run=run_v2.ServicesAsyncClient(), iam=iam_admin_v1.IAMAsyncClient())
    options = ClientOptions(api_endpoint=endpoint)
    run = run_v2.ServicesAsyncClient(
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=options,
        transport=functools.partial(ServicesGrpcAsyncIOTransport, channel=_insecure_channel),
    )
    iam = iam_admin_v1.IAMAsyncClient(
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=options,
        transport=functools.partial(IAMGrpcAsyncIOTransport, channel=_insecure_channel),
    )
    return Clients(run=run, iam=iam, endpoint=endpoint)
