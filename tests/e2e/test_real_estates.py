"""Issue 15: services deployed the way teams really deploy them, against the emulator with the
real google clients (the reconcile use-case without Kubernetes; the status and Events these
produce through the controller are in test_real_estates_controller.py).

Covered here: a revision name pinned by Terraform / `--revision-suffix` (15.1), a removal that
does not stick (15.4), normalisations of real Cloud Run (15.5), conditional IAM bindings (15.7)
and `invokerIamDisabled` (15.10).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, options_pb2, policy_pb2
from google.type import expr_pb2

from cloudrun_emulator.testing import EmulatorProcess
from controller.domain.model import Aspect, Managed, Observed, Plan
from controller.domain.outcome import Prior
from controller.domain.spec import parse
from controller.gcp.clients import Clients, make_clients
from controller.gcp.gateway import Gateway
from controller.reconcile import reconcile
from tests.e2e.test_reconcile_emulator import (
    FOREIGN,
    MEMBER,
    PROJECT,
    REGION,
    RUN,
    SA,
    converge,
    delta,
    prior_after,
    spec,
)

ROLE = "roles/run.invoker"
TEMP = "user:contractor@example.com"


@pytest.fixture
async def clients(emulator: EmulatorProcess) -> AsyncIterator[Clients]:
    made = make_clients(emulator.grpc_endpoint)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
def gateway(clients: Clients) -> Gateway:
    return Gateway(clients, rollout_timeout=30)


@pytest.fixture
def service(emulator: EmulatorProcess, unique_name: Callable[[str], str]) -> str:
    name = unique_name("estate")
    emulator.admin.put_service_account(SA)
    emulator.admin.put_service(
        PROJECT, REGION, name, env={"FOREIGN": "x"}, invokers={ROLE: [FOREIGN]}
    )
    return name


def resource(name: str, project: str = PROJECT) -> str:
    return f"projects/{project}/locations/{REGION}/services/{name}"


async def someone_deploys(
    clients: Clients, name: str, edit: Callable[[Any], None], project: str = PROJECT
) -> Any:
    """Someone else's full-template deploy with the v2 client (Terraform, gcloud, a console)."""
    service = await clients.run.get_service(name=resource(name, project))
    edit(service)
    operation = await clients.run.update_service(service=service)
    return await operation.result(timeout=30)


# --------------------------------------------------------------- 15.1 a pinned revision name


async def test_a_pinned_revision_name_does_not_block_the_repair(
    gateway: Gateway, clients: Clients, emulator: EmulatorProcess, service: str
) -> None:
    """Terraform (or `gcloud run deploy --revision-suffix`) names the revision in
    template.revision. Sent back with a changed template, that name is refused with
    ALREADY_EXISTS; the repair must leave it out, as gcloud does, and Cloud Run names the new
    revision itself."""
    desired = parse(spec(service))
    update, managed = await converge(gateway, desired)
    pinned = f"{service}-tf-1"

    def deploy(svc: Any) -> None:
        svc.template.revision = pinned
        del svc.template.containers[0].env[:]  # a full-template deploy without our variables

    deployed = await someone_deploys(clients, service, deploy)
    assert deployed.latest_ready_revision.endswith(pinned)

    repaired = await reconcile(gateway, desired, managed, prior_after(update))
    assert repaired.ready.status, repaired.ready
    assert repaired.ready.reason == "DriftRepaired"
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["env"] == {"GCP_PROJECT_ID": PROJECT, "MODE": "prod"}
    assert got["latestReadyRevision"] != pinned
    assert pinned in got["revisions"]


async def test_the_emulator_refuses_a_changed_template_under_an_existing_revision_name(
    clients: Clients, service: str
) -> None:
    """What real Cloud Run answers (googleapis/google-cloud-python#14259): 409 ALREADY_EXISTS
    "Revision named '<rev>' with different configuration already exists."."""
    from google.api_core import exceptions as gexc

    pinned = f"{service}-tf-1"

    def pin(svc: Any) -> None:
        svc.template.revision = pinned

    await someone_deploys(clients, service, pin)

    def change_under_the_same_name(svc: Any) -> None:
        svc.template.containers[0].env.append(run_v2.EnvVar(name="NEW", value="1"))

    with pytest.raises(gexc.AlreadyExists, match="with different configuration already exists"):
        await someone_deploys(clients, service, change_under_the_same_name)


# ------------------------------------------------------------ 15.4 a removal that does not stick


class RacingDeploy(Gateway):
    """The real gateway, with someone else's deploy landing right after each UpdateService and
    before the read-back: it puts a variable back (a CI pipeline still setting it)."""

    def __init__(self, clients: Clients, emulator: EmulatorProcess, env: dict[str, str]) -> None:
        super().__init__(clients, rollout_timeout=30)
        self.emulator = emulator
        self.env = env

    async def update_service(self, observed: Observed, plan: Plan) -> Observed:
        after = await super().update_service(observed, plan)
        ref = observed.ref
        current = self.emulator.admin.get_service(ref.project, ref.region, ref.name)
        self.emulator.admin.put_service(
            ref.project, ref.region, ref.name, env={**current["env"], **self.env}
        )
        return after


