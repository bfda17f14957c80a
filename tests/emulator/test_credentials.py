"""Impersonation against the emulator: IAM Credentials GenerateAccessToken (gRPC and the REST path
google-auth's impersonated_credentials uses), calls attributed to the impersonated account, and
project grants that refuse a principal outside its projects.

Everything goes through the real clients: google-auth's ``impersonated_credentials`` (via
controller.gcp.identity, the controller's own wiring), google-cloud-iam's IAMCredentials client
and google-cloud-run's ServicesAsyncClient.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import requests
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import iam_credentials_v1, run_v2
from google.protobuf import duration_pb2

from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.budget import Pacer
from controller.gcp.clients import make_clients
from controller.gcp.identity import Gateways
from tests.fixtures.wait import wait_for

RUN_V2 = "google.cloud.run.v2.Services"  # the emulator's call counters name the gRPC method
TENANT_A = "tenant-a-prj"
TENANT_B = "tenant-b-prj"
REGION = "us-west2"
SA_A = f"runner@{TENANT_A}.iam.gserviceaccount.com"
SA_B = f"runner@{TENANT_B}.iam.gserviceaccount.com"


def _name(project: str, service: str) -> str:
    return f"projects/{project}/locations/{REGION}/services/{service}"


def _setup(emu: EmulatorProcess) -> None:
    for sa in (SA_A, SA_B):
        emu.admin.put_service_account(sa)
    for project in (TENANT_A, TENANT_B):
        emu.admin.put_service(project, REGION, "svc", env={"A": "1"})


def _iam_credentials(emu: EmulatorProcess) -> iam_credentials_v1.IAMCredentialsAsyncClient:
    from google.cloud.iam_credentials_v1.services.iam_credentials.transports.grpc_asyncio import (
        IAMCredentialsGrpcAsyncIOTransport,
    )

    channel = grpc.aio.insecure_channel(emu.grpc_endpoint)
    return iam_credentials_v1.IAMCredentialsAsyncClient(
        client_options=ClientOptions(api_endpoint=emu.grpc_endpoint),
        transport=IAMCredentialsGrpcAsyncIOTransport(
            channel=channel, credentials=AnonymousCredentials()
        ),
    )


async def test_generate_access_token_over_grpc(fresh_emulator: EmulatorProcess) -> None:
    _setup(fresh_emulator)
    client = _iam_credentials(fresh_emulator)
    resp = await client.generate_access_token(
        name=f"projects/-/serviceAccounts/{SA_A}",
        scope=["https://www.googleapis.com/auth/cloud-platform"],
        lifetime=duration_pb2.Duration(seconds=600),
    )
    assert resp.access_token.startswith("ya29.")
    remaining = resp.expire_time.timestamp() - time.time()
    assert 500 < remaining <= 601
    with pytest.raises(gexc.NotFound, match="nobody@"):
        await client.generate_access_token(
            name="projects/-/serviceAccounts/nobody@tenant-a-prj.iam.gserviceaccount.com",
            scope=["https://www.googleapis.com/auth/cloud-platform"],
        )
    with pytest.raises(gexc.InvalidArgument, match="projects/-/serviceAccounts"):
        await client.generate_access_token(
            name=f"projects/{TENANT_A}/serviceAccounts/{SA_A}",
            scope=["https://www.googleapis.com/auth/cloud-platform"],
        )
    with pytest.raises(gexc.InvalidArgument, match="3600s"):
        await client.generate_access_token(
            name=f"projects/-/serviceAccounts/{SA_A}",
            scope=["https://www.googleapis.com/auth/cloud-platform"],
            lifetime=duration_pb2.Duration(seconds=7200),
        )


async def test_impersonated_writes_carry_the_account(fresh_emulator: EmulatorProcess) -> None:
    """google-auth impersonated credentials -> the emulator's REST GenerateAccessToken; the
    UpdateService made with that token is the account's (lastModifier), the one made without
    is the default principal's."""
    _setup(fresh_emulator)
    gateways = Gateways(
        fresh_emulator.grpc_endpoint, Pacer(), iam_credentials_endpoint=fresh_emulator.admin_url
    )
    try:
        gateways.for_account(SA_A)
        run = gateways.clients[SA_A].run
        svc = await run.get_service(name=_name(TENANT_A, "svc"))
        svc.template.containers[0].env.append(run_v2.EnvVar(name="B", value="2"))
        await (await run.update_service(service=svc)).result()
        got = fresh_emulator.admin.get_service(TENANT_A, REGION, "svc")
        assert got["lastModifier"] == SA_A
        assert got["env"] == {"A": "1", "B": "2"}

        own = gateways.clients[None].run
        svc = await own.get_service(name=_name(TENANT_A, "svc"))
        svc.template.containers[0].env.append(run_v2.EnvVar(name="C", value="3"))
        await (await own.update_service(service=svc)).result()
        assert fresh_emulator.admin.get_service(TENANT_A, REGION, "svc")["lastModifier"] == (
            "runwarden@example.com"
        )
    finally:
        await gateways.close()


