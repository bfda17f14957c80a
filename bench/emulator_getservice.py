"""GetService calls/s through the real async Cloud Run client against the emulator.

    .venv/bin/python bench/emulator_getservice.py [--services 1000] [--concurrency 50]
        [--seconds 10] [--endpoint HOST:PORT --admin-url URL]

Without --endpoint it starts its own emulator. Not a test: it prints one figure and a few
latency percentiles, and `run()` returns them for bench tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

from cloudrun_emulator.admin import AdminClient
from cloudrun_emulator.testing import EmulatorProcess
from controller.gcp.clients import make_clients

PROJECT = "bench-project"
REGION = "us-west2"


def seed_services(admin: AdminClient, count: int) -> list[str]:
    names = []
    for i in range(count):
        service = f"bench-svc-{i:05d}"
        admin.put_service(
            PROJECT,
            REGION,
            service,
            env={"GCP_PROJECT_ID": PROJECT, "INDEX": str(i)},
            invokers={
                "roles/run.invoker": [
                    f"serviceAccount:caller-{i}@{PROJECT}.iam.gserviceaccount.com"
                ]
            },
            settings={"maxInstances": 10, "timeoutSeconds": 540},
        )
        names.append(f"projects/{PROJECT}/locations/{REGION}/services/{service}")
    return names


async def measure(
    endpoint: str, names: list[str], concurrency: int, seconds: float
) -> dict[str, Any]:
    clients = make_clients(endpoint)
    latencies: list[float] = []
    errors = 0
    try:
        for name in names[: min(len(names), 100)]:  # warm the channel and the code paths
            await clients.run.get_service(name=name)
        stop_at = time.monotonic() + seconds
        rng = random.Random(1)

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                name = names[rng.randrange(len(names))]
                t0 = time.perf_counter()
                try:
                    await clients.run.get_service(name=name)
                except Exception:  # counted, not fatal: a benchmark, not a test
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    finally:
        await clients.close()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 100 else [0.0] * 99
    return {
        "services": len(names),
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "calls": len(latencies),
        "errors": errors,
        "calls_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
    }


def run(
    services: int = 1000,
    concurrency: int = 50,
    seconds: float = 10.0,
    endpoint: str | None = None,
    admin_url: str | None = None,
) -> dict[str, Any]:
    """Seed `services` services and hammer GetService; returns the figures."""
    emu = None
    if endpoint is None:
        emu = EmulatorProcess().start()
        endpoint, admin_url = emu.grpc_endpoint, emu.admin_url
    try:
        if admin_url is None:
            raise ValueError("--admin-url is needed with --endpoint (to seed services)")
        t0 = time.monotonic()
        names = seed_services(AdminClient(admin_url), services)
        seeded_in = time.monotonic() - t0
        result = asyncio.run(measure(endpoint, names, concurrency, seconds))
        result["seed_seconds"] = round(seeded_in, 2)
        return result
    finally:
        if emu is not None:
            emu.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--endpoint", help="an already running emulator's gRPC HOST:PORT")
    p.add_argument("--admin-url", help="its admin URL (with --endpoint)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args()
    r = run(a.services, a.concurrency, a.seconds, a.endpoint, a.admin_url)
    if a.json:
        print(json.dumps(r))
        return
    print(
        f"GetService via run_v2.ServicesAsyncClient, {r['services']} services, "
        f"concurrency {r['concurrency']}: {r['calls_per_second']:.0f} calls/s "
        f"({r['calls']} calls in {r['seconds']} s, {r['errors']} errors; "
        f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms)"
    )


if __name__ == "__main__":
    main()
