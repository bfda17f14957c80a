"""Namespace bindings (controller.domain.tenancy): annotations -> Binding, and what it refuses."""

from __future__ import annotations

import pytest

from controller.domain.model import Desired, Policy, Reason, Retry, ServiceRef
from controller.domain.tenancy import (
    PROJECTS_ANNOTATION,
    PUBLIC_ANNOTATION,
    SERVICE_ACCOUNT_ANNOTATION,
    Binding,
    BindingMode,
    project_allowed_anywhere,
    refusal,
)

REQUIRED, OPTIONAL = BindingMode.REQUIRED, BindingMode.OPTIONAL
SA = "tenant-a@tenant-a-prj.iam.gserviceaccount.com"


def desired(project: str = "tenant-a-prj", *members: str, public: bool = False) -> Desired:
    return Desired(
        ref=ServiceRef(project, "us-west2", "svc"),
        invokers=frozenset(members),
        policy=Policy(allow_public_invokers=public),
    )


@pytest.mark.parametrize(
    ("annotations", "projects", "account", "public"),
    [
        (None, None, None, False),
        ({}, None, None, False),
        ({PROJECTS_ANNOTATION: "a-prj"}, {"a-prj"}, None, False),
        ({PROJECTS_ANNOTATION: " a-prj , b-prj ,,"}, {"a-prj", "b-prj"}, None, False),
        ({PROJECTS_ANNOTATION: ""}, set(), None, False),
        ({PROJECTS_ANNOTATION: "*"}, {"*"}, None, False),
        ({SERVICE_ACCOUNT_ANNOTATION: f" {SA} "}, None, SA, False),
        ({PUBLIC_ANNOTATION: "true"}, None, None, True),
        ({PUBLIC_ANNOTATION: "True"}, None, None, True),
        ({PUBLIC_ANNOTATION: "yes"}, None, None, False),
    ],
)
def test_binding_of_annotations(
    annotations: dict[str, str] | None,
    projects: set[str] | None,
    account: str | None,
    public: bool,
) -> None:
    b = Binding.of("ns", annotations)
    assert b.projects == (None if projects is None else frozenset(projects))
    assert (b.service_account, b.allow_public) == (account, public)


@pytest.mark.parametrize(
    ("projects", "mode", "project", "allowed"),
    [
        ("tenant-a-prj", REQUIRED, "tenant-a-prj", True),
        ("tenant-a-prj", REQUIRED, "tenant-b-prj", False),
        ("tenant-a-prj", OPTIONAL, "tenant-b-prj", False),  # bound: held to it in both modes
        ("tenant-a-prj,tenant-b-prj", REQUIRED, "tenant-b-prj", True),
        ("*", REQUIRED, "anything-prj", True),
        ("", REQUIRED, "tenant-a-prj", False),
        (None, REQUIRED, "tenant-a-prj", False),  # unbound, binding required
        (None, OPTIONAL, "tenant-a-prj", True),  # unbound, binding optional
    ],
)
def test_project_refusal(
    projects: str | None, mode: BindingMode, project: str, allowed: bool
) -> None:
    annotations = {} if projects is None else {PROJECTS_ANNOTATION: projects}
    failure = refusal(Binding.of("team-a", annotations), desired(project), mode)
    if allowed:
        assert failure is None
        return
    assert failure is not None
    assert failure.reason == Reason.PROJECT_NOT_ALLOWED
    assert failure.retry is Retry.RESYNC
    # The message names the annotation, the namespace and the project (and the fix).
    for part in (PROJECTS_ANNOTATION, "team-a", project, "cluster administrator"):
        assert part in failure.message


@pytest.mark.parametrize(
    ("annotations", "mode", "refused"),
    [
        ({PROJECTS_ANNOTATION: "tenant-a-prj"}, REQUIRED, True),
        ({PROJECTS_ANNOTATION: "tenant-a-prj"}, OPTIONAL, True),
        ({PROJECTS_ANNOTATION: "tenant-a-prj", PUBLIC_ANNOTATION: "true"}, REQUIRED, False),
        ({PROJECTS_ANNOTATION: "*", PUBLIC_ANNOTATION: "false"}, REQUIRED, True),
        ({}, OPTIONAL, False),  # an unbound namespace under optional binding: as before tenancy
    ],
)
def test_public_invoker_gate(annotations: dict[str, str], mode: BindingMode, refused: bool) -> None:
    want = desired("tenant-a-prj", "allUsers", "user:a@example.com", public=True)
    failure = refusal(Binding.of("team-a", annotations), want, mode)
    if not refused:
        assert failure is None
        return
    assert failure is not None
    assert failure.reason == Reason.PUBLIC_INVOKER_REFUSED
    assert PUBLIC_ANNOTATION in failure.message and "allUsers" in failure.message
    assert "user:a@example.com" not in failure.message


def test_private_members_need_no_public_annotation() -> None:
    binding = Binding.of("team-a", {PROJECTS_ANNOTATION: "tenant-a-prj"})
    assert refusal(binding, desired("tenant-a-prj", "user:a@example.com"), REQUIRED) is None


def test_project_allowed_anywhere() -> None:
    bindings = {
        "a": Binding.of("a", {PROJECTS_ANNOTATION: "tenant-a-prj"}),
        "b": Binding.of("b", {PROJECTS_ANNOTATION: "tenant-b-prj"}),
        "c": Binding.of("c", {}),
    }
    assert project_allowed_anywhere(bindings, "tenant-a-prj", REQUIRED)
    assert not project_allowed_anywhere(bindings, "stranger-prj", REQUIRED)
    assert project_allowed_anywhere(bindings, "stranger-prj", OPTIONAL)  # "c" may touch any
    bindings["d"] = Binding.of("d", {PROJECTS_ANNOTATION: "*"})
    assert project_allowed_anywhere(bindings, "stranger-prj", REQUIRED)
