"""The only module that talks to Google (with controller.gcp.clients, which builds the clients).

It reads a service into an ``Observed``, writes a ``Plan`` back (one UpdateService, one
read-modify-write SetIamPolicy) and checks that service accounts exist. Google's errors leave
this module only as the small vocabulary below, each carrying its condition reason.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.api_core import retry_async
from google.cloud import iam_admin_v1, run_v2
from google.iam.v1 import iam_policy_pb2, options_pb2, policy_pb2

from controller.domain.model import (
    ROLLOUT_ATTEMPT_ANNOTATION,
    Grant,
    Observed,
    Plan,
    ServiceRef,
)
from controller.gcp import convert
from controller.gcp.budget import Pacer
from controller.gcp.clients import IamApi, RunApi
from controller.gcp.errors import (
    Conflict,
    NotFound,
    NotLeader,
    RevisionFailed,
    code_name,
    code_of,
    retry_delay,
    translate,
)
from controller.obs import logs, metrics

T = TypeVar("T")
log = logs.get("runwarden.gcp")

# Reads are idempotent: a transient failure is retried inside the call, with this one policy
# for every read (GetService, GetIamPolicy, GetServiceAccount). The gateway wraps each read in
# it (the clients get retry=None), so that every retry waits for its region's read budget like
# any other call. Writes are not retried here (a lost response would turn the retry into a
# false conflict); the reconcile's own backoff covers them, and IAM conflicts get the
# read-modify-write retry below.
_TRANSIENT = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError)


def _retryable_read(exc: Exception) -> bool:
    """Whether a read is worth another attempt within the call: a transient failure, or a quota
    refusal without RetryInfo (nothing says how long to wait: retry with the backoff, each
    attempt paced by the region's budget). A refusal with RetryInfo holds the region's budget
    that long instead, and the check fails as QuotaExceeded."""
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, gexc.ResourceExhausted) and retry_delay(exc) == 0


READ_RETRY = retry_async.AsyncRetry(
    predicate=_retryable_read, initial=0.2, maximum=2.0, multiplier=2.0, timeout=10.0
)
# An IAM etag conflict (ABORTED) means someone wrote in between: re-read, re-apply, retry.
IAM_CONFLICT_RETRY = retry_async.AsyncRetry(
    predicate=retry_async.if_exception_type(gexc.Aborted),
    initial=0.05,
    maximum=1.0,
    multiplier=2.0,
    timeout=20.0,
)


class Clients(Protocol):
    """What controller.gcp.clients.make_clients() returns (either transport)."""

    @property
    def run(self) -> RunApi: ...

    @property
    def iam(self) -> IamApi: ...


class Gateway:
    """Cloud Run + IAM for the reconcile, with a cache of service accounts known to exist."""

    def __init__(
        self,
        clients: Clients,
        *,
        timeout: float = 30.0,
        rollout_timeout: float = 600.0,
        sa_cache_seconds: float = 600.0,
        pacer: Pacer | None = None,
        fence: Callable[[], float] | None = None,
        write_metadata: tuple[tuple[str, str], ...] = (),
        on_rollout: Callable[[ServiceRef], object] | None = None,
    ) -> None:
        self._run = clients.run
        # Leader election: seconds this replica may still write (controller.kube.lease), asked
        # right before every write is sent; None = no election, always allowed.
        self._fence = fence
        # Request metadata for writes (the emulator's x-emulator-principal; see make_gateway).
        self._write_metadata = write_metadata
        # Per-region read/write budgets; every Cloud Run call waits for its token.
        self._pacer = pacer if pacer is not None else Pacer()
        self._iam = clients.iam
        self._timeout = timeout
        self._rollout_timeout = rollout_timeout
        self._sa_cache_seconds = sa_cache_seconds
        self._sa_seen: dict[str, float] = {}  # email -> monotonic time it was last seen
        self._on_rollout = on_rollout  # told when a rollout started by update_service ends
        self._rollouts: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ reads

    async def observe(self, ref: ServiceRef, container: str) -> Observed:
        """One GetService and one GetIamPolicy: everything a check needs."""
        # Both reads' tokens at once, so that a busy budget delays the check, not its 2nd read.
        await self._pacer.take(ref.region, write=False, n=2)
        service = await self._get_service(ref, paced=True)
        policy = await self._get_policy(ref, paced=True)
        return convert.observed(ref, container, service, policy)

    async def refresh_service(self, observed: Observed, container: str) -> Observed:
        """Re-read the service (for verification after an UpdateService)."""
        service = await self._get_service(observed.ref)
        fresh = convert.observed(observed.ref, container, service, observed.policy_handle)
        return fresh

    async def refresh_iam(self, observed: Observed) -> Observed:
        """Re-read the IAM policy (for verification after a SetIamPolicy)."""
        policy = await self._get_policy(observed.ref)
        return replace(
            observed,
            bindings=convert.bindings_of(policy),
            conditional=convert.conditional_of(policy),
            iam_etag=policy.etag,
            policy_handle=policy,
        )

    async def list_services(self, project: str, region: str) -> list[str]:
        """The names of every service in a project and region (ListServices, page by page).

        Each page is a paced, counted read of its own (the client's pager would fetch later
        pages behind the budget's back)."""
        parent = f"projects/{project}/locations/{region}"
        names: list[str] = []
        token = ""
        with translate(f"services of {parent}"):
            while True:
                request = run_v2.ListServicesRequest(parent=parent, page_token=token)
                page = await self._read(
                    "ListServices",
                    functools.partial(self._list_page, request),
                    region=region,
                )
                names += [s.name.rsplit("/", 1)[-1] for s in page.services]
                token = page.next_page_token
                if not token:
                    return sorted(names)

    async def _list_page(self, request: run_v2.ListServicesRequest) -> run_v2.ListServicesResponse:
        pager = await self._run.list_services(request=request, retry=None, timeout=self._timeout)
        return await anext(aiter(pager.pages))  # the first page is the response itself

    async def service_account_exists(self, email: str) -> bool:
        """Whether a service account exists; positive answers are cached for a while."""
        seen = self._sa_seen.get(email)
        if seen is not None and time.monotonic() - seen < self._sa_cache_seconds:
            return True
        request = iam_admin_v1.GetServiceAccountRequest(name=f"projects/-/serviceAccounts/{email}")
        try:
            with translate(f"service account {email}"):
                await self._read(
                    "GetServiceAccount",
                    lambda: self._iam.get_service_account(
                        request=request, retry=None, timeout=self._timeout
                    ),
                )
        except NotFound:
            self._sa_seen.pop(email, None)
            return False
        self._sa_seen[email] = time.monotonic()
        return True

    # ------------------------------------------------------------------ writes

    async def update_service(self, observed: Observed, plan: Plan) -> Observed:
        """Apply the plan's env and settings in ONE UpdateService; do not wait for the rollout.

        Starts from the service exactly as observed, etag included, so a concurrent deploy by
        someone else makes this write fail with a conflict instead of silently reverting it.
        A rollout retry sets the attempt annotation on the template, so Cloud Run makes a new
        revision even where nothing else changes.

        Returns the service as the update left it (the operation's metadata: the new template,
        its rollout in progress). The rollout is awaited in the background, never by the caller
        (a check holds its object's lock: a spec change or a deletion would wait behind a
        rollout of up to ``rollout_timeout``); ``on_rollout(ref)`` is called when it ends, and
        the next check reads how it ended (Observed.rollout).
        """
        if observed.service_handle is None:
            raise ValueError("observed has no service to update")
        service: Any = copy.deepcopy(observed.service_handle)
        # A revision name pinned by Terraform or `--revision-suffix` names the revision already
        # made of the old template: sent back with a changed template, Cloud Run refuses it
        # with ALREADY_EXISTS ("Revision named ... with different configuration already
        # exists"; googleapis/google-cloud-python#14259). RevisionTemplate.revision
        # (google/cloud/run/v2/revision_template.proto): "If this field is omitted, it will be
        # automatically generated based on the Service name" -- so, as gcloud does on every
        # update, leave it out and let Cloud Run name the new revision.
        service.template.revision = ""
        container = convert.container_of(service, observed.container)
        convert.edit_env(container, plan.env_set, plan.env_remove)
        convert.edit_settings(service, container, plan.settings_set)
        if plan.invoker_iam_disabled is not None:
            service.invoker_iam_disabled = plan.invoker_iam_disabled
        if plan.rollout_retry is not None:
            service.template.annotations[ROLLOUT_ATTEMPT_ANNOTATION] = str(
                plan.rollout_retry.attempt
            )
        if plan.claim is not None:
            convert.edit_claim(service, plan.claim)
        request = run_v2.UpdateServiceRequest(service=service)
        with translate(f"service {observed.ref}"):
            operation = await self._call(
                "UpdateService",
                lambda: self._run.update_service(
                    request=request,
                    retry=None,
                    timeout=self._timeout,
                    metadata=self._write_metadata,
                ),
                region=observed.ref.region,
                write=True,
            )
        raw = operation.operation
        if raw.done and raw.HasField("error"):
            raise _operation_failed(operation, observed.ref)
        _tune_polling(operation)
        self._await_rollout(operation, observed.ref)
        try:
            # The Service as the update left it (run/v2/service.proto: UpdateService's
            # operation_info is response_type Service, metadata_type Service).
            updated: Any = operation.metadata
        except (TypeError, ValueError):
            updated = None
        if not updated or not updated.template.containers:
            return observed  # the operation does not say: the read-back will
        return convert.observed(observed.ref, observed.container, updated, observed.policy_handle)

    def _await_rollout(self, operation: Any, ref: ServiceRef) -> None:
        """Wait for the operation in the background (bounded by rollout_timeout), then tell
        ``on_rollout``. Its outcome is not kept: the next check reads the service."""

        async def wait() -> None:
            try:
                await operation.result(timeout=self._rollout_timeout)
            except Exception as exc:  # the service says how it ended; this is only the wake
                log.debug("rollout_ended", service=str(ref), error=type(exc).__name__)
            if self._on_rollout is not None:
                self._on_rollout(ref)

        if operation.operation.done:
            if self._on_rollout is not None:
                self._on_rollout(ref)
            return
        task = asyncio.get_running_loop().create_task(wait())
        self._rollouts.add(task)
        task.add_done_callback(self._rollouts.discard)

    async def close(self) -> None:
        """Stop waiting for rollouts (the process is stopping)."""
        for task in list(self._rollouts):
            task.cancel()
        await asyncio.gather(*self._rollouts, return_exceptions=True)

    async def set_invokers(
        self,
        observed: Observed,
        role: str,
        add: frozenset[str],
        remove: frozenset[str],
        grants_remove: frozenset[Grant] = frozenset(),
    ) -> bytes:
        """Grant/revoke ``role`` in ONE SetIamPolicy, read-modify-write with the policy etag.

        The first attempt edits the policy read by observe(); on ABORTED (someone else wrote in
        between) the policy is re-read and the same delta re-applied, so other roles, conditional
        bindings, audit configs and members someone else added meanwhile all survive.
        Returns the new etag.
        """
        ref = observed.ref
        attempts = 0

        async def attempt() -> bytes:
            nonlocal attempts
            policy = observed.policy_handle
            if attempts or not isinstance(policy, policy_pb2.Policy):
                policy = await self._get_policy_raw(ref)
            attempts += 1
            edited = convert.edit_policy(policy, role, add, remove, grants_remove)
            if edited is None:
                return bytes(policy.etag)  # already as wanted (someone did it meanwhile)
            request = iam_policy_pb2.SetIamPolicyRequest(resource=ref.resource_name, policy=edited)
            result = await self._call(
                "SetIamPolicy",
                lambda: self._run.set_iam_policy(
                    request=request,
                    retry=None,
                    timeout=self._timeout,
                    metadata=self._write_metadata,
                ),
                region=ref.region,
                write=True,
            )
            return bytes(result.etag)

        with translate(f"IAM policy of service {ref}"):
            return await IAM_CONFLICT_RETRY(attempt)()

    # ------------------------------------------------------------------ plumbing

    async def _get_service(self, ref: ServiceRef, paced: bool = False) -> Any:
        """GetService (``paced``: its read token is taken already)."""
        request = run_v2.GetServiceRequest(name=ref.resource_name)
        with translate(f"service {ref}"):
            return await self._read(
                "GetService",
                lambda: self._run.get_service(request=request, retry=None, timeout=self._timeout),
                region=ref.region,
                paced=paced,
            )

    async def _get_policy(self, ref: ServiceRef, paced: bool = False) -> policy_pb2.Policy:
        with translate(f"IAM policy of service {ref}"):
            return await self._get_policy_raw(ref, paced)

    async def _get_policy_raw(self, ref: ServiceRef, paced: bool = False) -> policy_pb2.Policy:
        request = iam_policy_pb2.GetIamPolicyRequest(
            resource=ref.resource_name,
            # Version 3 shows conditional bindings, so a write can carry them over intact.
            options=options_pb2.GetPolicyOptions(requested_policy_version=3),
        )
        policy: policy_pb2.Policy = await self._read(
            "GetIamPolicy",
            lambda: self._run.get_iam_policy(request=request, retry=None, timeout=self._timeout),
            region=ref.region,
            paced=paced,
        )
        return policy

    async def _read(
        self,
        method: str,
        fn: Callable[[], Awaitable[T]],
        *,
        region: str | None = None,
        paced: bool = False,
    ) -> T:
        """A read under READ_RETRY. Every attempt is a paced call of its own; ``paced`` (the
        token is taken already) covers the first attempt only, so a retry costs a token and a
        read that succeeds at once costs exactly the one taken."""
        attempts = 0

        async def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return await self._call(method, fn, region=region, paced=paced and attempts == 1)

        result: T = await READ_RETRY(attempt)()
        return result

    async def _call(
        self,
        method: str,
        fn: Callable[[], Awaitable[T]],
        *,
        region: str | None = None,
        write: bool = False,
        paced: bool = False,
    ) -> T:
        """Call Google once, counting the call by status code.

        A Cloud Run call (``region`` given) first waits for the region's read or write budget,
        unless ``paced`` (its token is taken already); a quota refusal's RetryInfo holds the
        budget. IAM API calls (no region) have a quota of their own and are not paced here.
        """
        if region is not None and not paced:
            await self._pacer.take(region, write)
        if write and self._fence is not None and self._fence() <= 0:
            # Nothing may be awaited between this check and sending: the budget wait is above.
            raise NotLeader(
                f"{method} held back: this replica no longer holds the leader Lease (another "
                "replica may be writing); it stops reconciling until it holds the Lease again",
                "NOT_LEADER",
            )
        try:
            result = await fn()
        except gexc.GoogleAPICallError as exc:
            metrics.gcp_requests(method, code_of(exc)).inc()
            if region is not None and isinstance(exc, gexc.ResourceExhausted):
                self._pacer.retry_after(region, write, retry_delay(exc))
            raise
        except grpc.aio.AioRpcError as exc:
            metrics.gcp_requests(method, exc.code().name).inc()
            raise
        except TimeoutError:
            metrics.gcp_requests(method, "DEADLINE_EXCEEDED").inc()
            raise
        metrics.gcp_requests(method, "OK").inc()
        return result


def _operation_failed(operation: Any, ref: ServiceRef) -> Exception:
    """The error of an UpdateService operation that finished at once with an error status."""
    error = operation.operation.error
    if error.code == grpc.StatusCode.ABORTED.value[0]:
        return Conflict(f"the update of service {ref} was superseded by another", "ABORTED")
    revision = convert.rolled_out_revision(operation)
    return RevisionFailed(
        f"{f'revision {revision}' if revision else 'the new revision'} of service "
        f"{ref} failed to become ready; the previous revision keeps serving",
        code=code_name(error.code),
    )


def _tune_polling(operation: Any) -> None:
    # AsyncOperation takes its polling policy only in its constructor, which the generated
    # client calls for us; api-core reads it from ``_retry`` (pinned version, see pyproject).
    if hasattr(operation, "_retry"):
        operation._retry = retry_async.AsyncRetry(
            predicate=operation._retry._predicate,
            initial=0.1,
            maximum=2.0,
            multiplier=1.5,
        )
