"""google.cloud.run.v2.Services through the real async client: reads, writes, Cloud Run rules."""

from __future__ import annotations

import re

import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2

from .conftest import PROJECT, REGION

REVISION_RE = re.compile(r"^(?P<svc>[a-z0-9-]+)-(?P<n>\d{5})-[a-z]{3}$")


def env_of(service: run_v2.Service) -> dict[str, str]:
    return {e.name: e.value for e in service.template.containers[0].env}


async def test_get_service_shows_what_the_admin_api_deployed(clients, deploy):
    svc = deploy(
        env={"A": "1", "B": "2"},
        secret_env={"HOOK": {"secret": "slack-webhook", "version": "3"}},
        settings={
            "timeoutSeconds": 540,
            "minInstances": 1,
            "maxInstances": 10,
            "concurrency": 1,
            "cpu": "2",
            "memory": "1Gi",
            "ingress": "internal-and-cloud-load-balancing",
            "labels": {"team": "data"},
        },
    )
    got = await clients.run.get_service(name=svc.name)

    assert got.name == svc.name
    assert got.generation == 1
    assert got.observed_generation == 1
    assert not got.reconciling
    assert got.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    assert REVISION_RE.match(got.latest_ready_revision.rsplit("/", 1)[-1])["svc"] == svc.service
    assert got.latest_ready_revision.startswith(f"{svc.name}/revisions/")
    assert got.latest_ready_revision == got.latest_created_revision
    assert re.match(rf"^https://{svc.service}-[a-z0-9]{{10}}-wl\.a\.run\.app$", got.uri)
    c = got.template.containers[0]
    assert c.image
    plain = {e.name: e.value for e in c.env if not e.value_source.secret_key_ref.secret}
    assert plain == {"A": "1", "B": "2"}
    secret = [e for e in c.env if e.value_source.secret_key_ref.secret]
    assert [
        (e.name, e.value_source.secret_key_ref.secret, e.value_source.secret_key_ref.version)
        for e in secret
    ] == [("HOOK", "slack-webhook", "3")]
    t = got.template
    assert t.timeout.total_seconds() == 540
    assert (t.scaling.min_instance_count, t.scaling.max_instance_count) == (1, 10)
    assert t.max_instance_request_concurrency == 1
    assert dict(c.resources.limits) == {"cpu": "2", "memory": "1Gi"}
    assert got.ingress == run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER
    assert dict(got.labels) == {"team": "data"}
    assert t.service_account.endswith("-compute@developer.gserviceaccount.com")


async def test_unknown_service_is_not_found(clients):
    name = f"projects/{PROJECT}/locations/{REGION}/services/does-not-exist"
    with pytest.raises(gexc.NotFound, match="does-not-exist"):
        await clients.run.get_service(name=name)


async def test_list_services_pages_through_a_region(clients, emulator, unique_name):
    project = unique_name("listproj")
    made = sorted(unique_name("l") for _ in range(5))
    for s in made:
        emulator.admin.put_service(project, REGION, s, env={})
    emulator.admin.put_service(project, "europe-west1", unique_name("other"), env={})

    pager = await clients.run.list_services(
        request={"parent": f"projects/{project}/locations/{REGION}", "page_size": 2}
    )
    seen = [s.name.rsplit("/", 1)[1] async for s in pager]
    assert seen == made

    everywhere = await clients.run.list_services(parent=f"projects/{project}/locations/-")
    assert len([s async for s in everywhere]) == 6


async def test_create_service_then_already_exists(clients, unique_name):
    sid = unique_name("created")
    service = run_v2.Service(
        template=run_v2.RevisionTemplate(
            containers=[
                run_v2.Container(image="gcr.io/x/y", env=[run_v2.EnvVar(name="K", value="v")])
            ]
        )
    )
    op = await clients.run.create_service(
        parent=f"projects/{PROJECT}/locations/{REGION}", service=service, service_id=sid
    )
    created = await op.result(timeout=30)
    assert created.name.endswith(f"/services/{sid}")
    assert created.generation == 1
    assert env_of(created) == {"K": "v"}
    assert created.latest_ready_revision.startswith(f"{created.name}/revisions/{sid}-00001-")
    # Cloud Run's server-side defaults are filled in
    assert created.template.timeout.total_seconds() == 300
    assert created.template.max_instance_request_concurrency == 80

    with pytest.raises(gexc.AlreadyExists):
        await clients.run.create_service(
            parent=f"projects/{PROJECT}/locations/{REGION}", service=service, service_id=sid
        )


