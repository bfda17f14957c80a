"""One frozen settings object, from the command line and the environment (CONTRACT §2)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ENV_GCP_ENDPOINT = "RUNWARDEN_GCP_ENDPOINT"
ENV_RESYNC_SECONDS = "RUNWARDEN_RESYNC_SECONDS"
LOG_FORMATS = ("json", "console")


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = True
    standalone: bool = False
    gcp_endpoint: str | None = None  # HOST:PORT of an insecure emulator; None = Google (ADC)
    metrics_port: int | None = None
    liveness: str | None = None
    log_format: str = "json"
    resync_override: float | None = None  # seconds, for every Orchestrator

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
        return cls(
            namespaces=tuple(args.namespace or ()),
            all_namespaces=args.all_namespaces or not args.namespace,
            standalone=args.standalone,
            gcp_endpoint=args.gcp_endpoint or environ.get(ENV_GCP_ENDPOINT) or None,
            metrics_port=args.metrics_port,
            liveness=args.liveness,
            log_format=log_format,
            resync_override=resync,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m controller",
        description="Runwarden: keeps Cloud Run services holding the env vars, invokers and "
        "settings declared in Orchestrator resources.",
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
        metavar="HOST:PORT",
        help=f"insecure gRPC endpoint for Cloud Run and IAM (an emulator); env {ENV_GCP_ENDPOINT}",
    )
    parser.add_argument(
        "--metrics-port", type=int, metavar="N", help="serve Prometheus metrics on this port"
    )
    parser.add_argument(
        "--liveness", metavar="URL", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="json (default when not on a terminal) or console (default on a terminal)",
    )
    return parser
