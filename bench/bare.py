"""The baseline for the overhead ratio: a bare script making a check's two calls, nothing else.

    python -m bench.bare --endpoint HOST:PORT --rate R --checks C SERVICE...
    python -m bench.bare ... --patch-status NAMESPACE SERVICE...   # KUBECONFIG from the env

Same clients as the controller (controller.gcp.clients.make_clients), same requests
(GetService, then GetIamPolicy with policy version 3), same emulator, at the same rate the
controller checked at, round-robin over the same services. Prints JSON: the process CPU seconds
spent from the first to the last check (interpreter start-up and imports excluded, as the
controller's start-up is).

With --patch-status, each check also writes the Orchestrator's status.lastSyncTime (one merge
patch of the status subresource, the Orchestrator named like its service) the way the contract
wants after every check: the least any implementation of the contract can spend per check.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import time

import aiohttp
import kopf
from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, options_pb2

from controller.gcp.clients import make_clients


async def main(endpoint: str, project: str, region: str, services: list[str], rate: float,
               checks: int, warmup: int, namespace: str | None) -> dict[str, float]:  # fmt: skip
    clients = make_clients(endpoint)
    names = [f"projects/{project}/locations/{region}/services/{s}" for s in services]
    session, server = (None, "") if namespace is None else _kube_session()

    async def check(i: int) -> None:
        name = names[i % len(names)]
        await clients.run.get_service(request=run_v2.GetServiceRequest(name=name), timeout=30)
        await clients.run.get_iam_policy(
            request=iam_policy_pb2.GetIamPolicyRequest(
                resource=name, options=options_pb2.GetPolicyOptions(requested_policy_version=3)
            ),
            timeout=30,
        )
        if session is not None:
            url = (
                f"{server}/apis/runwarden.dev/v1alpha1/namespaces/{namespace}/orchestrators/"
                f"{services[i % len(services)]}/status"
            )
            stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            async with session.patch(
                url,
                json={"status": {"lastSyncTime": stamp}},
                headers={"Content-Type": "application/merge-patch+json"},
            ) as resp:
                resp.raise_for_status()
                await resp.json()

    for i in range(warmup):  # channel set-up and first-call costs, outside the measurement
        await check(i)

    cpu0, wall0 = time.process_time(), time.monotonic()
    tasks = []
    for i in range(checks):
        delay = wall0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(check(i)))
    await asyncio.gather(*tasks)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    await clients.close()
    if session is not None:
        await session.close()
    return {"cpu_seconds": cpu, "wall_seconds": wall, "checks": checks}


def _kube_session() -> tuple[aiohttp.ClientSession, str]:
    """An HTTP session to kube-apiserver with KUBECONFIG's credentials (kopf's own login)."""
    info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
    assert info is not None, "KUBECONFIG is not set"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=16, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
    )
    return session, info.server


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--rate", type=float, required=True, help="checks per second")
    parser.add_argument("--checks", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--patch-status", metavar="NAMESPACE", help="also write status per check")
    parser.add_argument("services", nargs="+")
    a = parser.parse_args()
    args = (a.endpoint, a.project, a.region, a.services, a.rate, a.checks, a.warmup)
    result = asyncio.run(main(*args, a.patch_status))
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
