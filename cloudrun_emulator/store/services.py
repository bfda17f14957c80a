"""Services (google.cloud.run.v2.Services reads and writes): a submitted Service replaces the
previous spec wholesale, every write bumps `generation` and the etag, server-side defaults are
filled, and every write returns a long-running operation whose response and metadata are
Any-packed `google.cloud.run.v2.Service`."""

from __future__ import annotations

import base64
import os
import uuid
from typing import Any

import grpc
from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from google.longrunning import operations_pb2

from .. import convert, names
from ..errors import ApiError, invalid, not_found
from ..events import AuditEvent, AuditSink
from . import iam, traffic
from .accounts import ServiceAccounts
from .directory import Directory, missing_v2
from .operations import Operations
from .records import OperationEntry, ServiceEntry, ServicePb, now, pack
from .revisions import Revisions

ListServicesResponsePb = run_v2.ListServicesResponse.pb()

# Fields a client may set; everything else in a submitted Service is output-only.
_OUTPUT_ONLY = (
    "uid",
    "generation",
    "create_time",
    "update_time",
    "delete_time",
    "expire_time",
    "creator",
    "last_modifier",
    "observed_generation",
    "terminal_condition",
    "conditions",
    "latest_ready_revision",
    "latest_created_revision",
    "traffic_statuses",
    "uri",
    "urls",
    "reconciling",
    "etag",
    "satisfies_pzs",
)


def _etag() -> str:
    raw = base64.urlsafe_b64encode(os.urandom(12)).decode().rstrip("=")
    return f'"{raw}"'


