"""The emulator's in-memory world: services, their IAM policies, revisions, operations and
service accounts. Everything runs on one asyncio loop, so there are no locks.

Behaviour mirrors Cloud Run where a client can tell (see CONTRACT §3): a submitted Service
replaces the previous spec wholesale, every write bumps `generation` and the etag, a changed
template creates a revision `<svc>-<generation:05d>-<3 letters>`, writes return long-running
operations whose response and metadata are Any-packed `google.cloud.run.v2.Service`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import string
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.cloud import iam_admin_v1, run_v2
from google.iam.v1 import policy_pb2
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2, status_pb2

from . import convert, names
from .errors import ApiError, invalid, not_found

log = logging.getLogger("cloudrun_emulator")

ServicePb = run_v2.Service.pb()
ConditionPb = run_v2.Condition.pb()
ListServicesResponsePb = run_v2.ListServicesResponse.pb()
ServiceAccountPb = iam_admin_v1.ServiceAccount.pb()
ListServiceAccountsResponsePb = iam_admin_v1.ListServiceAccountsResponse.pb()

SUCCEEDED = ConditionPb.CONDITION_SUCCEEDED
FAILED = ConditionPb.CONDITION_FAILED
RECONCILING = ConditionPb.CONDITION_RECONCILING
LATEST = 1  # TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST

CONCURRENT_POLICY_CHANGES = (
    "There were concurrent policy changes. Please retry the whole read-modify-write with "
    "exponential backoff."
)
MAX_OPERATIONS = 20_000  # finished operations kept for GetOperation; oldest are forgotten

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


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _pack(message: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(message)
    return a


@dataclass(slots=True)
class AuditEvent:
    """One successful write, for the audit publisher (see audit.py)."""

    method: str  # e.g. google.cloud.run.v2.Services.UpdateService
    key: names.ServiceKey
    principal: str
    request: Any  # a protobuf message or a JSON-able dict
    response: Any | None
    operation_id: str | None = None
    first: bool = False
    last: bool = False
    status: tuple[int, str] | None = None  # (google.rpc code, message) of a failed operation
    resource_name: str | None = None


@dataclass(slots=True)
class Revision:
    name: str
    generation: int
    template: bytes  # serialized RevisionTemplate, for "did the template change"
    ready: bool = False
    failed: bool = False


@dataclass(slots=True)
class Rollout:
    """A revision on its way to serving (only with --rollout-ms > 0)."""

    revision: str
    operation: str
    fail: bool
    handle: asyncio.TimerHandle | None = None
    principal: str = ""
    method: str = ""
    request: Any = None


@dataclass(slots=True)
class OperationEntry:
    op: operations_pb2.Operation
    done: asyncio.Event


@dataclass(slots=True)
class ServiceEntry:
    key: names.ServiceKey
    service: Any  # ServicePb, the authoritative state
    policy: policy_pb2.Policy
    revisions: dict[str, Revision] = field(default_factory=dict)
    pending: Rollout | None = None
    _wire: bytes | None = None

    def wire(self) -> bytes:
        """The serialized Service, cached so that reads cost a dict lookup."""
        if self._wire is None:
            self._wire = self.service.SerializeToString()
        return self._wire

    def touched(self) -> None:
        self._wire = None

    def snapshot(self) -> Any:
        s = ServicePb()
        s.CopyFrom(self.service)
        return s


class Store:
    """All emulator state and the Cloud Run / IAM semantics on top of it."""

    def __init__(
        self,
        *,
        rollout_ms: int = 0,
        rng: random.Random | None = None,
        audit: Callable[[AuditEvent], None] | None = None,
    ) -> None:
        self.rollout_ms = rollout_ms
        self.rng = rng or random.Random()
        self.audit = audit
        self.services: dict[str, ServiceEntry] = {}
        self.operations: OrderedDict[str, OperationEntry] = OrderedDict()
        self.service_accounts: dict[str, Any] = {}
        self.fail_next_revision = False
        # project number -> project id, so names may use either (as Cloud Run allows)
        self._numbers: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers

    def _resolve(self, key: names.ServiceKey) -> names.ServiceKey:
        if key.project.isdigit() and key.project in self._numbers:
            return names.ServiceKey(self._numbers[key.project], key.region, key.service)
        return key

    def _entry(self, name: str, field_name: str = "name") -> ServiceEntry:
        key = self._resolve(names.parse_service_name(name, field_name))
        entry = self.services.get(key.name)
        if entry is None:
            raise not_found(
                f"Resource '{key.service}' of kind 'SERVICE' in region '{key.region}' "
                f"in project '{key.project}' does not exist."
            )
        return entry

    def _etag(self) -> str:
        raw = base64.urlsafe_b64encode(os.urandom(12)).decode().rstrip("=")
        return f'"{raw}"'

    @staticmethod
    def _policy_etag(previous: bytes = b"") -> bytes:
        while True:
            tag = b"\x00" + os.urandom(7)
            if tag != previous:
                return tag

    def _revision_name(self, service: str, generation: int) -> str:
        suffix = "".join(self.rng.choice(string.ascii_lowercase) for _ in range(3))
        return f"{service}-{generation:05d}-{suffix}"

    def _new_operation(self, key: names.ServiceKey, metadata: Any) -> OperationEntry:
        name = f"projects/{key.project}/locations/{key.region}/operations/{uuid.uuid4()}"
        op = operations_pb2.Operation(name=name, done=False)
        op.metadata.CopyFrom(_pack(metadata))
        entry = OperationEntry(op, asyncio.Event())
        self.operations[name] = entry
        while len(self.operations) > MAX_OPERATIONS:
            self.operations.popitem(last=False)
        return entry

    def _finish(
        self, entry: OperationEntry, response: Any = None, error: tuple[int, str] | None = None
    ) -> None:
        if entry.op.done:
            return
        entry.op.done = True
        if error is not None:
            entry.op.error.CopyFrom(status_pb2.Status(code=error[0], message=error[1]))
        else:
            entry.op.response.CopyFrom(_pack(response))
        entry.done.set()

    def _emit(self, event: AuditEvent) -> None:
        if self.audit is None:
            return
        try:
            self.audit(event)
        except Exception:  # the audit sink must never break a write
            log.exception("audit_publish_failed")

    def register_project(self, project: str) -> None:
        """Remember the project's number and create its default compute service account."""
        number = names.project_number(project)
        if number not in self._numbers and not project.isdigit():
            self._numbers[number] = project
            self.put_service_account(names.default_compute_sa(project))

    # ------------------------------------------------------------------ services: reads

    def get_service_wire(self, name: str) -> bytes:
        return self._entry(name).wire()

    def get_service(self, name: str) -> Any:
        return self._entry(name).snapshot()

    def list_services(self, parent: str, page_size: int, page_token: str) -> Any:
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
            project = self._numbers.get(project, project)
        prefix = f"projects/{project}/locations/"
        matching = sorted(
            n
            for n, e in self.services.items()
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
            resp.services.add().CopyFrom(self.services[n].service)
        if start + size < len(matching):
            resp.next_page_token = base64.urlsafe_b64encode(str(start + size).encode()).decode()
        return resp

    # ------------------------------------------------------------------ services: writes

    def _check_service_account(self, submitted: Any, current: Any | None) -> None:
        sa = submitted.template.service_account
        if not sa:
            return
        if current is not None and current.template.service_account == sa:
            return
        if sa.lower() not in self.service_accounts:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Permission 'iam.serviceaccounts.actAs' denied on service account {sa} "
                "(or it may not exist).",
            )

    def _prepare(self, submitted: Any, key: names.ServiceKey) -> Any:
        """The spec as Cloud Run stores it: output-only fields cleared, defaults filled."""
        spec = ServicePb()
        spec.CopyFrom(submitted)
        for f in _OUTPUT_ONLY:
            spec.ClearField(f)
        spec.name = key.name
        convert.validate_service(spec)
        convert.fill_defaults(spec, names.default_compute_sa(key.project))
        return spec

    def _deploy(
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
        current = self.services.get(key.name)
        if must_exist is True and current is None:
            raise not_found(
                f"Resource '{key.service}' of kind 'SERVICE' in region '{key.region}' "
                f"in project '{key.project}' does not exist."
            )
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
        spec = self._prepare(submitted, key)
        if check_sa:
            self._check_service_account(spec, current.service if current else None)
        new_template = spec.template.SerializeToString(deterministic=True)
        if spec.template.revision:
            if not spec.template.revision.startswith(key.service + "-"):
                raise invalid(
                    f"spec.template.revision: revision name must be prefixed by the service "
                    f"name '{key.service}-'."
                )
            if current is not None and spec.template.revision in current.revisions:
                if current.revisions[spec.template.revision].template != new_template:
                    raise ApiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"Revision named '{spec.template.revision}' with different "
                        "configuration already exists.",
                    )

        if validate_only:
            preview = ServicePb()
            preview.CopyFrom(current.service if current else spec)
            if current is not None:
                self._carry_spec(preview, spec)
            return None, None, preview

        if current is None:
            self.register_project(key.project)
            now = _now()
            svc = spec
            svc.uid = str(uuid.uuid4())
            svc.create_time.CopyFrom(now)
            svc.creator = principal
            svc.generation = 1
            svc.uri = names.service_uri(key)
            svc.urls.extend(names.service_urls(key))
            policy = policy_pb2.Policy(version=1, etag=self._policy_etag())
            current = ServiceEntry(key=key, service=svc, policy=policy)
            self.services[key.name] = current
            template_changed = True
        else:
            svc = current.service
            old_template = svc.template.SerializeToString(deterministic=True)
            self._carry_spec(svc, spec)
            svc.generation += 1
            template_changed = old_template != new_template

        svc.update_time.CopyFrom(_now())
        svc.last_modifier = principal
        svc.etag = self._etag()

        op = self._new_operation(key, svc)
        fail = False
        if template_changed:
            revision = spec.template.revision or self._revision_name(key.service, svc.generation)
            current.revisions[revision] = Revision(revision, svc.generation, new_template)
            svc.latest_created_revision = revision
            if not immediate and self.fail_next_revision:
                fail = True
                self.fail_next_revision = False
            if current.pending is not None:
                self._supersede(current)
            if immediate or self.rollout_ms <= 0:
                self._settle(current, revision, fail)
            else:
                self._start_rollout(
                    current, Rollout(revision, op.op.name, fail, None, principal, method, request)
                )
        elif current.pending is None:
            svc.observed_generation = svc.generation
        current.touched()

        method_v2 = method.startswith("google.cloud.run.v2")
        result = current.snapshot()
        op.op.metadata.CopyFrom(_pack(result))
        self._emit(
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
            self._complete_operation(current, op, fail, principal, method, request)
        return current, op, result

    @staticmethod
    def _carry_spec(target: Any, spec: Any) -> None:
        """Replace every client-settable field of `target` by the one in `spec`."""
        keep = ServicePb()
        keep.CopyFrom(target)
        target.CopyFrom(spec)
        for f in _OUTPUT_ONLY:
            target.ClearField(f)
            _copy_field(keep, target, f)

    def _settle(self, entry: ServiceEntry, revision: str, fail: bool) -> None:
        """The revision finished rolling out (or failed to)."""
        svc = entry.service
        rev = entry.revisions.get(revision)
        svc.reconciling = False
        svc.observed_generation = svc.generation
        del svc.conditions[:]
        if fail:
            if rev is not None:
                rev.failed = True
            message = (
                f"Revision '{revision}' is not ready and cannot serve traffic. The user-provided "
                "container failed to start and listen on the port defined provided by the "
                "PORT=8080 environment variable within the allocated timeout."
            )
            svc.terminal_condition.CopyFrom(
                ConditionPb(
                    type_="Ready",
                    state=FAILED,
                    message=message,
                    last_transition_time=_now(),
                    severity=ConditionPb.ERROR,
                    reason=ConditionPb.REVISION_FAILED,
                )
            )
            svc.conditions.add(
                type_="ConfigurationsReady",
                state=FAILED,
                message=message,
                last_transition_time=_now(),
                severity=ConditionPb.ERROR,
            )
            svc.conditions.add(type_="RoutesReady", state=SUCCEEDED, last_transition_time=_now())
        else:
            if rev is not None:
                rev.ready = True
            svc.latest_ready_revision = revision
            svc.terminal_condition.CopyFrom(
                ConditionPb(type_="Ready", state=SUCCEEDED, last_transition_time=_now())
            )
            svc.conditions.add(type_="RoutesReady", state=SUCCEEDED, last_transition_time=_now())
            svc.conditions.add(
                type_="ConfigurationsReady", state=SUCCEEDED, last_transition_time=_now()
            )
        del svc.traffic_statuses[:]
        if svc.latest_ready_revision:
            svc.traffic_statuses.add(type_=LATEST, revision=svc.latest_ready_revision, percent=100)
        entry.touched()

    def _start_rollout(self, entry: ServiceEntry, rollout: Rollout) -> None:
        svc = entry.service
        revision = rollout.revision
        svc.reconciling = True
        svc.terminal_condition.CopyFrom(
            ConditionPb(
                type_="Ready",
                state=RECONCILING,
                message=f"Deploying revision '{revision}'.",
                last_transition_time=_now(),
                reason=ConditionPb.WAITING_FOR_OPERATION,
            )
        )
        loop = asyncio.get_running_loop()
        rollout.handle = loop.call_later(self.rollout_ms / 1000, self._rollout_done, entry, rollout)
        entry.pending = rollout

    def _rollout_done(self, entry: ServiceEntry, rollout: Rollout) -> None:
        if entry.pending is not rollout or self.services.get(entry.key.name) is not entry:
            return
        entry.pending = None
        self._settle(entry, rollout.revision, rollout.fail)
        op = self.operations.get(rollout.operation)
        if op is not None:
            self._complete_operation(
                entry, op, rollout.fail, rollout.principal, rollout.method, rollout.request
            )

    def _supersede(self, entry: ServiceEntry) -> None:
        rollout = entry.pending
        if rollout is None:
            return
        entry.pending = None
        if rollout.handle is not None:
            rollout.handle.cancel()
        op = self.operations.get(rollout.operation)
        if op is not None:
            self._finish(
                op,
                error=(
                    code_pb2.ABORTED,
                    f"Revision '{rollout.revision}' was superseded by a newer revision.",
                ),
            )

    def _complete_operation(
        self,
        entry: ServiceEntry,
        op: OperationEntry,
        fail: bool,
        principal: str,
        method: str,
        request: Any,
    ) -> None:
        result = entry.snapshot()
        error = None
        if fail:
            error = (code_pb2.FAILED_PRECONDITION, result.terminal_condition.message)
        self._finish(op, response=result, error=error)
        if method.startswith("google.cloud.run.v2"):
            self._emit(
                AuditEvent(
                    method=method,
                    key=entry.key,
                    principal=principal,
                    request=request,
                    response=result,
                    operation_id=op.op.name,
                    last=True,
                    status=error,
                )
            )

    def create_service(
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
        key = self._resolve(names.ServiceKey(m["project"], m["region"], service_id))
        _, op, result = self._deploy(
            key,
            service,
            principal=principal,
            method="google.cloud.run.v2.Services.CreateService",
            request=request,
            validate_only=validate_only,
            must_exist=False,
        )
        return self._op_or_preview(key, op, result)

    def update_service(
        self,
        service: Any,
        allow_missing: bool,
        validate_only: bool,
        principal: str,
        request: Any,
    ) -> operations_pb2.Operation:
        key = self._resolve(names.parse_service_name(service.name, "service.name"))
        _, op, result = self._deploy(
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

    def _op_or_preview(
        self, key: names.ServiceKey, op: OperationEntry | None, result: Any
    ) -> operations_pb2.Operation:
        if op is not None:
            return op.op
        # validate_only: a finished operation that is not stored
        preview = operations_pb2.Operation(
            name=f"projects/{key.project}/locations/{key.region}/operations/{uuid.uuid4()}",
            done=True,
        )
        preview.metadata.CopyFrom(_pack(result))
        preview.response.CopyFrom(_pack(result))
        return preview

    def delete_service(
        self,
        name: str,
        etag: str,
        validate_only: bool,
        principal: str,
        request: Any,
        method: str = "google.cloud.run.v2.Services.DeleteService",
    ) -> operations_pb2.Operation:
        entry = self._entry(name)
        key = entry.key
        if etag and etag != entry.service.etag:
            raise ApiError(
                grpc.StatusCode.ABORTED,
                f"The etag '{etag}' does not match the current etag of service "
                f"'{key.service}'; the service was modified concurrently. Re-read it and retry.",
            )
        result = entry.snapshot()
        result.delete_time.CopyFrom(_now())
        if validate_only:
            return self._op_or_preview(key, None, result)
        self._supersede(entry)
        del self.services[key.name]
        op = self._new_operation(key, result)
        v2 = method.startswith("google.cloud.run.v2")
        self._emit(
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
        self._finish(op, response=result)
        if v2:
            self._emit(
                AuditEvent(
                    method, key, principal, request, result, operation_id=op.op.name, last=True
                )
            )
        return op.op

    # ------------------------------------------------------------------ IAM policies

    def get_policy(self, resource: str) -> policy_pb2.Policy:
        return self._entry(resource, "resource").policy

    def set_policy(
        self,
        resource: str,
        policy: policy_pb2.Policy,
        update_mask: list[str],
        principal: str,
        request: Any,
        method: str = "google.cloud.run.v2.Services.SetIamPolicy",
    ) -> policy_pb2.Policy:
        entry = self._entry(resource, "resource")
        current = entry.policy
        if policy.etag and policy.etag != current.etag:
            raise ApiError(grpc.StatusCode.ABORTED, CONCURRENT_POLICY_CHANGES)
        new = policy_pb2.Policy()
        new.CopyFrom(current)
        paths = set(update_mask) if update_mask else {"bindings", "etag"}
        unknown = paths - {"bindings", "etag", "audit_configs", "auditConfigs", "version"}
        if unknown:
            raise invalid(f"Invalid update_mask path(s): {sorted(unknown)}.")
        if "bindings" in paths:
            del new.bindings[:]
            conditional = False
            for b in policy.bindings:
                if not b.role.startswith("roles/"):
                    raise invalid(f"Role ({b.role}) does not exist in the resource's hierarchy.")
                for m in b.members:
                    if not convert.MEMBER_RE.match(m):
                        raise invalid(
                            f"Invalid argument: Member {m} is of an unknown type. Please set a "
                            "valid type prefix for the member."
                        )
                if not len(b.members):
                    continue  # Google drops empty bindings
                if b.HasField("condition"):
                    conditional = True
                nb = new.bindings.add()
                nb.CopyFrom(b)
                # members are a set on Google's side
                members = list(dict.fromkeys(b.members))
                del nb.members[:]
                nb.members.extend(members)
            if conditional and policy.version < 3:
                raise invalid(
                    "Invalid argument: Policies with conditions must set version 3 or higher."
                )
            new.version = 3 if conditional else 1
        if "audit_configs" in paths or "auditConfigs" in paths:
            del new.audit_configs[:]
            new.audit_configs.extend(policy.audit_configs)
        new.etag = self._policy_etag(current.etag)
        entry.policy = new
        self._emit(AuditEvent(method, entry.key, principal, request, new))
        return new

    def test_permissions(self, resource: str, permissions: list[str]) -> list[str]:
        self._entry(resource, "resource")
        return [p for p in permissions if p.startswith("run.")]

    # ------------------------------------------------------------------ operations

    def get_operation(self, name: str) -> operations_pb2.Operation:
        return self._operation(name).op

    def _operation(self, name: str) -> OperationEntry:
        if not name:
            raise invalid("The request is missing the required field 'name'.")
        if not names.OPERATION_RE.match(name):
            raise invalid(
                f"Invalid value for field 'name': '{name}'. Expected the form "
                "'projects/{project}/locations/{location}/operations/{operation}'."
            )
        entry = self.operations.get(name)
        if entry is None:
            raise not_found(f"Operation '{name}' not found.")
        return entry

    async def wait_operation(
        self, name: str, wait_seconds: float | None
    ) -> operations_pb2.Operation:
        entry = self._operation(name)
        if not entry.op.done:
            try:
                await asyncio.wait_for(entry.done.wait(), wait_seconds or 60.0)
            except TimeoutError:
                pass
        return entry.op

    def delete_operation(self, name: str) -> None:
        self._operation(name)
        del self.operations[name]

    # ------------------------------------------------------------------ service accounts

    def put_service_account(self, email: str) -> Any:
        if not names.EMAIL_RE.match(email):
            raise invalid(f"invalid service account email {email!r}")
        project = names.sa_project(email)
        sa = ServiceAccountPb(
            name=f"projects/{project}/serviceAccounts/{email}",
            project_id=project,
            unique_id=names.sa_unique_id(email),
            email=email,
            display_name=email.split("@", 1)[0],
            oauth2_client_id=names.sa_unique_id(email),
            etag=b"\x00" + os.urandom(7),
        )
        created = email.lower() not in self.service_accounts
        self.service_accounts[email.lower()] = sa
        return sa, created

    def delete_service_account(self, email: str) -> None:
        if self.service_accounts.pop(email.lower(), None) is None:
            raise not_found(f"Unknown service account {email}")

    def get_service_account(self, name: str) -> Any:
        if not name:
            raise invalid("The request is missing the required field 'name'.")
        m = names.SA_NAME_RE.match(name)
        if m is None:
            raise invalid(
                f"Invalid value for field 'name': '{name}'. Expected the form "
                "'projects/{project}/serviceAccounts/{email}'."
            )
        sa = self.service_accounts.get(m["email"].lower())
        if sa is None or (m["project"] not in ("-", sa.project_id)):
            raise not_found("Unknown service account")
        return sa

    def list_service_accounts(self, name: str, page_size: int, page_token: str) -> Any:
        if not name.startswith("projects/") or "/" in name[len("projects/") :]:
            raise invalid(f"Invalid value for field 'name': '{name}'. Expected 'projects/{{p}}'.")
        project = name[len("projects/") :]
        accounts = sorted(
            (sa for sa in self.service_accounts.values() if project in ("-", sa.project_id)),
            key=lambda sa: sa.email,
        )
        start = int(page_token) if page_token.isdigit() else 0
        size = min(page_size or 100, 100)
        resp = ListServiceAccountsResponsePb()
        resp.accounts.extend(accounts[start : start + size])
        if start + size < len(accounts):
            resp.next_page_token = str(start + size)
        return resp

    # ------------------------------------------------------------------ admin API

    def admin_put_service(self, key: names.ServiceKey, body: dict[str, Any]) -> bool:
        """Create or replace a service the way someone else's deploy would. True if created."""
        allowed = {"env", "secretEnv", "invokers", "settings", "principal", "image"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise invalid(f"unknown field(s) {unknown}; expected some of {sorted(allowed)}")
        principal = body.get("principal") or "deployer@example.com"
        if not isinstance(principal, str):
            raise invalid("'principal' must be a string")
        invokers = body.get("invokers")
        if invokers is not None:
            if not isinstance(invokers, dict) or not all(
                isinstance(r, str) and isinstance(ms, list) and all(isinstance(m, str) for m in ms)
                for r, ms in invokers.items()
            ):
                raise invalid("'invokers' must be an object of role to a list of member strings")
        image = body.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise invalid("'image' must be a non-empty string")

        current = self.services.get(key.name)
        created = current is None
        spec = ServicePb()
        if current is not None:
            spec.CopyFrom(current.service)
        touches_service = created or any(
            k in body for k in ("env", "secretEnv", "settings", "image")
        )
        convert.apply_env(spec, body.get("env"), body.get("secretEnv"))
        if "settings" in body:
            convert.apply_settings(spec, body["settings"])
        if image is not None:
            convert.ensure_container(spec).image = image

        # Build the new policy first so that a bad member fails before anything is written.
        new_policy = None
        if invokers is not None:
            base = current.policy if current is not None else policy_pb2.Policy(version=1)
            new_policy = policy_pb2.Policy()
            new_policy.CopyFrom(base)
            for role, members in invokers.items():
                kept = [b for b in new_policy.bindings if b.role != role or b.HasField("condition")]
                del new_policy.bindings[:]
                new_policy.bindings.extend(kept)
                if members:
                    new_policy.bindings.add(role=role, members=list(dict.fromkeys(members)))
            for b in new_policy.bindings:
                if not b.role.startswith("roles/"):
                    raise invalid(f"invalid role {b.role!r}: roles start with 'roles/'")
                for m in b.members:
                    if not convert.MEMBER_RE.match(m):
                        raise invalid(f"invalid member {m!r} for role {b.role}")

        if touches_service:
            self._prepare(spec, key)  # validate before writing anything
            method = (
                "google.cloud.run.v1.Services.CreateService"
                if created
                else "google.cloud.run.v1.Services.ReplaceService"
            )
            request = {"name": f"namespaces/{key.project}/services/{key.service}", "body": body}
            self._deploy(
                key,
                spec,
                principal=principal,
                method=method,
                request=request,
                immediate=True,
                check_sa=False,
            )
        if new_policy is not None:
            entry = self.services[key.name]
            new_policy.etag = entry.policy.etag
            self.set_policy(
                key.name,
                new_policy,
                [],
                principal,
                {
                    "resource": key.name,
                    "policy": {
                        "bindings": [
                            {"role": b.role, "members": list(b.members)}
                            for b in new_policy.bindings
                        ]
                    },
                },
                method="google.cloud.run.v1.Services.SetIamPolicy",
            )
        return created

    def admin_get_service(self, key: names.ServiceKey) -> dict[str, Any]:
        entry = self.services.get(key.name)
        if entry is None:
            raise not_found(f"service {key.name} does not exist")
        svc = entry.service
        env, secret_env = convert.env_of(svc)
        iam: dict[str, list[str]] = {}
        conditional = []
        for b in entry.policy.bindings:
            if b.HasField("condition"):
                conditional.append(
                    {
                        "role": b.role,
                        "members": list(b.members),
                        "condition": {
                            "title": b.condition.title,
                            "expression": b.condition.expression,
                        },
                    }
                )
            else:
                iam.setdefault(b.role, []).extend(b.members)
        c = convert.main_container(svc)
        return {
            "name": key.name,
            "project": key.project,
            "region": key.region,
            "service": key.service,
            "uri": svc.uri,
            "image": c.image if c is not None else "",
            "env": env,
            "secretEnv": secret_env,
            "iam": iam,
            "iamConditional": conditional,
            "iamVersion": entry.policy.version,
            "settings": convert.settings_of(svc),
            "generation": svc.generation,
            "observedGeneration": svc.observed_generation,
            "latestReadyRevision": svc.latest_ready_revision,
            "latestCreatedRevision": svc.latest_created_revision,
            "revisions": sorted(entry.revisions),
            "reconciling": svc.reconciling,
            "ready": _state_name(svc.terminal_condition.state),
            "etag": base64.b64encode(entry.policy.etag).decode(),
            "serviceEtag": svc.etag,
        }

    def admin_delete_service(self, key: names.ServiceKey, principal: str) -> None:
        self.delete_service(
            key.name,
            "",
            False,
            principal,
            {"name": f"namespaces/{key.project}/services/{key.service}"},
            method="google.cloud.run.v1.Services.DeleteService",
        )

    def admin_list_services(self) -> list[str]:
        return sorted(self.services)


def _state_name(state: int) -> str:
    return ConditionPb.State.Name(state)


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
