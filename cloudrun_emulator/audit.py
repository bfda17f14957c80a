"""`--audit-topic`: publish a Cloud Audit Logs entry (LogEntry JSON, as a Log Router sink to
Pub/Sub would deliver it) for every successful write.

gRPC writes are v2 methods (`google.cloud.run.v2.Services.UpdateService`, ...) on
`projects/P/locations/R/services/S`; long-running ones get two entries, `operation.first` when
accepted and `operation.last` when done (a failed rollout's last entry carries
`protoPayload.status`). Admin-API writes look like `gcloud run deploy`, which uses the v1 API:
`google.cloud.run.v1.Services.ReplaceService` / `CreateService` / `DeleteService` on
`namespaces/P/services/S`, and `google.cloud.run.v1.Services.SetIamPolicy`, without `operation`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from .events import AuditEvent

log = logging.getLogger("cloudrun_emulator")

_PERMISSIONS = {
    "CreateService": "run.services.create",
    "UpdateService": "run.services.update",
    "ReplaceService": "run.services.update",
    "DeleteService": "run.services.delete",
    "SetIamPolicy": "run.services.setIamPolicy",
}


class AuditSetupError(RuntimeError):
    """The audit topic cannot be used (no emulator host, emulator down, bad topic)."""


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _message_json(message: Any) -> dict[str, Any]:
    if isinstance(message, Message):
        body = json_format.MessageToDict(message)
        return {"@type": f"type.googleapis.com/{message.DESCRIPTOR.full_name}", **body}
    return dict(message or {})


def _v1_service(event: AuditEvent) -> dict[str, Any]:
    """A knative-style v1 Service for admin-API (gcloud-like) entries."""
    svc = event.response
    key = event.key
    if svc is None or not hasattr(svc, "template"):
        return _message_json(svc)
    containers = []
    for c in svc.template.containers:
        env = []
        for e in c.env:
            if e.HasField("value_source"):
                ref = e.value_source.secret_key_ref
                env.append(
                    {
                        "name": e.name,
                        "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.version}},
                    }
                )
            else:
                env.append({"name": e.name, "value": e.value})
        containers.append({"image": c.image, "env": env})
    return {
        "@type": "type.googleapis.com/google.cloud.run.v1.Service",
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {
            "name": key.service,
            "namespace": key.project,
            "generation": svc.generation,
            "labels": {**dict(svc.labels), "cloud.googleapis.com/location": key.region},
            "uid": svc.uid,
        },
        "spec": {"template": {"spec": {"containers": containers}}},
        "status": {
            "observedGeneration": svc.observed_generation,
            "latestCreatedRevisionName": svc.latest_created_revision.rsplit("/", 1)[-1],
            "latestReadyRevisionName": svc.latest_ready_revision.rsplit("/", 1)[-1],
            "url": svc.uri,
        },
    }


def log_entry(event: AuditEvent) -> dict[str, Any]:
    """The LogEntry JSON for one write."""
    key = event.key
    short = event.method.rsplit(".", 1)[-1]
    v1 = event.method.startswith("google.cloud.run.v1")
    if v1 and short != "SetIamPolicy":
        resource_name = f"namespaces/{key.project}/services/{key.service}"
        response = _v1_service(event)
    else:
        resource_name = key.name
        response = _message_json(event.response)
    revision = (getattr(event.response, "latest_created_revision", "") or "").rsplit("/", 1)[-1]
    now = _timestamp()
    payload: dict[str, Any] = {
        "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
        "status": {}
        if event.status is None
        else {"code": event.status[0], "message": event.status[1]},
        "authenticationInfo": {"principalEmail": event.principal},
        "requestMetadata": {
            "callerIp": "127.0.0.1",
            "callerSuppliedUserAgent": "cloudrun-emulator",
            "requestAttributes": {"time": now, "auth": {}},
            "destinationAttributes": {},
        },
        "serviceName": "run.googleapis.com",
        "methodName": event.method,
        "authorizationInfo": [
            {
                "resource": resource_name,
                "permission": _PERMISSIONS.get(short, "run.services.update"),
                "granted": True,
                "resourceAttributes": {},
            }
        ],
        "resourceName": resource_name,
        "request": _message_json(event.request),
        "response": response,
        "resourceLocation": {"currentLocations": [key.region]},
    }
    if v1 and isinstance(event.request, dict) and "@type" not in payload["request"]:
        payload["request"]["@type"] = f"type.googleapis.com/google.cloud.run.v1.{short}Request"
    entry: dict[str, Any] = {
        "protoPayload": payload,
        "insertId": uuid.uuid4().hex[:12],
        "resource": {
            "type": "cloud_run_revision",
            "labels": {
                "project_id": key.project,
                "location": key.region,
                "service_name": key.service,
                "configuration_name": key.service,
                "revision_name": revision,
            },
        },
        "timestamp": now,
        "severity": "NOTICE" if event.status is None else "ERROR",
        "logName": f"projects/{key.project}/logs/cloudaudit.googleapis.com%2Factivity",
        "receiveTimestamp": now,
    }
    if event.operation_id:
        op: dict[str, Any] = {"id": event.operation_id, "producer": "run.googleapis.com"}
        if event.first:
            op["first"] = True
        if event.last:
            op["last"] = True
        entry["operation"] = op
    return entry


class AuditPublisher:
    """Publishes audit entries to a Pub/Sub topic (the Pub/Sub emulator, via
    PUBSUB_EMULATOR_HOST). Publishing is asynchronous and never blocks a write."""

    def __init__(self, topic: str) -> None:
        if not os.environ.get("PUBSUB_EMULATOR_HOST"):
            raise AuditSetupError(
                "--audit-topic needs PUBSUB_EMULATOR_HOST (the Pub/Sub emulator's HOST:PORT)"
            )
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]

        self.topic = topic
        self.client = pubsub_v1.PublisherClient()
        self.published = 0
        self.failed = 0

    def ensure_topic(self) -> None:
        """Create the topic when it does not exist (a sink's topic exists on GCP)."""
        from google.api_core import exceptions as gexc

        try:
            self.client.get_topic(topic=self.topic, timeout=15)
        except gexc.NotFound:
            try:
                self.client.create_topic(name=self.topic, timeout=15)
            except gexc.AlreadyExists:
                pass
        except gexc.GoogleAPICallError as exc:
            raise AuditSetupError(f"cannot use audit topic {self.topic}: {exc}") from exc
        except Exception as exc:  # e.g. RetryError when the emulator is not there
            raise AuditSetupError(f"cannot reach Pub/Sub for {self.topic}: {exc!r}") from exc

    def publish(self, event: AuditEvent) -> None:
        entry = log_entry(event)
        data = json.dumps(entry, separators=(",", ":")).encode()
        attributes = {"logging.googleapis.com/timestamp": entry["timestamp"]}
        future = self.client.publish(self.topic, data, **attributes)
        future.add_done_callback(self._done)
        log.info(
            "audit_published method=%s resource=%s principal=%s operation=%s",
            event.method,
            event.key.name,
            event.principal,
            "first" if event.first else "last" if event.last else "-",
        )

    def _done(self, future: Any) -> None:
        try:
            future.result()
            self.published += 1
        except Exception:
            self.failed += 1
            log.exception("audit_publish_failed topic=%s", self.topic)

    def close(self) -> None:
        """Flush what is batched and stop the publisher's threads."""
        try:
            self.client.stop()
        except Exception:
            log.exception("audit_publisher_stop_failed")