class Services:
    def __init__(
        self,
        directory: Directory,
        accounts: ServiceAccounts,
        operations: Operations,
        revisions: Revisions,
        emit: AuditSink,
    ) -> None:
        self.directory = directory
        self.accounts = accounts
        self.operations = operations
        self.revisions = revisions
        self.emit = emit

    # ------------------------------------------------------------------ reads

    def get_wire(self, name: str) -> bytes:
        return self.directory.entry(name).wire()

    def get(self, name: str) -> Any:
        return self.directory.entry(name).snapshot()

    def list_page(self, parent: str, page_size: int, page_token: str) -> Any:
        if not parent:
            raise invalid("The request is missing the required field 'parent'.")
        m = names.PARENT_RE.match(parent)
        if m is None:
            raise invalid(
                f"Invalid value for field 'parent': '{parent}'. "
                "Expected the form 'projects/{project}/locations/{location}'."
            )
        project, region = m["project"], m["region"]
        if project.isdigit():
            project = self.directory.numbers.get(project, project)
        prefix = f"projects/{project}/locations/"
        services = self.directory.services
        matching = sorted(
            n
            for n, e in services.items()
            if n.startswith(prefix) and (region == "-" or e.key.region == region)
        )
        start = 0
        if page_token:
            try:
                start = int(base64.urlsafe_b64decode(page_token.encode()).decode())
            except (ValueError, UnicodeDecodeError) as exc:
                raise invalid(f"Invalid page_token '{page_token}'.") from exc
        if page_size < 0:
            raise invalid("page_size must not be negative.")
        size = min(page_size or 100, 1000)
        chunk = matching[start : start + size]
        resp = ListServicesResponsePb()
        for n in chunk:
            resp.services.add().CopyFrom(services[n].service)
        if start + size < len(matching):
            resp.next_page_token = base64.urlsafe_b64encode(str(start + size).encode()).decode()
        return resp

    # ------------------------------------------------------------------ writes

    def create(
        self,
        parent: str,
        service_id: str,
        service: Any,
        validate_only: bool,
        principal: str,
        request: Any,
    ) -> operations_pb2.Operation:
        if not parent:
            raise invalid("The request is missing the required field 'parent'.")
        m = names.PARENT_RE.match(parent)
        if m is None or m["region"] == "-":
            raise invalid(
                f"Invalid value for field 'parent': '{parent}'. "
                "Expected the form 'projects/{project}/locations/{location}'."
            )
        if not service_id:
            raise invalid("The request is missing the required field 'service_id'.")
        if not names.SERVICE_ID_RE.match(service_id):
            raise invalid(
                f"Invalid value for field 'service_id': '{service_id}'. Must be an RFC 1035 "
                "label of at most 49 characters."
            )
        if service.name:
            raise invalid(
                "service.name must be empty in CreateService; it is composed from parent and "
                "service_id."
            )
        _refuse_system_annotations(service)
        key = self.directory.resolve(names.ServiceKey(m["project"], m["region"], service_id))
        _, op, result = self.deploy(
            key,
            service,
            principal=principal,
            method="google.cloud.run.v2.Services.CreateService",
            request=request,
            validate_only=validate_only,
            must_exist=False,
        )
        return self._op_or_preview(key, op, result)

    def update(
        self,
        service: Any,
        allow_missing: bool,
        validate_only: bool,
        principal: str,
        request: Any,
    ) -> operations_pb2.Operation:
        key = self.directory.resolve(names.parse_service_name(service.name, "service.name"))
        _, op, result = self.deploy(
            key,
            service,
            principal=principal,
            method="google.cloud.run.v2.Services.UpdateService",
            request=request,
            validate_only=validate_only,
            etag=service.etag,
            must_exist=None if allow_missing else True,
        )
        return self._op_or_preview(key, op, result)

    def delete(
        self,
        name: str,
        etag: str,
        validate_only: bool,
        principal: str,
        request: Any,
        method: str = "google.cloud.run.v2.Services.DeleteService",
    ) -> operations_pb2.Operation:
        entry = self.directory.entry(name)
        key = entry.key
        if etag and etag != entry.service.etag:
            raise ApiError(
                grpc.StatusCode.ABORTED,
                f"The etag '{etag}' does not match the current etag of service "
                f"'{key.service}'; the service was modified concurrently. Re-read it and retry.",
            )
        result = entry.snapshot()
        result.delete_time.CopyFrom(now())
        if validate_only:
            return self._op_or_preview(key, None, result)
        self.revisions.supersede(entry)
        del self.directory.services[key.name]
        op = self.operations.new(key, result)
        v2 = method.startswith("google.cloud.run.v2")
        self.emit(
            AuditEvent(
                method,
                key,
                principal,
                request,
                result,
                operation_id=op.op.name if v2 else None,
                first=v2,
            )
        )
        self.operations.finish(op, response=result)
        if v2:
            self.emit(
                AuditEvent(
                    method, key, principal, request, result, operation_id=op.op.name, last=True
                )
            )
        return op.op

    def prepare(self, submitted: Any, key: names.ServiceKey) -> Any:
        """The spec as Cloud Run stores it: output-only fields cleared, defaults filled."""
        spec = ServicePb()
        spec.CopyFrom(submitted)
        for f in _OUTPUT_ONLY:
            spec.ClearField(f)
        spec.name = key.name
        convert.validate_service(spec)
        convert.fill_defaults(spec, names.default_compute_sa(key.project))
        return spec

    def deploy(
        self,
        key: names.ServiceKey,
        submitted: Any,
        *,
        principal: str,
        method: str,
        request: Any,
        validate_only: bool = False,
        etag: str = "",
        must_exist: bool | None = None,
        immediate: bool = False,
        check_sa: bool = True,
    ) -> tuple[ServiceEntry | None, OperationEntry | None, Any]:
        """Create or replace a service. Returns (entry, operation, resulting Service)."""
        current = self.directory.services.get(key.name)
        if must_exist is True and current is None:
            raise missing_v2(key)
        if must_exist is False and current is not None:
            raise ApiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"Resource '{key.service}' already exists.",
            )
        if etag and current is not None and etag != current.service.etag:
            raise ApiError(
                grpc.StatusCode.ABORTED,
                f"The etag '{etag}' does not match the current etag of service "
                f"'{key.service}'; the service was modified concurrently. Re-read it and retry.",
            )
        if etag and current is None:
            raise not_found(f"Resource '{key.service}' of kind 'SERVICE' does not exist.")
        spec = self.prepare(submitted, key)
        # Every project has its default compute service account (the one prepare() filled in),
        # also before its first service: a first create that runs as it must pass actAs.
        self.directory.register_project(key.project)
        if check_sa:
            self.accounts.check_act_as(spec, current.service if current else None)
        new_template = spec.template.SerializeToString(deterministic=True)
        if spec.template.revision:
            if not spec.template.revision.startswith(key.service + "-"):
                raise invalid(
                    f"spec.template.revision: revision name must be prefixed by the service "
                    f"name '{key.service}-'."
                )
            # Revisions are immutable: a template naming an existing revision must be that
            # revision's template. Cloud Run answers 409 ALREADY_EXISTS "Revision named '<rev>'
            # with different configuration already exists." (GoogleCloudPlatform/k8s-config-
            # connector#772, a real v2 UpdateService audit entry with status code 6;
            # googleapis/google-cloud-python#14259, a v2 UpdateService from the Python client;
            # firebase/firebase-tools#10148, the v1 409 JSON; hashicorp/
            # terraform-provider-google#14569). RevisionTemplate.revision is optional: "If this
            # field is omitted, it will be automatically generated based on the Service name"
            # (google/cloud/run/v2/revision_template.proto).
            if current is not None and spec.template.revision in current.revisions:
                if current.revisions[spec.template.revision].template != new_template:
                    raise ApiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"Revision named '{spec.template.revision}' with different "
                        "configuration already exists.",
                    )

        traffic.validate(spec, current, spec.template.revision)

        if validate_only:
            preview = ServicePb()
            preview.CopyFrom(current.service if current else spec)
            if current is not None:
                _carry_spec(preview, spec)
            return None, None, preview

        if current is None:
            self.directory.register_project(key.project)
            created = now()
            svc = spec
            svc.uid = str(uuid.uuid4())
            svc.create_time.CopyFrom(created)
            svc.creator = principal
            svc.generation = 1
            svc.uri = names.service_uri(key)
            svc.urls.extend(names.service_urls(key))
            policy = policy_pb2.Policy(version=1, etag=iam.new_etag())
            current = ServiceEntry(key=key, service=svc, policy=policy)
            self.directory.services[key.name] = current
            template_changed = True
        else:
            svc = current.service
            old_template = svc.template.SerializeToString(deterministic=True)
            _carry_spec(svc, spec)
            svc.generation += 1
            template_changed = old_template != new_template

        svc.update_time.CopyFrom(now())
        svc.last_modifier = principal
        svc.etag = _etag()

        op = self.operations.new(key, svc)
        fail = False
        if template_changed:
            fail = self.revisions.create(
                current,
                spec.template.revision,
                new_template,
                op,
                immediate=immediate,
                principal=principal,
                method=method,
                request=request,
            )
        elif current.pending is None:
            svc.observed_generation = svc.generation
        if not template_changed:
            traffic.route(svc)  # a traffic-only (or annotation-only) write: no revision
        current.touched()

        method_v2 = method.startswith("google.cloud.run.v2")
        result = current.snapshot()
        op.op.metadata.CopyFrom(pack(result))
        self.emit(
            AuditEvent(
                method=method,
                key=key,
                principal=principal,
                request=request,
                response=result,
                operation_id=op.op.name if method_v2 else None,
                first=method_v2,
                last=False,
            )
        )
        if current.pending is None or not template_changed:
            self.revisions.complete_operation(current, op, fail, principal, method, request)
        return current, op, result

    def _op_or_preview(
        self, key: names.ServiceKey, op: OperationEntry | None, result: Any
    ) -> operations_pb2.Operation:
        if op is not None:
            return op.op
        return self.operations.preview(key, result)


