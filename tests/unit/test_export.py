"""`runwarden export`'s pure core: an observed service -> an Orchestrator that changes nothing,
or a refusal naming what cannot be declared. Real protos through the controller's own conversion;
no I/O (the end-to-end test, tests/e2e/test_export.py, applies the output and counts GCP calls)."""

from __future__ import annotations

from typing import Any

import pytest
from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from google.type import expr_pb2

from controller import export
from controller.domain import spec
from controller.domain.model import Managed, Mode, ServiceRef
from controller.domain.plan import plan
from controller.domain.tenancy import Binding
from controller.gcp import convert

REF = ServiceRef("nba-props-platform", "us-west2", "phase3-to-phase4")
SECRET_VALUE = "s3cr3t-literal-value"
PUSH_SA = "serviceAccount:756957797294-compute@developer.gserviceaccount.com"


def service(containers: list[dict[str, Any]] | None = None, **fields: Any) -> Any:
    if containers is None:
        containers = [
            {
                "name": "app",
                "image": "us-docker.pkg.dev/cloudrun/container/hello",
                "ports": [{"container_port": 8080}],
                "env": [
                    {"name": "GCP_PROJECT_ID", "value": "nba-props-platform"},
                    {"name": "API_TOKEN", "value": SECRET_VALUE},
                    {
                        "name": "SLACK_WEBHOOK_URL",
                        "value_source": {"secret_key_ref": {"secret": "slack-webhook"}},
                    },
                ],
                "resources": {"limits": {"cpu": "1", "memory": "512Mi"}},
            }
        ]
    template = {
        "containers": containers,
        "timeout": {"seconds": 540},
        "scaling": {"min_instance_count": 0, "max_instance_count": 10},
        "max_instance_request_concurrency": 0,  # unset: Cloud Run's default
        "service_account": "orchestrator@nba-props-platform.iam.gserviceaccount.com",
    }
    template.update(fields.pop("template", {}))
    body = {
        "name": REF.resource_name,
        "uri": "https://phase3-to-phase4-xyz.a.run.app",
        "latest_ready_revision": f"{REF.resource_name}/revisions/phase3-to-phase4-00001-abc",
        "latest_created_revision": f"{REF.resource_name}/revisions/phase3-to-phase4-00001-abc",
        "ingress": run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL,
        "labels": {"team": "data"},
        "template": template,
        **fields,
    }
    return run_v2.Service.pb(run_v2.Service(body))


def policy(*bindings: policy_pb2.Binding) -> policy_pb2.Policy:
    p = policy_pb2.Policy(etag=b"e1")
    if not bindings:
        bindings = (
            policy_pb2.Binding(role="roles/run.invoker", members=[PUSH_SA]),
            policy_pb2.Binding(role="roles/run.developer", members=["user:dev@example.com"]),
        )
    p.bindings.extend(bindings)
    return p


def run_export(svc: Any, pol: Any = None, target: export.Target | None = None) -> Any:
    observed = convert.observed(REF, "", svc, pol if pol is not None else policy())
    facts = convert.adoption_facts(observed, "roles/run.invoker")
    if len(facts.containers) > 1:
        observed = convert.observed(REF, facts.managed_container, svc, pol or policy())
    return export.orchestrator(observed, facts, target or export.Target()), observed


