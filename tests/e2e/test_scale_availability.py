"""Issue 17 on the real apiserver + the emulator + `python -m controller` processes:

- status economy: a steady Orchestrator costs the apiserver no write per check; a drift is
  written at once;
- leader election: of two replicas only the Lease holder calls Google; SIGKILL of the holder ->
  the standby repairs a drift (the time is measured and printed, under a generous deadline);
  fencing: a holder paused past its Lease (SIGSTOP ... SIGCONT) sends no write after it wakes,
  counted per replica by the emulator (each replica names itself with --own-principal, which
  the controller sends as the emulator's x-emulator-principal);
- shards: two controllers with disjoint --selector serve only their own Orchestrators.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import yaml

from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.bodies import orchestrator as body
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.orch import condition
from tests.fixtures.wait import wait_for

pytestmark = pytest.mark.e2e

PROJECT, REGION = "runwarden-e2e", "us-west2"
SA = "invoker@runwarden-e2e.iam.gserviceaccount.com"
RUN = "google.cloud.run.v2.Services/"
WRITES = (f"{RUN}UpdateService", f"{RUN}SetIamPolicy")
DEADLINE = 60  # a busy 2-core machine: deadlines, never timings


def orchestrator(name: str, service: str) -> dict[str, Any]:
    return body(
        name,
        service,
        project=PROJECT,
        region=REGION,
        env={"GCP_PROJECT_ID": PROJECT},
        invokers=[f"serviceAccount:{SA}"],
    )


def apply(cp: ControlPlane, namespace: str, obj: dict[str, Any]) -> None:
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(obj))


def get(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    out = cp.kubectl("get", "orchestrator", name, "-n", namespace, "-o", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def deploy(emulator: EmulatorProcess, name: str, **env: str) -> None:
    emulator.admin.put_service_account(SA)
    emulator.admin.put_service(
        PROJECT, REGION, name, env={"FOREIGN": "keep", **env}, invokers={"roles/run.invoker": []}
    )


def env_of(emulator: EmulatorProcess, name: str) -> dict[str, str]:
    return dict(emulator.admin.get_service(PROJECT, REGION, name)["env"])


def drift(emulator: EmulatorProcess, name: str) -> None:
    """Someone else's deploy: the service's env back to ``FOREIGN`` alone."""
    emulator.admin.put_service(PROJECT, REGION, name, env={"FOREIGN": "keep"})


def wait_repaired(
    emulator: EmulatorProcess, name: str, message: str, interval: float = 0.2
) -> None:
    """Wait until the declared GCP_PROJECT_ID is back on the service."""
    wait_for(
        lambda: "GCP_PROJECT_ID" in env_of(emulator, name),
        DEADLINE,
        interval=interval,
        message=message,
    )


def ready(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = get(cp, namespace, name)
    except Exception:
        return None
    gen = obj["metadata"]["generation"]
    ok = condition(obj).get("status") == "True" and obj["status"].get("observedGeneration") == gen
    return obj if ok else None


def writes_by(emulator: EmulatorProcess, principal: str) -> int:
    calls = emulator.admin.calls_by_principal().get(principal, {})
    return sum(calls.get(m, 0) for m in WRITES)


def calls_by(emulator: EmulatorProcess, principal: str) -> int:
    return sum(emulator.admin.calls_by_principal().get(principal, {}).values())


def get_service_calls(emulator: EmulatorProcess) -> int:
    return int(emulator.admin.calls().get(f"{RUN}GetService", 0))


def logged(proc: ControllerProcess, event: str) -> list[dict[str, Any]]:
    return [line for line in proc.log_lines() if line.get("event") == event]


def replica(
    own_controller: Callable[..., ControllerProcess], namespace: str, name: str
) -> ControllerProcess:
    """One controller replica with leader election on a Lease in the test's namespace."""
    return own_controller(
        f"{name}.log",
        extra_args=[
            "--leader-election",
            f"--leader-election-namespace={namespace}",
            f"--leader-election-identity={name}",
            f"--own-principal={name}@example.com",
        ],
    )


