"""controller.gcp.convert on real protos (google.cloud.run_v2, google.iam.v1.policy_pb2): the pure
proto <-> model conversion the gateway reads and writes through.

Grounding (googleapis): google/cloud/run/v2/k8s.min.proto, EnvVar is a name with ``value`` or
``value_source.secret_key_ref`` {secret, version} (a oneof); google/iam/v1/policy.proto,
Policy.version: "Any operation that affects conditional role bindings must specify version 3",
including "removing any role binding, with or without a condition, from a policy that includes
conditions".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from google.protobuf import duration_pb2
from google.type import expr_pb2

from controller.domain.model import EnvValue, ServiceRef, SettingValue
from controller.gcp import convert
from controller.gcp.errors import Invalid

REF = ServiceRef("my-project", "us-west2", "svc")
CRD = Path(__file__).resolve().parents[3] / "crds" / "orchestrators.runwarden.dev.yaml"
ROLE = "roles/run.invoker"
OTHER_ROLE = "roles/run.developer"
A, B, C = "user:a@example.com", "user:b@example.com", "serviceAccount:c@p.iam.gserviceaccount.com"
LIT, SECRET = EnvValue.literal, EnvValue.from_secret

# ---------------------------------------------------------------------- builders


def env_var(name: str, value: EnvValue) -> run_v2.EnvVar:
    if value.secret is not None:
        ref = run_v2.SecretKeySelector(secret=value.secret.secret, version=value.secret.version)
        return run_v2.EnvVar(name=name, value_source=run_v2.EnvVarSource(secret_key_ref=ref))
    return run_v2.EnvVar(name=name, value=value.value or "")


def container(name: str = "", *, env: Mapping[str, EnvValue] = {}, port: int = 0) -> Any:
    """A Container as a raw protobuf message (what the gateway hands to convert)."""
    c = run_v2.Container(name=name, image="us-docker.pkg.dev/p/r/app:1")
    c.env.extend(env_var(k, v) for k, v in env.items())
    if port:
        c.ports.append(run_v2.ContainerPort(container_port=port))
    return run_v2.Container.pb(c)


def service(*containers: Any, **fields: Any) -> Any:
    """A Service (raw protobuf) with ``containers`` in its template."""
    pb = run_v2.Service.pb(run_v2.Service(name=REF.resource_name, **fields))
    for c in containers:
        pb.template.containers.append(c)
    return pb


def env_of(c: Any) -> list[tuple[str, str]]:
    """The container's env in order, as (name, "value") or (name, "secret:S@V")."""
    out = []
    for e in c.env:
        if e.HasField("value_source"):
            ref = e.value_source.secret_key_ref
            out.append((e.name, f"secret:{ref.secret}@{ref.version}"))
        else:
            out.append((e.name, e.value))
    return out


def binding(role: str, *members: str, condition: str = "") -> policy_pb2.Binding:
    b = policy_pb2.Binding(role=role, members=list(members))
    if condition:
        b.condition.CopyFrom(expr_pb2.Expr(title="t", expression=condition))
    return b


def policy(*bindings: policy_pb2.Binding, version: int = 1) -> policy_pb2.Policy:
    return policy_pb2.Policy(version=version, bindings=list(bindings), etag=b"etag-1")


def bindings_list(p: policy_pb2.Policy) -> list[tuple[str, list[str], str]]:
    return [(b.role, list(b.members), b.condition.expression) for b in p.bindings]


# ---------------------------------------------------------------------- container_of

APP, SIDECAR = container("app", port=8080), container("sidecar")


@pytest.mark.parametrize(
    ("containers", "name", "picked"),
    [
        ((SIDECAR, APP), "sidecar", "sidecar"),  # by name, even without a port
        ((SIDECAR, APP), "", "app"),  # the ingress container (it has a port)
        ((SIDECAR,), "", "sidecar"),  # the only one, port or not
        ((APP,), "app", "app"),
    ],
    ids=["by-name", "ingress-port", "only-one", "named-only-one"],
)
def test_container_of_picks(containers: tuple[Any, ...], name: str, picked: str) -> None:
    assert convert.container_of(service(*containers), name).name == picked


