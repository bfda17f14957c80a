"""End to end, event-driven: Cloud Audit Log entries -> Pub/Sub -> the controller repairs at once.

The real apiserver, the Cloud Run emulator publishing audit entries (``--audit-topic``) to the
real Pub/Sub emulator, and ``python -m controller --audit-subscription ...`` as a process. The
resync is 300 s, so nothing but an audit entry can explain a repair within seconds.

The emulator is this module's own process (its call counters are asserted on); each test gets a
fresh subscription and controller (the Pub/Sub emulator keeps dead consumers on a subscription
whose streaming pull was cancelled).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from prometheus_client.parser import text_string_to_metric_families

from cloudrun_emulator.testing import EmulatorProcess, PubSubEmulatorProcess, free_port
from tests.fixtures.bodies import orchestrator
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import holds_for, wait_for

pytestmark = pytest.mark.e2e

PROJECT = "runwarden-audit"
REGION = "us-west2"
SA = "invoker@runwarden-audit.iam.gserviceaccount.com"
MEMBER = f"serviceAccount:{SA}"
FOREIGN = "user:someone@example.com"
PIPELINE = "ci-pipeline@example.com"
RUN = "google.cloud.run.v2.Services/"
REPAIR_WITHIN = 5.0  # ISSUE 8: an env wipe / dropped invoker is repaired in <= 5 s
SETTLE = 30  # first sync and the like, on a busy 2-core machine


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def audit_topic(pubsub_emulator: PubSubEmulatorProcess) -> Iterator[str]:
    topic = f"projects/{pubsub_emulator.project}/topics/audit-{uuid.uuid4().hex[:8]}"
    with pubsub_emulator.environment():
        publisher = pubsub_v1.PublisherClient()
        publisher.create_topic(name=topic, timeout=30)
    yield topic


@pytest.fixture(scope="module")
def audit_emulator(
    pubsub_emulator: PubSubEmulatorProcess,
    audit_topic: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmulatorProcess]:
    """The Cloud Run emulator of this module, publishing every write to ``audit_topic``."""
    emu = EmulatorProcess(
        audit_topic=audit_topic,
        env={"PUBSUB_EMULATOR_HOST": pubsub_emulator.host},
        log_dir=tmp_path_factory.mktemp("audit-emulator"),
    ).start()
    emu.admin.put_service_account(SA)
    try:
        yield emu
    finally:
        emu.stop()


class Audit:
    """One test's controller with its own fresh subscription, and what the test needs of it."""

    def __init__(
        self,
        cp: ControlPlane,
        namespace: str,
        emu: EmulatorProcess,
        pubsub: PubSubEmulatorProcess,
        topic: str,
        tmp: Path,
    ) -> None:
        self.cp, self.namespace, self.emu, self.pubsub, self.topic = (
            cp,
            namespace,
            emu,
            pubsub,
            topic,
        )
        self.subscription = f"projects/{pubsub.project}/subscriptions/rw-{uuid.uuid4().hex[:10]}"
        with pubsub.environment():
            subscriber = pubsub_v1.SubscriberClient()
            subscriber.create_subscription(name=self.subscription, topic=topic, timeout=30)
            subscriber.close()
        self.metrics_port = free_port()
        self.controller = ControllerProcess(
            kubeconfig=cp.kubeconfig,
            gcp_endpoint=emu.grpc_endpoint,
            namespaces=[namespace],
            log_path=tmp / "controller.log",
            resync_seconds=300,
            metrics_port=self.metrics_port,
            extra_args=["--audit-subscription", self.subscription],
            extra_env={"PUBSUB_EMULATOR_HOST": pubsub.host},
        )

    # -- controller
    def start(self) -> None:
        self.controller.start()
        wait_for(
            lambda: any(line.get("event") == "audit_subscribed" for line in self.logs()),
            timeout=SETTLE,
            message="the controller subscribed",
        )

    def logs(self) -> list[dict[str, Any]]:
        return self.controller.log_lines()

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def audit_count(self, result: str) -> float:
        return self.metric("runwarden_audit_events_total", result=result)

    # -- Kubernetes
    def apply(self, name: str, service: str) -> None:
        body = orchestrator(
            name,
            service,
            project=PROJECT,
            region=REGION,
            env={"GCP_PROJECT_ID": PROJECT, "MODE": "prod"},
            invokers=[MEMBER],
        )
        self.cp.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(body))

    def get(self, name: str) -> dict[str, Any]:
        out = self.cp.kubectl("get", "orchestrator", name, "-n", self.namespace, "-o", "json")
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def ready(self, name: str) -> dict[str, Any]:
        for c in self.get(name).get("status", {}).get("conditions", []):
            if c["type"] == "Ready":
                return c  # type: ignore[no-any-return]
        return {}

    def wait_ready(self, name: str, reason: str, timeout: float = SETTLE) -> dict[str, Any]:
        return wait_for(
            lambda: (c := self.ready(name)).get("reason") == reason and c,
            timeout=timeout,
            interval=0.3,
            message=f"{name} Ready reason {reason}",
        )

    def events(self, name: str, reason: str) -> list[dict[str, Any]]:
        out = self.cp.kubectl(
            "get", "events", "-n", self.namespace, "-o", "json",
            f"--field-selector=involvedObject.name={name},reason={reason}",
        )  # fmt: skip
        return json.loads(out.stdout)["items"]  # type: ignore[no-any-return]

    # -- the service
    def state(self, service: str) -> dict[str, Any]:
        return self.emu.admin.get_service(PROJECT, REGION, service)

    def holds_spec(self, service: str) -> bool:
        s = self.state(service)
        return (
            s["env"].get("GCP_PROJECT_ID") == PROJECT
            and s["env"].get("MODE") == "prod"
            and MEMBER in s["iam"].get("roles/run.invoker", [])
        )

    def deploy(self, service: str, principal: str = "deployer@example.com", **kw: Any) -> None:
        self.emu.admin.put_service(PROJECT, REGION, service, principal=principal, **kw)

    def publish(self, data: bytes) -> None:
        with self.pubsub.environment():
            publisher = pubsub_v1.PublisherClient()
            publisher.publish(self.topic, data).result(timeout=30)
            publisher.stop()

    def writes(self) -> int:
        calls = self.emu.admin.calls()
        return calls.get(RUN + "UpdateService", 0) + calls.get(RUN + "SetIamPolicy", 0)

    def stop(self) -> None:
        self.controller.stop()
        with self.pubsub.environment():
            subscriber = pubsub_v1.SubscriberClient()
            try:
                subscriber.delete_subscription(subscription=self.subscription, timeout=30)
            except gexc.GoogleAPICallError:
                pass
            subscriber.close()