async def test_grants_refuse_another_tenants_project(fresh_emulator: EmulatorProcess) -> None:
    """A principal with grants is PERMISSION_DENIED outside them, reads and writes alike, even
    with a valid token: the tenant account cannot touch the other tenant's project."""
    _setup(fresh_emulator)
    fresh_emulator.admin.set_grants(SA_A, [TENANT_A])
    fresh_emulator.admin.set_grants(SA_B, [TENANT_B])
    gateways = Gateways(
        fresh_emulator.grpc_endpoint, Pacer(), iam_credentials_endpoint=fresh_emulator.admin_url
    )
    try:
        gateways.for_account(SA_A)
        run = gateways.clients[SA_A].run
        await run.get_service(name=_name(TENANT_A, "svc"))  # its own project: allowed
        with pytest.raises(gexc.PermissionDenied, match=TENANT_B):
            await run.get_service(name=_name(TENANT_B, "svc"))
        with pytest.raises(gexc.PermissionDenied, match=TENANT_B):
            await run.get_iam_policy(request={"resource": _name(TENANT_B, "svc")})
        svc = run_v2.Service(name=_name(TENANT_B, "svc"))
        with pytest.raises(gexc.PermissionDenied):
            await run.update_service(service=svc)
        # The controller's own identity has no grants: unrestricted (the emulator's default).
        await gateways.clients[None].run.get_service(name=_name(TENANT_B, "svc"))
        assert fresh_emulator.admin.grants()["grants"] == {
            SA_A: [TENANT_A],
            SA_B: [TENANT_B],
        }
    finally:
        await gateways.close()


async def test_tokens_are_cached_and_refreshed_before_expiry(
    fresh_emulator: EmulatorProcess,
) -> None:
    """One token serves many calls while it is fresh; a token within google-auth's refresh
    threshold of its expiry (here: every token, at most 200 s long) is replaced before the call."""
    _setup(fresh_emulator)
    gateways = Gateways(
        fresh_emulator.grpc_endpoint, Pacer(), iam_credentials_endpoint=fresh_emulator.admin_url
    )
    try:
        gateways.for_account(SA_A)
        run = gateways.clients[SA_A].run
        for _ in range(3):
            await run.get_service(name=_name(TENANT_A, "svc"))
        assert fresh_emulator.admin.grants()["tokensIssued"] == {SA_A: 1}

        fresh_emulator.admin.set_token_lifetime(200)
        gateways.for_account(SA_B)
        run_b = gateways.clients[SA_B].run
        for _ in range(3):
            await run_b.get_service(name=_name(TENANT_B, "svc"))
        assert fresh_emulator.admin.grants()["tokensIssued"][SA_B] == 3
    finally:
        await gateways.close()


