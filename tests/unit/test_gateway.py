"""The gateway's read policy, with fake Google clients: every read carries the one shared retry,
and a transient failure of a read is absorbed inside the call."""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.iam.v1 import policy_pb2

from controller.gateway import READ_RETRY, Gateway
from controller.model import ServiceRef

REF = ServiceRef("my-project", "us-west2", "svc")


class FakeRun:
    """Cloud Run reads that fail with ``errors`` (in turn) before answering."""

    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.errors = list(errors or [])
        self.retries: dict[str, list[Any]] = {}
        self.attempts: dict[str, int] = {}

    async def _read(self, method: str, retry: Any, answer: Any) -> Any:
        self.retries.setdefault(method, []).append(retry)

        async def once() -> Any:
            self.attempts[method] = self.attempts.get(method, 0) + 1
            if self.errors:
                raise self.errors.pop(0)
            return answer

        # What the generated client does with ``retry``: wrap the RPC in it.
        return await (retry(once)() if retry is not None else once())

    async def get_service(self, *, request: Any, retry: Any = None, **_: Any) -> Any:
        service = run_v2.Service(
            name=request.name,
            template=run_v2.RevisionTemplate(containers=[run_v2.Container(name="app")]),
        )
        return await self._read("GetService", retry, service)

    async def get_iam_policy(self, *, request: Any, retry: Any = None, **_: Any) -> Any:
        return await self._read("GetIamPolicy", retry, policy_pb2.Policy(etag=b"e"))


class FakeIam:
    def __init__(self) -> None:
        self.retries: list[Any] = []

    async def get_service_account(self, *, request: Any, retry: Any = None, **_: Any) -> Any:
        self.retries.append(retry)
        return object()


class FakeClients:
    def __init__(self, run: FakeRun) -> None:
        self.run = run
        self.iam = FakeIam()


async def test_every_read_uses_the_one_shared_read_retry() -> None:
    clients = FakeClients(FakeRun())
    gw = Gateway(clients)  # type: ignore[arg-type]
    observed = await gw.observe(REF, "")
    await gw.refresh_service(observed, "")
    await gw.refresh_iam(observed)
    assert await gw.service_account_exists("sa@my-project.iam.gserviceaccount.com")
    used = [*clients.run.retries["GetService"], *clients.run.retries["GetIamPolicy"]]
    used += clients.iam.retries
    assert len(used) == 5
    assert all(r is READ_RETRY for r in used), used


async def test_a_transient_read_failure_is_retried_within_the_call() -> None:
    run = FakeRun(
        [
            gexc.DeadlineExceeded("slow"),
            gexc.ServiceUnavailable("down"),
            gexc.InternalServerError("x"),
        ]
    )
    gw = Gateway(FakeClients(run))  # type: ignore[arg-type]
    observed = await gw.observe(REF, "")
    assert observed.ref == REF
    assert run.attempts == {"GetService": 4, "GetIamPolicy": 1}
