"""IAM policies on services (GetIamPolicy / SetIamPolicy / TestIamPermissions): the etag
changes on every write; a stale etag is ABORTED, no etag overwrites."""

from __future__ import annotations

import os
from typing import Any

import grpc
from google.iam.v1 import policy_pb2

from .. import convert, names
from ..errors import ApiError, invalid
from ..events import AuditEvent, AuditSink
from .directory import Directory

# IAM's answer to a stale etag: 409 ABORTED with this text, as real setIamPolicy calls show it
# (GoogleCloudPlatform/deploymentmanager-samples#332: {"code":409,"message":"There were
# concurrent policy changes. Please retry the whole read-modify-write with exponential
# backoff.","status":"ABORTED"}; openshift/installer pkg/terraform/diagnose_test.go). Those are
# project policies; no recording of a Cloud Run service's own SetIamPolicy conflict was found.
CONCURRENT_POLICY_CHANGES = (
    "There were concurrent policy changes. Please retry the whole read-modify-write with "
    "exponential backoff."
)


def new_etag(previous: bytes = b"") -> bytes:
    while True:
        tag = b"\x00" + os.urandom(7)
        if tag != previous:
            return tag


class Policies:
    def __init__(self, directory: Directory, emit: AuditSink) -> None:
        self.directory = directory
        self.emit = emit

    def get(self, resource: str) -> policy_pb2.Policy:
        return self.directory.entry(resource, "resource").policy

    def set(
        self,
        resource: str,
        policy: policy_pb2.Policy,
        update_mask: list[str],
        principal: str,
        request: Any,
        method: str = "google.cloud.run.v2.Services.SetIamPolicy",
    ) -> policy_pb2.Policy:
        entry = self.directory.entry(resource, "resource")
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
        new.etag = new_etag(current.etag)
        entry.policy = new
        self.emit(AuditEvent(method, entry.key, principal, request, new))
        return new

    def test_permissions(self, resource: str, permissions: list[str]) -> list[str]:
        """The caller holds every `run.*` permission. The service need not exist: permissions
        are inherited from the project, and `gcloud run deploy` of a new service asks first
        (measured with gcloud 528: it calls testIamPermissions before the service exists and
        fails on NOT_FOUND)."""
        names.parse_service_name(resource, "resource")
        return [p for p in permissions if p.startswith("run.")]
