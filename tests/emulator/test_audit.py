"""--audit-topic: Cloud Audit Log entries published to a real Pub/Sub emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from google.cloud import pubsub_v1, run_v2
from google.iam.v1 import policy_pb2

from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.clients import make_clients
from tests.fixtures.wait import wait_for

PROJECT = "audit-project"
REGION = "us-west2"
ACTIVITY_LOG = f"projects/{PROJECT}/logs/cloudaudit.googleapis.com%2Factivity"


class Inbox:
    """Pulls a fresh subscription and keeps every entry seen, in arrival order."""

    def __init__(self, subscriber: pubsub_v1.SubscriberClient, subscription: str) -> None:
        self.subscriber = subscriber
        self.subscription = subscription
        self.entries: list[dict] = []

    def pull(self) -> list[dict]:
        resp = self.subscriber.pull(
            request={"subscription": self.subscription, "max_messages": 100}, timeout=5
        )
        if resp.received_messages:
            for m in resp.received_messages:
                entry = json.loads(m.message.data)
                assert (
                    m.message.attributes["logging.googleapis.com/timestamp"] == entry["timestamp"]
                )
                self.entries.append(entry)
            self.subscriber.acknowledge(
                request={
                    "subscription": self.subscription,
                    "ack_ids": [m.ack_id for m in resp.received_messages],
                }
            )
        return self.entries

    def wait(self, predicate, what: str) -> list[dict]:
        def found():
            self.pull()
            return [e for e in self.entries if predicate(e)]

        return wait_for(found, timeout=20, message=f"no audit entry: {what}")


def method(entry: dict) -> str:
    return entry["protoPayload"]["methodName"]


@pytest.fixture
def audit_setup(pubsub_emulator, monkeypatch, tmp_path):
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    suffix = uuid.uuid4().hex[:8]
    topic = f"projects/{PROJECT}/topics/run-audit-{suffix}"
    subscription = f"projects/{PROJECT}/subscriptions/run-audit-{suffix}"
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)
    emu = EmulatorProcess(
        audit_topic=topic,
        env={"PUBSUB_EMULATOR_HOST": pubsub_emulator.host},
        log_dir=tmp_path / "emu",
    ).start()
    try:
        yield emu, Inbox(subscriber, subscription)
    finally:
        emu.stop()
        subscriber.close()


async def test_every_successful_write_is_published(audit_setup):
    emu, inbox = audit_setup
    name = f"projects/{PROJECT}/locations/{REGION}/services/audited"

    # Admin API: someone else's deploy (v1, like gcloud), default principal.
    emu.admin.put_service(
        PROJECT, REGION, "audited", env={"A": "1"}, invokers={"roles/run.invoker": ["user:a@x.com"]}
    )
    created = inbox.wait(
        lambda e: method(e) == "google.cloud.run.v1.Services.CreateService", "admin create"
    )[0]
    p = created["protoPayload"]
    assert created["logName"] == ACTIVITY_LOG
    assert created["resource"]["type"] == "cloud_run_revision"
    assert created["resource"]["labels"]["project_id"] == PROJECT
    assert created["resource"]["labels"]["location"] == REGION
    assert created["resource"]["labels"]["service_name"] == "audited"
    assert p["serviceName"] == "run.googleapis.com"
    assert p["authenticationInfo"]["principalEmail"] == "deployer@example.com"
    assert p["resourceName"] == f"namespaces/{PROJECT}/services/audited"
    assert p["response"]["metadata"]["generation"] == 1
    assert "operation" not in created
    iam = inbox.wait(
        lambda e: method(e) == "google.cloud.run.v1.Services.SetIamPolicy", "admin IAM write"
    )[0]
    assert iam["protoPayload"]["resourceName"] == name

    # Admin API with a named principal.
    emu.admin.put_service(PROJECT, REGION, "audited", env={}, principal="ci@example.com")
    replaced = inbox.wait(
        lambda e: method(e) == "google.cloud.run.v1.Services.ReplaceService", "admin replace"
    )[0]
    assert replaced["protoPayload"]["authenticationInfo"]["principalEmail"] == "ci@example.com"
    assert replaced["protoPayload"]["response"]["metadata"]["generation"] == 2

    clients = make_clients(emu.grpc_endpoint)
    try:
        # gRPC UpdateService with the principal header: first and last entries.
        svc = await clients.run.get_service(name=name)
        svc.template.containers[0].env = [run_v2.EnvVar(name="B", value="2")]
        op = await clients.run.update_service(
            service=svc, metadata=[("x-emulator-principal", "alice@example.com")]
        )
        done = await op.result(timeout=30)
        updates = inbox.wait(
            lambda e: (
                method(e) == "google.cloud.run.v2.Services.UpdateService"
                and e.get("operation", {}).get("last")
            ),
            "UpdateService last",
        )
        last = updates[0]
        first = next(
            e
            for e in inbox.entries
            if method(e) == "google.cloud.run.v2.Services.UpdateService"
            and e["operation"].get("first")
        )
        assert first["operation"]["id"] == last["operation"]["id"] == op.operation.name
        assert last["operation"]["producer"] == "run.googleapis.com"
        assert last["protoPayload"]["resourceName"] == name
        assert last["protoPayload"]["authenticationInfo"]["principalEmail"] == "alice@example.com"
        assert last["protoPayload"]["response"]["generation"] == str(done.generation)
        assert last["protoPayload"]["request"]["@type"].endswith("UpdateServiceRequest")
        assert last["protoPayload"]["status"] == {}

        # gRPC SetIamPolicy without the header: runwarden@example.com.
        policy = await clients.run.get_iam_policy(request={"resource": name})
        policy.bindings.append(
            policy_pb2.Binding(role="roles/run.invoker", members=["user:b@x.com"])
        )
        await clients.run.set_iam_policy(request={"resource": name, "policy": policy})
        set_iam = inbox.wait(
            lambda e: method(e) == "google.cloud.run.v2.Services.SetIamPolicy", "gRPC SetIamPolicy"
        )[0]
        assert set_iam["protoPayload"]["authenticationInfo"]["principalEmail"] == (
            "runwarden@example.com"
        )

        # A refused write publishes nothing; reads publish nothing.
        before = len(inbox.pull())
        with pytest.raises(Exception, match="concurrent policy changes"):
            await clients.run.set_iam_policy(request={"resource": name, "policy": policy})
        await clients.run.get_service(name=name)
        emu.admin.put_service(PROJECT, REGION, "marker", env={})
        inbox.wait(lambda e: e["resource"]["labels"]["service_name"] == "marker", "marker")
        between = inbox.entries[before:]
        assert [e["resource"]["labels"]["service_name"] for e in between] == ["marker"]

        # DeleteService through gRPC.
        await (await clients.run.delete_service(name=name)).result(timeout=30)
        inbox.wait(
            lambda e: (
                method(e) == "google.cloud.run.v2.Services.DeleteService"
                and e["operation"].get("last")
            ),
            "DeleteService last",
        )
    finally:
        await clients.close()


async def test_failed_rollout_last_entry_carries_the_status(audit_setup):
    emu, inbox = audit_setup
    emu.admin.put_service(PROJECT, REGION, "doomed", env={"A": "1"})
    emu.admin.set_faults(fail_next_revision=True)
    clients = make_clients(emu.grpc_endpoint)
    try:
        svc = await clients.run.get_service(
            name=f"projects/{PROJECT}/locations/{REGION}/services/doomed"
        )
        svc.template.containers[0].env = []
        op = await clients.run.update_service(service=svc)
        with pytest.raises(Exception, match="cannot serve traffic"):
            await op.result(timeout=30)
    finally:
        await clients.close()
    last = inbox.wait(
        lambda e: (
            method(e) == "google.cloud.run.v2.Services.UpdateService" and e["operation"].get("last")
        ),
        "failed UpdateService last",
    )[0]
    assert last["protoPayload"]["status"]["code"] == 9
    assert last["severity"] == "ERROR"


def test_audit_topic_needs_the_pubsub_emulator_host(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloudrun_emulator",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--audit-topic",
            "projects/p/topics/t",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert "PUBSUB_EMULATOR_HOST" in proc.stderr