@pytest.fixture
def start_audit(
    control_plane: ControlPlane,
    crds: ControlPlane,
    namespace: str,
    audit_emulator: EmulatorProcess,
    pubsub_emulator: PubSubEmulatorProcess,
    audit_topic: str,
    tmp_path: Path,
) -> Iterator[Callable[..., Audit]]:
    """A factory: ``start_audit(*args)`` starts this test's Audit (its controller with ``args``
    more), stopped at the end of the test."""
    started: list[Audit] = []

    def start(*args: str) -> Audit:
        a = Audit(control_plane, namespace, audit_emulator, pubsub_emulator, audit_topic, tmp_path)
        a.controller.args.extend(args)
        a.start()
        started.append(a)
        return a

    try:
        yield start
    finally:
        for a in started:
            a.stop()


@pytest.fixture
def audit(start_audit: Callable[..., Audit]) -> Audit:
    return start_audit()


@pytest.fixture
def service(audit: Audit, unique_name: Callable[[str], str]) -> str:
    """A deployed service (someone else's variable and member on it) with an Orchestrator that
    has synced it; the entries of that first sync are already dealt with."""
    name = unique_name("aud")
    audit.deploy(name, env={"FOREIGN": "keep-me"}, invokers={"roles/run.invoker": [FOREIGN]})
    own = audit.audit_count("own")
    audit.apply("orch", name)
    audit.wait_ready("orch", "Synced")
    # The first sync's UpdateService + SetIamPolicy come back as Runwarden's own entries.
    wait_for(lambda: audit.audit_count("own") >= own + 2, SETTLE, message="own entries seen")
    quiet(audit)
    return name


