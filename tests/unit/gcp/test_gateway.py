"""The gateway's read policy, with fake Google clients and a recording pacer: every read is
retried inside the call on transient failures and on quota refusals without RetryInfo, every
retry takes a token from its region's read budget, a check without failures costs exactly one
GetService and one GetIamPolicy, a refusal with RetryInfo holds the budget, and writes are never
retried."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.iam.v1 import policy_pb2
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from controller.domain.model import Observed, Plan, ServiceRef
from controller.gcp import gateway
from controller.gcp.budget import Pacer
from controller.gcp.errors import NotLeader, QuotaExceeded, Unavailable
from controller.gcp.gateway import READ_RETRY, Gateway

REF = ServiceRef("my-project", "us-west2", "svc")
SA = "sa@my-project.iam.gserviceaccount.com"


def quota(retry_after: float | None = None) -> gexc.ResourceExhausted:
    """A RESOURCE_EXHAUSTED answer, with Google's RetryInfo if ``retry_after`` is given."""
    if retry_after is None:
        return gexc.ResourceExhausted("quota")
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_after)))
    return gexc.ResourceExhausted("quota", details=[info])


@pytest.fixture(autouse=True)
def fast_retry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """READ_RETRY's predicate and timeout, with millisecond sleeps."""
    monkeypatch.setattr(gateway, "READ_RETRY", READ_RETRY.with_delay(0.001, 0.001, 1.0))
    yield


class FakeRun:
    """Cloud Run that fails with ``errors`` (in turn, any method) before answering."""

    def __init__(self, errors: list[Exception] | None = None, forever: Exception | None = None):
        self.errors = list(errors or [])
        self.forever = forever
        self.retries: list[Any] = []  # the retry= each call was given
        self.attempts: dict[str, int] = {}

    async def _rpc(self, method: str, retry: Any, answer: Any) -> Any:
        self.retries.append(retry)
        self.attempts[method] = self.attempts.get(method, 0) + 1
        if self.errors:
            raise self.errors.pop(0)
        if self.forever is not None:
            raise self.forever
        return answer

    async def get_service(self, *, request: Any, retry: Any = "DEFAULT", **_: Any) -> Any:
        service = run_v2.Service(
            name=request.name,
            template=run_v2.RevisionTemplate(containers=[run_v2.Container(name="app")]),
        )
        return await self._rpc("GetService", retry, service)

    async def get_iam_policy(self, *, request: Any, retry: Any = "DEFAULT", **_: Any) -> Any:
        return await self._rpc("GetIamPolicy", retry, policy_pb2.Policy(etag=b"e"))

    async def set_iam_policy(self, *, request: Any, retry: Any = "DEFAULT", **_: Any) -> Any:
        return await self._rpc("SetIamPolicy", retry, policy_pb2.Policy(etag=b"f"))

    async def update_service(self, *, request: Any, retry: Any = "DEFAULT", **_: Any) -> Any:
        return await self._rpc("UpdateService", retry, None)


class FakeIam:
    def __init__(self, errors: list[Exception] | None = None) -> None:
        self.errors = list(errors or [])
        self.retries: list[Any] = []
        self.attempts = 0

    async def get_service_account(self, *, request: Any, retry: Any = "DEFAULT", **_: Any) -> Any:
        self.retries.append(retry)
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return object()


class FakeClients:
    def __init__(self, run: FakeRun, iam: FakeIam | None = None) -> None:
        self.run = run
        self.iam = iam or FakeIam()


class RecordingPacer(Pacer):
    """A pacer (unlimited budgets) that records every take and every RetryInfo hold."""

    def __init__(self) -> None:
        super().__init__()
        self.takes: list[tuple[str, bool, int]] = []
        self.holds: list[tuple[str, bool, float]] = []

    async def take(self, region: str, write: bool, n: int = 1) -> None:
        self.takes.append((region, write, n))
        await super().take(region, write, n)

    def retry_after(self, region: str, write: bool, seconds: float) -> None:
        if seconds > 0:
            self.holds.append((region, write, seconds))
        super().retry_after(region, write, seconds)


