"""CLI -> Settings, and the log bridge (kopf's records as JSON with k8s_ref, no settings dump)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from controller.obs import logs
from controller.settings import Settings, parse_selector, selector_matches


def test_cli_flags() -> None:
    s = Settings.from_cli(
        [
            "--namespace",
            "a",
            "-n",
            "b",
            "--standalone",
            "--gcp-endpoint",
            "127.0.0.1:1",
            "--metrics-port",
            "9090",
            "--liveness",
            "http://0.0.0.0:8080/healthz",
            "--log-format",
            "console",
        ],
        {},
    )
    assert s.namespaces == ("a", "b") and not s.all_namespaces
    assert s.standalone and s.gcp_endpoint == "127.0.0.1:1" and s.metrics_port == 9090
    assert s.liveness == "http://0.0.0.0:8080/healthz" and s.log_format == "console"
    assert s.resync_override is None


def test_environment_fallbacks() -> None:
    s = Settings.from_cli(
        ["--all-namespaces"],
        {"RUNWARDEN_GCP_ENDPOINT": "127.0.0.1:2", "RUNWARDEN_RESYNC_SECONDS": "2.5"},
    )
    assert s.all_namespaces and s.gcp_endpoint == "127.0.0.1:2" and s.resync_override == 2.5
    assert Settings.from_cli([], {}).all_namespaces
    flag_wins = Settings.from_cli(["--gcp-endpoint", "h:1"], {"RUNWARDEN_GCP_ENDPOINT": "h:2"})
    assert flag_wins.gcp_endpoint == "h:1"


@pytest.mark.parametrize(
    "argv", [["--namespace", "a", "--all-namespaces"], ["--log-format", "xml"]]
)
def test_bad_flags_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_cli(argv, {})


def test_heartbeat_leader_election_and_selector_flags() -> None:
    default = Settings.from_cli([], {"POD_NAME": "runwarden-abc"})
    assert default.status_heartbeat == 300 and not default.leader_election
    assert default.leader_election_namespace == "runwarden-system"
    assert default.leader_election_identity == "runwarden-abc"
    assert default.selector == ""
    s = Settings.from_cli(
        ["--leader-election", "--leader-election-identity", "r1", "-l", "shard in (a,b)"],
        {"RUNWARDEN_STATUS_HEARTBEAT": "0", "POD_NAME": "ignored"},
    )
    assert s.leader_election and s.leader_election_identity == "r1"
    assert s.status_heartbeat == 0 and s.selector == "shard in (a,b)"
    assert Settings.from_cli(["--status-heartbeat", "60"], {}).status_heartbeat == 60
    no_pod = Settings.from_cli([], {}).leader_election_identity
    assert no_pod.endswith(f"-{os.getpid()}") and no_pod != f"-{os.getpid()}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--status-heartbeat", "-1"],
        ["--selector", "shard in ()"],
        ["--selector", "a b"],
        ["--leader-election-lease-seconds", "1"],
    ],
)
def test_bad_new_flags_exit_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        Settings.from_cli(argv, {})


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("", {}, True),
        ("shard=a", {"shard": "a"}, True),
        ("shard==a", {"shard": "b"}, False),
        ("shard=a", {}, False),
        ("shard!=a", {}, True),  # Kubernetes: != matches a missing key
        ("shard!=a", {"shard": "a"}, False),
        ("shard in (a, b),tier", {"shard": "b", "tier": "x"}, True),
        ("shard in (a,b),tier", {"shard": "b"}, False),
        ("shard notin (a,b)", {"shard": "c"}, True),
        ("shard notin (a,b)", {}, True),
        ("!legacy", {"legacy": ""}, False),
        ("runwarden.dev/shard=s-1", {"runwarden.dev/shard": "s-1"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(parse_selector(selector), labels) is matches


def test_bad_resync_env_exits() -> None:
    with pytest.raises(SystemExit):
        Settings.from_cli([], {"RUNWARDEN_RESYNC_SECONDS": "soon"})


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_kopf_records_become_json_with_k8s_ref_and_no_settings(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure("json")
    ref = {
        "apiVersion": "runwarden.dev/v1alpha1",
        "kind": "Orchestrator",
        "namespace": "ns",
        "name": "orch",
        "uid": "u-1",
    }
    # kopf's own settings shape: once kopf is imported (by another test in the same session), its
    # Event-posting handler on kopf.objects reads settings.posting of every record.
    posting = SimpleNamespace(enabled=False, level=logging.CRITICAL, loggers=False)
    settings = SimpleNamespace(posting=posting)
    logging.getLogger("kopf.objects").warning(
        "Handler 'x' failed", extra={"k8s_ref": ref, "settings": settings, "k8s_skip": False}
    )
    logs.get("runwarden.test").info("drift_repaired", aspect="env", names=["A"])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    kopf_line, own_line = lines
    assert kopf_line["event"] == "Handler 'x' failed"
    assert kopf_line["k8s_ref"] == {"namespace": "ns", "name": "orch", "uid": "u-1"}
    assert kopf_line["level"] == "warning" and kopf_line["logger"] == "kopf.objects"
    assert "settings" not in kopf_line and "k8s_skip" not in kopf_line
    assert own_line["event"] == "drift_repaired" and own_line["names"] == ["A"]


def test_kopf_object_info_lines_are_quiet(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logs.configure("json")
    logging.getLogger("kopf.objects").info("Timer 'drift-loop' succeeded.")
    assert capsys.readouterr().err == ""


def test_tenancy_flags() -> None:
    from controller.domain.tenancy import BindingMode

    assert Settings.from_cli([], {}).namespace_binding is BindingMode.OPTIONAL
    s = Settings.from_cli(
        ["--namespace-binding", "required", "--iam-credentials-endpoint", "http://127.0.0.1:9"],
        {},
    )
    assert s.namespace_binding is BindingMode.REQUIRED
    assert s.iam_credentials_endpoint == "http://127.0.0.1:9"
    env = {"RUNWARDEN_NAMESPACE_BINDING": "required"}
    assert Settings.from_cli([], env).namespace_binding is BindingMode.REQUIRED
    with pytest.raises(SystemExit):
        Settings.from_cli([], {"RUNWARDEN_NAMESPACE_BINDING": "sometimes"})
    with pytest.raises(SystemExit):
        Settings.from_cli(["--namespace-binding", "sometimes"], {})


def test_cluster_name_flag_env_and_default() -> None:
    assert Settings.from_cli([], {}).cluster_name == "default"
    assert Settings.from_cli([], {"RUNWARDEN_CLUSTER_NAME": "prod-eu"}).cluster_name == "prod-eu"
    flag = Settings.from_cli(["--cluster-name", "a"], {"RUNWARDEN_CLUSTER_NAME": "b"})
    assert flag.cluster_name == "a"
    with pytest.raises(SystemExit):
        Settings.from_cli(["--cluster-name", "a/b"], {})