@contextmanager
def leader_and_standby(
    crds: ControlPlane,
    namespace: str,
    emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
    service: str,
) -> Iterator[tuple[ControllerProcess, ControllerProcess]]:
    """replica-a holding the Lease, replica-b standing by, and the Orchestrator "orch" for
    ``service`` (deployed here) Ready; replica-a killed and replica-b stopped on the way out."""
    deploy(emulator, service)
    a = replica(own_controller, namespace, "replica-a")
    b = replica(own_controller, namespace, "replica-b")
    try:
        a.start()  # "started" is logged once it holds the Lease
        assert lease_holder(crds, namespace) == "replica-a"
        b.start(wait=False)
        wait_for(lambda: logged(b, "standby"), DEADLINE, message="replica-b standing by")
        apply(crds, namespace, orchestrator("orch", service))
        wait_for(lambda: ready(crds, namespace, "orch"), DEADLINE, message="Ready")
        yield a, b
    finally:
        a.kill()
        b.stop()


def lease_holder(cp: ControlPlane, namespace: str, name: str = "runwarden") -> str:
    done = cp.kubectl("get", "lease", name, "-n", namespace, "-o", "json", check=False)
    if done.returncode != 0:
        return ""
    return str(json.loads(done.stdout)["spec"].get("holderIdentity") or "")


# ---------------------------------------------------------------------- status economy


