"""CR body -> Desired, with the semantic checks admission may not have made.

The CRD's schema and CEL rules refuse most bad specs, but an object created before a CRD upgrade
(or with validation off) can still hold one; such a spec becomes ``InvalidSpec`` (or
``PublicInvokerRefused``) until it changes, never an exception that kopf would retry forever.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from controller.domain.model import (
    DEFAULT_ROLE,
    PUBLIC_MEMBERS,
    DeletionPolicy,
    Desired,
    EnvPolicy,
    EnvValue,
    InvokerPolicy,
    Mode,
    Policy,
    Reason,
    ServiceRef,
    SettingValue,
)

_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]{1,2}$")
_SERVICE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_CONTAINER = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET = re.compile(
    r"^([A-Za-z0-9_-]{1,255}|projects/[a-z0-9][a-z0-9-]{0,62}/secrets/[A-Za-z0-9_-]{1,255})$"
)
_SECRET_VERSION = re.compile(r"^(latest|[1-9][0-9]{0,18})$")
_ROLE = re.compile(
    r"^(roles/[A-Za-z0-9_.]{1,100}|projects/[a-z0-9][a-z0-9-]{0,62}/roles/[A-Za-z0-9_.]{3,64}"
    r"|organizations/[0-9]{1,20}/roles/[A-Za-z0-9_.]{3,64})$"
)
_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
_MEMBER = re.compile(
    rf"^(allUsers|allAuthenticatedUsers|(user|serviceAccount|group):{_EMAIL}"
    r"|domain:[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+"
    r"|principal://[!-~]+|principalSet://[!-~]+)$"
)
_SA_EMAIL = re.compile(rf"^{_EMAIL}$")
_CPU = re.compile(r"^([1-9][0-9]*|[0-9]+\.[0-9]+|[1-9][0-9]*m)$")
_MEMORY = re.compile(r"^[1-9][0-9]*(Ki|Mi|Gi|k|M|G)$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
E = TypeVar("E", Mode, EnvPolicy, InvokerPolicy, DeletionPolicy)

INGRESS_VALUES = ("all", "internal", "internal-and-cloud-load-balancing")

# (CRD key, minimum, maximum) of the integer settings.
_INT_SETTINGS = (
    ("timeoutSeconds", 1, 3600),
    ("minInstances", 0, 1000),
    ("maxInstances", 0, 1000),
    ("concurrency", 1, 1000),
)


class InvalidSpec(Exception):
    """The spec cannot be enforced as written. ``reason`` is a condition reason."""

    def __init__(self, message: str, reason: str = Reason.INVALID_SPEC) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse(spec: Mapping[str, Any], resync_override: float | None = None) -> Desired:
    """Validate a CR's ``spec`` and turn it into a Desired; raises InvalidSpec."""
    ref = parse_ref(spec)
    service = _mapping(spec, "service")
    container = service.get("container") or ""
    if not isinstance(container, str) or not _CONTAINER.match(container) or len(container) > 63:
        raise InvalidSpec("spec.service.container is not a valid container name")

    policy = _policy(_mapping(spec, "policy"), resync_override)
    env = _env(spec.get("env"))
    role, members = _invokers(_mapping(spec, "invokers"))
    public = sorted(members & PUBLIC_MEMBERS)
    if public and not policy.allow_public_invokers:
        raise InvalidSpec(
            f"spec.invokers.members lists {', '.join(public)}, which makes the service public; "
            "set spec.policy.allowPublicInvokers: true to allow it",
            Reason.PUBLIC_INVOKER_REFUSED,
        )
    settings = _settings(_mapping(spec, "settings"))
    return Desired(
        ref=ref,
        container=container,
        env=env,
        role=role,
        invokers=members,
        settings=settings,
        policy=policy,
    )


def parse_ref(spec: Mapping[str, Any]) -> ServiceRef:
    """Only ``spec.service``: enough to find the service (e.g. to revoke with a broken spec)."""
    service = _mapping(spec, "service")
    project = _str(service.get("project"), "spec.service.project")
    region = _str(service.get("region"), "spec.service.region")
    name = _str(service.get("name"), "spec.service.name")
    if not _PROJECT.match(project):
        raise InvalidSpec("spec.service.project is not a valid GCP project id")
    if not _REGION.match(region):
        raise InvalidSpec("spec.service.region is not a valid Cloud Run region")
    if not _SERVICE.match(name) or len(name) > 49:
        raise InvalidSpec("spec.service.name is not a valid Cloud Run service name")
    return ServiceRef(project, region, name)


def parse_deletion(spec: Mapping[str, Any]) -> DeletionPolicy:
    """The deletion policy alone, tolerant of the rest of the spec being broken."""
    raw = _mapping(spec, "policy").get("deletion", DeletionPolicy.ABANDON.value)
    try:
        return DeletionPolicy(raw)
    except ValueError:
        return DeletionPolicy.ABANDON


def parse_role(spec: Mapping[str, Any]) -> str:
    """The invoker role alone (default roles/run.invoker)."""
    role = _mapping(spec, "invokers").get("role") or DEFAULT_ROLE
    return str(role)