@pytest.mark.parametrize(
    ("containers", "name", "says"),
    [
        ((SIDECAR, APP), "worker", ["spec.service.container", "worker"]),
        ((SIDECAR, container("other")), "", ["several containers", "spec.service.container"]),
        ((), "", ["no container"]),
    ],
    ids=["unknown-name", "several-no-port", "none"],
)
def test_container_of_errors_name_the_field(
    containers: tuple[Any, ...], name: str, says: list[str]
) -> None:
    with pytest.raises(Invalid) as err:
        convert.container_of(service(*containers), name)
    for text in says:
        assert text in str(err.value)


# ---------------------------------------------------------------------- edit_env

BEFORE = {"FOREIGN": LIT("f"), "KEEP": LIT("k"), "OURS": LIT("old"), "TOKEN": SECRET("tok", "3")}


@pytest.mark.parametrize(
    ("env_set", "remove", "after"),
    [
        pytest.param(
            {"NEW": LIT("n")},
            set(),
            [("FOREIGN", "f"), ("KEEP", "k"), ("OURS", "old"), ("TOKEN", "secret:tok@3"),
             ("NEW", "n")],
            id="add-appends-keeps-order",
        ),
        pytest.param(
            {"OURS": LIT("new")},
            set(),
            [("FOREIGN", "f"), ("KEEP", "k"), ("OURS", "new"), ("TOKEN", "secret:tok@3")],
            id="replace-in-place",
        ),
        pytest.param(
            {},
            {"OURS"},
            [("FOREIGN", "f"), ("KEEP", "k"), ("TOKEN", "secret:tok@3")],
            id="remove-only-what-is-asked",
        ),
        pytest.param(
            {},
            {"NOT_THERE"},
            [("FOREIGN", "f"), ("KEEP", "k"), ("OURS", "old"), ("TOKEN", "secret:tok@3")],
            id="remove-absent-is-harmless",
        ),
        pytest.param(
            {"OURS": SECRET("ours-secret", "latest")},
            set(),
            [("FOREIGN", "f"), ("KEEP", "k"), ("OURS", "secret:ours-secret@latest"),
             ("TOKEN", "secret:tok@3")],
            id="literal-to-secret-ref",
        ),
        pytest.param(
            {"TOKEN": LIT("plain")},
            set(),
            [("FOREIGN", "f"), ("KEEP", "k"), ("OURS", "old"), ("TOKEN", "plain")],
            id="secret-ref-to-literal",
        ),
        pytest.param(
            {"TOKEN": SECRET("tok", "4"), "NEW": SECRET("s", "1")},
            {"OURS"},
            [("FOREIGN", "f"), ("KEEP", "k"), ("TOKEN", "secret:tok@4"), ("NEW", "secret:s@1")],
            id="set-and-remove-together",
        ),
        pytest.param(
            {"OURS": LIT("")},
            set(),
            [("FOREIGN", "f"), ("KEEP", "k"), ("OURS", ""), ("TOKEN", "secret:tok@3")],
            id="empty-value-is-a-value",
        ),
    ],
)  # fmt: skip
def test_edit_env(
    env_set: dict[str, EnvValue], remove: set[str], after: list[tuple[str, str]]
) -> None:
    c = container("app", env=BEFORE)
    convert.edit_env(c, env_set, frozenset(remove))
    assert env_of(c) == after


def test_edit_env_leaves_no_value_beside_a_secret_ref() -> None:
    """value and value_source are a oneof: switching kinds must not keep the other half."""
    c = container("app", env={"X": LIT("was-literal"), "Y": SECRET("s", "1")})
    convert.edit_env(c, {"X": SECRET("s2", "2"), "Y": LIT("now-literal")}, frozenset())
    x, y = c.env
    assert x.value == "" and x.HasField("value_source")
    assert not y.HasField("value_source") and y.value == "now-literal"


# ---------------------------------------------------------------------- edit_policy