async def test_expired_token_is_unauthenticated(fresh_emulator: EmulatorProcess) -> None:
    _setup(fresh_emulator)
    fresh_emulator.admin.set_token_lifetime(1)
    client = _iam_credentials(fresh_emulator)
    resp = await client.generate_access_token(
        name=f"projects/-/serviceAccounts/{SA_A}",
        scope=["https://www.googleapis.com/auth/cloud-platform"],
    )
    wait_for(
        lambda: resp.expire_time.timestamp() < time.time(),
        timeout=10,
        message="the token to expire",
    )
    run = make_clients(fresh_emulator.grpc_endpoint).run
    with pytest.raises(gexc.Unauthenticated):
        await run.get_service(
            name=_name(TENANT_A, "svc"),
            metadata=[("authorization", f"Bearer {resp.access_token}")],
        )


async def test_impersonating_an_unknown_account_is_permission_denied(
    fresh_emulator: EmulatorProcess,
) -> None:
    """google-auth's refresh fails (the emulator answers 404 as Google does for an unknown
    account); the controller's clients turn that into PermissionDenied naming impersonation."""
    _setup(fresh_emulator)
    gateways = Gateways(
        fresh_emulator.grpc_endpoint, Pacer(), iam_credentials_endpoint=fresh_emulator.admin_url
    )
    try:
        gateways.for_account("ghost@tenant-a-prj.iam.gserviceaccount.com")
        run = gateways.clients["ghost@tenant-a-prj.iam.gserviceaccount.com"].run
        with pytest.raises(gexc.PermissionDenied, match="impersonation failed"):
            await run.get_service(name=_name(TENANT_A, "svc"))
    finally:
        await gateways.close()


@pytest.mark.parametrize("fresh_emulator", [{"rest_port": 0}], indirect=True)
async def test_impersonation_over_rest_is_attributed_and_held_to_grants(
    fresh_emulator: EmulatorProcess,
) -> None:
    """--gcp-transport rest with an impersonated tenant: the REST surface, like the gRPC one,
    counts and attributes the token's calls to the account (lastModifier), refuses the other
    tenant's project, and answers an expired token with 401 UNAUTHENTICATED."""
    _setup(fresh_emulator)
    fresh_emulator.admin.set_grants(SA_A, [TENANT_A])
    gateways = Gateways(
        fresh_emulator.rest_url,
        Pacer(),
        iam_credentials_endpoint=fresh_emulator.admin_url,
        transport="rest",
    )
    try:
        gateways.for_account(SA_A)
        # The REST adapter, called as the controller's gateway calls it.
        run = gateways.clients[SA_A].run
        call = {"retry": None, "timeout": 30}
        svc = await run.get_service(request={"name": _name(TENANT_A, "svc")}, **call)
        svc.template.containers[0].env.append(run_v2.EnvVar(name="B", value="2"))
        await (await run.update_service(request={"service": svc}, **call)).result()
        assert fresh_emulator.admin.get_service(TENANT_A, REGION, "svc")["lastModifier"] == SA_A
        mine = fresh_emulator.admin.calls_by_principal()[SA_A]
        assert mine[f"{RUN_V2}/GetService"] >= 1 and mine[f"{RUN_V2}/UpdateService"] == 1
        with pytest.raises(gexc.PermissionDenied, match=TENANT_B):
            await run.get_service(request={"name": _name(TENANT_B, "svc")}, **call)
    finally:
        await gateways.close()

    fresh_emulator.admin.set_token_lifetime(1)
    resp = await _iam_credentials(fresh_emulator).generate_access_token(
        name=f"projects/-/serviceAccounts/{SA_B}",
        scope=["https://www.googleapis.com/auth/cloud-platform"],
    )
    wait_for(lambda: resp.expire_time.timestamp() < time.time(), 10, message="token expiry")
    url = f"{fresh_emulator.rest_url}/v2/{_name(TENANT_B, 'svc')}"
    headers = {"Authorization": f"Bearer {resp.access_token}"}
    refused = await asyncio.to_thread(requests.get, url, headers=headers, timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"]["status"] == "UNAUTHENTICATED"