def test_a_steady_orchestrator_costs_no_status_write_and_drift_is_written_at_once(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
) -> None:
    emulator = fresh_emulator
    deploy(emulator, "steady")
    with own_controller(status_heartbeat=300):  # the default heartbeat, said out loud
        apply(crds, namespace, orchestrator("orch", "steady"))
        first = wait_for(lambda: ready(crds, namespace, "orch"), DEADLINE, message="Ready")

        # The first sync's status write may be followed by kopf's own bookkeeping patch; wait
        # until the object stops changing over a full check before counting.
        def settled() -> dict[str, Any] | None:
            before = get(crds, namespace, "orch")
            n = get_service_calls(emulator)
            wait_for(lambda: get_service_calls(emulator) >= n + 2, DEADLINE, message="2 checks")
            after = get(crds, namespace, "orch")
            same = before["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]
            return after if same else None

        steady = wait_for(settled, DEADLINE * 2, interval=0, message="a settled object")
        version = steady["metadata"]["resourceVersion"]
        checks_before = get_service_calls(emulator)
        wait_for(
            lambda: get_service_calls(emulator) >= checks_before + 5,
            DEADLINE,
            message="five more checks",
        )
        after = get(crds, namespace, "orch")
        checks = get_service_calls(emulator) - checks_before
        # No apiserver write at all: the object's resourceVersion did not move over the checks.
        assert after["metadata"]["resourceVersion"] == version, (
            f"{checks} no-change checks wrote the object: {after['status']}"
        )
        assert after["status"]["lastSyncTime"] == first["status"]["lastSyncTime"]
        print(f"\nstatus economy: {checks} no-change checks, 0 apiserver writes")

        # A drift is written at once, with a fresh lastSyncTime.
        drift(emulator, "steady")
        repaired = wait_for(
            lambda: (o := get(crds, namespace, "orch"))["status"]["drift"]["count"] >= 1 and o,
            DEADLINE,
            message="the repair recorded in status",
        )
        assert repaired["metadata"]["resourceVersion"] != version
        assert repaired["status"]["lastSyncTime"] >= first["status"]["lastSyncTime"]
        assert condition(repaired)["reason"] == "DriftRepaired"
        assert env_of(emulator, "steady")["GCP_PROJECT_ID"] == PROJECT


# ---------------------------------------------------------------------- leader election


def test_only_the_leader_calls_google_and_a_standby_repairs_after_the_leader_is_killed(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
) -> None:
    emulator = fresh_emulator
    with leader_and_standby(crds, namespace, emulator, own_controller, "elected") as (a, b):
        drift(emulator, "elected")
        wait_repaired(emulator, "elected", "the leader repairs a drift")
        assert writes_by(emulator, "replica-a@example.com") >= 2
        assert calls_by(emulator, "replica-b@example.com") == 0, "the standby called Google"
        assert not logged(b, "started") and not logged(b, "leader_elected")

        a.kill()
        killed = time.monotonic()
        drift(emulator, "elected")
        wait_repaired(
            emulator,
            "elected",
            "the standby repairs the drift after the leader's SIGKILL",
            interval=0.1,
        )
        took = time.monotonic() - killed
        print(f"\nfailover: drift repaired {took:.1f} s after SIGKILL of the leader")
        assert writes_by(emulator, "replica-b@example.com") >= 1
        assert lease_holder(crds, namespace) == "replica-b"
        assert env_of(emulator, "elected")["FOREIGN"] == "keep"
    # A clean stop hands the Lease back at once.
    assert lease_holder(crds, namespace) == ""
    assert b.proc is not None and b.proc.returncode == 0, b.tail()


def test_a_leader_paused_past_its_lease_writes_nothing_after_it_wakes(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
) -> None:
    emulator = fresh_emulator
    with leader_and_standby(crds, namespace, emulator, own_controller, "fenced") as (a, _):
        assert a.pid is not None
        os.kill(a.pid, signal.SIGSTOP)
        try:
            wait_for(
                lambda: lease_holder(crds, namespace) == "replica-b",
                DEADLINE,
                message="replica-b takes the Lease of the paused leader",
            )
            # A drift for both to see: the new leader repairs it ...
            drift(emulator, "fenced")
            wait_repaired(emulator, "fenced", "the new leader repairs the drift")
            # ... and another one that the old leader finds the moment it wakes: its drift loop
            # is long overdue, so it would check (and repair) at once, were it not fenced.
            drift(emulator, "fenced")
            writes_a = writes_by(emulator, "replica-a@example.com")
        finally:
            os.kill(a.pid, signal.SIGCONT)
        wait_repaired(emulator, "fenced", "the drift repaired (by the new leader)")
        # The old leader notices it lost the Lease and exits (to restart as a standby).
        wait_for(lambda: not a.running, DEADLINE, message="the old leader exits")
        assert a.proc is not None and a.proc.returncode == 3, a.tail()
        assert logged(a, "leader_lost"), a.tail()
        assert writes_by(emulator, "replica-a@example.com") == writes_a, (
            emulator.admin.calls_by_principal()
        )
        assert writes_by(emulator, "replica-b@example.com") >= 2
        assert lease_holder(crds, namespace) == "replica-b"


# ---------------------------------------------------------------------- shards


def test_disjoint_selectors_each_serve_only_their_own(
    crds: ControlPlane,
    namespace: str,
    fresh_emulator: EmulatorProcess,
    own_controller: Callable[..., ControllerProcess],
) -> None:
    emulator = fresh_emulator
    for name in ("svc-a", "svc-b", "svc-none"):
        deploy(emulator, name)

    def shard(name: str, selector: str) -> ControllerProcess:
        return own_controller(
            f"{name}.log",
            extra_args=[f"--selector={selector}", f"--own-principal={name}@example.com"],
        )

    with shard("shard-a", "shard=a") as a, shard("shard-b", "shard in (b)") as b:
        for name, label in (("orch-a", "a"), ("orch-b", "b"), ("orch-none", None)):
            obj = orchestrator(name, f"svc-{name.removeprefix('orch-')}")
            if label:
                obj["metadata"]["labels"] = {"shard": label}
            apply(crds, namespace, obj)
        for name in ("orch-a", "orch-b"):
            wait_for(lambda n=name: ready(crds, namespace, n), DEADLINE, message=f"{name} Ready")
        # Each wrote to Google (its own principal) and logged the first sync of its own only.
        assert writes_by(emulator, "shard-a@example.com") >= 1
        assert writes_by(emulator, "shard-b@example.com") >= 1
        assert checked(a) == {"orch-a"} and checked(b) == {"orch-b"}, (checked(a), checked(b))
        # Several checks later, the unlabelled one is still untouched by both.
        n = get_service_calls(emulator)
        wait_for(lambda: get_service_calls(emulator) >= n + 4, DEADLINE, message="more checks")
        assert not get(crds, namespace, "orch-none").get("status")
        assert "GCP_PROJECT_ID" not in env_of(emulator, "svc-none")
        # Relabelling moves an Orchestrator to the other shard: shard-b repairs it from then on.
        crds.kubectl("label", "orchestrator", "orch-a", "-n", namespace, "shard=b", "--overwrite")
        # shard-a's filtered watch reports orch-a DELETED: it stops serving it.
        wait_for(lambda: logged(a, "unselected"), DEADLINE, message="shard-a lets orch-a go")
        writes_a = writes_by(emulator, "shard-a@example.com")
        drift(emulator, "svc-a")
        wait_repaired(emulator, "svc-a", "orch-a's drift repaired after the relabel")
        assert writes_by(emulator, "shard-a@example.com") == writes_a, "shard-a still serves it"
        wait_for(lambda: "orch-a" in checked(b), DEADLINE, message="shard-b logged the repair")


def checked(proc: ControllerProcess) -> set[str]:
    """The Orchestrators this controller logged a check of (INFO: first syncs and repairs)."""
    return {
        str((line.get("k8s_ref") or {}).get("name"))
        for line in proc.log_lines()
        if line.get("event") in ("check", "check_failed")
    }