async def test_a_removal_that_does_not_stick_stays_owned_and_is_not_drift_repaired(
    gateway: Gateway, clients: Clients, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service))
    update, managed = await converge(gateway, desired)
    assert "MODE" in managed.env

    smaller = parse(spec(service, env=[{"name": "GCP_PROJECT_ID", "value": PROJECT}]))
    racing = RacingDeploy(clients, emulator, {"MODE": "prod"})
    failed = await reconcile(racing, smaller, managed, prior_after(update))
    assert emulator.admin.get_service(PROJECT, REGION, service)["env"].get("MODE") == "prod"
    assert not failed.ready.status
    assert failed.ready.reason == "VerificationFailed", failed.ready
    assert "env MODE no longer declared" in failed.ready.message
    assert failed.aspects[Aspect.ENV].reason == "VerificationFailed"
    assert "DriftRepaired" not in [e.reason for e in failed.events]
    assert failed.managed is not None and "MODE" in failed.managed.env  # still ours to remove

    # The next check (no race this time) removes it, verifies it, and only then lets it go.
    done = await reconcile(gateway, smaller, failed.managed, prior_after(failed))
    assert done.ready.status, done.ready
    assert "MODE" not in emulator.admin.get_service(PROJECT, REGION, service)["env"]
    assert done.managed == Managed.of(
        env=frozenset({"GCP_PROJECT_ID"}), members=frozenset({MEMBER})
    )


# ------------------------------------------------------- 15.5 normalisations of real Cloud Run


