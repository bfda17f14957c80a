"""The admin API's view of the store (CONTRACT §3): a service as one flat JSON object of env,
IAM and settings, and writes that look like someone else's `gcloud run deploy` (v1 methods in
the audit log, applied at once, no actAs check)."""

from __future__ import annotations

import base64
from typing import Any

from google.iam.v1 import policy_pb2

from .. import convert, names
from ..errors import invalid, not_found
from ..store import Store, traffic
from ..store.records import ConditionPb, ServicePb

DEFAULT_PRINCIPAL = "deployer@example.com"


def put_service(store: Store, key: names.ServiceKey, body: dict[str, Any]) -> bool:
    """Create or replace a service the way someone else's deploy would. True if created."""
    allowed = {"env", "secretEnv", "invokers", "settings", "principal", "image", "traffic"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unknown field(s) {unknown}; expected some of {sorted(allowed)}")
    principal = body.get("principal") or DEFAULT_PRINCIPAL
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

    current = store.directory.services.get(key.name)
    created = current is None
    spec = ServicePb()
    if current is not None:
        spec.CopyFrom(current.service)
    touches_service = created or any(
        k in body for k in ("env", "secretEnv", "settings", "image", "traffic")
    )
    convert.apply_env(spec, body.get("env"), body.get("secretEnv"))
    if "settings" in body:
        convert.apply_settings(spec, body["settings"])
    if image is not None:
        convert.ensure_container(spec).image = image
    if "traffic" in body:
        _apply_traffic(spec, body["traffic"])

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
        store.services.prepare(spec, key)  # validate before writing anything
        method = (
            "google.cloud.run.v1.Services.CreateService"
            if created
            else "google.cloud.run.v1.Services.ReplaceService"
        )
        request = {"name": f"namespaces/{key.project}/services/{key.service}", "body": body}
        store.services.deploy(
            key,
            spec,
            principal=principal,
            method=method,
            request=request,
            immediate=True,
            check_sa=False,
        )
    if new_policy is not None:
        entry = store.directory.services[key.name]
        new_policy.etag = entry.policy.etag
        store.policies.set(
            key.name,
            new_policy,
            [],
            principal,
            {
                "resource": key.name,
                "policy": {
                    "bindings": [
                        {"role": b.role, "members": list(b.members)} for b in new_policy.bindings
                    ]
                },
            },
            method="google.cloud.run.v1.Services.SetIamPolicy",
        )
    return created


def get_service(store: Store, key: names.ServiceKey) -> dict[str, Any]:
    """The admin API's JSON for one service."""
    entry = store.directory.services.get(key.name)
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
        # v2 Service.invoker_iam_disabled ("allow public access" without an allUsers binding):
        # stored as the client sent it, like every client-settable field.
        "invokerIamDisabled": bool(svc.invoker_iam_disabled),
        "generation": svc.generation,
        "observedGeneration": svc.observed_generation,
        # short names here (the v2 fields carry full resource names)
        "latestReadyRevision": names.short_revision(svc.latest_ready_revision),
        "latestCreatedRevision": names.short_revision(svc.latest_created_revision),
        "revisions": sorted(entry.revisions),
        "reconciling": svc.reconciling,
        "traffic": [_target_json(t) for t in svc.traffic],
        "trafficStatuses": [_target_json(t) for t in svc.traffic_statuses],
        "ready": _state_name(svc.terminal_condition.state),
        "etag": base64.b64encode(entry.policy.etag).decode(),
        "serviceEtag": svc.etag,
        "lastModifier": svc.last_modifier,
        "annotations": dict(svc.annotations),
    }


def delete_service(store: Store, key: names.ServiceKey, principal: str) -> None:
    store.services.delete(
        key.name,
        "",
        False,
        principal,
        {"name": f"namespaces/{key.project}/services/{key.service}"},
        method="google.cloud.run.v1.Services.DeleteService",
    )


def list_services(store: Store) -> list[str]:
    return sorted(store.directory.services)


def put_service_account(store: Store, email: str) -> tuple[dict[str, str], bool]:
    """Register a service account; returns its JSON and whether it was created."""
    sa, created = store.accounts.put(email)
    return {"name": sa.name, "email": sa.email}, created


def list_service_accounts(store: Store) -> list[str]:
    return sorted(sa.email for sa in store.accounts.by_email.values())


def _apply_traffic(spec: Any, raw: Any) -> None:
    """The admin body's ``traffic``: [{"revision": NAME (absent = the latest ready revision),
    "percent": N, "tag": T}] replaces Service.traffic (what `gcloud run services update-traffic`
    or a `--no-traffic` deploy sends)."""
    if not isinstance(raw, list):
        raise invalid("'traffic' must be a list of {revision?, percent, tag?}")
    del spec.traffic[:]
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or set(t) - {"revision", "percent", "tag"}:
            raise invalid(f"traffic[{i}] must be an object with revision?, percent, tag?")
        revision, percent, tag = t.get("revision") or "", t.get("percent", 0), t.get("tag") or ""
        if not isinstance(revision, str) or not isinstance(tag, str):
            raise invalid(f"traffic[{i}].revision and .tag must be strings")
        if isinstance(percent, bool) or not isinstance(percent, int):
            raise invalid(f"traffic[{i}].percent must be an integer")
        spec.traffic.add(
            type_=traffic.REVISION if revision else traffic.LATEST,
            revision=revision,
            percent=percent,
            tag=tag,
        )


def _target_json(t: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": traffic.TYPE_NAMES.get(int(t.type_), "UNSPECIFIED"),
        "percent": t.percent,
    }
    if t.revision:
        out["revision"] = t.revision
    if t.tag:
        out["tag"] = t.tag
    return out


def _state_name(state: int) -> str:
    return str(ConditionPb.State.Name(state))
