"""controller.audit.listener.AuditListener in-process on the real Pub/Sub emulator: streaming
pull into the event loop, ack of everything, and a subscription that is missing at first."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

import pytest
from google.cloud import pubsub_v1

from cloudrun_emulator.testing import PubSubEmulatorProcess
from controller.audit.entries import AuditEntry, Ignored, Parsed, Result
from controller.audit.listener import AuditListener
from controller.audit.provenance import OwnWrites
from controller.audit.router import AuditRouter
from controller.domain.model import ServiceRef, WriteRecord
from tests.fixtures.wait import reached, wait_until

pytestmark = pytest.mark.e2e

REF = ServiceRef("p-listener", "us-west2", "svc")


class Recorder(AuditRouter):
    """The real router, also keeping what it received."""

    def __init__(self) -> None:
        super().__init__(
            OwnWrites("runwarden@example.com"),
            debounce=0.05,
            last_write={REF: WriteRecord()}.get,
            wake=lambda ref, reason: self.woken.append(ref) or 1,  # type: ignore[func-returns-value]
        )
        self.got: list[Parsed] = []
        self.woken: list[ServiceRef] = []

    def receive(self, parsed: Parsed, received: float | None = None) -> None:
        self.got.append(parsed)
        super().receive(parsed, received)


def entry(principal: str) -> bytes:
    return json.dumps(
        {
            "protoPayload": {
                "serviceName": "run.googleapis.com",
                "methodName": "google.cloud.run.v1.Services.ReplaceService",
                "authenticationInfo": {"principalEmail": principal},
                "response": {"metadata": {"generation": 3}},
            },
            "resource": {
                "type": "cloud_run_revision",
                "labels": {
                    "project_id": REF.project,
                    "location": REF.region,
                    "service_name": REF.name,
                },
            },
            "timestamp": "2026-11-28T18:00:00Z",
        }
    ).encode()


async def until(predicate: Callable[[], object], within: float) -> None:
    await wait_until(predicate, within, interval=0.05)


async def test_listener_survives_a_missing_subscription_and_delivers_into_the_loop(
    pubsub_emulator: PubSubEmulatorProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    suffix = uuid.uuid4().hex[:8]
    topic = f"projects/{pubsub_emulator.project}/topics/listener-{suffix}"
    subscription = f"projects/{pubsub_emulator.project}/subscriptions/listener-{suffix}"
    publisher = pubsub_v1.PublisherClient()
    publisher.create_topic(name=topic, timeout=30)

    router = Recorder()
    listener = AuditListener(subscription, router)
    await listener.start()
    try:
        # The subscription does not exist yet: the stream fails, the listener retries.
        await until(lambda: listener.failures >= 1, within=30)
        assert listener._task is not None and not listener._task.done()
        subscriber = pubsub_v1.SubscriberClient()
        subscriber.create_subscription(name=subscription, topic=topic, timeout=30)
        subscriber.close()

        messages = [entry("deployer@example.com"), b"not json", entry("other@example.com")]

        def publish_all() -> None:
            for data in messages:
                publisher.publish(topic, data).result(timeout=30)

        # Publish until the re-opened stream has delivered (it comes back after its backoff).
        async def delivered() -> None:
            await asyncio.to_thread(publish_all)
            while not await reached(lambda: len(router.got) >= 3, within=1.0):
                await asyncio.to_thread(publish_all)

        await asyncio.wait_for(delivered(), timeout=60)
        kinds = {type(p) for p in router.got}
        assert kinds == {AuditEntry, Ignored}
        assert any(isinstance(p, Ignored) and p.result is Result.MALFORMED for p in router.got)
        await until(lambda: router.woken, within=10)
        assert router.woken[0] == REF
    finally:
        await asyncio.wait_for(listener.stop(), timeout=20)
        publisher.stop()
    assert listener._task is not None and listener._task.done()
