"""The one place the Google API clients are built: real Google (ADC) or the local emulator,
over gRPC (the default) or REST (``--gcp-transport rest``, for networks that block HTTP/2 gRPC).

Both transports give the gateway the same async face (``RunApi``, ``IamApi``): the same request
objects, the same replies, google.api_core exceptions typed by their gRPC status, and an
UpdateService operation whose ``result()`` is awaited.

- gRPC: the generated async clients (``ServicesAsyncClient``, ``IAMAsyncClient``).
- REST: google-cloud-run has only a synchronous REST client (``ServicesClient(transport="rest")``
  in 0.16); ``_RestRun`` runs each call in a thread of its own pool and polls the operation
  without holding a thread. google-cloud-iam's ``iam_admin_v1`` has no REST transport, so the one
  IAM call (GetServiceAccount) is ``GET https://iam.googleapis.com/v1/{name}``
  (https://cloud.google.com/iam/docs/reference/rest/v1/projects.serviceAccounts/get) through
  google-auth's ``AuthorizedSession``, its error through api-core's ``from_http_response``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import google.auth
import google.auth.exceptions
import grpc
import requests
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.transport import requests as google_requests
from google.auth.transport.requests import AuthorizedSession
from google.cloud import iam_admin_v1, run_v2
from google.cloud.iam_admin_v1.services.iam.transports.grpc_asyncio import IAMGrpcAsyncIOTransport
from google.cloud.run_v2.services.services.transports.grpc_asyncio import (
    ServicesGrpcAsyncIOTransport,
)
from google.longrunning import operations_pb2

T = TypeVar("T")

TRANSPORTS = ("grpc", "rest")
IAM_REST_ENDPOINT = "https://iam.googleapis.com"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
# Threads for REST calls (each holds one for the duration of one HTTP request; operations are
# polled without holding one).
_REST_THREADS = 16


# The signatures are the generated clients' (a ``timeout`` per call, hence the ASYNC109 noqa).


# Request metadata for writes (gRPC metadata; HTTP headers over REST).
Metadata = Sequence[tuple[str, str]]


class RunApi(Protocol):
    """The Cloud Run v2 calls the gateway makes (``ServicesAsyncClient`` or ``_RestRun``)."""

    async def get_service(self, *, request: Any, retry: Any, timeout: Any) -> Any: ...  # noqa: ASYNC109

    async def update_service(
        self,
        *,
        request: Any,
        retry: Any,
        timeout: Any,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> Any: ...

    async def list_services(self, *, request: Any, retry: Any, timeout: Any) -> Any: ...  # noqa: ASYNC109

    async def get_iam_policy(self, *, request: Any, retry: Any, timeout: Any) -> Any: ...  # noqa: ASYNC109

    async def set_iam_policy(
        self,
        *,
        request: Any,
        retry: Any,
        timeout: Any,  # noqa: ASYNC109
        metadata: Metadata = (),
    ) -> Any: ...


class IamApi(Protocol):
    """The IAM admin v1 call the gateway makes (``IAMAsyncClient`` or ``_RestIam``)."""

    async def get_service_account(self, *, request: Any, retry: Any, timeout: Any) -> Any: ...  # noqa: ASYNC109


class _Closable(Protocol):
    """A transport's close(), as the grpc_asyncio transports implement it (the generated code
    leaves it unannotated): it returns the channel's close() coroutine."""

    def close(self) -> Awaitable[None]: ...


@dataclass
class Clients:
    """Cloud Run and IAM clients sharing a lifetime.

    Note: in google-cloud-run 0.16 `ServicesAsyncClient.wait_operation` returns raw bytes (its
    stub has no deserializer); wait on a write with `await (await op).result()` instead.
    """

    run: RunApi
    iam: IamApi
    endpoint: str | None = None
    transport: str = "grpc"
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        """Close both clients' channels or sessions."""
        for close in self.closers:
            await close()

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _BearerToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends ``credentials``' access token on a plaintext channel (to an emulator), refreshing it
    the way google-auth's gRPC plugin does for Google: when it is missing or within google-auth's
    refresh threshold of its expiry (``Credentials.valid``), before the call."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._lock = asyncio.Lock()

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        if not self._credentials.valid:
            async with self._lock:
                if not self._credentials.valid:
                    # The refresh is a blocking HTTP call (IAM Credentials GenerateAccessToken).
                    try:
                        await asyncio.to_thread(
                            self._credentials.refresh, google_requests.Request()
                        )
                    except google.auth.exceptions.RefreshError as exc:
                        # A PermissionDenied like Google's: the check reports PermissionDenied.
                        message = f"impersonation failed: {exc}"
                        raise gexc.PermissionDenied(message) from exc  # type: ignore[no-untyped-call]
        metadata = [*(client_call_details.metadata or ())]
        metadata.append(("authorization", f"Bearer {self._credentials.token}"))
        return await continuation(client_call_details._replace(metadata=metadata), request)


