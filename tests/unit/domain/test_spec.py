"""CR spec -> Desired, and the checks that make a spec InvalidSpec / PublicInvokerRefused."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.domain.model import (
    DeletionPolicy,
    EnvPolicy,
    EnvValue,
    InvokerPolicy,
    Mode,
    ServiceRef,
)
from controller.domain.spec import InvalidSpec, parse, parse_deletion, parse_ref

FULL: dict[str, Any] = {
    "service": {"project": "nba-props-platform", "region": "us-west2", "name": "phase3-to-phase4"},
    "env": [
        {"name": "GCP_PROJECT_ID", "value": "nba-props-platform"},
        {"name": "SLACK_WEBHOOK_URL", "secretKeyRef": {"secret": "slack-webhook"}},
    ],
    "invokers": {"members": ["serviceAccount:756957797294-compute@developer.gserviceaccount.com"]},
    "settings": {
        "serviceAccount": "orchestrator@nba-props-platform.iam.gserviceaccount.com",
        "timeoutSeconds": 540,
        "minInstances": 0,
        "maxInstances": 10,
        "concurrency": 1,
        "cpu": "1",
        "memory": "512Mi",
        "ingress": "all",
        "labels": {"team": "data"},
    },
    "policy": {
        "mode": "Observe",
        "env": "Authoritative",
        "invokers": "Authoritative",
        "deletion": "Revoke",
        "resyncSeconds": 30,
    },
}


def test_full_example_parses() -> None:
    d = parse(FULL)
    assert d.ref == ServiceRef("nba-props-platform", "us-west2", "phase3-to-phase4")
    assert d.env["GCP_PROJECT_ID"] == EnvValue.literal("nba-props-platform")
    assert d.env["SLACK_WEBHOOK_URL"] == EnvValue.from_secret("slack-webhook", "latest")
    assert d.role == "roles/run.invoker"
    assert d.settings["labels.team"] == "data"
    assert d.settings["maxInstances"] == 10
    assert "labels" not in d.settings
    assert d.policy.mode is Mode.OBSERVE
    assert d.policy.env is EnvPolicy.AUTHORITATIVE
    assert d.policy.invokers is InvokerPolicy.AUTHORITATIVE
    assert d.policy.deletion is DeletionPolicy.REVOKE
    assert d.policy.resync_seconds == 30


def test_minimal_spec_defaults() -> None:
    d = parse({"service": FULL["service"]})
    assert d.env == {} and d.invokers == frozenset() and d.settings == {}
    assert d.policy.mode is Mode.ENFORCE and d.policy.resync_seconds == 60


def test_resync_override_wins() -> None:
    assert parse(FULL, resync_override=2).policy.resync_seconds == 2


def mutate(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(FULL)
    *parents, last = path.split(".")
    node: Any = spec
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return spec


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (mutate("service.project", "X"), "spec.service.project"),
        (mutate("service.name", "Bad_Name"), "spec.service.name"),
        (mutate("env.0", {"name": "PORT", "value": "1"}), "reserved"),
        (mutate("env.0", {"name": "K_SERVICE", "value": "1"}), "reserved"),
        (
            mutate("env.0", {"name": "A", "value": "1", "secretKeyRef": {"secret": "s"}}),
            "exactly one",
        ),
        (mutate("env.0", {"name": "A"}), "exactly one"),
        (
            mutate("env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
            "more than once",
        ),
        (mutate("invokers.members", ["bogus"]), "spec.invokers.members[0]"),
        (mutate("settings.minInstances", 11), "maxInstances must be at least minInstances"),
        (mutate("settings.timeoutSeconds", 0), "timeoutSeconds"),
        (mutate("settings.ingress", "everywhere"), "ingress"),
        (mutate("settings.labels", {"Team": "x"}), "labels"),
        (mutate("policy.mode", "Yolo"), "spec.policy.mode"),
        (mutate("policy.resyncSeconds", 1), "resyncSeconds"),
    ],
)
def test_invalid_specs(spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse(spec)
    assert info.value.reason == "InvalidSpec"
    assert fragment in info.value.message


def test_invalid_spec_message_never_holds_values() -> None:
    spec = mutate("env.0", {"name": "TOKEN", "value": "hunter2", "secretKeyRef": {"secret": "s"}})
    with pytest.raises(InvalidSpec) as info:
        parse(spec)
    assert "hunter2" not in info.value.message


@pytest.mark.parametrize("member", ["allUsers", "allAuthenticatedUsers"])
def test_public_members_refused_unless_allowed(member: str) -> None:
    spec = mutate("invokers.members", [member])
    with pytest.raises(InvalidSpec) as info:
        parse(spec)
    assert info.value.reason == "PublicInvokerRefused"
    spec["policy"]["allowPublicInvokers"] = True
    assert member in parse(spec).invokers


def test_ref_and_deletion_survive_a_broken_rest() -> None:
    spec = mutate("policy.mode", "Yolo")
    assert parse_ref(spec).name == "phase3-to-phase4"
    assert parse_deletion(spec) is DeletionPolicy.REVOKE
    assert parse_deletion({"service": FULL["service"]}) is DeletionPolicy.ABANDON


def test_take_over() -> None:
    assert parse(FULL).policy.take_over is False
    assert parse(mutate("policy.takeOver", True)).policy.take_over is True
    with pytest.raises(InvalidSpec, match=r"spec\.policy\.takeOver must be a boolean"):
        parse(mutate("policy.takeOver", "yes"))


def test_max_instances_zero_is_unset_whatever_the_minimum() -> None:
    spec = mutate("settings.maxInstances", 0)
    spec["settings"]["minInstances"] = 3
    d = parse(spec)
    assert d.settings["minInstances"] == 3 and d.settings["maxInstances"] == 0