@pytest.mark.parametrize(
    ("before", "add", "remove", "after", "version"),
    [
        pytest.param(
            policy(binding(ROLE, B), binding(OTHER_ROLE, A)),
            {A}, set(),
            [(ROLE, [A, B], ""), (OTHER_ROLE, [A], "")], 1,
            id="add-keeps-other-roles",
        ),
        pytest.param(
            policy(binding(OTHER_ROLE, A)),
            {C}, set(),
            [(OTHER_ROLE, [A], ""), (ROLE, [C], "")], 1,
            id="add-creates-the-binding",
        ),
        pytest.param(
            policy(binding(ROLE, A, B), binding(OTHER_ROLE, A)),
            set(), {A},
            [(ROLE, [B], ""), (OTHER_ROLE, [A], "")], 1,
            id="remove-only-that-member",
        ),
        pytest.param(
            policy(binding(OTHER_ROLE, A), binding(ROLE, A)),
            set(), {A},
            [(OTHER_ROLE, [A], "")], 1,
            id="last-member-removes-the-binding",
        ),
        pytest.param(
            policy(binding(ROLE, A, condition="request.time < x"), binding(ROLE, B)),
            {C}, {B},
            [(ROLE, [A], "request.time < x"), (ROLE, [C], "")], 3,
            id="conditional-binding-untouched-version-3",
        ),
        pytest.param(
            policy(binding(ROLE, A, condition="request.time < x")),
            {B}, set(),
            [(ROLE, [A], "request.time < x"), (ROLE, [B], "")], 3,
            id="conditional-same-role-new-unconditional",
        ),
        pytest.param(
            policy(binding(OTHER_ROLE, A, condition="c"), binding(ROLE, A, B)),
            set(), {A, B},
            [(OTHER_ROLE, [A], "c")], 3,
            id="removing-a-binding-beside-a-condition-version-3",
        ),
    ],
)  # fmt: skip
def test_edit_policy(
    before: policy_pb2.Policy,
    add: set[str],
    remove: set[str],
    after: list[tuple[str, list[str], str]],
    version: int,
) -> None:
    original = policy_pb2.Policy()
    original.CopyFrom(before)
    edited = convert.edit_policy(before, ROLE, frozenset(add), frozenset(remove))
    assert edited is not None
    assert bindings_list(edited) == after
    assert edited.version == version
    assert edited.etag == b"etag-1"  # read-modify-write: the etag that was read goes back
    assert before == original  # a copy is edited, never the policy that was read


@pytest.mark.parametrize(
    ("before", "add", "remove"),
    [
        (policy(binding(ROLE, A, B)), {A}, set()),
        (policy(binding(ROLE, A)), set(), {B}),
        (policy(binding(ROLE, A)), {A}, {B}),
        (policy(), set(), {A}),
        # Only the unconditional binding counts: A held under a condition is not held.
        (policy(binding(ROLE, A, condition="c"), binding(ROLE, B)), {B}, {C}),
    ],
    ids=["add-held", "remove-absent", "both", "empty-policy", "beside-a-condition"],
)
def test_edit_policy_no_op_is_none(
    before: policy_pb2.Policy, add: set[str], remove: set[str]
) -> None:
    assert convert.edit_policy(before, ROLE, frozenset(add), frozenset(remove)) is None


# ---------------------------------------------------------------------- bindings_of


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (policy(), {}),
        (policy(binding(ROLE, A), binding(OTHER_ROLE, B)), {ROLE: {A}, OTHER_ROLE: {B}}),
        (policy(binding(ROLE, A), binding(ROLE, B)), {ROLE: {A, B}}),  # merged
        (policy(binding(ROLE, A, condition="c"), binding(ROLE, B)), {ROLE: {B}}),
        (policy(binding(ROLE, A, condition="c")), {}),
    ],
    ids=["empty", "two-roles", "same-role-twice", "conditional-skipped", "only-conditional"],
)
def test_bindings_of(given: policy_pb2.Policy, expected: dict[str, set[str]]) -> None:
    assert convert.bindings_of(given) == {k: frozenset(v) for k, v in expected.items()}


# ---------------------------------------------------------------------- settings_of


def full_service() -> Any:
    app = container("app", port=8080)
    app.resources.limits["cpu"] = "2"
    app.resources.limits["memory"] = "1Gi"
    svc = service(app, ingress=run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY)
    svc.labels["team"] = "data"
    t = svc.template
    t.service_account = "orchestrator@my-project.iam.gserviceaccount.com"
    t.timeout.CopyFrom(duration_pb2.Duration(seconds=540))
    t.scaling.min_instance_count = 1
    t.scaling.max_instance_count = 10
    t.max_instance_request_concurrency = 80
    return svc


