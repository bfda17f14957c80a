"""`make demo` end to end: `hack/demo` as a user (or CI) runs it, on the real control plane.

Without a terminal on stdin (CI) the demo must replay both incidents, show them detected and
repaired, and tear everything down. On a terminal it keeps running until `make demo-down`.
Each test gets its own DEMO_DIR, so a demo a developer has running is never touched.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "hack" / "demo"
KUBECTL = REPO / ".cache" / "testenv" / "bin" / "kubectl"
PUSH_MEMBER = "serviceAccount:756957797294-compute@developer.gserviceaccount.com"
DECLARED = ["GCP_PROJECT_ID", "NEXT_PHASE", "NEXT_TOPIC", "PHASE", "SLACK_WEBHOOK_URL (secret)"]
# Values that exist in the seed, the examples or the redeploy: the demo shows names only.
VALUES = ["nba-phase4-trigger", "nba-phase5-trigger", "nba-phase6-trigger", "3f9c2ab"]


@pytest.fixture
def demo_env(tmp_path: Path) -> dict[str, str]:
    if not KUBECTL.exists():
        pytest.fail(
            f"{KUBECTL} not found: build the control plane first (`hack/testenv build`)",
            pytrace=False,
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "RUNWARDEN_"))}
    env["DEMO_DIR"] = str(tmp_path / "demo")
    return env


def section(output: str, start: str, end: str) -> str:
    begin = output.index(start)
    stop = output.find(end, begin)
    return output[begin : stop if stop >= 0 else len(output)]


def orch_row(text: str, name: str) -> list[str]:
    """The last `kubectl get orch` row for `name` in `text`, split into columns."""
    rows = [line.split() for line in text.splitlines() if line.split()[:2] == [name, name]]
    assert rows, f"no `kubectl get orch` row for {name} in:\n{text}"
    return rows[-1]


def assert_stopped(demo_dir: Path) -> None:
    """Every process the demo recorded is gone, and nothing listens on its ports."""

    def alive(entry: dict[str, Any]) -> bool:
        pid, start = entry.get("pid"), entry.get("start_time")
        if not pid or not start:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        fields = stat[stat.rindex(")") + 2 :].split()
        return fields[0] not in ("Z", "X") and fields[19] == start

    state = json.loads((demo_dir / "demo.json").read_text())
    recorded = dict(state["processes"])
    testenv = json.loads((demo_dir / "k8s" / "testenv.json").read_text())
    recorded.update({f"testenv {k}": v for k, v in testenv["processes"].items()})
    assert {"demo", "emulator", "controller", "testenv etcd", "testenv kube-apiserver"} <= set(
        recorded
    ), recorded
    running = {name: e["pid"] for name, e in recorded.items() if alive(e)}
    assert not running, f"still running after the demo: {running}"

    ports = [int(p) for p in testenv["ports"].values()]
    for url in state["emulator"].values():
        ports.append(int(urllib.parse.urlsplit(f"//{url.split('://')[-1]}").port or 0))
    for port in ports:
        with socket.socket() as sock:
            sock.settimeout(1)
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


def audit_choice() -> str:
    """CI (RUNWARDEN_REQUIRE_PUBSUB_EMULATOR=1) requires the audit-log feed; else whatever works."""
    return "1" if os.environ.get("RUNWARDEN_REQUIRE_PUBSUB_EMULATOR") == "1" else "auto"


@pytest.mark.parametrize("drift_source", ["audit-feed", "polling"])
def test_demo_without_a_terminal_shows_both_repairs_and_tears_down(
    demo_env: dict[str, str], drift_source: str
) -> None:
    demo_env["DEMO_AUDIT"] = audit_choice() if drift_source == "audit-feed" else "0"
    # The feed run causes the incidents with the real gcloud (required under CI=true), the
    # polling run with the admin-API replay, so both paths of the demo are covered.
    with_gcloud = drift_source == "audit-feed" and (
        shutil.which("gcloud") is not None or os.environ.get("CI") == "true"
    )
    demo_env["DEMO_GCLOUD"] = "1" if with_gcloud else "0"
    done = subprocess.run(
        [str(DEMO)],
        cwd=REPO,
        env=demo_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out
    assert "\033[" not in out, "no colours when stdout is not a terminal"
    audit = "--audit-subscription" in out
    if demo_env["DEMO_AUDIT"] == "0":
        assert not audit and "drift checks every 5s" in out, out
    elif demo_env["DEMO_AUDIT"] == "1":
        assert audit, out

    # The starting point: all three Ready, nothing repaired yet.
    start = section(out, "$ kubectl get orch -n pipeline", "==> Incident 1")
    for name in ("phase3-to-phase4", "phase4-to-phase5", "phase5-to-phase6"):
        row = orch_row(start, name)
        assert row[4:7] == ["True", "Synced", "0"], row

    # Incident 1: the redeploy leaves two variables; Runwarden restores its five; BUILD_SHA stays.
    one = section(out, "==> Incident 1", "==> Incident 2")
    wiped = section(one, "after the redeploy: phase4-to-phase5", "... waiting")
    assert "env vars:   BUILD_SHA, GCP_PROJECT_ID\n" in wiped, wiped
    restored = section(one, "after Runwarden: phase4-to-phase5", "$ kubectl")
    assert "env vars:   BUILD_SHA, " + ", ".join(DECLARED) + "\n" in restored, restored
    row = orch_row(one, "phase4-to-phase5")
    assert row[4:7] == ["True", "DriftRepaired", "1"], row
    events = section(one, "Events:", "$ grep")
    for reason in ("DriftDetected", "DriftRepaired"):
        assert re.search(rf"{reason} .*env NEXT_PHASE missing", events), events
    log = section(one, "$ grep phase4-to-phase5", "==>")
    assert "result=repaired" in log, log
    # With the feed, the audit entry woke the check: the periodic one was a minute away.
    assert ("woken_by=['audit']" in log) == audit, log

    # Incident 2: the invoker binding disappears and comes back; the other role is untouched.
    two = section(out, "==> Incident 2", "==> Both incidents")
    lost = section(two, "after the IAM change: phase5-to-phase6", "... waiting")
    assert "roles/run.invoker: (no binding)" in lost, lost
    back = section(two, "after Runwarden: phase5-to-phase6", "$ kubectl")
    assert f"roles/run.invoker: {PUSH_MEMBER}\n" in back, back
    assert "other roles: roles/run.viewer" in back, back
    assert orch_row(two, "phase5-to-phase6")[4:7] == ["True", "DriftRepaired", "1"]
    assert orch_row(two, "phase4-to-phase5")[6] == "1"  # the first repair still counted
    events = section(two, "Events:", "$ grep")
    for reason in ("DriftDetected", "DriftRepaired"):
        assert re.search(rf"{reason} .*invoker {re.escape(PUSH_MEMBER)} missing", events), events

    if with_gcloud:
        assert "the incidents are caused by real gcloud commands" in out, out
        assert "$ gcloud run deploy phase4-to-phase5 --image " in one, one
        assert "verified with gcloud: phase4-to-phase5 is as declared" in one, one
        assert "$ gcloud run services set-iam-policy phase5-to-phase6 " in two, two
        checked = section(two, "$ gcloud run services get-iam-policy", "$ gcloud run services desc")
        assert f"roles/run.invoker: {PUSH_MEMBER}\n" in checked, checked
        assert "verified with gcloud: phase5-to-phase6 is as declared" in two, two
    else:
        assert "the incidents are replayed through the emulator's admin API" in out, out
        assert "$ gcloud" not in out, out

    for value in VALUES:
        assert value not in out, f"the demo printed the env var value {value!r}"

    assert "==> Tearing down" in out and "everything stopped" in out, out
    assert_stopped(Path(demo_env["DEMO_DIR"]))


def test_demo_on_a_terminal_keeps_running_until_demo_down(demo_env: dict[str, str]) -> None:
    log = Path(demo_env["DEMO_DIR"]).parent / "demo-output.txt"
    leader, follower = pty.openpty()  # stdin is a terminal: the demo keeps running
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(DEMO)],
                cwd=REPO,
                env=demo_env,
                stdin=follower,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda: "make demo-down" in log.read_text() or proc.poll() is not None,
                timeout=600,
                interval=0.5,
                message="the demo's instructions",
            )
            text = log.read_text()
            assert proc.poll() is None, f"the demo ended on a terminal:\n{text}"
            kubeconfig = Path(demo_env["DEMO_DIR"]) / "k8s" / "kubeconfig"
            assert f"export KUBECONFIG={kubeconfig}" in text, text
            assert "kubectl get orch -n pipeline -w" in text, text

            # What the instructions promise: the cluster answers while the demo waits.
            got = subprocess.run(
                [str(KUBECTL), f"--kubeconfig={kubeconfig}", "get", "orch", "-n", "pipeline"],
                text=True,
                capture_output=True,
                timeout=60,
                check=True,
            ).stdout
            assert "phase5-to-phase6" in got, got

            down = subprocess.run(
                [str(DEMO), "down"],
                cwd=REPO,
                env=demo_env,
                stdin=subprocess.DEVNULL,
                text=True,
                capture_output=True,
                timeout=180,
                check=False,
            )
            assert down.returncode == 0, down.stdout + down.stderr
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        os.close(leader)
        os.close(follower)
    assert "everything stopped" in log.read_text()
    assert_stopped(Path(demo_env["DEMO_DIR"]))


def test_demo_down_with_nothing_running(demo_env: dict[str, str]) -> None:
    done = subprocess.run(
        [str(DEMO), "down"],
        cwd=REPO,
        env=demo_env,
        stdin=subprocess.DEVNULL,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing to stop" in done.stdout