async def test_update_replaces_the_whole_template_dropping_unsent_env(clients, deploy):
    svc = deploy(env={"KEEP": "1", "DROP": "2"}, settings={"maxInstances": 7})
    current = await clients.run.get_service(name=svc.name)
    first_revision = current.latest_ready_revision

    # A client that builds the template from scratch (like --set-env-vars) loses what it omits.
    current.template.containers[0].env = [run_v2.EnvVar(name="KEEP", value="1b")]
    op = await clients.run.update_service(service=current)
    updated = await op.result(timeout=30)

    assert env_of(updated) == {"KEEP": "1b"}
    assert updated.generation == 2
    assert updated.latest_ready_revision != first_revision
    assert REVISION_RE.match(updated.latest_ready_revision.rsplit("/", 1)[-1])["n"] == "00002"
    assert updated.template.scaling.max_instance_count == 7
    assert svc.get()["env"] == {"KEEP": "1b"}
    assert svc.get()["generation"] == 2


async def test_update_without_scaling_falls_back_to_defaults(clients, deploy):
    svc = deploy(env={"A": "1"}, settings={"maxInstances": 3, "timeoutSeconds": 900})
    bare = run_v2.Service(
        name=svc.name,
        template=run_v2.RevisionTemplate(containers=[run_v2.Container(image="gcr.io/x/y")]),
    )
    updated = await (await clients.run.update_service(service=bare)).result(timeout=30)
    assert env_of(updated) == {}
    # Unset stays unset (0) in v2; see cloudrun_emulator.convert.DEFAULT_MAX_INSTANCES.
    assert updated.template.scaling.max_instance_count == 0
    assert updated.template.timeout.total_seconds() == 300


async def test_service_level_change_bumps_generation_without_new_revision(clients, deploy):
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    current.labels["owner"] = "someone"
    updated = await (await clients.run.update_service(service=current)).result(timeout=30)
    assert updated.generation == 2
    assert updated.latest_ready_revision == current.latest_ready_revision
    assert dict(updated.labels) == {"owner": "someone"}


async def test_update_with_stale_etag_is_aborted(clients, deploy):
    svc = deploy(env={"A": "1"})
    read = await clients.run.get_service(name=svc.name)
    assert read.etag
    svc.admin.put_service(svc.project, svc.region, svc.service, env={"A": "other"})

    read.template.containers[0].env = [run_v2.EnvVar(name="A", value="mine")]
    with pytest.raises(gexc.Aborted, match="etag"):
        await clients.run.update_service(service=read)
    assert svc.get()["env"] == {"A": "other"}

    fresh = await clients.run.get_service(name=svc.name)
    fresh.template.containers[0].env = [run_v2.EnvVar(name="A", value="mine")]
    done = await (await clients.run.update_service(service=fresh)).result(timeout=30)
    assert env_of(done) == {"A": "mine"}
    assert done.etag != fresh.etag


async def test_update_of_missing_service_needs_allow_missing(clients, unique_name):
    sid = unique_name("upsert")
    service = run_v2.Service(
        name=f"projects/{PROJECT}/locations/{REGION}/services/{sid}",
        template=run_v2.RevisionTemplate(containers=[run_v2.Container(image="gcr.io/x/y")]),
    )
    with pytest.raises(gexc.NotFound):
        await clients.run.update_service(service=service)
    created = await (
        await clients.run.update_service(request={"service": service, "allow_missing": True})
    ).result(timeout=30)
    assert created.generation == 1
    assert (await clients.run.get_service(name=service.name)).uid == created.uid