def test_a_plain_service_exports_env_secret_refs_invokers_and_settings():
    (doc, notes), observed = run_export(service())
    assert doc["apiVersion"] == "runwarden.dev/v1alpha1" and doc["kind"] == "Orchestrator"
    assert doc["metadata"] == {"name": "phase3-to-phase4"}
    body = doc["spec"]
    assert body["service"] == {
        "project": "nba-props-platform",
        "region": "us-west2",
        "name": "phase3-to-phase4",
    }
    assert body["env"] == [
        {"name": "GCP_PROJECT_ID", "value": "nba-props-platform"},
        {"name": "API_TOKEN", "value": SECRET_VALUE},
        # The reference, never the secret's value; an empty version is Cloud Run's "latest".
        {
            "name": "SLACK_WEBHOOK_URL",
            "secretKeyRef": {"secret": "slack-webhook", "version": "latest"},
        },
    ]
    # Only roles/run.invoker, unconditional members.
    assert body["invokers"] == {"role": "roles/run.invoker", "members": [PUSH_SA]}
    assert body["settings"] == {
        "timeoutSeconds": 540,
        "minInstances": 0,
        "maxInstances": 10,
        "serviceAccount": "orchestrator@nba-props-platform.iam.gserviceaccount.com",
        "cpu": "1",
        "memory": "512Mi",
        "ingress": "all",
        "labels": {"team": "data"},
    }
    assert "concurrency" not in body["settings"]  # 0 = unset in the v2 API; the CRD refuses 0
    assert body["policy"]["mode"] == "Observe"
    assert notes == []
    # The controller's own reading of it, in Enforce mode and owning nothing: nothing to do.
    desired = spec.parse({**body, "policy": {**body["policy"], "mode": "Enforce"}})
    assert plan(desired, observed, Managed()).empty


def test_mode_and_namespace_are_the_targets():
    target = export.Target(
        mode=Mode.ENFORCE, namespace="pipeline", binding=Binding.of("pipeline", {})
    )
    (doc, _), _ = run_export(service(), target=target)
    assert doc["metadata"] == {"name": "phase3-to-phase4", "namespace": "pipeline"}
    assert doc["spec"]["policy"]["mode"] == "Enforce"


def test_settings_the_crd_cannot_express_are_left_undeclared_and_named():
    svc = service(
        labels={"team": "data", "goog-Managed": "x"},
        template={"scaling": {"min_instance_count": 0, "max_instance_count": 0}},
    )
    svc.template.containers[0].resources.limits["memory"] = "0.5Gi"
    (doc, notes), _ = run_export(svc)
    settings = doc["spec"]["settings"]
    assert "memory" not in settings and "maxInstances" not in settings
    assert settings["labels"] == {"team": "data"}
    assert any("settings.memory" in n for n in notes), notes
    assert any("settings.labels.goog-Managed" in n for n in notes), notes


def test_another_containers_env_is_refused_by_name_without_values():
    containers = [
        {"name": "app", "ports": [{"container_port": 8080}], "env": [{"name": "A", "value": "1"}]},
        {"name": "sidecar", "env": [{"name": "PROXY_TOKEN", "value": SECRET_VALUE}]},
    ]
    with pytest.raises(export.Refused) as refused:
        run_export(service(containers))
    text = str(refused.value)
    assert "sidecar" in text and "PROXY_TOKEN" in text and "spec.service.container" in text
    assert SECRET_VALUE not in text


def test_several_containers_without_other_env_name_the_managed_one():
    containers = [
        {"name": "sidecar", "image": "proxy"},
        {"name": "app", "ports": [{"container_port": 8080}], "env": [{"name": "A", "value": "1"}]},
    ]
    (doc, _), _ = run_export(service(containers))
    assert doc["spec"]["service"]["container"] == "app"
    assert doc["spec"]["env"] == [{"name": "A", "value": "1"}]


def test_conditional_bindings_of_the_invoker_role_are_refused():
    conditional = policy_pb2.Binding(
        role="roles/run.invoker",
        members=["user:temp@example.com"],
        condition=expr_pb2.Expr(
            title="until-june", expression="request.time < timestamp('2027-06-01T00:00:00Z')"
        ),
    )
    plain = policy_pb2.Binding(role="roles/run.invoker", members=[PUSH_SA])
    with pytest.raises(export.Refused) as refused:
        run_export(service(), policy(plain, conditional))
    assert "conditional binding" in str(refused.value)


def test_conditional_bindings_of_other_roles_do_not_matter():
    other = policy_pb2.Binding(
        role="roles/run.developer",
        members=["user:temp@example.com"],
        condition=expr_pb2.Expr(title="t", expression="true"),
    )
    (doc, _), _ = run_export(service(), policy(other))
    assert "invokers" not in doc["spec"]


