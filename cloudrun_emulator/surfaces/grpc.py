"""The gRPC face: generic method handlers over the run_v2 / google.iam.v1 / longrunning /
iam.admin.v1 message types, so the unmodified Google client libraries talk to the emulator.

Requests are parsed with the protobuf classes behind the proto-plus types (`Type.pb()`), which is
what proto-plus `deserialize` does minus the wrapper; responses that are read often (GetService)
are served from a cached serialization.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.cloud import iam_admin_v1, iam_credentials_v1, run_v2
from google.iam.v1 import iam_policy_pb2
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError

from ..control import Controls
from ..errors import ApiError
from ..store import Store

log = logging.getLogger("cloudrun_emulator")

DEFAULT_PRINCIPAL = "runwarden@example.com"
PRINCIPAL_HEADER = "x-emulator-principal"

RUN = "google.cloud.run.v2.Services"
OPS = "google.longrunning.Operations"
IAM = "google.iam.admin.v1.IAM"
IAM_CREDENTIALS = "google.iam.credentials.v1.IAMCredentials"
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default=DEFAULT_PRINCIPAL)
# A resource name's project: every Cloud Run and operation name starts projects/{project}/.
_PROJECT_OF_NAME = re.compile(r"^projects/([^/]+)/")


class _Malformed:
    """Stands in for a request whose bytes did not parse, so the handler can refuse it."""


MALFORMED = _Malformed()


def _deserializer(request_cls: Any) -> Callable[[bytes], Any]:
    parse = request_cls.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return MALFORMED

    return deserialize


def _serialize(message: Any) -> bytes:
    return message if type(message) is bytes else message.SerializeToString()


def _principal(context: grpc.aio.ServicerContext) -> str:
    """Who makes the call (set by _wrap): an impersonated account whose token the call presents,
    else the x-emulator-principal metadata, else the default."""
    return _CALLER.get()


def caller(store: Store, metadata: Any) -> str:
    """The principal of a call from its metadata (see _principal)."""
    header = DEFAULT_PRINCIPAL
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            account = store.credentials.principal_of(value[len("Bearer ") :].strip())
            if account is not None:
                return account
        elif key == PRINCIPAL_HEADER and isinstance(value, str) and value:
            header = value
    return header


def _resource_of(request: Any) -> str | None:
    """The resource a request names (name, parent, resource, or service.name)."""
    for field in ("name", "parent", "resource"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return value
    service = getattr(request, "service", None)
    value = getattr(service, "name", None)
    return value if isinstance(value, str) and value else None


class Api:
    """Method implementations; each takes (request, context) and returns a message or bytes."""

    def __init__(self, store: Store, controls: Controls) -> None:
        self.store = store
        self.controls = controls

    # google.cloud.run.v2.Services
    def get_service(self, req: Any, ctx: Any) -> bytes:
        return self.store.services.get_wire(req.name)

    def list_services(self, req: Any, ctx: Any) -> Any:
        return self.store.services.list_page(req.parent, req.page_size, req.page_token)

    def create_service(self, req: Any, ctx: Any) -> Any:
        return self.store.services.create(
            req.parent, req.service_id, req.service, req.validate_only, _principal(ctx), req
        )

    def update_service(self, req: Any, ctx: Any) -> Any:
        if not req.HasField("service"):
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "The request is missing the required field 'service'.",
            )
        return self.store.services.update(
            req.service, req.allow_missing, req.validate_only, _principal(ctx), req
        )

    def delete_service(self, req: Any, ctx: Any) -> Any:
        return self.store.services.delete(
            req.name, req.etag, req.validate_only, _principal(ctx), req
        )

    def get_iam_policy(self, req: Any, ctx: Any) -> Any:
        return self.store.policies.get(req.resource)

    def set_iam_policy(self, req: Any, ctx: Any) -> Any:
        if not req.HasField("policy"):
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "The request is missing the required field 'policy'.",
            )
        return self.store.policies.set(
            req.resource, req.policy, list(req.update_mask.paths), _principal(ctx), req
        )

    def test_iam_permissions(self, req: Any, ctx: Any) -> Any:
        granted = self.store.policies.test_permissions(req.resource, list(req.permissions))
        return iam_policy_pb2.TestIamPermissionsResponse(permissions=granted)

    # google.longrunning.Operations
    def get_operation(self, req: Any, ctx: Any) -> Any:
        return self.store.operations.get(req.name)

    async def wait_operation(self, req: Any, ctx: Any) -> Any:
        timeout = None
        if req.HasField("timeout"):
            timeout = req.timeout.seconds + req.timeout.nanos / 1e9
        return await self.store.operations.wait(req.name, timeout)

    def delete_operation(self, req: Any, ctx: Any) -> Any:
        self.store.operations.delete(req.name)
        return empty_pb2.Empty()

    # google.iam.admin.v1.IAM
    def get_service_account(self, req: Any, ctx: Any) -> Any:
        return self.store.accounts.get(req.name)

    def list_service_accounts(self, req: Any, ctx: Any) -> Any:
        return self.store.accounts.list_page(req.name, req.page_size, req.page_token)

    # google.iam.credentials.v1.IAMCredentials
    def generate_access_token(self, req: Any, ctx: Any) -> Any:
        lifetime = req.lifetime.seconds if req.HasField("lifetime") else None
        token, expires = self.store.credentials.generate(req.name, lifetime)
        resp = iam_credentials_v1.GenerateAccessTokenResponse.pb()(access_token=token)
        resp.expire_time.FromSeconds(int(expires))
        log.info("access_token_generated name=%s caller=%s", req.name, _principal(ctx))
        return resp


def _methods(api: Api) -> dict[str, dict[str, tuple[Callable[..., Any], Any, bool]]]:
    """service -> method -> (implementation, request class, is_async)."""
    return {
        RUN: {
            "GetService": (api.get_service, run_v2.GetServiceRequest.pb(), False),
            "ListServices": (api.list_services, run_v2.ListServicesRequest.pb(), False),
            "CreateService": (api.create_service, run_v2.CreateServiceRequest.pb(), False),
            "UpdateService": (api.update_service, run_v2.UpdateServiceRequest.pb(), False),
            "DeleteService": (api.delete_service, run_v2.DeleteServiceRequest.pb(), False),
            "GetIamPolicy": (api.get_iam_policy, iam_policy_pb2.GetIamPolicyRequest, False),
            "SetIamPolicy": (api.set_iam_policy, iam_policy_pb2.SetIamPolicyRequest, False),
            "TestIamPermissions": (
                api.test_iam_permissions,
                iam_policy_pb2.TestIamPermissionsRequest,
                False,
            ),
        },
        OPS: {
            "GetOperation": (api.get_operation, operations_pb2.GetOperationRequest, False),
            "WaitOperation": (api.wait_operation, operations_pb2.WaitOperationRequest, True),
            "DeleteOperation": (api.delete_operation, operations_pb2.DeleteOperationRequest, False),
        },
        IAM_CREDENTIALS: {
            "GenerateAccessToken": (
                api.generate_access_token,
                iam_credentials_v1.GenerateAccessTokenRequest.pb(),
                False,
            ),
        },
        IAM: {
            "GetServiceAccount": (
                api.get_service_account,
                iam_admin_v1.GetServiceAccountRequest.pb(),
                False,
            ),
            "ListServiceAccounts": (
                api.list_service_accounts,
                iam_admin_v1.ListServiceAccountsRequest.pb(),
                False,
            ),
        },
    }


def _wrap(
    full_name: str, impl: Callable[..., Any], is_async: bool, controls: Controls, store: Store
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Count the call, apply faults and quota, find the caller and hold it to its project grants
    (store.credentials), translate ApiError into a gRPC status."""
    calls = controls.calls
    by_principal = controls.calls_by_principal
    granted = full_name.startswith((RUN, OPS))  # grants are about projects' Cloud Run resources

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        calls[full_name] = calls.get(full_name, 0) + 1
        try:
            # The caller first: an expired or unknown token is UNAUTHENTICATED (an ApiError).
            principal = caller(store, context.invocation_metadata())
            _CALLER.set(principal)  # each call runs in its own task: its own context
            mine = by_principal.setdefault(principal, {})
            mine[full_name] = mine.get(full_name, 0) + 1
            if request is MALFORMED:
                raise ApiError(
                    grpc.StatusCode.INVALID_ARGUMENT, "Invalid request: the message did not parse."
                )
            if controls.faults.active:
                delay, error = controls.fault_for(full_name)
                if delay:
                    await asyncio.sleep(delay)
                if error is not None:
                    raise error
            if controls.quota.active:
                controls.quota.check(full_name)
            if granted and store.credentials.grants:
                resource = _resource_of(request) or ""
                m = _PROJECT_OF_NAME.match(resource)
                store.credentials.check(principal, m.group(1) if m else None, resource)
            if is_async:
                return await impl(request, context)
            return impl(request, context)
        except ApiError as e:
            await context.abort(e.code, e.message, e.trailing_metadata)
        except Exception:
            log.exception("grpc_handler_failed method=%s", full_name)
            await context.abort(grpc.StatusCode.INTERNAL, "Internal error encountered.")

    return handler


def generic_handlers(store: Store, controls: Controls) -> list[grpc.GenericRpcHandler]:
    api = Api(store, controls)
    handlers = []
    for service, methods in _methods(api).items():
        table = {}
        for method, (impl, request_cls, is_async) in methods.items():
            table[method] = grpc.unary_unary_rpc_method_handler(
                _wrap(f"{service}/{method}", impl, is_async, controls, store),
                request_deserializer=_deserializer(request_cls),
                response_serializer=_serialize,
            )
        handlers.append(grpc.method_handlers_generic_handler(service, table))
    return handlers


async def start_grpc(
    store: Store, controls: Controls, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
        ]
    )
    server.add_generic_rpc_handlers(generic_handlers(store, controls))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    return server, bound