async def test_validate_only_changes_nothing(clients, deploy):
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    current.template.containers[0].env = [run_v2.EnvVar(name="B", value="2")]
    op = await clients.run.update_service(request={"service": current, "validate_only": True})
    preview = await op.result(timeout=30)
    assert env_of(preview) == {"B": "2"}
    after = svc.get()
    assert after["env"] == {"A": "1"}
    assert after["generation"] == 1


async def test_delete_service_and_its_etag_check(clients, deploy):
    svc = deploy(env={"A": "1"})
    with pytest.raises(gexc.Aborted):
        await clients.run.delete_service(request={"name": svc.name, "etag": '"stale"'})
    read = await clients.run.get_service(name=svc.name)
    deleted = await (
        await clients.run.delete_service(request={"name": svc.name, "etag": read.etag})
    ).result(timeout=30)
    assert deleted.name == svc.name
    with pytest.raises(gexc.NotFound):
        await clients.run.get_service(name=svc.name)
    with pytest.raises(KeyError):
        svc.get()
    with pytest.raises(gexc.NotFound):
        await clients.run.delete_service(name=svc.name)


async def test_unknown_service_account_is_refused_like_act_as(clients, deploy, emulator):
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    sa = f"ghost-{svc.service[-8:]}@{PROJECT}.iam.gserviceaccount.com"
    current.template.service_account = sa
    with pytest.raises(gexc.PermissionDenied, match=r"iam\.serviceaccounts\.actAs"):
        await clients.run.update_service(service=current)

    emulator.admin.put_service_account(sa)
    updated = await (await clients.run.update_service(service=current)).result(timeout=30)
    assert updated.template.service_account == sa
    assert svc.get()["settings"]["serviceAccount"] == sa


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda s: s.template.containers[0].env.append(run_v2.EnvVar(name="PORT", value="1")),
            "reserved env names",
        ),
        (
            lambda s: s.template.containers[0].env.extend(
                [run_v2.EnvVar(name="D", value="1"), run_v2.EnvVar(name="D", value="2")]
            ),
            "duplicate",
        ),
        (lambda s: setattr(s.template.scaling, "min_instance_count", 50), "min_instance_count"),
        (lambda s: s.template.containers[0].resources.limits.update({"memory": "lots"}), "memory"),
        (lambda s: s.template.__setattr__("containers", []), "at least one container"),
    ],
    ids=["reserved-env", "duplicate-env", "min-above-max", "bad-memory", "no-container"],
)
async def test_invalid_service_spec_is_invalid_argument(clients, deploy, mutate, match):
    svc = deploy(env={"A": "1"}, settings={"maxInstances": 5})
    current = await clients.run.get_service(name=svc.name)
    mutate(current)
    with pytest.raises(gexc.InvalidArgument, match=match):
        await clients.run.update_service(service=current)
    assert svc.get()["generation"] == 1


@pytest.mark.parametrize(
    "name",
    [
        "",
        "garbage",
        "projects/p/locations/us-west2/services/x",
        "projects/proj-ok/services/x",
        f"projects/{PROJECT}/locations/{REGION}/services/Bad_Name",
    ],
)
async def test_malformed_names_are_invalid_argument(clients, name):
    with pytest.raises(gexc.InvalidArgument):
        await clients.run.get_service(name=name)
    with pytest.raises(gexc.InvalidArgument):
        await clients.run.get_iam_policy(request={"resource": name})


async def test_missing_fields_are_invalid_argument(clients):
    with pytest.raises(gexc.InvalidArgument, match="service"):
        await clients.run.update_service(request={})
    with pytest.raises(gexc.InvalidArgument, match="parent"):
        await clients.run.list_services(request={})
    with pytest.raises(gexc.InvalidArgument, match="service_id"):
        await clients.run.create_service(
            parent=f"projects/{PROJECT}/locations/{REGION}",
            service=run_v2.Service(),
            service_id="",
        )
