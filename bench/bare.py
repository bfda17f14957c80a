"""The baseline for the overhead ratio: a bare script making a check's two calls, nothing else.

    python -m bench.bare --endpoint HOST:PORT --rate R --checks C SERVICE...

Same clients as the controller (controller.clients.make_clients), same requests (GetService, then
GetIamPolicy with policy version 3), same emulator, at the same rate the controller checked at,
round-robin over the same services. Prints JSON: the process CPU seconds spent from the first to
the last check (interpreter start-up and imports excluded, as the controller's start-up is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, options_pb2

from controller.clients import make_clients


async def main(endpoint: str, project: str, region: str, services: list[str], rate: float,
               checks: int, warmup: int) -> dict[str, float]:  # fmt: skip
    clients = make_clients(endpoint)
    names = [f"projects/{project}/locations/{region}/services/{s}" for s in services]

    async def check(name: str) -> None:
        await clients.run.get_service(request=run_v2.GetServiceRequest(name=name), timeout=30)
        await clients.run.get_iam_policy(
            request=iam_policy_pb2.GetIamPolicyRequest(
                resource=name, options=options_pb2.GetPolicyOptions(requested_policy_version=3)
            ),
            timeout=30,
        )

    for i in range(warmup):  # channel set-up and first-call costs, outside the measurement
        await check(names[i % len(names)])

    cpu0, wall0 = time.process_time(), time.monotonic()
    tasks = []
    for i in range(checks):
        delay = wall0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(check(names[i % len(names)])))
    await asyncio.gather(*tasks)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    await clients.close()
    return {"cpu_seconds": cpu, "wall_seconds": wall, "checks": checks}


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--rate", type=float, required=True, help="checks per second")
    parser.add_argument("--checks", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("services", nargs="+")
    a = parser.parse_args()
    result = asyncio.run(
        main(a.endpoint, a.project, a.region, a.services, a.rate, a.checks, a.warmup)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