def test_a_claim_by_another_owner_is_refused_unless_it_is_this_target():
    svc = service(annotations={convert.OWNER_ANNOTATION: "prod/pipeline/phase3-to-phase4"})
    with pytest.raises(export.Refused) as refused:
        run_export(svc)
    assert "prod/pipeline/phase3-to-phase4" in str(refused.value)
    target = export.Target(
        namespace="pipeline", cluster_name="prod", binding=Binding.of("pipeline", {})
    )
    (doc, _), _ = run_export(svc, target=target)
    assert doc["metadata"]["namespace"] == "pipeline"


def test_public_invokers_need_allow_public_and_the_namespace_annotation():
    pol = policy(policy_pb2.Binding(role="roles/run.invoker", members=["allUsers", PUSH_SA]))
    (doc, _), _ = run_export(service(), pol)
    assert doc["spec"]["policy"]["allowPublicInvokers"] is True
    assert doc["spec"]["invokers"]["members"] == ["allUsers", PUSH_SA]
    closed = export.Target(
        namespace="pipeline", binding=Binding.of("pipeline", {"runwarden.dev/projects": "*"})
    )
    with pytest.raises(export.Refused) as refused:
        run_export(service(), pol, target=closed)
    assert "runwarden.dev/allow-public-invokers" in str(refused.value)
    opened = export.Target(
        namespace="pipeline",
        binding=Binding.of("pipeline", {"runwarden.dev/allow-public-invokers": "true"}),
    )
    run_export(service(), pol, target=opened)


def test_a_member_the_crd_cannot_declare_is_refused():
    pol = policy(
        policy_pb2.Binding(
            role="roles/run.invoker",
            members=["deleted:serviceAccount:old@p.iam.gserviceaccount.com?uid=1"],
        )
    )
    with pytest.raises(export.Refused) as refused:
        run_export(service(), pol)
    assert "spec.invokers.members" in str(refused.value)


def test_a_failed_latest_revision_is_refused():
    svc = service(
        latest_created_revision=f"{REF.resource_name}/revisions/phase3-to-phase4-00002-new",
        terminal_condition={"type_": "Ready", "state": run_v2.Condition.State.CONDITION_FAILED},
    )
    with pytest.raises(export.Refused) as refused:
        run_export(svc)
    assert "phase3-to-phase4-00002-new" in str(refused.value)


def test_render_is_multi_document_yaml_that_parses_back():
    (doc, _), _ = run_export(service())
    other = {**doc, "metadata": {"name": "phase4-to-phase5"}}
    other = {
        **other,
        "spec": {**doc["spec"], "service": {**doc["spec"]["service"], "name": "phase4-to-phase5"}},
    }
    import yaml

    text = export.render([doc, other], "projects/nba-props-platform/locations/us-west2")
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(text)] == [
        "phase3-to-phase4",
        "phase4-to-phase5",
    ]
    assert text.startswith("# runwarden export of projects/nba-props-platform/locations/us-west2")


def test_the_cli_refuses_a_bad_project_before_any_call(capsys):
    with pytest.raises(SystemExit) as exited:
        export.main(["--project", "X", "--region", "us-west2"])
    assert exited.value.code == 2
    assert "--project is not a valid GCP project id" in capsys.readouterr().err


def test_invoker_iam_disabled_is_public_and_kept_so():
    (doc, _), observed = run_export(service(invoker_iam_disabled=True))
    assert observed.invoker_iam_disabled
    assert doc["spec"]["policy"]["allowPublicInvokers"] is True
    closed = export.Target(
        namespace="pipeline", binding=Binding.of("pipeline", {"runwarden.dev/projects": "*"})
    )
    with pytest.raises(export.Refused) as refused:
        run_export(service(invoker_iam_disabled=True), target=closed)
    assert "invokerIamDisabled" in str(refused.value)