def gateway_with(run: FakeRun, iam: FakeIam | None = None) -> tuple[Gateway, RecordingPacer]:
    pacer = RecordingPacer()
    return Gateway(FakeClients(run, iam), pacer=pacer), pacer  # type: ignore[arg-type]


async def observed() -> Observed:
    gw, _ = gateway_with(FakeRun())
    return await gw.observe(REF, "")


async def test_a_check_without_failures_costs_one_of_each_read_and_their_two_tokens() -> None:
    run = FakeRun()
    gw, pacer = gateway_with(run)
    await gw.observe(REF, "")
    assert run.attempts == {"GetService": 1, "GetIamPolicy": 1}
    assert pacer.takes == [("us-west2", False, 2)]


async def test_the_clients_never_retry_on_their_own() -> None:
    """retry=None: a client's default retry would resend a read without waiting for the budget,
    and a write must never be resent blindly."""
    run, iam = FakeRun(), FakeIam()
    gw, _ = gateway_with(run, iam)
    obs = await gw.observe(REF, "")
    await gw.refresh_service(obs, "")
    await gw.refresh_iam(obs)
    await gw.set_invokers(obs, "roles/run.invoker", frozenset({"user:a@b.c"}), frozenset())
    assert await gw.service_account_exists(SA)
    assert len(run.retries) == 5 and len(iam.retries) == 1
    assert all(r is None for r in run.retries) and iam.retries == [None], run.retries


@pytest.mark.parametrize(
    "error",
    [
        gexc.DeadlineExceeded("slow"),
        gexc.ServiceUnavailable("down"),
        gexc.InternalServerError("x"),
        quota(),
    ],
    ids=["DEADLINE_EXCEEDED", "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED-no-RetryInfo"],
)
async def test_every_read_retries_a_transient_failure_within_the_call(error: Exception) -> None:
    run, iam = FakeRun([error, error]), FakeIam([error])
    gw, _ = gateway_with(run, iam)
    obs = await gw.observe(REF, "")
    assert obs.ref == REF
    assert run.attempts == {"GetService": 3, "GetIamPolicy": 1}
    run.errors = [error]
    await gw.refresh_iam(obs)
    assert run.attempts["GetIamPolicy"] == 3
    run.errors = [error]
    await gw.refresh_service(obs, "")
    assert run.attempts["GetService"] == 5
    assert await gw.service_account_exists(SA)
    assert iam.attempts == 2


async def test_each_retry_of_a_read_takes_a_token_from_the_region_budget() -> None:
    run = FakeRun([gexc.ServiceUnavailable("down"), quota(), gexc.DeadlineExceeded("slow")])
    gw, pacer = gateway_with(run)
    await gw.observe(REF, "")
    # GetService: 3 retries; GetIamPolicy none. The check's 2 tokens, then one per retry.
    assert run.attempts == {"GetService": 4, "GetIamPolicy": 1}
    assert pacer.takes == [("us-west2", False, 2)] + [("us-west2", False, 1)] * 3


async def test_a_quota_refusal_with_retry_info_holds_the_budget_and_fails_the_read() -> None:
    run = FakeRun([quota(retry_after=7)])
    gw, pacer = gateway_with(run)
    with pytest.raises(QuotaExceeded):
        await gw.observe(REF, "")
    assert run.attempts == {"GetService": 1}
    assert pacer.holds == [("us-west2", False, 7.0)]


async def test_quota_refusals_that_outlast_the_read_retry_are_quota_exceeded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway, "READ_RETRY", gateway.READ_RETRY.with_timeout(0.05))
    run = FakeRun(forever=quota())
    gw, pacer = gateway_with(run)
    with pytest.raises(QuotaExceeded, match="retries exhausted"):
        await gw.observe(REF, "")
    assert run.attempts["GetService"] > 1
    assert len(pacer.takes) == run.attempts["GetService"]  # each retry paced
    assert not pacer.holds