def _policy(raw: Mapping[str, Any], resync_override: float | None) -> Policy:
    mode = _enum(Mode, raw.get("mode", Mode.ENFORCE.value), "spec.policy.mode")
    env = _enum(EnvPolicy, raw.get("env", EnvPolicy.MERGE.value), "spec.policy.env")
    invokers = _enum(
        InvokerPolicy, raw.get("invokers", InvokerPolicy.ADDITIVE.value), "spec.policy.invokers"
    )
    deletion = _enum(
        DeletionPolicy, raw.get("deletion", DeletionPolicy.ABANDON.value), "spec.policy.deletion"
    )
    resync = raw.get("resyncSeconds", 60)
    if isinstance(resync, bool) or not isinstance(resync, int) or not 5 <= resync <= 86400:
        raise InvalidSpec("spec.policy.resyncSeconds must be an integer from 5 to 86400")
    allow_public = raw.get("allowPublicInvokers", False)
    if not isinstance(allow_public, bool):
        raise InvalidSpec("spec.policy.allowPublicInvokers must be a boolean")
    take_over = raw.get("takeOver", False)
    if not isinstance(take_over, bool):
        raise InvalidSpec("spec.policy.takeOver must be a boolean")
    return Policy(
        mode=mode,
        env=env,
        invokers=invokers,
        deletion=deletion,
        resync_seconds=float(resync_override if resync_override is not None else resync),
        allow_public_invokers=allow_public,
        take_over=take_over,
    )


def _env(raw: Any) -> dict[str, EnvValue]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise InvalidSpec("spec.env must be a list")
    env: dict[str, EnvValue] = {}
    for index, item in enumerate(raw):
        where = f"spec.env[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidSpec(f"{where} must be an object")
        name = _str(item.get("name"), f"{where}.name")
        if not _ENV_NAME.match(name) or len(name) > 256:
            raise InvalidSpec(f"{where}.name {name!r} is not a valid env var name")
        if name == "PORT" or name.startswith("K_"):
            raise InvalidSpec(f"{where}.name {name} is reserved by Cloud Run")
        if name in env:
            raise InvalidSpec(f"spec.env lists {name} more than once")
        has_value, has_secret = "value" in item, "secretKeyRef" in item
        if has_value == has_secret:
            raise InvalidSpec(f"spec.env {name}: set exactly one of value or secretKeyRef")
        if has_value:
            value = item["value"]
            if not isinstance(value, str):
                raise InvalidSpec(f"spec.env {name}: value must be a string")
            env[name] = EnvValue.literal(value)
        else:
            ref = item["secretKeyRef"]
            if not isinstance(ref, Mapping):
                raise InvalidSpec(f"spec.env {name}: secretKeyRef must be an object")
            secret = _str(ref.get("secret"), f"spec.env {name}: secretKeyRef.secret")
            version = _str(ref.get("version") or "latest", f"spec.env {name}: secretKeyRef.version")
            if not _SECRET.match(secret):
                raise InvalidSpec(f"spec.env {name}: secretKeyRef.secret is not a valid secret id")
            if not _SECRET_VERSION.match(version):
                raise InvalidSpec(
                    f"spec.env {name}: secretKeyRef.version must be latest or a number"
                )
            env[name] = EnvValue.from_secret(secret, version)
    return env


def _invokers(raw: Mapping[str, Any]) -> tuple[str, frozenset[str]]:
    role = _str(raw.get("role") or DEFAULT_ROLE, "spec.invokers.role")
    if not _ROLE.match(role):
        raise InvalidSpec("spec.invokers.role is not a valid IAM role name")
    members_raw = raw.get("members") or []
    if not isinstance(members_raw, list):
        raise InvalidSpec("spec.invokers.members must be a list")
    members: set[str] = set()
    for index, member in enumerate(members_raw):
        if not isinstance(member, str) or not _MEMBER.match(member):
            raise InvalidSpec(f"spec.invokers.members[{index}] is not a valid IAM principal")
        members.add(member)
    return role, frozenset(members)


def _settings(raw: Mapping[str, Any]) -> dict[str, SettingValue]:
    settings: dict[str, SettingValue] = {}
    for key, low, high in _INT_SETTINGS:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidSpec(f"spec.settings.{key} must be an integer from {low} to {high}")
            settings[key] = value
    if "minInstances" in settings and "maxInstances" in settings:
        ceiling = int(settings["maxInstances"])
        if ceiling != 0 and ceiling < int(settings["minInstances"]):  # 0: unset (no ceiling)
            raise InvalidSpec(
                "spec.settings.maxInstances must be at least minInstances (or 0, which leaves "
                "it unset)"
            )
    checks = (
        ("serviceAccount", _SA_EMAIL, "a service account email"),
        ("cpu", _CPU, 'a CPU quantity such as "1" or "1000m"'),
        ("memory", _MEMORY, "a memory quantity such as 512Mi"),
    )
    for key, pattern, what in checks:
        if key in raw:
            value = raw[key]
            if not isinstance(value, str) or not pattern.match(value):
                raise InvalidSpec(f"spec.settings.{key} must be {what}")
            settings[key] = value
    if "ingress" in raw:
        if raw["ingress"] not in INGRESS_VALUES:
            raise InvalidSpec(f"spec.settings.ingress must be one of {', '.join(INGRESS_VALUES)}")
        settings["ingress"] = raw["ingress"]
    labels = raw.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise InvalidSpec("spec.settings.labels must be a map")
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            raise InvalidSpec(f"spec.settings.labels key {key!r} breaks the GCP label rules")
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            raise InvalidSpec(f"spec.settings.labels.{key} value breaks the GCP label rules")
        settings[f"labels.{key}"] = value
    return settings


def _mapping(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidSpec(f"spec.{key} must be an object")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidSpec(f"{where} must be a non-empty string")
    return value


def _enum(kind: type[E], value: Any, where: str) -> E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidSpec(f"{where} must be one of {allowed}") from None
