"""controller.check with namespace bindings: a refused Orchestrator causes no Google call at all
(no gateway is even chosen), its status says why naming the annotation, and an allowed one acts
as its namespace's Google service account."""

from __future__ import annotations

from typing import Any

import pytest

from controller.check import check, gateway_for
from controller.domain import spec
from controller.domain.model import Event, Failure, Reason
from controller.domain.tenancy import BindingMode
from controller.gcp.budget import Pacer
from controller.kube.namespaces import NamespaceBindings
from controller.schedule.drift_loop import DriftLoop
from controller.settings import Settings

SA_A = "runner@tenant-a-prj.iam.gserviceaccount.com"
SECRET_VALUE = "canary-7f3e-value"


class Memo(dict[str, Any]):
    """kopf.Memo's shape: a dict with attribute access."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


class NoGoogle:
    """A gateway that fails the test on any call."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a Google call ({name}) for a refused Orchestrator")


class Gateways:
    def __init__(self) -> None:
        self.asked: list[str | None] = []

    def for_account(self, account: str | None) -> Any:
        self.asked.append(account)
        return NoGoogle()


def memo(mode: BindingMode, annotations: dict[str, str]) -> Memo:
    bindings = NamespaceBindings(None, mode)
    bindings.seen("team-a", annotations)
    return Memo(
        config=Settings(),
        gateway=NoGoogle(),
        gateways=Gateways(),
        namespaces=bindings,
        pacer=Pacer(None, None),
    )


def body(project: str, *members: str, public: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "team-a", "name": "orch", "generation": 1},
        "spec": {
            "service": {"project": project, "region": "us-west2", "name": "svc"},
            "env": [{"name": "TOKEN", "value": SECRET_VALUE}],
            "invokers": {"members": list(members)},
            "policy": {"allowPublicInvokers": public},
        },
    }


@pytest.mark.parametrize(
    ("annotations", "spec_body", "reason", "named"),
    [
        (
            {"runwarden.dev/projects": "tenant-a-prj"},
            body("tenant-b-prj"),
            Reason.PROJECT_NOT_ALLOWED,
            ["runwarden.dev/projects", "tenant-b-prj", "team-a"],
        ),
        ({}, body("tenant-a-prj"), Reason.PROJECT_NOT_ALLOWED, ["runwarden.dev/projects"]),
        (
            {"runwarden.dev/projects": "tenant-a-prj"},
            body("tenant-a-prj", "allUsers", public=True),
            Reason.PUBLIC_INVOKER_REFUSED,
            ["runwarden.dev/allow-public-invokers", "allUsers"],
        ),
    ],
)
async def test_refused_orchestrator_makes_no_google_call(
    annotations: dict[str, str], spec_body: dict[str, Any], reason: str, named: list[str]
) -> None:
    m = memo(BindingMode.REQUIRED, annotations)
    loop = DriftLoop(("team-a", "orch"))
    posted: list[Event] = []
    patch = await check(loop, spec_body, m, ("spec-create",), posted.append)
    assert m["gateways"].asked == []  # not even a gateway was chosen
    ready = next(c for c in patch["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", reason)
    for part in named:
        assert part in ready["message"]
    assert [(e.type, e.reason) for e in posted] == [("Warning", reason)]
    assert loop.ref is None  # audit entries for the service wake nothing here
    assert SECRET_VALUE not in repr(patch) + repr(posted)


async def test_allowed_orchestrator_acts_as_its_namespace_account() -> None:
    m = memo(
        BindingMode.REQUIRED,
        {"runwarden.dev/projects": "tenant-a-prj", "runwarden.dev/google-service-account": SA_A},
    )
    desired = spec.parse(body("tenant-a-prj")["spec"])
    got = await gateway_for(m, "team-a", desired)
    assert isinstance(got, NoGoogle) and m["gateways"].asked == [SA_A]


async def test_optional_binding_leaves_unbound_namespaces_alone() -> None:
    m = memo(BindingMode.OPTIONAL, {})
    desired = spec.parse(body("any-project-prj")["spec"])
    got = await gateway_for(m, "team-a", desired)
    assert not isinstance(got, Failure) and m["gateways"].asked == [None]