async def test_transient_failures_that_outlast_the_read_retry_are_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway, "READ_RETRY", gateway.READ_RETRY.with_timeout(0.05))
    gw, _ = gateway_with(FakeRun(forever=gexc.ServiceUnavailable("down")))
    with pytest.raises(Unavailable, match="retries exhausted"):
        await gw.observe(REF, "")


@pytest.mark.parametrize(
    "error", [quota(), gexc.ServiceUnavailable("down")], ids=["RESOURCE_EXHAUSTED", "UNAVAILABLE"]
)
async def test_writes_are_never_retried(error: Exception) -> None:
    """Never a blind write: a failed UpdateService or SetIamPolicy is sent once."""
    obs = await observed()
    run = FakeRun(forever=error)
    gw, pacer = gateway_with(run)
    with pytest.raises((QuotaExceeded, Unavailable)):
        await gw.update_service(obs, Plan())
    with pytest.raises((QuotaExceeded, Unavailable)):
        await gw.set_invokers(obs, "roles/run.invoker", frozenset({"user:a@b.c"}), frozenset())
    assert run.attempts == {"UpdateService": 1, "SetIamPolicy": 1}
    assert pacer.takes == [("us-west2", True, 1)] * 2


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (gexc.ServiceUnavailable("down"), True),
        (gexc.DeadlineExceeded("slow"), True),
        (gexc.InternalServerError("x"), True),
        (quota(), True),
        (quota(retry_after=3), False),
        (gexc.NotFound("gone"), False),
        (gexc.PermissionDenied("no"), False),
        (gexc.Aborted("etag"), False),
        (gexc.InvalidArgument("bad"), False),
    ],
)
def test_which_read_failures_are_retried(error: Exception, retried: bool) -> None:
    assert gateway._retryable_read(error) is retried


def test_already_exists_is_never_a_transient_conflict() -> None:
    """Cloud Run's 409 ALREADY_EXISTS for a pinned revision name ("Revision named '<rev>' with
    different configuration already exists", googleapis/google-cloud-python#14259) fails the
    same way every time: not a Conflict retried within seconds, but AlreadyExists, slowly."""
    from controller.domain.model import Retry
    from controller.gcp.errors import AlreadyExists, Conflict, translate

    refused = gexc.AlreadyExists(
        "Revision named 'svc-pinned' with different configuration already exists."
    )
    with pytest.raises(AlreadyExists) as caught, translate("service my-project/us-west2/svc"):
        raise refused
    assert not isinstance(caught.value, Conflict)
    assert caught.value.failure().reason == "AlreadyExists"
    assert caught.value.failure().retry is Retry.SLOWLY
    assert "template.revision" in caught.value.message
    # ABORTED (an etag race) stays the transient Conflict.
    with pytest.raises(Conflict), translate("service x"):
        raise gexc.Aborted("etag")


async def test_fencing_holds_back_every_write_once_the_lease_is_not_valid() -> None:
    """Leader election: a replica whose Lease ran out (by its own clock) sends no write at all,
    and still reads; the writes it may send carry its principal (the emulator's metadata)."""
    obs = await observed()
    left = [5.0]
    run = FakeRun()
    gw = Gateway(
        FakeClients(run),  # type: ignore[arg-type]
        pacer=RecordingPacer(),
        fence=lambda: left[0],
        write_metadata=(("x-emulator-principal", "replica-a@example.com"),),
    )
    await gw.set_invokers(obs, "roles/run.invoker", frozenset({"user:a@b.c"}), frozenset())
    assert run.attempts == {"SetIamPolicy": 1}
    left[0] = 0.0
    with pytest.raises(NotLeader) as raised:
        await gw.update_service(obs, Plan())
    assert "leader Lease" in raised.value.message
    with pytest.raises(NotLeader):
        await gw.set_invokers(obs, "roles/run.invoker", frozenset({"user:x@b.c"}), frozenset())
    assert run.attempts == {"SetIamPolicy": 1}, "no write sent without a valid lease"
    await gw.observe(REF, "")  # reads are not fenced: only writes can do harm
    assert run.attempts["GetService"] == 1
