"""The bad input catalog: malformed Orchestrators, each refused by `kubectl apply` (server-side dry
run, so the apiserver's admission does the refusing) with a message that names the field.

Every case starts from the contract's valid example and breaks one thing, so a refusal can only
come from that one thing; the expected field path (and, for the CEL rules, a phrase of the
message) must appear in kubectl's error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.crd.orchestrators import apply, contract_example, variant

Spec = dict[str, Any]

CYRILLIC_O = "\u041e"  # looks like O
CYRILLIC_o = "\u043e"  # looks like o
CYRILLIC_s = "\u0455"  # looks like s
FULLWIDTH_HYPHEN = "\uff0d"


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Spec], object]  # mutates the spec in place
    field: str  # the field path kubectl's error must name
    says: str = ""  # a phrase the message must contain, for the hand-written CEL messages
    existing: bool = False  # apply the valid example first: the change, not the create, is bad


def _set(path: str, value: object) -> Callable[[Spec], None]:
    """spec mutation: set the dotted ``path`` (relative to spec) to ``value``."""

    def mutate(spec: Spec) -> None:
        *parents, last = path.split(".")
        node: Any = spec
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        *parents, last = path.split(".")
        node: Any = spec
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        del node[last]

    return mutate


def _env(*items: dict[str, Any]) -> Callable[[Spec], None]:
    return _set("env", list(items))


def _members(*members: str) -> Callable[[Spec], None]:
    return _set("invokers.members", list(members))


CATALOG = [
    # --- spec.service: patterns, lengths, required, immutability
    Case("service missing", _delete("service"), "spec.service", "Required"),
    Case("service name missing", _delete("service.name"), "spec.service.name", "Required"),
    Case(
        "project uppercase", _set("service.project", "NBA-Props-Platform"), "spec.service.project"
    ),
    Case("project too short", _set("service.project", "nba"), "spec.service.project"),
    Case("project ends with hyphen", _set("service.project", "nba-props-"), "spec.service.project"),
    Case("project is a number", _set("service.project", 756957797294), "spec.service.project"),
    Case("project empty", _set("service.project", ""), "spec.service.project"),
    Case("region uppercase", _set("service.region", "US-WEST2"), "spec.service.region"),
    Case("region without number", _set("service.region", "us-west"), "spec.service.region"),
    Case("service name too long", _set("service.name", "p" * 50), "spec.service.name"),
    Case("service name underscore", _set("service.name", "phase3_to_phase4"), "spec.service.name"),
    Case("service name starts with digit", _set("service.name", "3-to-4"), "spec.service.name"),
    Case(
        "service name unicode look-alike",
        _set("service.name", f"phase3-t{CYRILLIC_o}-phase4"),
        "spec.service.name",
    ),
    Case(
        "service name fullwidth hyphen",
        _set("service.name", f"phase3{FULLWIDTH_HYPHEN}to"),
        "spec.service.name",
    ),
    Case("container uppercase", _set("service.container", "Main"), "spec.service.container"),
    Case(
        "service name changed",
        _set("service.name", "phase4-to-phase5"),
        "spec.service",
        "immutable",
        existing=True,
    ),
    Case(
        "service project changed",
        _set("service.project", "nba-props-staging"),
        "spec.service",
        "immutable",
        existing=True,
    ),
    # --- spec.env: names, reserved names, one-of, duplicates, types, sizes
    Case(
        "env value and secretKeyRef",
        _env({"name": "A", "value": "x", "secretKeyRef": {"secret": "s"}}),
        "spec.env[0]",
        "exactly one of value or secretKeyRef",
    ),
    Case(
        "env neither value nor secretKeyRef",
        _env({"name": "A"}),
        "spec.env[0]",
        "exactly one of value or secretKeyRef",
    ),
    Case("env name PORT", _env({"name": "PORT", "value": "8080"}), "spec.env[0].name", "reserved"),
    Case(
        "env name K_SERVICE",
        _env({"name": "K_SERVICE", "value": "x"}),
        "spec.env[0].name",
        "reserved",
    ),
    Case(
        "env name K_REVISION second item",
        _env({"name": "OK", "value": "x"}, {"name": "K_REVISION", "value": "x"}),
        "spec.env[1].name",
        "reserved",
    ),
    Case("env name starts with digit", _env({"name": "1ST", "value": "x"}), "spec.env[0].name"),
    Case("env name with hyphen", _env({"name": "NEXT-TOPIC", "value": "x"}), "spec.env[0].name"),
    Case("env name with space", _env({"name": "NEXT TOPIC", "value": "x"}), "spec.env[0].name"),
    Case(
        "env name unicode look-alike",
        _env({"name": f"GCP_PR{CYRILLIC_O}JECT_ID", "value": "x"}),
        "spec.env[0].name",
    ),
    Case("env name empty", _env({"name": "", "value": "x"}), "spec.env[0].name"),
    Case("env name missing", _env({"value": "x"}), "spec.env[0].name"),
    Case(
        "env duplicate names",
        _env({"name": "GCP_PROJECT_ID", "value": "a"}, {"name": "GCP_PROJECT_ID", "value": "b"}),
        "spec.env[1]",
        "Duplicate",
    ),
    Case("env value is a number", _env({"name": "TIMEOUT", "value": 540}), "spec.env[0].value"),
    Case("env value is a boolean", _env({"name": "DEBUG", "value": True}), "spec.env[0].value"),
    Case("env is a map", _set("env", {"GCP_PROJECT_ID": "nba-props-platform"}), "spec.env"),
    Case(
        "env too many",
        _set("env", [{"name": f"V{i}", "value": "x"} for i in range(257)]),
        "spec.env",
        "257",
    ),
    Case("env value too long", _env({"name": "BIG", "value": "x" * 32769}), "spec.env[0].value"),
    Case(
        "secret missing",
        _env({"name": "A", "secretKeyRef": {"version": "latest"}}),
        "spec.env[0].secretKeyRef.secret",
    ),
    Case(
        "secret version not a number",
        _env({"name": "A", "secretKeyRef": {"secret": "s", "version": "v2"}}),
        "spec.env[0].secretKeyRef.version",
    ),
    Case(
        "secret id with slash",
        _env({"name": "A", "secretKeyRef": {"secret": "a/b"}}),
        "spec.env[0].secretKeyRef.secret",
    ),
    # --- spec.invokers: prefixes, public members, duplicates, sizes, role
    Case(
        "allUsers without opt-in",
        _members("allUsers"),
        "spec.invokers.members",
        "allowPublicInvokers",
    ),
    Case(
        "allAuthenticatedUsers without opt-in",
        _members("serviceAccount:a@b.iam.gserviceaccount.com", "allAuthenticatedUsers"),
        "spec.invokers.members",
        "allowPublicInvokers",
    ),
    Case(
        "member without prefix",
        _members("pusher@nba-props-platform.iam.gserviceaccount.com"),
        "spec.invokers.members[0]",
    ),
    Case(
        "member bad prefix",
        _members("sa:pusher@nba-props-platform.iam.gserviceaccount.com"),
        "spec.invokers.members[0]",
    ),
    Case(
        "member prefix look-alike",
        _members(f"serviceAcc{CYRILLIC_o}unt:pusher@nba-props-platform.iam.gserviceaccount.com"),
        "spec.invokers.members[0]",
    ),
    Case(
        "member email look-alike",
        _members(f"user:{CYRILLIC_s}re@example.com"),
        "spec.invokers.members[0]",
    ),
    Case("member lowercase allusers", _members("allusers"), "spec.invokers.members[0]"),
    Case("member empty", _members(""), "spec.invokers.members[0]"),
    Case(
        "member duplicate",
        _members("user:a@example.com", "user:a@example.com"),
        "spec.invokers.members[1]",
        "Duplicate",
    ),
    Case(
        "members too many",
        _members(*[f"user:u{i}@example.com" for i in range(101)]),
        "spec.invokers.members",
        "101",
    ),
    Case(
        "members is a string",
        _set("invokers.members", "user:a@example.com"),
        "spec.invokers.members",
    ),
    Case("role without roles/ prefix", _set("invokers.role", "run.invoker"), "spec.invokers.role"),
    # --- spec.settings: bounds, formats, enums, CEL, labels
    Case("timeout zero", _set("settings.timeoutSeconds", 0), "spec.settings.timeoutSeconds"),
    Case(
        "timeout above an hour",
        _set("settings.timeoutSeconds", 3601),
        "spec.settings.timeoutSeconds",
    ),
    Case(
        "timeout as a string",
        _set("settings.timeoutSeconds", "540"),
        "spec.settings.timeoutSeconds",
    ),
    Case(
        "timeout fractional", _set("settings.timeoutSeconds", 1.5), "spec.settings.timeoutSeconds"
    ),
    Case("concurrency zero", _set("settings.concurrency", 0), "spec.settings.concurrency"),
    Case("concurrency above 1000", _set("settings.concurrency", 1001), "spec.settings.concurrency"),
    Case("min instances negative", _set("settings.minInstances", -1), "spec.settings.minInstances"),
    Case(
        "max below min",
        lambda s: s["settings"].update(minInstances=5, maxInstances=2),
        "spec.settings.maxInstances",
        "greater than or equal to spec.settings.minInstances",
    ),
    Case("cpu as words", _set("settings.cpu", "one"), "spec.settings.cpu"),
    Case("cpu zero", _set("settings.cpu", "0"), "spec.settings.cpu"),
    Case("cpu unquoted number", _set("settings.cpu", 1), "spec.settings.cpu"),
    Case("memory in MB", _set("settings.memory", "512MB"), "spec.settings.memory"),
    Case("memory without unit", _set("settings.memory", "512"), "spec.settings.memory"),
    Case("ingress unknown", _set("settings.ingress", "public"), "spec.settings.ingress"),
    Case("ingress wrong case", _set("settings.ingress", "All"), "spec.settings.ingress"),
    Case(
        "service account not an email",
        _set("settings.serviceAccount", "orchestrator"),
        "spec.settings.serviceAccount",
    ),
    Case(
        "label key uppercase",
        _set("settings.labels", {"Team": "data"}),
        "spec.settings.labels",
        "GCP label rules",
    ),
    Case(
        "label key kubernetes style",
        _set("settings.labels", {"app.kubernetes.io/name": "x"}),
        "spec.settings.labels",
        "GCP label rules",
    ),
    Case(
        "label key starts with digit",
        _set("settings.labels", {"1team": "data"}),
        "spec.settings.labels",
        "GCP label rules",
    ),
    Case(
        "label key too long",
        _set("settings.labels", {"k" * 64: "data"}),
        "spec.settings.labels",
        "GCP label rules",
    ),
    Case(
        "label value uppercase",
        _set("settings.labels", {"team": "Data"}),
        "spec.settings.labels.team",
    ),
    Case(
        "label value too long",
        _set("settings.labels", {"team": "d" * 64}),
        "spec.settings.labels.team",
    ),
    Case(
        "labels too many",
        _set("settings.labels", {f"l{i}": "x" for i in range(65)}),
        "spec.settings.labels",
    ),
    # --- spec.policy: enums, bounds, types
    Case("mode lowercase", _set("policy.mode", "enforce"), "spec.policy.mode"),
    Case("mode unknown", _set("policy.mode", "DryRun"), "spec.policy.mode"),
    Case("env policy unknown", _set("policy.env", "Replace"), "spec.policy.env"),
    Case("invokers policy unknown", _set("policy.invokers", "Exclusive"), "spec.policy.invokers"),
    Case("deletion policy unknown", _set("policy.deletion", "Delete"), "spec.policy.deletion"),
    Case("resync too fast", _set("policy.resyncSeconds", 4), "spec.policy.resyncSeconds"),
    Case("resync above a day", _set("policy.resyncSeconds", 86401), "spec.policy.resyncSeconds"),
    Case(
        "resync as a duration string",
        _set("policy.resyncSeconds", "60s"),
        "spec.policy.resyncSeconds",
    ),
    Case(
        "allowPublicInvokers as a string",
        _set("policy.allowPublicInvokers", "yes"),
        "spec.policy.allowPublicInvokers",
    ),
    # --- unknown fields (kubectl's strict field validation) and a missing spec
    Case(
        "typo in a field name",
        lambda s: s.update(enviroment=[]),
        "spec.enviroment",
        "unknown field",
    ),
    Case(
        "unknown settings field",
        _set("settings.maxInstance", 3),
        "spec.settings.maxInstance",
        "unknown field",
    ),
]


def test_the_catalog_is_big_and_its_ids_unique():
    assert len(CATALOG) >= 30
    assert len({c.id for c in CATALOG}) == len(CATALOG)


@pytest.mark.parametrize("case", CATALOG, ids=[c.id for c in CATALOG])
def test_bad_input_is_refused_naming_the_field(crds, namespace, case: Case):
    obj = contract_example(namespace, name="bad")
    if case.existing:
        done = apply(crds, obj)
        assert done.returncode == 0, f"the valid example must apply first: {done.stderr}"
    bad = variant(obj)
    case.mutate(bad["spec"])
    done = apply(crds, bad, dry_run=True)
    assert done.returncode != 0, f"{case.id}: accepted\n{done.stdout[:2000]}"
    message = done.stderr
    # Refused by the API (admission/validation), not by kubectl or for an unrelated reason.
    assert "Orchestrator" in message or "orchestrators" in message, message
    assert case.field in message, f"{case.id}: {case.field!r} not named in\n{message}"
    if case.says:
        assert case.says in message, f"{case.id}: {case.says!r} not in\n{message}"


def test_a_missing_spec_is_refused(crds, namespace):
    obj = contract_example(namespace, name="bad")
    del obj["spec"]
    done = apply(crds, obj, dry_run=True)
    assert done.returncode != 0
    assert "spec" in done.stderr and "Required" in done.stderr, done.stderr
