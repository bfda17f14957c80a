"""Reliability suite fixtures: the invariant checker, the session's canary collector, controllers
that register their logs with it, and the figures table printed at the end of the run.

Every scenario runs on the session's control plane, an emulator of its own (faults, quota and
counters are per test) and the controller as a real process. After each test the canary
collector scans that test's controller logs, Events and Orchestrator statuses; the last test of
the session (tests/reliability/test_secrets.py) scans everything once more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudrun_emulator.testing import EmulatorProcess, free_port
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.reliability import harness
from tests.reliability.harness import FINAL_SCAN, CanaryCollector, Figures, Rig

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / ".cache" / "reliability" / "last-run.md"

_FIGURES = Figures()


# ---------------------------------------------------------------------- session pieces


@pytest.fixture(scope="session")
def canary() -> CanaryCollector:
    """The session's canary values and everything registered to be scanned for them."""
    return _CANARY


_CANARY = CanaryCollector()


@pytest.fixture(autouse=True)
def _canary_scan(request: pytest.FixtureRequest, canary: CanaryCollector) -> Iterator[None]:
    """After each test: its controller logs, Events and statuses hold no canary value."""
    canary.begin_test()
    yield
    if request.node.name == FINAL_SCAN or "control_plane" not in request.fixturenames:
        return
    plane: ControlPlane = request.getfixturevalue("control_plane")
    scan = canary.scan_test(plane)
    if scan.hits:
        pytest.fail(f"canary values leaked: {scan.hits[:20]} ({scan.summary()})", pytrace=False)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[[str, str, str], None]:
    """``figures(scenario, counts, result)``: this test's row in the reliability table."""

    def record(scenario: str, counts: str, result: str) -> None:
        _FIGURES.record(request.node.nodeid, scenario, counts, result)

    return record


# ---------------------------------------------------------------------- per-test pieces


@pytest.fixture
def ns(namespace: str, crds: ControlPlane, canary: CanaryCollector) -> str:
    """The test's namespace (CRDs applied), registered for the canary scan."""
    canary.watch_namespace(namespace)
    return namespace


@pytest.fixture
def start_controller(
    kubeconfig: str, ns: str, tmp_path: Path, canary: CanaryCollector
) -> Iterator[Callable[..., ControllerProcess]]:
    """``start_controller(emulator, resync=2, metrics=False)``: a controller for ``ns``,
    started (its log registered for the canary scan); stopped after the test."""
    started: list[ControllerProcess] = []

    def start(
        emulator: EmulatorProcess,
        *,
        resync: float | None = 2,
        metrics: bool = False,
        wait: bool = True,
        **kw: Any,
    ) -> ControllerProcess:
        port = free_port() if metrics else None
        # These tests read lastSyncTime as "a check completed since": refresh it every check.
        kw.setdefault("status_heartbeat", 0)
        proc = ControllerProcess(
            kubeconfig=kubeconfig,
            gcp_endpoint=emulator.grpc_endpoint,
            namespaces=[ns],
            log_path=tmp_path / f"controller-{len(started)}.log",
            resync_seconds=resync,
            metrics_port=port,
            **kw,
        )
        proc.metrics_port = port  # type: ignore[attr-defined]
        canary.watch_log(proc.log_path)
        started.append(proc)
        return proc.start(wait=wait)  # wait=False: a leader election standby never "starts"

    yield start
    for proc in started:
        proc.stop()
        if os.environ.get("RUNWARDEN_SHOW_CONTROLLER_LOG"):
            print(proc.tail(200))


@pytest.fixture
def replicas() -> int:
    """How the scenario runs the controller (harness.Replicas): 1 process without leader
    election, unless a test parametrizes ``replicas`` (2: two replicas with leader election)."""
    return 1


@pytest.fixture
def rig(
    crds: ControlPlane,
    ns: str,
    fresh_emulator: EmulatorProcess,
    canary: CanaryCollector,
    figures: Callable[[str, str, str], None],
    start_controller: Callable[..., ControllerProcess],
    replicas: int,
) -> Rig:
    """The scenario's prologue in one: see harness.Rig. Emulator options by indirect
    parametrization of ``fresh_emulator``, as before; the controller's replicas by
    parametrizing ``replicas`` (its rows in the figures table say so)."""
    record = figures
    if replicas > 1:

        def record(scenario: str, counts: str, result: str) -> None:
            figures(f"{scenario}, {replicas} replicas + leader election", counts, result)

    return Rig(crds, ns, fresh_emulator, canary, record, start_controller, replicas)


# ---------------------------------------------------------------------- hooks


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The suite-wide canary scan runs after everything else."""
    last = [i for i in items if i.name == FINAL_SCAN]
    if last:
        items[:] = [i for i in items if i.name != FINAL_SCAN] + last


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed (known bug)" if report.skipped else "XPASS"
        _FIGURES.outcome(item.nodeid, outcome)
    elif report.when == "teardown" and report.failed:
        _FIGURES.outcome(item.nodeid, "failed at teardown")
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES.rows:
        return
    table = _FIGURES.markdown()
    mode = "RUNWARDEN_SOAK=1 (make soak)" if harness.SOAK else "in-suite counts"
    terminalreporter.write_sep("=", f"reliability figures ({mode})")
    terminalreporter.write_line(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"Reliability run, {mode}, {harness.utc_stamp()}\n\n{table}\n")
    terminalreporter.write_line(f"(written to {RESULTS.relative_to(REPO)})")