def _insecure_channel(
    host: str, bearer: Credentials | None = None, **kwargs: Any
) -> grpc.aio.Channel:
    """Channel factory for the transports: plaintext (emulator only), the transport's own
    ``credentials`` ignored; with ``bearer`` (an impersonated identity) each call carries its
    access token."""
    interceptors = [_BearerToken(bearer)] if bearer is not None else None
    return grpc.aio.insecure_channel(host, options=kwargs.get("options"), interceptors=interceptors)


def make_clients(
    endpoint: str | None, transport: str = "grpc", credentials: Credentials | None = None
) -> Clients:
    """Build both clients for ``transport`` ("grpc" or "rest"). ``endpoint`` means a local
    emulator: "HOST:PORT" for grpc, "http://HOST:PORT" (its REST port) for rest; None means
    Google. ``credentials`` None: Application Default Credentials (the emulator: none), else these
    (an impersonated tenant identity, controller.gcp.identity). Call inside a running event
    loop."""
    if transport == "rest":
        return _make_rest_clients(endpoint, credentials)
    if transport != "grpc":
        raise ValueError(f"--gcp-transport must be one of {', '.join(TRANSPORTS)}, not {transport}")
    if not endpoint:
        run = run_v2.ServicesAsyncClient(credentials=credentials)
        iam = iam_admin_v1.IAMAsyncClient(credentials=credentials)
    else:
        options = ClientOptions(api_endpoint=endpoint)
        channel = functools.partial(_insecure_channel, bearer=credentials)
        run = run_v2.ServicesAsyncClient(
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=options,
            transport=functools.partial(ServicesGrpcAsyncIOTransport, channel=channel),
        )
        iam = iam_admin_v1.IAMAsyncClient(
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=options,
            transport=functools.partial(IAMGrpcAsyncIOTransport, channel=channel),
        )
    closers = [cast(_Closable, run.transport).close, cast(_Closable, iam.transport).close]
    return Clients(run=run, iam=iam, endpoint=endpoint, transport="grpc", closers=closers)


# ---------------------------------------------------------------------- REST


def _make_rest_clients(endpoint: str | None, tenant: Credentials | None = None) -> Clients:
    """The REST clients; ``tenant``: an impersonated identity's credentials (controller.gcp.
    identity), sent as the bearer token of every call, Cloud Run's and IAM's alike."""
    executor = ThreadPoolExecutor(_REST_THREADS, thread_name_prefix="gcp-rest")
    credentials: Credentials
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(
                "--gcp-endpoint must be the emulator's REST URL (http://HOST:PORT) with "
                f"--gcp-transport rest, not {endpoint}"
            )
        credentials = tenant or AnonymousCredentials()  # type: ignore[no-untyped-call]
        sync_run = run_v2.ServicesClient(
            credentials=credentials,
            client_options=ClientOptions(api_endpoint=endpoint),
            transport="rest",
        )
        iam_base = endpoint.rstrip("/")
    else:
        if tenant is not None:
            credentials = tenant
        else:
            credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
        sync_run = run_v2.ServicesClient(credentials=credentials, transport="rest")
        iam_base = IAM_REST_ENDPOINT
    session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
    run = _RestRun(sync_run, executor)
    iam = _RestIam(session, iam_base, executor)

    async def close() -> None:
        sync_run.transport.close()  # type: ignore[no-untyped-call]
        session.close()  # type: ignore[no-untyped-call]
        executor.shutdown(wait=False, cancel_futures=True)

    return Clients(run=run, iam=iam, endpoint=endpoint, transport="rest", closers=[close])


def rest_error(exc: gexc.GoogleAPICallError) -> gexc.GoogleAPICallError:
    """A REST error typed as its gRPC status. api-core types a REST error by its HTTP status
    alone, so 409 is ``Conflict`` whether the body says ABORTED (an IAM etag conflict, which
    the gateway retries) or ALREADY_EXISTS, and 400 is ``BadRequest`` for INVALID_ARGUMENT and
    FAILED_PRECONDITION alike; Google's JSON error carries the gRPC status name in
    ``error.status`` (https://cloud.google.com/apis/design/errors#http_mapping)."""
    response = exc.response
    status = ""
    if isinstance(response, requests.Response):
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            status = str(body["error"].get("status", ""))
    code = getattr(grpc.StatusCode, status, None) if status else None
    if not isinstance(code, grpc.StatusCode) or exc.grpc_status_code == code:
        return exc
    retyped: gexc.GoogleAPICallError = gexc.from_grpc_status(  # type: ignore[no-untyped-call]
        code,
        exc.message,
        errors=exc.errors,
        details=exc.details,
        response=response,
        error_info=getattr(exc, "_error_info", None),
    )
    return retyped


