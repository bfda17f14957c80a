"""cloudrun-emulator: Cloud Run Admin API v2 + IAM emulator over gRPC, with a JSON admin API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys

from .audit import AuditSetupError
from .seed import SeedError
from .server import Options, serve

TOPIC_RE = re.compile(r"^projects/[^/]+/topics/[^/]+$")


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="cloudrun-emulator",
        description="Serve google.cloud.run.v2.Services, google.longrunning.Operations and "
        "google.iam.admin.v1.IAM over insecure gRPC, plus a JSON admin API.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8085, help="gRPC port (0 = any free port)")
    p.add_argument("--admin-port", type=int, default=8086, help="admin HTTP port (0 = any)")
    p.add_argument(
        "--rest-port",
        type=int,
        default=None,
        help="also serve the Cloud Run Admin API v1 (Knative, as gcloud uses it) and v2 over "
        "HTTP/1.1 JSON on this port (0 = any free port); see `cloudrun-emulator gcloud-env`",
    )
    p.add_argument(
        "--seed", metavar="FILE.yaml", help="services and service accounts to start with"
    )
    p.add_argument(
        "--rollout-ms",
        type=int,
        default=0,
        help="how long a new revision takes to become ready (0 = at once)",
    )
    p.add_argument(
        "--audit-topic",
        metavar="projects/P/topics/T",
        help="publish a Cloud Audit Log entry per successful write (uses PUBSUB_EMULATOR_HOST)",
    )
    p.add_argument(
        "--ready-file",
        metavar="PATH",
        help="write {grpcPort, adminPort, pid} as JSON here once listening",
    )
    p.add_argument(
        "--random-seed",
        type=int,
        default=None,
        help="seed for revision suffixes and fault sampling (reproducible runs)",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process is gone (so a killed test run leaks no emulator)",
    )
    p.add_argument("--log-level", default=os.environ.get("CLOUDRUN_EMULATOR_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    if a.rollout_ms < 0:
        p.error("--rollout-ms must be >= 0")
    if a.audit_topic and not TOPIC_RE.match(a.audit_topic):
        p.error("--audit-topic must look like projects/P/topics/T")
    if a.seed and not os.path.exists(a.seed):
        p.error(f"--seed: no such file: {a.seed}")
    logging.basicConfig(
        level=a.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    return Options(
        host=a.host,
        port=a.port,
        admin_port=a.admin_port,
        seed=a.seed,
        rollout_ms=a.rollout_ms,
        audit_topic=a.audit_topic,
        ready_file=a.ready_file,
        random_seed=a.random_seed,
        parent_pid=a.parent_pid,
        rest_port=a.rest_port,
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["gcloud-env"]:
        from .gcloud_env import main as gcloud_env_main

        return gcloud_env_main(args[1:])
    opts = parse_args(args)
    try:
        asyncio.run(serve(opts))
    except (SeedError, AuditSetupError) as exc:
        print(f"cloudrun-emulator: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cloudrun-emulator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
