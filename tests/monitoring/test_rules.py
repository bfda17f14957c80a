"""manifests/monitoring/: the alert rules checked and unit-tested by the real promtool (built from
github.com/prometheus/prometheus by `hack/testenv build-tools`), the PrometheusRule equal to the
plain rule file, the dashboard's panels, and each alert documented in docs/operations.md."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.k8s import BIN

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "manifests" / "monitoring"
RULES = MONITORING / "rules.yaml"
UNIT_TESTS = Path(__file__).resolve().parent / "rules_test.yaml"
METRIC = re.compile(r"\brunwarden_[a-z0-9_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = BIN / "promtool"
    if not tool.exists():
        pytest.fail(
            f"{tool} not found: build it with `hack/testenv build-tools` (`make test` does)"
        )
    return subprocess.run([str(tool), *args], text=True, capture_output=True, timeout=300)


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_rule_file():
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say():
    done = promtool("test", "rules", str(UNIT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_unit_tests_would_catch_a_broken_rule(tmp_path):
    """A rule file whose alerts never fire fails the same unit tests (so they test something)."""
    broken = yaml.safe_load(RULES.read_text())
    for group in broken["groups"]:
        for rule in group["rules"]:
            rule["expr"] = "vector(1) == 0"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(broken))
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(tmp_path / "rules.yaml")]
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(tests))
    done = promtool("test", "rules", str(tmp_path / "rules_test.yaml"))
    assert done.returncode != 0
    for alert in alerts():
        assert f"alertname: {alert['alert']}" in done.stdout + done.stderr, alert["alert"]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names == {
        "RunwardenNoChecks",
        "RunwardenOrchestratorNotReady",
        "RunwardenDriftFight",
        "RunwardenOwnedElsewhere",
        "RunwardenQuotaExceeded",
        "RunwardenRepairRateSpike",
    }
    assert names <= fired, names - fired
    assert names <= quiet, names - quiet


def test_the_prometheusrule_carries_the_same_groups():
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_every_alert_has_a_severity_a_runbook_and_a_section_in_operations_md():
    operations = (REPO / "docs" / "operations.md").read_text()
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert alert["annotations"]["runbook_url"].endswith(f"docs/operations.md#{name.lower()}")
        assert f"### {name}" in operations, f"docs/operations.md has no section for {name}"


def test_the_dashboard_shows_what_operators_ask_for():
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    wanted = {
        "Checks / s by result": "runwarden_reconcile_total",
        "Repairs by aspect": "runwarden_drift_repairs_total",
        "Detection → repair latency": "runwarden_drift_repair_seconds_bucket",
        "GCP calls / s by method and code": "runwarden_gcp_requests_total",
        "Budget waits": "runwarden_budget_wait_seconds_total",
        "Orchestrators by Ready and reason": "runwarden_orchestrators_by_reason",
    }
    for title, metric in wanted.items():
        assert metric in exprs[title], title
    assert "by (method, code)" in exprs["GCP calls / s by method and code"]
    assert "by (aspect)" in exprs["Repairs by aspect"]
    assert "by (ready, reason)" in exprs["Orchestrators by Ready and reason"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def metric_names_used() -> set[str]:
    """Every runwarden_* name in the rules and the dashboard (tests/monitoring/test_metrics_e2e.py
    checks them against a real controller's /metrics)."""
    text = RULES.read_text() + (MONITORING / "dashboard.json").read_text()
    return set(METRIC.findall(text))


def test_the_rules_and_dashboard_use_metric_names_only():
    names = metric_names_used()
    assert "runwarden_reconcile_total" in names and len(names) >= 8