async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
    """``fn()`` in a REST thread; its errors as the gRPC clients raise them."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(executor, fn)
    except gexc.GoogleAPICallError as exc:
        retyped = rest_error(exc)
        if retyped is exc:
            raise
        raise retyped from exc
    except requests.RequestException as exc:
        # A connection refused or reset: the gRPC clients raise UNAVAILABLE for these.
        raise gexc.ServiceUnavailable(f"REST call failed: {type(exc).__name__}") from exc  # type: ignore[no-untyped-call]


class _RestOperation:
    """An UpdateService operation of the sync REST client, awaited as the gateway awaits an
    ``AsyncOperation``: ``await result(timeout)``, ``.operation``, ``.metadata``."""

    def __init__(self, operation: Any, executor: ThreadPoolExecutor) -> None:
        self._op = operation
        self._executor = executor

    @property
    def operation(self) -> operations_pb2.Operation:
        op: operations_pb2.Operation = self._op.operation
        return op

    @property
    def metadata(self) -> Any:
        return self._op.metadata

    async def result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Poll (GetOperation; 0.1 s growing to 2 s apart, as the gateway tunes the gRPC
        operation) until done; then the result, or the operation's error as a
        ``GoogleAPICallError`` without a gRPC status, as ``AsyncOperation`` raises it."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = 0.1
        while not await _in_thread(self._executor, lambda: bool(self._op.done(retry=None))):
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"operation did not complete within {timeout} seconds")
            wait = delay if deadline is None else min(delay, max(deadline - loop.time(), 0))
            await asyncio.sleep(wait)
            delay = min(delay * 1.5, 2.0)
        try:
            return self._op.result(timeout=0)  # done: returns or raises at once, no call
        except gexc.GoogleAPICallError as exc:
            if isinstance(exc.response, operations_pb2.Operation):
                raise gexc.GoogleAPICallError(  # type: ignore[no-untyped-call]
                    exc.message, errors=exc.errors, response=exc.response
                ) from exc
            raise


class _OnePage:
    """A fetched page behind an async pager's ``pages``."""

    def __init__(self, page: Any) -> None:
        self._page = page

    @property
    async def pages(self) -> AsyncIterator[Any]:
        yield self._page


class _RestRun:
    """``RunApi`` over the synchronous REST ``ServicesClient``: each call is the client's own
    method of the same name with the same keyword arguments, run in a REST thread."""

    def __init__(self, client: run_v2.ServicesClient, executor: ThreadPoolExecutor) -> None:
        self._client = client
        self._executor = executor

    async def _call(self, method: Callable[..., T], **kwargs: Any) -> T:
        """``method(**kwargs)`` (the sync client's) in a REST thread."""
        return await _in_thread(self._executor, functools.partial(method, **kwargs))

    async def get_service(self, **kwargs: Any) -> Any:
        return await self._call(self._client.get_service, **kwargs)

    async def update_service(self, **kwargs: Any) -> Any:
        operation = await self._call(self._client.update_service, **kwargs)
        return _RestOperation(operation, self._executor)

    async def list_services(self, **kwargs: Any) -> Any:
        """One page, as an async pager's ``pages`` yields it (the page is the response)."""

        def first_page() -> Any:
            return next(iter(self._client.list_services(**kwargs).pages))

        return _OnePage(await _in_thread(self._executor, first_page))

    async def get_iam_policy(self, **kwargs: Any) -> Any:
        return await self._call(self._client.get_iam_policy, **kwargs)

    async def set_iam_policy(self, **kwargs: Any) -> Any:
        return await self._call(self._client.set_iam_policy, **kwargs)


class _RestIam:
    """``IamApi`` over IAM admin v1 REST (no generated REST client exists for it)."""

    def __init__(self, session: AuthorizedSession, base: str, executor: ThreadPoolExecutor) -> None:
        self._session = session
        self._base = base
        self._executor = executor

    async def get_service_account(self, *, request: Any, retry: Any, timeout: Any) -> Any:  # noqa: ASYNC109
        url = f"{self._base}/v1/{request.name}"
        seconds = timeout if isinstance(timeout, (int, float)) else None

        def call() -> Any:
            response = self._session.get(url, timeout=seconds)
            if response.status_code >= 400:
                raise gexc.from_http_response(response)  # type: ignore[no-untyped-call]
            return iam_admin_v1.ServiceAccount.from_json(response.text, ignore_unknown_fields=True)

        return await _in_thread(self._executor, call)