FULL: dict[str, SettingValue] = {
    "serviceAccount": "orchestrator@my-project.iam.gserviceaccount.com",
    "timeoutSeconds": 540,
    "minInstances": 1,
    "maxInstances": 10,
    "concurrency": 80,
    "cpu": "2",
    "memory": "1Gi",
    "ingress": "internal",
    "labels.team": "data",
}


def test_settings_of_reads_every_field() -> None:
    svc = full_service()
    assert convert.settings_of(svc, svc.template.containers[0]) == FULL


def test_settings_of_leaves_out_what_the_service_does_not_set() -> None:
    """No service account, no limits, ingress unspecified, no labels: absent, not "" or 0."""
    svc = service(container("app", port=8080))
    assert convert.settings_of(svc, svc.template.containers[0]) == {
        "timeoutSeconds": 0,
        "minInstances": 0,
        "maxInstances": 0,
        "concurrency": 0,
    }


@pytest.mark.parametrize(("crd", "api"), list(convert.INGRESS_TO_API.items()))
def test_settings_of_ingress_in_the_crd_vocabulary(crd: str, api: run_v2.IngressTraffic) -> None:
    svc = service(container("app", port=8080), ingress=api)
    assert convert.settings_of(svc, svc.template.containers[0])["ingress"] == crd


def test_settings_of_reads_only_what_the_crd_knows() -> None:
    """Every key settings_of can report is a property of the CRD's spec.settings (labels.K for
    spec.settings.labels), so drift is never reported on a field nobody can declare."""
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    declarable = set(schema["properties"]["spec"]["properties"]["settings"]["properties"])
    svc = full_service()
    keys = {k.split(".", 1)[0] for k in convert.settings_of(svc, svc.template.containers[0])}
    assert keys <= declarable, keys - declarable


def test_edit_settings_then_settings_of_round_trips() -> None:
    svc = service(container("app", port=8080))
    c = svc.template.containers[0]
    convert.edit_settings(svc, c, FULL)
    assert convert.settings_of(svc, c) == FULL


# ---------------------------------------------------------------------- observed


def test_observed_reads_env_settings_bindings_and_revision() -> None:
    svc = full_service()
    app = svc.template.containers[0]
    app.env.append(run_v2.EnvVar.pb(env_var("MODE", LIT("prod"))))
    # A secret reference without a version means "latest" (run_v2 SecretKeySelector).
    app.env.append(run_v2.EnvVar.pb(env_var("TOKEN", SECRET("tok", ""))))
    svc.template.containers.append(container("sidecar", env={"SIDE": LIT("not-ours")}))
    svc.uri = "https://svc-abc-uw.a.run.app"
    svc.generation = 7
    svc.latest_ready_revision = f"{REF.resource_name}/revisions/svc-00007-xyz"
    pol = policy(binding(ROLE, A), binding(ROLE, B, condition="c"))

    got = convert.observed(REF, "", svc, pol)

    assert got.ref == REF and got.container == ""  # "" stays "": the default container
    assert got.env == {"MODE": LIT("prod"), "TOKEN": SECRET("tok", "latest")}
    assert got.settings == FULL
    assert got.bindings == {ROLE: frozenset({A})}
    assert got.uri == "https://svc-abc-uw.a.run.app"
    assert got.latest_ready_revision == "svc-00007-xyz"
    assert got.generation == 7
    assert got.iam_etag == b"etag-1"
    assert got.service_handle is svc and got.policy_handle is pol


def test_observed_by_container_name_from_a_proto_plus_service() -> None:
    """The gateway may hold a proto-plus Service; a named container is reported by name."""
    pb = service(container("app", port=8080), container("worker", env={"W": LIT("1")}))
    got = convert.observed(REF, "worker", run_v2.Service.wrap(pb), None)
    assert got.container == "worker"
    assert got.env == {"W": LIT("1")}
    assert got.bindings == {} and got.iam_etag == b""  # no policy read
