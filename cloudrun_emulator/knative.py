"""The Cloud Run Admin API v1 view of the store: Knative serving `Service` and `Revision` JSON
(`serving.knative.dev/v1`), as `gcloud run services ...` reads and writes it.

The v2 Service proto stays the one authoritative state; this module only translates. The
mapping follows Cloud Run's YAML reference (https://cloud.google.com/run/docs/reference/yaml/v1):

====================================================  ===========================================
v1 (Knative)                                          v2 Service
====================================================  ===========================================
metadata.labels (minus cloud.googleapis.com/location) labels
metadata.annotations run.googleapis.com/ingress       ingress
metadata.annotations run.googleapis.com/client-name   client (client-version: client_version)
metadata.annotations serving.knative.dev/creator      creator (output only)
metadata.annotations serving.knative.dev/lastModifier last_modifier (output only)
other metadata.annotations                            annotations
metadata.resourceVersion                              etag (without its quotes)
spec.template.metadata.name                           template.revision
spec.template.metadata.labels / other annotations     template.labels / template.annotations
autoscaling.knative.dev/minScale, maxScale            template.scaling.min/max_instance_count
spec.template.spec.containerConcurrency               template.max_instance_request_concurrency
spec.template.spec.timeoutSeconds                     template.timeout
spec.template.spec.serviceAccountName                 template.service_account
spec.template.spec.containers[]                       template.containers[] (name, image, command,
                                                      args, env, resources.limits, ports)
spec.traffic[]                                        traffic[]
status.*                                              observed_generation, terminal_condition,
                                                      conditions, latest_*_revision, uri, traffic
====================================================  ===========================================

Fields of the v2 Service that v1 here does not carry (volumes, probes, VPC access, ...) are lost
when a v1 client sends the object back; the emulator's seeds and the controller use none of them.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from google.cloud import run_v2

from . import convert, names
from .errors import invalid
from .store.records import ConditionPb, Revision, ServiceEntry, ServicePb

API_VERSION = "serving.knative.dev/v1"
LOCATION_LABEL = "cloud.googleapis.com/location"
INGRESS_ANNOTATION = "run.googleapis.com/ingress"
CLIENT_NAME = "run.googleapis.com/client-name"
CLIENT_VERSION = "run.googleapis.com/client-version"
CREATOR = "serving.knative.dev/creator"
LAST_MODIFIER = "serving.knative.dev/lastModifier"
MIN_SCALE = "autoscaling.knative.dev/minScale"
MAX_SCALE = "autoscaling.knative.dev/maxScale"
# Annotations the server sets or derives: never stored from a submitted object.
_OUTPUT_ANNOTATIONS = frozenset(
    {
        CREATOR,
        LAST_MODIFIER,
        "run.googleapis.com/ingress-status",
        "run.googleapis.com/operation-id",
        "run.googleapis.com/urls",
        "serving.knative.dev/creator",
    }
)
_INGRESS = convert.INGRESS_TO_API
_INGRESS_NAME = convert.INGRESS_FROM_API
LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
RevisionTemplatePb = run_v2.RevisionTemplate.pb()


def _rfc3339(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    dt = datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def resource_version(etag: str) -> str:
    """The v1 resourceVersion of a v2 etag: the same value without its quotes."""
    return etag.strip('"')


def image_digest(image: str) -> str:
    """What Cloud Run reports as a revision's resolved image: `repo@sha256:...`. The emulator
    pulls nothing, so the digest is a stable hash of the reference it was given."""
    if "@sha256:" in image:
        return image
    repo = image
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repo = image[: image.rfind(":")]
    return f"{repo}@sha256:{hashlib.sha256(image.encode()).hexdigest()}"


def _status_word(state: int) -> str:
    if state == ConditionPb.CONDITION_SUCCEEDED:
        return "True"
    if state == ConditionPb.CONDITION_FAILED:
        return "False"
    return "Unknown"


def _condition(c: Any, type_: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type_ or c.type_, "status": _status_word(c.state)}
    if c.message:
        out["message"] = c.message
    if c.state == ConditionPb.CONDITION_FAILED:
        out["reason"] = "RevisionFailed"
    elif c.state not in (ConditionPb.CONDITION_SUCCEEDED, ConditionPb.CONDITION_FAILED):
        out["reason"] = "Deploying"
    when = _rfc3339(c.last_transition_time)
    if when:
        out["lastTransitionTime"] = when
    if c.severity == ConditionPb.ERROR:
        out["severity"] = "Error"
    return out


# ------------------------------------------------------------------------------ v2 -> v1


def _container_v1(c: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"image": c.image}
    if c.name:
        out["name"] = c.name
    if len(c.command):
        out["command"] = list(c.command)
    if len(c.args):
        out["args"] = list(c.args)
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
    if env:
        out["env"] = env
    if len(c.resources.limits):
        out["resources"] = {"limits": dict(sorted(c.resources.limits.items()))}
    if len(c.ports):
        out["ports"] = [
            {"name": p.name or "http1", "containerPort": p.container_port} for p in c.ports
        ]
    return out


def template_v1(t: Any, client: str = "", client_version: str = "") -> dict[str, Any]:
    """A RevisionTemplate as v1 `{metadata, spec}`."""
    annotations = dict(t.annotations)
    if t.scaling.min_instance_count:
        annotations[MIN_SCALE] = str(t.scaling.min_instance_count)
    if t.scaling.max_instance_count:
        annotations[MAX_SCALE] = str(t.scaling.max_instance_count)
    if client:
        annotations[CLIENT_NAME] = client
    if client_version:
        annotations[CLIENT_VERSION] = client_version
    metadata: dict[str, Any] = {}
    if t.revision:
        metadata["name"] = t.revision
    if len(t.labels):
        metadata["labels"] = dict(t.labels)
    if annotations:
        metadata["annotations"] = dict(sorted(annotations.items()))
    spec: dict[str, Any] = {
        "containerConcurrency": t.max_instance_request_concurrency,
        "timeoutSeconds": t.timeout.seconds,
        "containers": [_container_v1(c) for c in t.containers],
    }
    if t.service_account:
        spec["serviceAccountName"] = t.service_account
    return {"metadata": metadata, "spec": spec}


def _traffic_v1(targets: Any, status: bool, latest_ready: str = "") -> list[dict[str, Any]]:
    """v1 traffic; in `status`, a LATEST entry names the revision it resolved to (Knative's
    Route status does; v2 traffic_statuses leave it to latest_ready_revision)."""
    out = []
    for t in targets:
        item: dict[str, Any] = {"percent": t.percent}
        if t.type_ == LATEST and not status:
            item["latestRevision"] = True
        else:
            revision = t.revision or (latest_ready if t.type_ == LATEST else "")
            if revision:
                item["revisionName"] = revision
            if t.type_ == LATEST:
                item["latestRevision"] = True
        if t.tag:
            item["tag"] = t.tag
        out.append(item)
    return out


def service_v1(entry: ServiceEntry, numbers: bool = True) -> dict[str, Any]:
    """A stored service as a v1 Knative Service."""
    svc, key = entry.service, entry.key
    namespace = names.project_number(key.project) if numbers else key.project
    annotations = dict(svc.annotations)
    if svc.creator:
        annotations[CREATOR] = svc.creator
    if svc.last_modifier:
        annotations[LAST_MODIFIER] = svc.last_modifier
    annotations[INGRESS_ANNOTATION] = _INGRESS_NAME.get(int(svc.ingress), "all")
    annotations["run.googleapis.com/ingress-status"] = annotations[INGRESS_ANNOTATION]
    if svc.client:
        annotations[CLIENT_NAME] = svc.client
    if svc.client_version:
        annotations[CLIENT_VERSION] = svc.client_version
    terminal = svc.terminal_condition
    conditions = [_condition(terminal, "Ready")] if terminal.type_ else []
    conditions += [_condition(c) for c in svc.conditions]
    status: dict[str, Any] = {
        "observedGeneration": svc.observed_generation,
        "conditions": conditions,
        "url": svc.uri,
        "address": {"url": svc.uri},
        "traffic": _traffic_v1(
            svc.traffic_statuses,
            status=True,
            latest_ready=names.short_revision(svc.latest_ready_revision),
        ),
    }
    if svc.latest_created_revision:
        status["latestCreatedRevisionName"] = names.short_revision(svc.latest_created_revision)
    if svc.latest_ready_revision:
        status["latestReadyRevisionName"] = names.short_revision(svc.latest_ready_revision)
    return {
        "apiVersion": API_VERSION,
        "kind": "Service",
        "metadata": {
            "name": key.service,
            "namespace": namespace,
            "selfLink": f"/apis/{API_VERSION}/namespaces/{namespace}/services/{key.service}",
            "uid": svc.uid,
            "resourceVersion": resource_version(svc.etag),
            "generation": svc.generation,
            "creationTimestamp": _rfc3339(svc.create_time),
            "labels": {**dict(svc.labels), LOCATION_LABEL: key.region},
            "annotations": dict(sorted(annotations.items())),
        },
        "spec": {
            "template": template_v1(svc.template, svc.client, svc.client_version),
            "traffic": _traffic_v1(svc.traffic, status=False),
        },
        "status": status,
    }


def revision_v1(entry: ServiceEntry, rev: Revision) -> dict[str, Any]:
    """One of a service's revisions as a v1 Knative Revision."""
    key = entry.key
    namespace = names.project_number(key.project)
    t = RevisionTemplatePb()
    t.ParseFromString(rev.template)
    tv1 = template_v1(t)
    labels = {
        **tv1["metadata"].get("labels", {}),
        "serving.knative.dev/service": key.service,
        "serving.knative.dev/configuration": key.service,
        "serving.knative.dev/configurationGeneration": str(rev.generation),
        "serving.knative.dev/serviceUid": entry.service.uid,
        LOCATION_LABEL: key.region,
    }
    if rev.ready:
        state = ConditionPb.CONDITION_SUCCEEDED
    elif rev.failed:
        state = ConditionPb.CONDITION_FAILED
    else:
        state = ConditionPb.CONDITION_RECONCILING
    ready = {"type": "Ready", "status": _status_word(state)}
    if rev.failed:
        ready["reason"] = "HealthCheckContainerError"
    status: dict[str, Any] = {"observedGeneration": 1, "conditions": [ready]}
    if len(t.containers):
        status["imageDigest"] = image_digest(t.containers[0].image)
    return {
        "apiVersion": API_VERSION,
        "kind": "Revision",
        "metadata": {
            "name": rev.name,
            "namespace": namespace,
            "selfLink": f"/apis/{API_VERSION}/namespaces/{namespace}/revisions/{rev.name}",
            "generation": 1,
            "labels": labels,
            "annotations": tv1["metadata"].get("annotations", {}),
            "ownerReferences": [
                {
                    "kind": "Configuration",
                    "name": key.service,
                    "apiVersion": API_VERSION,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": tv1["spec"],
        "status": status,
    }


def list_v1(kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": f"{kind}List", "metadata": {}, "items": items}


# ------------------------------------------------------------------------------ v1 -> v2


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{where} must be an object, got {type(value).__name__}")
    return value


def _str_map(value: Any, where: str) -> dict[str, str]:
    m = _obj(value, where)
    for k, v in m.items():
        if not isinstance(v, str):
            raise invalid(f"{where}.{k} must be a string, got {type(v).__name__}")
    return m


def _int_field(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise invalid(f"{where} must be an integer, got {value!r}") from exc


def service_from_v1(body: dict[str, Any]) -> Any:
    """A submitted v1 Service as the v2 Service proto the store takes (no name, no output)."""
    if body.get("kind", "Service") != "Service":
        raise invalid(f"kind must be 'Service', got {body.get('kind')!r}")
    meta = _obj(body.get("metadata"), "metadata")
    spec = _obj(body.get("spec"), "spec")
    svc = ServicePb()
    for k, v in _str_map(meta.get("labels"), "metadata.labels").items():
        if k != LOCATION_LABEL:
            svc.labels[k] = v
    for k, v in _str_map(meta.get("annotations"), "metadata.annotations").items():
        if k == INGRESS_ANNOTATION:
            if v not in _INGRESS:
                raise invalid(
                    f"metadata.annotations[{INGRESS_ANNOTATION}]: must be one of "
                    f"{sorted(_INGRESS)}, got {v!r}"
                )
            svc.ingress = _INGRESS[v]
        elif k == CLIENT_NAME:
            svc.client = v
        elif k == CLIENT_VERSION:
            svc.client_version = v
        elif k not in _OUTPUT_ANNOTATIONS:
            svc.annotations[k] = v
    template = _obj(spec.get("template"), "spec.template")
    _template_from_v1(template, svc.template)
    for i, tr in enumerate(spec.get("traffic") or []):
        where = f"spec.traffic[{i}]"
        tr = _obj(tr, where)
        target = svc.traffic.add(percent=_int_field(tr.get("percent", 0), f"{where}.percent"))
        if tr.get("latestRevision"):
            target.type_ = LATEST
        else:
            target.type_ = REVISION
            target.revision = str(tr.get("revisionName") or "")
        if tr.get("tag"):
            target.tag = str(tr["tag"])
    return svc


def _template_from_v1(template: dict[str, Any], t: Any) -> None:
    meta = _obj(template.get("metadata"), "spec.template.metadata")
    spec = _obj(template.get("spec"), "spec.template.spec")
    if meta.get("name"):
        t.revision = str(meta["name"])
    for k, v in _str_map(meta.get("labels"), "spec.template.metadata.labels").items():
        t.labels[k] = v
    for k, v in _str_map(meta.get("annotations"), "spec.template.metadata.annotations").items():
        if k == MIN_SCALE:
            t.scaling.min_instance_count = _int_field(v, f"annotations[{MIN_SCALE}]")
        elif k == MAX_SCALE:
            t.scaling.max_instance_count = _int_field(v, f"annotations[{MAX_SCALE}]")
        elif k in (CLIENT_NAME, CLIENT_VERSION):
            continue  # the service's client fields carry these
        else:
            t.annotations[k] = v
    if spec.get("containerConcurrency") is not None:
        t.max_instance_request_concurrency = _int_field(
            spec["containerConcurrency"], "spec.template.spec.containerConcurrency"
        )
    if spec.get("timeoutSeconds") is not None:
        t.timeout.seconds = _int_field(spec["timeoutSeconds"], "spec.template.spec.timeoutSeconds")
    if spec.get("serviceAccountName"):
        t.service_account = str(spec["serviceAccountName"])
    for i, c in enumerate(spec.get("containers") or []):
        where = f"spec.template.spec.containers[{i}]"
        c = _obj(c, where)
        pc = t.containers.add(image=str(c.get("image") or ""), name=str(c.get("name") or ""))
        pc.command.extend(str(x) for x in c.get("command") or [])
        pc.args.extend(str(x) for x in c.get("args") or [])
        for j, e in enumerate(c.get("env") or []):
            e = _obj(e, f"{where}.env[{j}]")
            pe = pc.env.add(name=str(e.get("name") or ""))
            ref = _obj(e.get("valueFrom"), f"{where}.env[{j}].valueFrom").get("secretKeyRef")
            if ref is not None:
                ref = _obj(ref, f"{where}.env[{j}].valueFrom.secretKeyRef")
                pe.value_source.secret_key_ref.secret = str(ref.get("name") or "")
                pe.value_source.secret_key_ref.version = str(ref.get("key") or "latest")
            else:
                pe.value = str(e.get("value") or "")
        resources = _obj(c.get("resources"), f"{where}.resources")
        for k, v in _obj(resources.get("limits"), f"{where}.resources.limits").items():
            pc.resources.limits[k] = str(v)
        for j, p in enumerate(c.get("ports") or []):
            p = _obj(p, f"{where}.ports[{j}]")
            pc.ports.add(
                name=str(p.get("name") or ""),
                container_port=_int_field(p.get("containerPort", 8080), f"{where}.ports[{j}]"),
            )


# ------------------------------------------------------------------------------ label selectors


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, joined by
    commas (what gcloud sends, e.g. `client.knative.dev/nonce=abc`)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = (s.strip() for s in term.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True