# ---------------------------------------------------------------------- helpers


def quiet(audit: Audit, still: float = 1.5, timeout: float = SETTLE) -> None:
    """Wait until the controller has made no Cloud Run call for ``still`` seconds (a spec
    change's wake can bring a second, read-only check right after the first sync)."""
    calls, since = audit.emu.admin.calls(), time.monotonic()

    def settled() -> bool:
        nonlocal calls, since
        now = audit.emu.admin.calls()
        if now != calls:
            calls, since = now, time.monotonic()
        return time.monotonic() - since >= still

    wait_for(settled, timeout, interval=0.1, message="the controller went quiet")


def timed_repair(audit: Audit, service: str) -> float:
    """Seconds from now until the service holds the spec again (fails after REPAIR_WITHIN)."""
    started = time.monotonic()
    wait_for(
        lambda: audit.holds_spec(service),
        timeout=REPAIR_WITHIN,
        interval=0.05,
        message=f"{service} repaired within {REPAIR_WITHIN}s",
    )
    return time.monotonic() - started


# ---------------------------------------------------------------------- tests


def test_env_wipe_is_repaired_within_seconds(audit: Audit, service: str) -> None:
    # A `gcloud run deploy --set-env-vars OTHER=1` by someone else: our variables are gone.
    audit.deploy(service, env={"OTHER": "1"})
    assert not audit.holds_spec(service)
    elapsed = timed_repair(audit, service)
    state = audit.state(service)
    assert state["env"]["OTHER"] == "1"  # what the deploy set is not ours: it stays
    c = audit.wait_ready("orch", "DriftRepaired")
    assert "env GCP_PROJECT_ID missing" in c["message"]
    wait_for(lambda: audit.metric("runwarden_drift_repair_seconds_count") >= 1, 10)
    woke = [x for x in audit.logs() if x.get("event") == "audit_wake"]
    assert woke and woke[-1]["principals"] == ["deployer@example.com"]
    print(f"env wipe repaired {elapsed:.2f}s after the deploy")


def test_dropped_invoker_is_repaired_within_seconds(audit: Audit, service: str) -> None:
    audit.deploy(service, invokers={"roles/run.invoker": [FOREIGN]})  # MEMBER dropped
    assert not audit.holds_spec(service)
    elapsed = timed_repair(audit, service)
    assert FOREIGN in audit.state(service)["iam"]["roles/run.invoker"]
    c = audit.wait_ready("orch", "DriftRepaired")
    assert f"invoker {MEMBER} missing" in c["message"]
    print(f"dropped invoker repaired {elapsed:.2f}s after the change")


def test_own_writes_trigger_no_second_write(
    audit: Audit, unique_name: Callable[[str], str]
) -> None:
    name = unique_name("own")
    unmatched = audit.audit_count("unmatched")
    # Someone's first deploy (CreateService + SetIamPolicy): nobody manages it yet.
    audit.deploy(name, env={"FOREIGN": "keep-me"}, invokers={"roles/run.invoker": [FOREIGN]})
    wait_for(lambda: audit.audit_count("unmatched") >= unmatched + 2, SETTLE, message="deploy seen")
    audit.emu.admin.reset_calls()
    own, matched = audit.audit_count("own"), audit.audit_count("matched")
    audit.apply("orch", name)
    audit.wait_ready("orch", "Synced")
    # The apply: one UpdateService (env) and one SetIamPolicy (invoker), and their entries ...
    assert audit.writes() == 2
    wait_for(lambda: audit.audit_count("own") >= own + 2, SETTLE, message="own entries seen")
    quiet(audit)
    assert audit.writes() == 2
    reads = audit.emu.admin.calls().get(RUN + "GetService", 0)
    # ... are recognised as Runwarden's own: no wake, so no further read and no further write
    # (an own entry waits up to 8 debounce windows for its record; wait that out).
    holds_for(
        lambda: audit.writes() == 2 and audit.emu.admin.calls().get(RUN + "GetService", 0) == reads,
        seconds=10,
        message="the controller reacted to its own writes",
    )
    assert audit.audit_count("matched") == matched
    assert not [x for x in audit.logs() if x.get("event") == "audit_wake"]


