"""Service.traffic and traffic_statuses, and service-level annotations, through the real async
client: what Cloud Run v2 does (grounding in cloudrun_emulator/store/traffic.py)."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2

LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION


def short(name: str) -> str:
    """A revision's short name (v2 Service fields carry projects/…/revisions/NAME)."""
    return name.rsplit("/", 1)[-1]


def statuses(service: run_v2.Service) -> list[tuple[str, int, str]]:
    """(revision, percent, tag) per status; a LATEST status names no revision (real v2 traffic,
    test_fidelity): it serves the service's latest_ready_revision."""
    ready = short(service.latest_ready_revision)
    return [
        (t.revision or (ready if t.type_ == LATEST else ""), t.percent, t.tag)
        for t in service.traffic_statuses
    ]


async def update(clients, service: run_v2.Service) -> run_v2.Service:
    return await (await clients.run.update_service(service=service)).result(timeout=30)


async def test_a_new_service_serves_its_latest_revision(clients, deploy):
    svc = deploy(env={"A": "1"})
    got = await clients.run.get_service(name=svc.name)
    assert [(t.type_, t.percent) for t in got.traffic] == [(LATEST, 100)]
    assert statuses(got) == [(short(got.latest_ready_revision), 100, "")]
    assert got.traffic_statuses[0].type_ == LATEST
    assert got.traffic_statuses[0].revision == ""


async def test_no_traffic_deploy_keeps_traffic_on_the_pinned_revision(clients, deploy):
    """`gcloud run deploy --no-traffic`: traffic pinned by name, the new revision serves 0%."""
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    old = short(current.latest_ready_revision)
    current.traffic = [run_v2.TrafficTarget(type_=REVISION, revision=old, percent=100)]
    current.template.containers[0].env = [run_v2.EnvVar(name="A", value="2")]
    updated = await update(clients, current)
    assert short(updated.latest_ready_revision) != old
    assert statuses(updated) == [(old, 100, "")]
    assert svc.get()["trafficStatuses"] == [{"type": "REVISION", "revision": old, "percent": 100}]

    # Routing back to LATEST is a traffic-only write: no new revision.
    updated.traffic = [run_v2.TrafficTarget(type_=LATEST, percent=100)]
    routed = await update(clients, updated)
    assert routed.latest_created_revision == updated.latest_created_revision
    assert statuses(routed) == [(short(updated.latest_ready_revision), 100, "")]


async def test_canary_split_and_tags(clients, deploy):
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    old = short(current.latest_ready_revision)
    current.traffic = [
        run_v2.TrafficTarget(type_=REVISION, revision=old, percent=90, tag="stable"),
        run_v2.TrafficTarget(type_=LATEST, percent=10),
    ]
    current.template.containers[0].env = [run_v2.EnvVar(name="A", value="2")]
    updated = await update(clients, current)
    new = short(updated.latest_ready_revision)
    assert statuses(updated) == [(old, 90, "stable"), (new, 10, "")]
    tagged = updated.traffic_statuses[0]
    assert tagged.uri.startswith("https://stable---")


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ([{"type_": LATEST, "percent": 90}], "sum to 90"),
        ([{"type_": REVISION, "revision": "svc-nope", "percent": 100}], "does not exist"),
        ([{"type_": REVISION, "percent": 100}], "Required"),
        (
            [
                {"type_": LATEST, "percent": 50, "tag": "a"},
                {"type_": LATEST, "percent": 50, "tag": "a"},
            ],
            "duplicate tag",
        ),
    ],
)
async def test_invalid_traffic_is_refused(clients, deploy, targets, message):
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    current.traffic = [run_v2.TrafficTarget(**t) for t in targets]
    with pytest.raises(gexc.InvalidArgument, match=message):
        await clients.run.update_service(service=current)
    assert svc.get()["generation"] == 1


async def test_service_annotation_only_update_makes_no_revision(clients, deploy):
    """The claim Runwarden writes is a service annotation: generation moves, no revision."""
    svc = deploy(env={"A": "1"})
    current = await clients.run.get_service(name=svc.name)
    current.annotations["runwarden.dev/owner"] = "default/ns/orch"
    updated = await update(clients, current)
    assert updated.generation == current.generation + 1
    assert updated.latest_created_revision == current.latest_created_revision
    state = svc.get()
    assert state["annotations"] == {"runwarden.dev/owner": "default/ns/orch"}
    assert len(state["revisions"]) == 1
    # A deploy by someone else that sends the object back keeps it.
    svc.admin.put_service(svc.project, svc.region, svc.service, env={"A": "2"})
    assert svc.get()["annotations"] == {"runwarden.dev/owner": "default/ns/orch"}


def test_admin_api_pins_traffic(deploy):
    svc = deploy(env={"A": "1"})
    old = svc.get()["latestReadyRevision"].rsplit("/", 1)[-1]
    svc.admin.put_service(
        svc.project,
        svc.region,
        svc.service,
        env={"A": "2"},
        traffic=[{"revision": old, "percent": 100}],
    )
    state = svc.get()
    assert state["latestReadyRevision"].rsplit("/", 1)[-1] != old
    assert state["trafficStatuses"] == [{"type": "REVISION", "revision": old, "percent": 100}]
