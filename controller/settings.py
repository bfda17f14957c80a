"""One frozen settings object, from the command line and the environment (CONTRACT §2)."""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller.domain.tenancy import BindingMode
from controller.gcp.budget import MIN_PER_MINUTE
from controller.gcp.clients import TRANSPORTS

ENV_GCP_ENDPOINT = "RUNWARDEN_GCP_ENDPOINT"
ENV_RESYNC_SECONDS = "RUNWARDEN_RESYNC_SECONDS"
ENV_AUDIT_SUBSCRIPTION = "RUNWARDEN_AUDIT_SUBSCRIPTION"
ENV_OWN_PRINCIPAL = "RUNWARDEN_OWN_PRINCIPAL"
ENV_FIGHT_THRESHOLD = "RUNWARDEN_FIGHT_THRESHOLD"
ENV_FIGHT_WINDOW = "RUNWARDEN_FIGHT_WINDOW_SECONDS"
ENV_READS_PER_MINUTE = "RUNWARDEN_READS_PER_MINUTE"
ENV_WRITES_PER_MINUTE = "RUNWARDEN_WRITES_PER_MINUTE"
ENV_STATUS_HEARTBEAT = "RUNWARDEN_STATUS_HEARTBEAT"
ENV_SELECTOR = "RUNWARDEN_SELECTOR"
ENV_POD_NAME = "POD_NAME"
DEFAULT_STATUS_HEARTBEAT = 300.0
DEFAULT_LEASE_NAMESPACE = "runwarden-system"
LEASE_NAME = "runwarden"
ENV_NAMESPACE_BINDING = "RUNWARDEN_NAMESPACE_BINDING"
ENV_IAM_CREDENTIALS_ENDPOINT = "RUNWARDEN_IAM_CREDENTIALS_ENDPOINT"
ENV_CLUSTER_NAME = "RUNWARDEN_CLUSTER_NAME"
DEFAULT_CLUSTER_NAME = "default"
# The cluster part of the owner annotation "<cluster>/<namespace>/<name>": no "/" inside.
CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
# Per-region Cloud Run Admin API budgets: conservative, below Google's default per-region quotas,
# leaving room for other clients of the same quota (deploys, gcloud, consoles).
DEFAULT_READS_PER_MINUTE = 600
DEFAULT_WRITES_PER_MINUTE = 60
SUBSCRIPTION_RE = re.compile(r"^projects/[^/]+/subscriptions/[^/]+$")
LOG_FORMATS = ("json", "console")


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = True
    standalone: bool = False
    # An insecure emulator: HOST:PORT (grpc) or http://HOST:PORT (rest); None = Google (ADC).
    gcp_endpoint: str | None = None
    gcp_transport: str = "grpc"  # grpc | rest (controller.gcp.clients)
    metrics_port: int | None = None
    liveness: str | None = None
    log_format: str = "json"
    resync_override: float | None = None  # seconds, for every Orchestrator
    # Cloud Audit Logs via Pub/Sub (docs/audit-logs.md); None = polling only.
    audit_subscription: str | None = None  # projects/P/subscriptions/S
    own_principal: str | None = None  # None = the credentials' service account
    audit_debounce: float = 1.0  # seconds to gather one service's entries before a check
    fight_threshold: int = 5  # > this many repairs of one service in the window: DriftFight
    fight_window: float = 600.0  # seconds
    # Cloud Run Admin API calls per minute per region; None = unlimited (controller.gcp.budget).
    reads_per_minute: float | None = DEFAULT_READS_PER_MINUTE
    writes_per_minute: float | None = DEFAULT_WRITES_PER_MINUTE
    # A check that changes nothing refreshes status.lastSyncTime at most this often (seconds);
    # 0 = every check (the pre-heartbeat behaviour).
    status_heartbeat: float = DEFAULT_STATUS_HEARTBEAT
    # Leader election on a coordination.k8s.io/v1 Lease (controller.kube.lease).
    leader_election: bool = False
    leader_election_namespace: str = DEFAULT_LEASE_NAMESPACE
    leader_election_identity: str = ""
    leader_election_name: str = LEASE_NAME
    lease_seconds: float = 10.0
    # A label selector (kubectl syntax): serve only the Orchestrators it matches ("" = all).
    selector: str = ""
    # Tenancy (controller.domain.tenancy): namespaces bound to projects and Google identities.
    namespace_binding: BindingMode = BindingMode.OPTIONAL
    iam_credentials_endpoint: str | None = None  # None = Google's; the emulator's admin URL
    # Names this cluster in the claim on each service (runwarden.dev/owner, CONTRACT §6.1).
    cluster_name: str = DEFAULT_CLUSTER_NAME

    @classmethod
    def from_cli(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Parse flags (falling back to the environment); exits with usage on bad input."""
        environ = os.environ if environ is None else environ
        parser = build_parser()
        args = parser.parse_args(argv)
        resync: float | None = None
        raw_resync = environ.get(ENV_RESYNC_SECONDS, "").strip()
        if raw_resync:
            try:
                resync = float(raw_resync)
            except ValueError:
                parser.error(f"{ENV_RESYNC_SECONDS} must be a number of seconds")
            if not resync > 0:
                parser.error(f"{ENV_RESYNC_SECONDS} must be positive")
        log_format = args.log_format or ("console" if sys.stderr.isatty() else "json")
        subscription = (
            args.audit_subscription or environ.get(ENV_AUDIT_SUBSCRIPTION, "").strip() or None
        )
        if subscription is not None and not SUBSCRIPTION_RE.match(subscription):
            parser.error("--audit-subscription must look like projects/P/subscriptions/S")
        threshold = args.fight_threshold
        if threshold is None:
            raw = environ.get(ENV_FIGHT_THRESHOLD, "").strip()
            try:
                threshold = int(raw) if raw else 5
            except ValueError:
                parser.error(f"{ENV_FIGHT_THRESHOLD} must be a whole number")
        window = args.fight_window
        if window is None:
            raw = environ.get(ENV_FIGHT_WINDOW, "").strip()
            try:
                window = float(raw) if raw else 600.0
            except ValueError:
                parser.error(f"{ENV_FIGHT_WINDOW} must be a number of seconds")
        budgets = {}
        for name, flag, env_name, default in (
            ("reads", args.reads_per_minute, ENV_READS_PER_MINUTE, DEFAULT_READS_PER_MINUTE),
            ("writes", args.writes_per_minute, ENV_WRITES_PER_MINUTE, DEFAULT_WRITES_PER_MINUTE),
        ):
            given = flag if flag is not None else environ.get(env_name, "").strip()
            try:
                value = float(given) if given else float(default)
            except ValueError:
                parser.error(f"--{name}-per-minute / {env_name} must be a number")
            if value != 0 and value < MIN_PER_MINUTE:
                parser.error(f"--{name}-per-minute must be 0 (unlimited) or >= {MIN_PER_MINUTE:g}")
            budgets[name] = value or None
        endpoint = args.gcp_endpoint or environ.get(ENV_GCP_ENDPOINT) or None
        if endpoint and args.gcp_transport == "rest":
            if not endpoint.startswith(("http://", "https://")):
                parser.error(
                    "--gcp-endpoint must be the emulator's REST URL (http://127.0.0.1:PORT, its "
                    "--rest-port) with --gcp-transport rest"
                )
        elif endpoint and "://" in endpoint:
            parser.error(
                "--gcp-endpoint must be HOST:PORT (the emulator's gRPC port) with "
                "--gcp-transport grpc; for a REST URL add --gcp-transport rest"
            )
        heartbeat = args.status_heartbeat
        if heartbeat is None:
            raw = environ.get(ENV_STATUS_HEARTBEAT, "").strip()
            try:
                heartbeat = float(raw) if raw else DEFAULT_STATUS_HEARTBEAT
            except ValueError:
                parser.error(f"{ENV_STATUS_HEARTBEAT} must be a number of seconds")
        if heartbeat < 0:
            parser.error("--status-heartbeat must be >= 0 seconds (0 = refresh on every check)")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", args.leader_election_name):
            parser.error("--leader-election-name must be a DNS subdomain name, e.g. runwarden")
        if not 2 <= args.leader_election_lease_seconds <= 300:
            parser.error("--leader-election-lease-seconds must be between 2 and 300")
        identity = (
            args.leader_election_identity
            or environ.get(ENV_POD_NAME, "").strip()
            or f"{socket.gethostname()}-{os.getpid()}"
        )
        selector = args.selector if args.selector is not None else environ.get(ENV_SELECTOR, "")
        try:
            parse_selector(selector)
        except ValueError as exc:
            parser.error(f"--selector: {exc}")
        cluster = (
            args.cluster_name or environ.get(ENV_CLUSTER_NAME, "").strip() or DEFAULT_CLUSTER_NAME
        )
        if not CLUSTER_NAME_RE.match(cluster):
            parser.error(
                f"--cluster-name / {ENV_CLUSTER_NAME} must be letters, digits, '-', '_' or '.' "
                f"(at most 63, no '/'): it names this cluster in the owner annotation, got "
                f"{cluster!r}"
            )
        if threshold < 0 or not window > 0 or args.audit_debounce < 0:
            parser.error("--fight-threshold and --audit-debounce must be >= 0, --fight-window > 0")
        raw_binding = args.namespace_binding or environ.get(ENV_NAMESPACE_BINDING, "").strip()
        try:
            binding = BindingMode(raw_binding or BindingMode.OPTIONAL)
        except ValueError:
            parser.error(
                f"--namespace-binding / {ENV_NAMESPACE_BINDING} must be required or optional"
            )
        return cls(
            namespaces=tuple(args.namespace or ()),
            all_namespaces=args.all_namespaces or not args.namespace,
            standalone=args.standalone,
            gcp_endpoint=endpoint,
            gcp_transport=args.gcp_transport,
            metrics_port=args.metrics_port,
            liveness=args.liveness,
            log_format=log_format,
            resync_override=resync,
            audit_subscription=subscription,
            own_principal=args.own_principal or environ.get(ENV_OWN_PRINCIPAL, "").strip() or None,
            audit_debounce=args.audit_debounce,
            fight_threshold=threshold,
            fight_window=window,
            reads_per_minute=budgets["reads"],
            writes_per_minute=budgets["writes"],
            status_heartbeat=heartbeat,
            leader_election=args.leader_election,
            leader_election_namespace=args.leader_election_namespace,
            leader_election_identity=identity,
            leader_election_name=args.leader_election_name,
            lease_seconds=args.leader_election_lease_seconds,
            selector=selector.strip(),
            namespace_binding=binding,
            iam_credentials_endpoint=args.iam_credentials_endpoint
            or environ.get(ENV_IAM_CREDENTIALS_ENDPOINT, "").strip()
            or None,
            cluster_name=cluster,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m controller",
        description="Runwarden: keeps Cloud Run services holding the env vars, invokers and "
        "settings declared in Orchestrator resources.",
        epilog="`runwarden export --help`: print Orchestrator YAML for live Cloud Run services.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        metavar="NS",
        help="serve Orchestrators in this namespace (repeatable; globs as in kopf)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="serve Orchestrators in every namespace (the default without --namespace)",
    )
    parser.add_argument(
        "--standalone", action="store_true", help="no kopf peering: this is the only controller"
    )
    parser.add_argument(
        "--gcp-endpoint",
        metavar="HOST:PORT|URL",
        help="an emulator for Cloud Run and IAM, without credentials: HOST:PORT (gRPC), or with "
        f"--gcp-transport rest its REST URL http://HOST:PORT; env {ENV_GCP_ENDPOINT}",
    )
    parser.add_argument(
        "--gcp-transport",
        choices=TRANSPORTS,
        default="grpc",
        help="how to call Google: grpc (default) or rest (HTTP/1.1 JSON, for networks that "
        "block HTTP/2 gRPC)",
    )
    parser.add_argument(
        "--metrics-port", type=int, metavar="N", help="serve Prometheus metrics on this port"
    )
    parser.add_argument(
        "--liveness", metavar="URL", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument(
        "--cluster-name",
        metavar="NAME",
        help="this cluster's name in the claim on each service (annotation runwarden.dev/owner = "
        f"NAME/namespace/name; default {DEFAULT_CLUSTER_NAME}); env {ENV_CLUSTER_NAME}. Give "
        "every cluster that manages services of the same projects its own name",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="json (default when not on a terminal) or console (default on a terminal)",
    )
    parser.add_argument(
        "--status-heartbeat",
        type=float,
        metavar="SECONDS",
        help="a check that changes nothing writes no status; status.lastSyncTime is refreshed "
        f"at most this often (default {DEFAULT_STATUS_HEARTBEAT:g}; 0 = every check); env "
        f"{ENV_STATUS_HEARTBEAT}",
    )
    parser.add_argument(
        "--selector",
        "-l",
        metavar="LABEL_SELECTOR",
        help="serve only Orchestrators whose labels match (kubectl syntax: a=b,c!=d,e in (f,g),"
        f"h,!i); for shards; env {ENV_SELECTOR}",
    )
    election = parser.add_argument_group(
        "leader election (several replicas; only the holder of the Lease reconciles)"
    )
    election.add_argument(
        "--leader-election",
        action="store_true",
        help=f"hold the coordination.k8s.io/v1 Lease {LEASE_NAME!r} before reconciling, and "
        "check it is still held before every Google write",
    )
    election.add_argument(
        "--leader-election-namespace",
        default=DEFAULT_LEASE_NAMESPACE,
        metavar="NS",
        help=f"the Lease's namespace (default {DEFAULT_LEASE_NAMESPACE})",
    )
    election.add_argument(
        "--leader-election-name",
        default=LEASE_NAME,
        metavar="NAME",
        help=f"the Lease's name (default {LEASE_NAME}; one per shard, see manifests/shards/)",
    )
    election.add_argument(
        "--leader-election-identity",
        metavar="ID",
        help=f"this replica's holder identity (default: env {ENV_POD_NAME}, else <hostname>-<pid>)",
    )
    election.add_argument(
        "--leader-election-lease-seconds",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="lease duration (default 10): a standby takes over this long after the holder's "
        "last renewal; the holder renews every duration/5 and stops writing when it cannot "
        "renew within it",
    )
    tenancy = parser.add_argument_group(
        "Tenancy (namespace annotations runwarden.dev/projects, runwarden.dev/google-service-"
        "account, runwarden.dev/allow-public-invokers; docs/install.md)"
    )
    tenancy.add_argument(
        "--namespace-binding",
        choices=[m.value for m in BindingMode],
        help="required: an Orchestrator whose project its namespace's runwarden.dev/projects "
        "does not list is refused (ProjectNotAllowed); optional (default): only namespaces "
        f"with that annotation are held to it; env {ENV_NAMESPACE_BINDING}",
    )
    tenancy.add_argument(
        "--iam-credentials-endpoint",
        metavar="URL",
        help="base URL of the IAM Credentials API used to impersonate namespaces' service "
        "accounts (default Google's; with an emulator its admin URL); env "
        f"{ENV_IAM_CREDENTIALS_ENDPOINT}",
    )
    budget = parser.add_argument_group(
        "Cloud Run Admin API budgets (per region; checks slow down to stay within them)"
    )
    budget.add_argument(
        "--reads-per-minute",
        metavar="N",
        help=f"read requests a minute per region (default {DEFAULT_READS_PER_MINUTE}; 0 = "
        f"unlimited); env {ENV_READS_PER_MINUTE}",
    )
    budget.add_argument(
        "--writes-per-minute",
        metavar="N",
        help=f"write requests a minute per region (default {DEFAULT_WRITES_PER_MINUTE}; 0 = "
        f"unlimited); env {ENV_WRITES_PER_MINUTE}",
    )
    audit = parser.add_argument_group(
        "Cloud Audit Logs (repair within seconds; docs/audit-logs.md)"
    )
    audit.add_argument(
        "--audit-subscription",
        metavar="projects/P/subscriptions/S",
        help="Pub/Sub subscription receiving Cloud Run audit log entries; env "
        f"{ENV_AUDIT_SUBSCRIPTION} (PUBSUB_EMULATOR_HOST is honoured)",
    )
    audit.add_argument(
        "--own-principal",
        metavar="EMAIL",
        help="Runwarden's own identity in audit entries (default: the credentials' service "
        f"account; with --gcp-endpoint, runwarden@example.com); env {ENV_OWN_PRINCIPAL}",
    )
    audit.add_argument(
        "--audit-debounce",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="gather one service's entries this long before checking it (default 1)",
    )
    audit.add_argument(
        "--fight-threshold",
        type=int,
        metavar="N",
        help="more than N repairs of one service within --fight-window is a DriftFight: hold "
        f"its repairs with exponential backoff (default 5; 0 = never); env {ENV_FIGHT_THRESHOLD}",
    )
    audit.add_argument(
        "--fight-window",
        type=float,
        metavar="SECONDS",
        help=f"the fight detection window (default 600); env {ENV_FIGHT_WINDOW}",
    )
    return parser


# ---------------------------------------------------------------------- label selectors

Requirement = tuple[str, str, frozenset[str]]  # (key, operator, values)
_KEY = r"(?:[A-Za-z0-9][-A-Za-z0-9_.]*/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_RE = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s+\(([^)]*)\)\s*$")
_CMP_RE = re.compile(rf"^\s*({_KEY})\s*(==|!=|=)\s*({_VALUE})\s*$")
_EXISTS_RE = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")


def parse_selector(selector: str) -> tuple[Requirement, ...]:
    """A Kubernetes label selector (the syntax of ``kubectl get -l``) as requirements.

    Raises ValueError naming the part that does not parse.
    """
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(selector):  # split on commas outside "in (a,b)"
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    out: list[Requirement] = []
    for part in parts:
        if not part.strip():
            if len(parts) > 1:
                raise ValueError(f"empty requirement in {selector!r}")
            continue
        if m := _SET_RE.match(part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            if not values or not all(re.fullmatch(_VALUE, v) for v in values):
                raise ValueError(f"{part.strip()!r}: give label values as in (a,b)")
            out.append((m.group(1), m.group(2), values))
        elif m := _CMP_RE.match(part):
            op = "!=" if m.group(2) == "!=" else "="
            out.append((m.group(1), op, frozenset({m.group(3)})))
        elif m := _EXISTS_RE.match(part):
            out.append((m.group(2), "!" if m.group(1) else "exists", frozenset()))
        else:
            raise ValueError(
                f"{part.strip()!r} is not a label requirement (key=value, key!=value, "
                "key in (a,b), key notin (a,b), key, !key)"
            )
    return tuple(out)


def selector_matches(requirements: Sequence[Requirement], labels: Mapping[str, str]) -> bool:
    """Whether labels satisfy every requirement (Kubernetes semantics: != and notin match a
    missing key)."""
    for key, op, values in requirements:
        value = labels.get(key)
        if op == "exists":
            ok = value is not None
        elif op == "!":
            ok = value is None
        elif op in ("=", "in"):
            ok = value is not None and value in values
        else:  # "!=", "notin"
            ok = value is None or value not in values
        if not ok:
            return False
    return True