def test_unmanaged_service_and_malformed_messages_change_nothing(
    audit: Audit, service: str, unique_name: Callable[[str], str]
) -> None:
    audit.emu.admin.reset_calls()
    unmatched, malformed = audit.audit_count("unmatched"), audit.audit_count("malformed")
    other = unique_name("unmanaged")
    audit.deploy(other, env={"X": "1"})  # nobody here manages it
    audit.publish(b"this is not JSON")
    audit.publish(json.dumps({"protoPayload": "nope"}).encode())
    audit.publish(json.dumps([1, 2, 3]).encode())
    wait_for(
        lambda: (
            audit.audit_count("unmatched") >= unmatched + 1
            and audit.audit_count("malformed") >= malformed + 3
        ),
        timeout=SETTLE,
        message="the entries were received and counted",
    )
    holds_for(
        lambda: not audit.emu.admin.calls(),
        seconds=3,
        message="an unmanaged or malformed entry made the controller call Cloud Run",
    )
    assert audit.state(other)["env"] == {"X": "1"}
    assert audit.controller.running
    # The listener is still there: real drift is still repaired at once.
    audit.deploy(service, env={"OTHER": "1"})
    timed_repair(audit, service)


def test_a_pipeline_redeploying_every_second_is_a_drift_fight(audit: Audit, service: str) -> None:
    stop = threading.Event()

    def pipeline() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            audit.deploy(service, principal=PIPELINE, env={"BUILD": str(i)})
            stop.wait(1.0)

    thread = threading.Thread(target=pipeline, daemon=True)
    thread.start()
    try:
        c = audit.wait_ready("orch", "DriftFight", timeout=60)
        assert c["status"] == "False"
        assert PIPELINE in c["message"]
        warnings = wait_for(lambda: audit.events("orch", "DriftFight"), 10)
        assert warnings[0]["type"] == "Warning"
        assert PIPELINE in warnings[0]["message"]
        # It backs off: the pipeline goes on undoing the spec, Runwarden stops repairing ...
        writes = audit.writes()
        holds_for(lambda: audit.writes() == writes, 8, "the controller kept fighting")
        assert not audit.holds_spec(service)
        # ... and keeps reporting what it would repair.
        assert audit.ready("orch")["reason"] == "DriftFight"
        held = [x for x in audit.logs() if x.get("event") == "audit_wake_held"]
        assert held
    finally:
        stop.set()
        thread.join(10)


def test_entries_for_a_project_no_namespace_may_touch_wake_nothing(
    control_plane: ControlPlane,
    namespace: str,
    start_audit: Callable[..., Audit],
    unique_name: Callable[[str], str],
) -> None:
    """Tenancy (--namespace-binding required): the namespace is bound to another project, so its
    Orchestrator for this project is refused; someone's writes to the service come in as audit
    entries and wake nothing: no check runs (no GetService), the entry counts as unmatched."""
    control_plane.kubectl(
        "annotate", "namespace", namespace, "runwarden.dev/projects=some-other-prj"
    )
    a = start_audit("--namespace-binding=required")
    name = unique_name("unb")
    a.deploy(name, env={"FOREIGN": "keep-me"})
    a.apply("refused", name)
    cond = a.wait_ready("refused", "ProjectNotAllowed")
    assert "runwarden.dev/projects" in cond["message"] and PROJECT in cond["message"]
    unmatched, matched = a.audit_count("unmatched"), a.audit_count("matched")
    reads = a.emu.admin.calls().get(RUN + "GetService", 0)
    a.deploy(name, env={"FOREIGN": "changed"})  # someone's write: an audit entry
    wait_for(
        lambda: a.audit_count("unmatched") > unmatched,
        SETTLE,
        message="the entry received and counted unmatched",
    )
    assert a.audit_count("matched") == matched
    assert not any(line.get("event") == "audit_wake" for line in a.logs())
    # Nothing read the service (the resync is 300 s; the refusal's backoff is longer).
    assert a.emu.admin.calls().get(RUN + "GetService", 0) == reads
    assert a.ready("refused")["reason"] == "ProjectNotAllowed"
