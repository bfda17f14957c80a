"""IAM on services (GetIamPolicy / SetIamPolicy / TestIamPermissions) and IAM service accounts."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gexc
from google.iam.v1 import policy_pb2
from google.type import expr_pb2

from .conftest import PROJECT, REGION

INVOKER = "roles/run.invoker"
CONCURRENT = (
    "There were concurrent policy changes. Please retry the whole read-modify-write with "
    "exponential backoff."
)


def members(policy: policy_pb2.Policy, role: str) -> list[str]:
    return sorted(
        m
        for b in policy.bindings
        if b.role == role and not b.condition.expression
        for m in b.members
    )


async def test_get_policy_shows_admin_invokers(clients, deploy):
    svc = deploy(invokers={INVOKER: ["serviceAccount:a@p.iam.gserviceaccount.com", "user:b@x.com"]})
    policy = await clients.run.get_iam_policy(request={"resource": svc.name})
    assert members(policy, INVOKER) == [
        "serviceAccount:a@p.iam.gserviceaccount.com",
        "user:b@x.com",
    ]
    assert policy.etag
    assert policy.version == 1


async def test_read_modify_write_changes_the_etag_every_time(clients, deploy):
    svc = deploy(invokers={INVOKER: ["user:a@x.com"]})
    p1 = await clients.run.get_iam_policy(request={"resource": svc.name})
    p1.bindings[0].members.append("user:b@x.com")
    p2 = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": p1})
    assert p2.etag != p1.etag
    assert members(p2, INVOKER) == ["user:a@x.com", "user:b@x.com"]
    # Writing the same content again is still a write: new etag.
    p3 = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": p2})
    assert p3.etag not in (p1.etag, p2.etag)
    assert svc.get()["iam"] == {INVOKER: ["user:a@x.com", "user:b@x.com"]}
    assert svc.get()["etag"]  # the admin view carries the policy etag as a string


async def test_stale_policy_etag_is_aborted_with_googles_text(clients, deploy):
    svc = deploy(invokers={INVOKER: ["user:a@x.com"]})
    mine = await clients.run.get_iam_policy(request={"resource": svc.name})
    svc.admin.put_service(
        svc.project,
        svc.region,
        svc.service,
        invokers={INVOKER: ["user:a@x.com", "user:someone-else@x.com"]},
    )
    mine.bindings[0].members.append("user:mine@x.com")
    with pytest.raises(gexc.Aborted) as info:
        await clients.run.set_iam_policy(request={"resource": svc.name, "policy": mine})
    assert info.value.message == CONCURRENT
    assert svc.get()["iam"][INVOKER] == ["user:a@x.com", "user:someone-else@x.com"]


async def test_policy_without_etag_is_a_blind_overwrite(clients, deploy):
    svc = deploy(invokers={INVOKER: ["user:a@x.com"], "roles/run.developer": ["user:dev@x.com"]})
    blind = policy_pb2.Policy(bindings=[policy_pb2.Binding(role=INVOKER, members=["user:z@x.com"])])
    result = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": blind})
    assert members(result, INVOKER) == ["user:z@x.com"]
    assert members(result, "roles/run.developer") == []  # whole bindings list replaced
    assert result.etag


async def test_other_roles_and_conditions_survive_a_careful_write(clients, deploy):
    svc = deploy(invokers={INVOKER: ["user:a@x.com"], "roles/run.developer": ["user:dev@x.com"]})
    policy = await clients.run.get_iam_policy(
        request={"resource": svc.name, "options": {"requested_policy_version": 3}}
    )
    policy.version = 3
    policy.bindings.append(
        policy_pb2.Binding(
            role="roles/run.viewer",
            members=["group:ops@x.com"],
            condition=expr_pb2.Expr(
                title="until-2030", expression="request.time < timestamp('2030-01-01T00:00:00Z')"
            ),
        )
    )
    written = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": policy})
    assert written.version == 3

    again = await clients.run.get_iam_policy(
        request={"resource": svc.name, "options": {"requested_policy_version": 3}}
    )
    for b in again.bindings:
        if b.role == INVOKER:
            b.members.append("user:new@x.com")
    final = await clients.run.set_iam_policy(request={"resource": svc.name, "policy": again})
    assert members(final, "roles/run.developer") == ["user:dev@x.com"]
    conditional = [b for b in final.bindings if b.condition.expression]
    assert [(b.role, list(b.members), b.condition.title) for b in conditional] == [
        ("roles/run.viewer", ["group:ops@x.com"], "until-2030")
    ]
    assert svc.get()["iamConditional"][0]["condition"]["title"] == "until-2030"


async def test_conditions_need_policy_version_3(clients, deploy):
    svc = deploy()
    policy = policy_pb2.Policy(
        version=1,
        bindings=[
            policy_pb2.Binding(
                role=INVOKER,
                members=["user:a@x.com"],
                condition=expr_pb2.Expr(title="t", expression="true"),
            )
        ],
    )
    with pytest.raises(gexc.InvalidArgument, match="version 3"):
        await clients.run.set_iam_policy(request={"resource": svc.name, "policy": policy})


@pytest.mark.parametrize("member", ["alice@x.com", "user:", "robot:x@y.com"])
async def test_malformed_member_is_invalid_argument(clients, deploy, member):
    svc = deploy()
    policy = await clients.run.get_iam_policy(request={"resource": svc.name})
    policy.bindings.append(policy_pb2.Binding(role=INVOKER, members=[member]))
    with pytest.raises(gexc.InvalidArgument, match="type prefix"):
        await clients.run.set_iam_policy(request={"resource": svc.name, "policy": policy})


async def test_policy_of_unknown_service_is_not_found(clients):
    name = f"projects/{PROJECT}/locations/{REGION}/services/no-such-service"
    with pytest.raises(gexc.NotFound):
        await clients.run.get_iam_policy(request={"resource": name})
    with pytest.raises(gexc.NotFound):
        await clients.run.set_iam_policy(request={"resource": name, "policy": policy_pb2.Policy()})


async def test_test_iam_permissions(clients, deploy):
    svc = deploy()
    resp = await clients.run.test_iam_permissions(
        request={"resource": svc.name, "permissions": ["run.services.get", "run.services.update"]}
    )
    assert sorted(resp.permissions) == ["run.services.get", "run.services.update"]


async def test_get_service_account_by_both_name_forms(clients, emulator, unique_name):
    email = f"{unique_name('sa')}@{PROJECT}.iam.gserviceaccount.com"
    with pytest.raises(gexc.NotFound):
        await clients.iam.get_service_account(name=f"projects/-/serviceAccounts/{email}")
    emulator.admin.put_service_account(email)
    for name in (
        f"projects/-/serviceAccounts/{email}",
        f"projects/{PROJECT}/serviceAccounts/{email}",
    ):
        sa = await clients.iam.get_service_account(name=name)
        assert sa.email == email
        assert sa.name == f"projects/{PROJECT}/serviceAccounts/{email}"
        assert sa.project_id == PROJECT
        assert sa.unique_id.isdigit()
    with pytest.raises(gexc.NotFound):
        await clients.iam.get_service_account(
            name=f"projects/other-project/serviceAccounts/{email}"
        )
    listed = await clients.iam.list_service_accounts(name=f"projects/{PROJECT}")
    assert email in [a.email async for a in listed]

    emulator.admin.delete_service_account(email)
    with pytest.raises(gexc.NotFound):
        await clients.iam.get_service_account(name=f"projects/-/serviceAccounts/{email}")


async def test_default_compute_service_account_exists(clients, deploy):
    svc = deploy()
    sa_email = svc.get()["settings"]["serviceAccount"]
    sa = await clients.iam.get_service_account(name=f"projects/-/serviceAccounts/{sa_email}")
    assert sa.email == sa_email


async def test_malformed_service_account_name_is_invalid_argument(clients):
    with pytest.raises(gexc.InvalidArgument):
        await clients.iam.get_service_account(name="serviceAccounts/x@y.com")
