"""`--gcp-transport rest` (CONTRACT §6.2) end to end: the controller speaks only REST to the
emulator's `--rest-port` (v2 services, getIamPolicy/setIamPolicy, operations, and IAM admin v1
`GET /v1/projects/-/serviceAccounts/{email}`), on the real control plane.

The emulator counts a REST call under the same method name as its gRPC twin (the REST surface's
route table), so the API economy is asserted exactly as for gRPC: a steady check is one
GetService and one GetIamPolicy. The drift here is made over REST too, with the same adapter
(tests/fixtures/drift.py on `make_clients(url, "rest")`), so that its UpdateService operation
and SetIamPolicy are used the way a REST user of the google clients uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2

from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.clients import make_clients
from controller.gcp.gateway import Gateway
from tests.fixtures import drift
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.drift import resource
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.orch import (
    FOREIGN,
    MEMBER,
    MODE_VALUE,
    OTHER_ROLE,
    PROJECT,
    REGION,
    ROLE,
    SA,
    Orch,
    deploy_service,
)
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

RUN = "google.cloud.run.v2.Services/"
GET_SA = "google.iam.admin.v1.IAM/GetServiceAccount"
REST = [{"rest_port": 0}]


@pytest.mark.parametrize("fresh_emulator", REST, indirect=True)
async def test_controller_over_rest_reaches_ready_repairs_drift_and_reads_twice_per_check(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
) -> None:
    emu = fresh_emulator
    orch = Orch(crds, namespace, emu, deploy_service(emu, "rest"))
    with own_controller(
        "controller.log",
        gcp_endpoint=emu.rest_url,  # no gRPC endpoint at all: every call is REST
        extra_args=["--gcp-transport", "rest"],
    ) as proc:
        orch.controller = proc
        emu.admin.reset_calls()
        orch.apply()
        orch.wait("True", timeout=60)
        drift.assert_spec_held(orch.state())
        first = emu.admin.calls()
        # The first sync went through every REST route the controller uses: the service account
        # check (IAM admin v1), the reads, the write, the operation and the invoker grant.
        for method in (GET_SA, f"{RUN}GetService", f"{RUN}GetIamPolicy"):
            assert first.get(method, 0) >= 1, first
        assert first.get(f"{RUN}UpdateService") == 1, first
        assert first.get(f"{RUN}SetIamPolicy") == 1, first

        # Steady: nothing but GetService + GetIamPolicy, one of each per check.
        emu.admin.reset_calls()
        wait_for(
            lambda: emu.admin.calls().get(f"{RUN}GetService", 0) >= 3,
            30,
            interval=0.3,
            message="three steady checks",
        )
        calls = emu.admin.calls()
        assert set(calls) <= {f"{RUN}GetService", f"{RUN}GetIamPolicy"}, calls
        assert abs(calls[f"{RUN}GetService"] - calls[f"{RUN}GetIamPolicy"]) <= 1, calls

        # Env drift, made over REST: repaired, someone else's variables kept.
        await drift.wipe_env(emu.rest_url, orch.service, "rest")
        drift.assert_env_restored(orch)

        # Invoker drift, made over REST: restored, the foreign member and other role kept.
        await drift.drop_member(emu.rest_url, orch.service, MEMBER, "rest")
        drift.assert_invoker_restored(orch, MEMBER, "invoker restored over REST")

        started = [line for line in proc.log_lines() if line.get("event") == "started"]
        assert started and started[0].get("gcp_transport") == "rest", started
        assert MODE_VALUE not in proc.log_text()


@pytest.mark.parametrize("fresh_emulator", REST, indirect=True)
async def test_rest_errors_are_typed_as_grpc_would_type_them(
    fresh_emulator: EmulatorProcess,
) -> None:
    """api-core types a REST error by its HTTP status alone (409 = Conflict); the adapter
    retypes it by Google's JSON `error.status`, so a stale IAM etag is `Aborted` (which the
    gateway's read-modify-write retries) and a missing service is `NotFound`."""
    emu = fresh_emulator
    emu.admin.put_service_account(SA)
    emu.admin.put_service(PROJECT, REGION, "errs", invokers={ROLE: [FOREIGN]})
    async with make_clients(emu.rest_url, "rest") as clients:
        get = iam_policy_pb2.GetIamPolicyRequest(resource=resource("errs"))
        stale: Any = await clients.run.get_iam_policy(request=get, retry=None, timeout=10)
        fresh: Any = await clients.run.get_iam_policy(request=get, retry=None, timeout=10)
        fresh.bindings.add(role=OTHER_ROLE, members=[FOREIGN])
        write = iam_policy_pb2.SetIamPolicyRequest(resource=resource("errs"), policy=fresh)
        await clients.run.set_iam_policy(request=write, retry=None, timeout=10)
        stale_write = iam_policy_pb2.SetIamPolicyRequest(resource=resource("errs"), policy=stale)
        with pytest.raises(gexc.Aborted):
            await clients.run.set_iam_policy(request=stale_write, retry=None, timeout=10)
        with pytest.raises(gexc.NotFound):
            await clients.run.get_service(
                request=run_v2.GetServiceRequest(name=resource("missing")), retry=None, timeout=10
            )

        gateway = Gateway(clients)
        assert await gateway.service_account_exists(SA)
        assert not await gateway.service_account_exists(f"nobody@{PROJECT}.iam.gserviceaccount.com")
    assert emu.admin.calls()[GET_SA] == 2


def test_rest_transport_refuses_a_grpc_endpoint() -> None:
    from controller.settings import Settings

    with pytest.raises(SystemExit):
        Settings.from_cli(["--gcp-transport", "rest", "--gcp-endpoint", "127.0.0.1:1"], {})
    with pytest.raises(SystemExit):
        Settings.from_cli(["--gcp-endpoint", "http://127.0.0.1:1"], {})
    ok = Settings.from_cli(["--gcp-transport", "rest", "--gcp-endpoint", "http://127.0.0.1:1"], {})
    assert (ok.gcp_transport, ok.gcp_endpoint) == ("rest", "http://127.0.0.1:1")
    assert Settings.from_cli([], {}).gcp_transport == "grpc"
