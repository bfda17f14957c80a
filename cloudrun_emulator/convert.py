"""Service protos <-> the admin API's JSON, plus Cloud Run's server-side defaults and checks.

The admin API's `settings` use the keys and units of the Orchestrator CRD's `spec.settings`,
mapped onto the v2 Service like this:

=================  ====================================================
serviceAccount     template.service_account
timeoutSeconds     template.timeout (seconds)
minInstances       template.scaling.min_instance_count
maxInstances       template.scaling.max_instance_count
concurrency        template.max_instance_request_concurrency
cpu                main container resources.limits["cpu"]
memory             main container resources.limits["memory"]
ingress            service.ingress (all | internal | internal-and-cloud-load-balancing)
labels             service.labels
=================  ====================================================

The main container is the one that declares a port (the ingress container), else the first.
"""

from __future__ import annotations

import re
from typing import Any

from google.cloud import run_v2

from .errors import invalid

ServicePb = run_v2.Service.pb()
ContainerPb = run_v2.Container.pb()
EnvVarPb = run_v2.EnvVar.pb()

DEFAULT_IMAGE = "us-docker.pkg.dev/cloudrun/container/hello"
DEFAULT_TIMEOUT_SECONDS = 300
DEFAULT_CONCURRENCY = 80
# Cloud Run v2 leaves `template.scaling.max_instance_count` unset (0) when the client does not
# set it: Config Connector's recording of a real CreateService without `scaling` gets a
# template back without `scaling` (and with cpu "1000m", memory "512Mi", concurrency 80,
# timeout "300s"): GoogleCloudPlatform/k8s-config-connector
# pkg/test/resourcefixture/testdata/basic/run/v1beta1/runservice/runservicesecret/_http.log.
# 0 therefore reads back as 0 ("unset": the server's own limit applies), never as 100.
DEFAULT_MAX_INSTANCES = 0
DEFAULT_CPU = "1000m"
DEFAULT_MEMORY = "512Mi"

_Ingress = run_v2.IngressTraffic
INGRESS_TO_API = {
    "all": _Ingress.INGRESS_TRAFFIC_ALL,
    "internal": _Ingress.INGRESS_TRAFFIC_INTERNAL_ONLY,
    "internal-and-cloud-load-balancing": _Ingress.INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER,
}
INGRESS_FROM_API = {int(v): k for k, v in INGRESS_TO_API.items()}
INGRESS_FROM_API[int(run_v2.IngressTraffic.INGRESS_TRAFFIC_NONE)] = "none"

SETTINGS_KEYS = (
    "serviceAccount",
    "timeoutSeconds",
    "minInstances",
    "maxInstances",
    "concurrency",
    "cpu",
    "memory",
    "ingress",
    "labels",
)

RESERVED_ENV = frozenset({"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"})
ENV_NAME_RE = re.compile(r"^[^=\s]{1,4096}$")
CPU_RE = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
MEMORY_RE = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|k|K|M|G|T)?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
MEMBER_RE = re.compile(
    r"^(allUsers|allAuthenticatedUsers"
    r"|(user|serviceAccount|group|deleted:user|deleted:serviceAccount|deleted:group):\S+@\S+"
    r"|domain:[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
    r"|principal://\S+|principalSet://\S+)$"
)


# ---------------------------------------------------------------------------------------------
# Reading a Service


def main_container(service: Any) -> Any | None:
    """The ingress container (the one with a port), else the first; None when there is none."""
    containers = service.template.containers
    for c in containers:
        if len(c.ports):
            return c
    return containers[0] if len(containers) else None