# google/cloud/run/v2/service.proto, Service.annotations: "Cloud Run API v2 does not support
# annotations with `run.googleapis.com`, `cloud.googleapis.com`, `serving.knative.dev`, or
# `autoscaling.knative.dev` namespaces, and they will be rejected in new resources";
# RevisionTemplate.annotations (revision_template.proto): "... and they will be rejected".
# The real refusal, from a v2 CreateService (GoogleCloudPlatform/avocano#238): "Error 400:
# Violation in CreateServiceRequest.service.template.annotations[autoscaling.knative.dev/
# maxScale]: system annotations are not supported in Cloud Run API v2." Only CreateService is
# grounded; an UpdateService of a service that already carries them (v1-created) is accepted.
SYSTEM_ANNOTATION_NAMESPACES = (
    "run.googleapis.com",
    "cloud.googleapis.com",
    "serving.knative.dev",
    "autoscaling.knative.dev",
)


def _is_system_annotation(key: str) -> bool:
    return "/" in key and key.split("/", 1)[0] in SYSTEM_ANNOTATION_NAMESPACES


def _refuse_system_annotations(service: Any) -> None:
    for where, given in (
        ("service.annotations", service.annotations),
        ("service.template.annotations", service.template.annotations),
    ):
        for key in sorted(given):
            if _is_system_annotation(key):
                raise invalid(
                    f"Violation in CreateServiceRequest.{where}[{key}]: system annotations are "
                    "not supported in Cloud Run API v2."
                )


def _carry_spec(target: Any, spec: Any) -> None:
    """Replace every client-settable field of `target` by the one in `spec`."""
    keep = ServicePb()
    keep.CopyFrom(target)
    target.CopyFrom(spec)
    for f in _OUTPUT_ONLY:
        target.ClearField(f)
        _copy_field(keep, target, f)


def _copy_field(src: Any, dst: Any, field_name: str) -> None:
    fd = ServicePb.DESCRIPTOR.fields_by_name[field_name]
    value = getattr(src, field_name)
    if fd.is_repeated:
        getattr(dst, field_name).extend(value)
    elif fd.message_type is not None:
        if src.HasField(field_name):
            getattr(dst, field_name).CopyFrom(value)
    else:
        setattr(dst, field_name, value)