async def test_max_instances_zero_reads_back_as_unset_not_as_a_default(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    """v2 leaves max_instance_count unset (0) unless the client sets it (Config Connector's
    recording of a real CreateService without `scaling`: runservicesecret/_http.log returns a
    template without `scaling`). Declaring 0 ("no limit of ours") must verify, not turn into
    one UpdateService per check."""
    emulator.admin.put_service(PROJECT, REGION, service, settings={"maxInstances": 5})
    desired = parse(spec(service, settings={"maxInstances": 0}))
    update, managed = await converge(gateway, desired)
    assert update.ready.reason == "Synced", update.ready
    assert emulator.admin.get_service(PROJECT, REGION, service)["settings"]["maxInstances"] == 0
    before = emulator.admin.calls()
    again = await reconcile(gateway, desired, managed, prior_after(update))
    assert again.ready.reason == "Synced"
    assert not delta(before, emulator.admin.calls()).get(f"{RUN}UpdateService")


async def test_defaults_read_back_in_cloud_runs_units_are_in_sync(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    """A default container reads back cpu "1000m", memory "512Mi" (same recording); declaring
    cpu "1" and memory "512Mi" is in sync: no write."""
    got = emulator.admin.get_service(PROJECT, REGION, service)["settings"]
    assert (got["cpu"], got["memory"]) == ("1000m", "512Mi")
    desired = parse(
        spec(service, env=[], invokers={"members": []}, settings={"cpu": "1", "memory": "512Mi"})
    )
    before = emulator.admin.calls()
    update = await reconcile(gateway, desired, Managed(), Prior())
    assert update.ready.reason == "Synced", update.ready
    assert not delta(before, emulator.admin.calls()).get(f"{RUN}UpdateService")


async def test_a_secret_named_in_full_in_its_own_project_is_the_declared_secret(
    gateway: Gateway, emulator: EmulatorProcess, service: str
) -> None:
    """Terraform and Config Connector write `projects/P/secrets/S`; Cloud Run keeps that form
    (Config Connector recording runjob/jobwithsecretmanagersecret/_http.log) and, in the
    service's own project, it is the secret `S` (SecretKeySelector.secret, k8s.min.proto).
    Declaring `S` must not rewrite the service (one new revision per check otherwise)."""
    emulator.admin.put_service(
        PROJECT,
        REGION,
        service,
        secret_env={"SLACK": {"secret": f"projects/{PROJECT}/secrets/slack", "version": "3"}},
    )
    desired = parse(
        spec(
            service,
            env=[{"name": "SLACK", "secretKeyRef": {"secret": "slack", "version": "3"}}],
            invokers={"members": []},
            settings={},
        )
    )
    before = emulator.admin.calls()
    update = await reconcile(gateway, desired, Managed(), Prior())
    assert update.ready.reason == "Synced", update.ready
    assert not delta(before, emulator.admin.calls()).get(f"{RUN}UpdateService")


# ----------------------------------------------------------------- 15.7 conditional bindings


async def grant_under_condition(
    clients: Clients, name: str, member: str, project: str = PROJECT
) -> None:
    """Someone grants the invoker role under an IAM condition (a time-limited grant)."""
    read = iam_policy_pb2.GetIamPolicyRequest(
        resource=resource(name, project),
        options=options_pb2.GetPolicyOptions(requested_policy_version=3),
    )
    policy = await clients.run.get_iam_policy(request=read)
    edited = policy_pb2.Policy()
    edited.CopyFrom(policy)
    edited.version = 3
    edited.bindings.add(
        role=ROLE,
        members=[member],
        condition=expr_pb2.Expr(
            title="until-2027",
            expression='request.time < timestamp("2027-01-01T00:00:00Z")',
        ),
    )
    await clients.run.set_iam_policy(
        request=iam_policy_pb2.SetIamPolicyRequest(resource=resource(name, project), policy=edited)
    )


def conditional_members(emulator: EmulatorProcess, name: str) -> Any:
    return emulator.admin.get_service(PROJECT, REGION, name)["iamConditional"]


async def test_a_declared_member_with_only_a_conditional_grant_is_said_and_granted(
    gateway: Gateway, clients: Clients, emulator: EmulatorProcess, service: str
) -> None:
    await grant_under_condition(clients, service, MEMBER)
    conditional_before = conditional_members(emulator, service)
    update = await reconcile(gateway, parse(spec(service)), Managed(), Prior())
    assert update.ready.status, update.ready
    message = update.aspects[Aspect.INVOKERS].message
    assert MEMBER in message and "only under an IAM condition" in message
    warnings = [e for e in update.events if e.type == "Warning"]
    assert [e.reason for e in warnings] == ["ConditionalBinding"]
    assert MEMBER in warnings[0].message
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert sorted(got["iam"][ROLE]) == sorted([FOREIGN, MEMBER])
    assert conditional_members(emulator, service) == conditional_before  # never touched


async def test_authoritative_invokers_say_the_conditional_members_that_survive(
    gateway: Gateway, clients: Clients, emulator: EmulatorProcess, service: str
) -> None:
    await grant_under_condition(clients, service, TEMP)
    conditional_before = conditional_members(emulator, service)
    desired = parse(spec(service, policy={"invokers": "Authoritative"}))
    update, managed = await converge(gateway, desired)
    got = emulator.admin.get_service(PROJECT, REGION, service)
    assert got["iam"][ROLE] == [MEMBER]  # the unconditional binding is exactly the spec
    assert conditional_members(emulator, service) == conditional_before
    message = update.aspects[Aspect.INVOKERS].message
    assert TEMP in message and "Authoritative" in message
    assert "ConditionalBinding" in [e.reason for e in update.events if e.type == "Warning"]
    # Said on every check while it lasts, in status; no write for it.
    before = emulator.admin.calls()
    again = await reconcile(gateway, desired, managed, prior_after(update))
    assert again.ready.reason == "Synced" and TEMP in again.aspects[Aspect.INVOKERS].message
    assert delta(before, emulator.admin.calls()) == {
        f"{RUN}GetService": 1,
        f"{RUN}GetIamPolicy": 1,
    }


# --------------------------------------------------------------- 15.10 invokerIamDisabled


async def make_public(clients: Clients, name: str, project: str = PROJECT) -> None:
    """`gcloud run services update --no-invoker-iam-check`: v2 Service.invoker_iam_disabled."""

    def public(svc: Any) -> None:
        svc.invoker_iam_disabled = True

    await someone_deploys(clients, name, public, project)


async def test_invoker_iam_disabled_is_invoker_drift_and_repaired(
    gateway: Gateway, clients: Clients, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service))
    update, managed = await converge(gateway, desired)
    await make_public(clients, service)
    assert emulator.admin.get_service(PROJECT, REGION, service)["invokerIamDisabled"] is True

    repaired = await reconcile(gateway, desired, managed, prior_after(update))
    assert repaired.ready.status and repaired.ready.reason == "DriftRepaired", repaired.ready
    assert repaired.aspects[Aspect.INVOKERS].reason == "DriftRepaired"
    assert any("invokerIamDisabled" in line for line in repaired.drift.detected)
    assert Aspect.INVOKERS in repaired.drift.aspects
    assert emulator.admin.get_service(PROJECT, REGION, service)["invokerIamDisabled"] is False


async def test_invoker_iam_disabled_allowed_by_policy_is_reported_not_repaired(
    gateway: Gateway, clients: Clients, emulator: EmulatorProcess, service: str
) -> None:
    desired = parse(spec(service, policy={"allowPublicInvokers": True}))
    update, managed = await converge(gateway, desired)
    await make_public(clients, service)
    before = emulator.admin.calls()
    again = await reconcile(gateway, desired, managed, prior_after(update))
    assert not delta(before, emulator.admin.calls()).get(f"{RUN}UpdateService")
    assert again.ready.status and again.ready.reason == "Synced"
    message = again.aspects[Aspect.INVOKERS].message
    assert "invokerIamDisabled is true" in message and "allowPublicInvokers" in message
    assert emulator.admin.get_service(PROJECT, REGION, service)["invokerIamDisabled"] is True