def env_of(service: Any) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Plain and secret env of the main container."""
    plain: dict[str, str] = {}
    secret: dict[str, dict[str, str]] = {}
    c = main_container(service)
    if c is None:
        return plain, secret
    for e in c.env:
        if e.HasField("value_source"):
            ref = e.value_source.secret_key_ref
            secret[e.name] = {"secret": ref.secret, "version": ref.version}
        else:
            plain[e.name] = e.value
    return plain, secret


def settings_of(service: Any) -> dict[str, Any]:
    t = service.template
    c = main_container(service)
    limits = dict(c.resources.limits) if c is not None else {}
    return {
        "serviceAccount": t.service_account,
        "timeoutSeconds": t.timeout.seconds,
        "minInstances": t.scaling.min_instance_count,
        "maxInstances": t.scaling.max_instance_count,
        "concurrency": t.max_instance_request_concurrency,
        "cpu": limits.get("cpu", ""),
        "memory": limits.get("memory", ""),
        "ingress": INGRESS_FROM_API.get(service.ingress, "all"),
        "labels": dict(service.labels),
    }


# ---------------------------------------------------------------------------------------------
# Writing a Service from admin JSON


def _int(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"settings.{key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise invalid(f"settings.{key} must be between {lo} and {hi}, got {value}")
    return value


def ensure_container(service: Any) -> Any:
    """The main container, created (Cloud Run's sample image, port 8080) when there is none."""
    c = main_container(service)
    if c is None:
        c = service.template.containers.add(image=DEFAULT_IMAGE)
        c.ports.add(name="http1", container_port=8080)
    return c


def apply_settings(service: Any, settings: Any) -> None:
    """Write admin-API settings into a Service proto (only the keys given; null = default)."""
    if not isinstance(settings, dict):
        raise invalid("'settings' must be an object")
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise invalid(f"unknown settings key(s) {unknown}; expected some of {list(SETTINGS_KEYS)}")
    t = service.template
    c = ensure_container(service)
    for key, value in settings.items():
        if key == "serviceAccount":
            if value is None:
                t.ClearField("service_account")
            elif not isinstance(value, str):
                raise invalid("settings.serviceAccount must be a string (an email)")
            else:
                t.service_account = value
        elif key == "timeoutSeconds":
            secs = DEFAULT_TIMEOUT_SECONDS if value is None else _int(key, value, 1, 3600)
            t.timeout.seconds = secs
            t.timeout.nanos = 0
        elif key == "minInstances":
            t.scaling.min_instance_count = 0 if value is None else _int(key, value, 0, 1000)
        elif key == "maxInstances":
            t.scaling.max_instance_count = (
                DEFAULT_MAX_INSTANCES if value is None else _int(key, value, 0, 1000)
            )
        elif key == "concurrency":
            t.max_instance_request_concurrency = (
                DEFAULT_CONCURRENCY if value is None else _int(key, value, 1, 1000)
            )
        elif key in ("cpu", "memory"):
            if value is None:
                c.resources.limits.pop(key, None)
            elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise invalid(f"settings.{key} must be a string such as '1' or '512Mi'")
            else:
                c.resources.limits[key] = str(value)
        elif key == "ingress":
            if value is None:
                value = "all"
            if value not in INGRESS_TO_API:
                raise invalid(
                    f"settings.ingress must be one of {list(INGRESS_TO_API)}, got {value!r}"
                )
            service.ingress = INGRESS_TO_API[value]
        elif key == "labels":
            if value is None:
                value = {}
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise invalid("settings.labels must be an object of string to string")
            service.labels.clear()
            service.labels.update(value)


def apply_env(
    service: Any,
    env: dict[str, Any] | None,
    secret_env: dict[str, Any] | None,
) -> None:
    """Replace the main container's plain env (`env`) and/or secret env (`secretEnv`)."""
    c = ensure_container(service)
    old_plain, old_secret = env_of(service)
    if env is not None:
        if not isinstance(env, dict):
            raise invalid("'env' must be an object of name to string value")
        for k, v in env.items():
            if not isinstance(v, str):
                raise invalid(f"env.{k} must be a string, got {type(v).__name__}")
        old_plain = dict(env)
    if secret_env is not None:
        if not isinstance(secret_env, dict):
            raise invalid("'secretEnv' must be an object of name to {secret, version}")
        parsed: dict[str, dict[str, str]] = {}
        for k, v in secret_env.items():
            if not isinstance(v, dict) or not isinstance(v.get("secret"), str):
                raise invalid(f"secretEnv.{k} must be an object {{'secret': NAME, 'version': V}}")
            version = v.get("version", "latest")
            if not isinstance(version, str):
                raise invalid(f"secretEnv.{k}.version must be a string")
            parsed[k] = {"secret": v["secret"], "version": version}
        old_secret = parsed
    both = sorted(set(old_plain) & set(old_secret))
    if both:
        raise invalid(f"env var(s) {both} given both as a plain value and as a secret")
    del c.env[:]
    for k, v in old_plain.items():
        c.env.add(name=k, value=v)
    for k, ref in old_secret.items():
        e = c.env.add(name=k)
        e.value_source.secret_key_ref.secret = ref["secret"]
        e.value_source.secret_key_ref.version = ref["version"]


# ---------------------------------------------------------------------------------------------
# Cloud Run's server-side defaults and validation of a submitted Service


def fill_defaults(service: Any, default_sa: str) -> None:
    t = service.template
    if not t.HasField("timeout") or (t.timeout.seconds == 0 and t.timeout.nanos == 0):
        t.timeout.seconds = DEFAULT_TIMEOUT_SECONDS
    if t.max_instance_request_concurrency == 0:
        t.max_instance_request_concurrency = DEFAULT_CONCURRENCY
    if not t.service_account:
        t.service_account = default_sa
    for c in t.containers:
        c.resources.limits.setdefault("cpu", DEFAULT_CPU)
        c.resources.limits.setdefault("memory", DEFAULT_MEMORY)
    if service.ingress == 0:
        service.ingress = run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL
    if not len(service.traffic):
        service.traffic.add(type_=1, percent=100)  # TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST


def validate_service(service: Any) -> None:
    """What Cloud Run refuses with INVALID_ARGUMENT when a Service is submitted."""
    t = service.template
    if not len(t.containers):
        raise invalid("spec.template.containers: at least one container must be specified.")
    if len(t.containers) > 10:
        raise invalid("spec.template.containers: at most 10 containers are allowed.")
    with_ports = [c for c in t.containers if len(c.ports)]
    if len(t.containers) > 1 and len(with_ports) != 1:
        raise invalid("spec.template.containers: exactly one container must declare a port.")
    names = [c.name for c in t.containers]
    if len(t.containers) > 1 and len(set(names)) != len(names):
        raise invalid("spec.template.containers: container names must be unique.")
    for i, c in enumerate(t.containers):
        where = f"spec.template.containers[{i}]"
        if not c.image:
            raise invalid(f"{where}.image: Required field is missing.")
        seen: set[str] = set()
        reserved = []
        for e in c.env:
            if not ENV_NAME_RE.match(e.name):
                raise invalid(f"{where}.env: invalid environment variable name {e.name!r}.")
            if e.name in seen:
                raise invalid(f"{where}.env: duplicate environment variable name {e.name!r}.")
            seen.add(e.name)
            if e.name in RESERVED_ENV:
                reserved.append(e.name)
            if e.HasField("value_source"):
                ref = e.value_source.secret_key_ref
                if not ref.secret:
                    raise invalid(
                        f"{where}.env[{e.name}].value_source.secret_key_ref.secret: "
                        "Required field is missing."
                    )
        if reserved:
            raise invalid(
                f"The following reserved env names were provided: {', '.join(reserved)}. "
                "These values are automatically set by the system."
            )
        for key, value in c.resources.limits.items():
            if key == "cpu" and not CPU_RE.match(value):
                raise invalid(f"{where}.resources.limits.cpu: invalid quantity {value!r}.")
            if key == "memory" and not MEMORY_RE.match(value):
                raise invalid(f"{where}.resources.limits.memory: invalid quantity {value!r}.")
    timeout = t.timeout.seconds + t.timeout.nanos / 1e9
    if timeout > 3600 or timeout < 0:
        raise invalid("spec.template.timeout: must be between 1 and 3600 seconds.")
    if t.max_instance_request_concurrency > 1000 or t.max_instance_request_concurrency < 0:
        raise invalid("spec.template.max_instance_request_concurrency: must be between 1 and 1000.")
    lo, hi = t.scaling.min_instance_count, t.scaling.max_instance_count
    if lo < 0 or hi < 0:
        raise invalid("spec.template.scaling: instance counts must not be negative.")
    if hi and lo > hi:
        raise invalid(
            "spec.template.scaling.min_instance_count: must be less than or equal to "
            f"max_instance_count ({lo} > {hi})."
        )
    for k, v in service.labels.items():
        if not LABEL_KEY_RE.match(k) or not LABEL_VALUE_RE.match(v):
            raise invalid(f"labels: invalid label {k!r}={v!r}.")
    if int(service.ingress) not in INGRESS_FROM_API and service.ingress != 0:
        raise invalid(f"ingress: invalid value {service.ingress}.")
