"""The only module that talks to Google (with controller.clients, which builds the clients).

It reads a service into an ``Observed``, writes a ``Plan`` back (one UpdateService, one
read-modify-write SetIamPolicy) and checks that service accounts exist. Google's errors leave
this module only as the small vocabulary below, each carrying its condition reason.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import grpc
from google.api_core import exceptions as gexc
from google.api_core import retry_async
from google.cloud import iam_admin_v1, run_v2
from google.iam.v1 import iam_policy_pb2, options_pb2, policy_pb2
from google.protobuf import duration_pb2

from controller import metrics
from controller.model import (
    ROLLOUT_ATTEMPT_ANNOTATION,
    EnvValue,
    Failure,
    Observed,
    Plan,
    Reason,
    Retry,
    Rollout,
    RolloutState,
    ServiceRef,
    SettingValue,
)
from controller.pacing import Pacer

T = TypeVar("T")

INGRESS_TO_API = {
    "all": run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL,
    "internal": run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY,
    "internal-and-cloud-load-balancing": (
        run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER
    ),
}
INGRESS_FROM_API = {int(v): k for k, v in INGRESS_TO_API.items()}

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
    return isinstance(exc, gexc.ResourceExhausted) and _retry_delay(exc) == 0


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


class GatewayError(Exception):
    """A failed call to Google, as a condition reason and a message without values."""

    reason: str = Reason.UNAVAILABLE
    retry: Retry = Retry.TRANSIENT

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def failure(self) -> Failure:
        return Failure(self.reason, self.message, self.retry)


class NotFound(GatewayError):
    reason = Reason.SERVICE_NOT_FOUND
    retry = Retry.RESYNC


class ServiceAccountMissing(GatewayError):
    reason = Reason.SERVICE_ACCOUNT_NOT_FOUND
    retry = Retry.RESYNC


class PermissionDenied(GatewayError):
    reason = Reason.PERMISSION_DENIED
    retry = Retry.RESYNC


class QuotaExceeded(GatewayError):
    reason = Reason.QUOTA_EXCEEDED
    retry = Retry.QUOTA


class Unavailable(GatewayError):
    reason = Reason.UNAVAILABLE


class Conflict(GatewayError):
    reason = Reason.CONFLICT


class RevisionFailed(GatewayError):
    reason = Reason.REVISION_FAILED
    retry = Retry.SLOWLY


class Invalid(GatewayError):
    """Google refused the request as invalid (or the spec names something the service lacks)."""

    reason = Reason.INVALID_SPEC
    retry = Retry.SLOWLY


class Clients(Protocol):
    """What controller.clients.make_clients() returns."""

    @property
    def run(self) -> run_v2.ServicesAsyncClient: ...

    @property
    def iam(self) -> iam_admin_v1.IAMAsyncClient: ...


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
    ) -> None:
        self._run = clients.run
        # Per-region read/write budgets; every Cloud Run call waits for its token.
        self._pacer = pacer if pacer is not None else Pacer()
        self._iam = clients.iam
        self._timeout = timeout
        self._rollout_timeout = rollout_timeout
        self._sa_cache_seconds = sa_cache_seconds
        self._sa_seen: dict[str, float] = {}  # email -> monotonic time it was last seen

    # ------------------------------------------------------------------ reads

    async def observe(self, ref: ServiceRef, container: str) -> Observed:
        """One GetService and one GetIamPolicy: everything a check needs."""
        # Both reads' tokens at once, so that a busy budget delays the check, not its 2nd read.
        await self._pacer.take(ref.region, write=False, n=2)
        service = await self._get_service(ref, paced=True)
        policy = await self._get_policy(ref, paced=True)
        return _observed(ref, container, service, policy)

    async def refresh_service(self, observed: Observed, container: str) -> Observed:
        """Re-read the service (for verification after an UpdateService)."""
        service = await self._get_service(observed.ref)
        fresh = _observed(observed.ref, container, service, observed.policy_handle)
        return fresh

    async def refresh_iam(self, observed: Observed) -> Observed:
        """Re-read the IAM policy (for verification after a SetIamPolicy)."""
        policy = await self._get_policy(observed.ref)
        return replace(
            observed,
            bindings=_bindings(policy),
            iam_etag=policy.etag,
            policy_handle=policy,
        )

    async def service_account_exists(self, email: str) -> bool:
        """Whether a service account exists; positive answers are cached for a while."""
        seen = self._sa_seen.get(email)
        if seen is not None and time.monotonic() - seen < self._sa_cache_seconds:
            return True
        request = iam_admin_v1.GetServiceAccountRequest(name=f"projects/-/serviceAccounts/{email}")
        try:
            with _translate(f"service account {email}"):
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
        """Apply the plan's env and settings in ONE UpdateService and wait for the rollout.

        Starts from the service exactly as observed, etag included, so a concurrent deploy by
        someone else makes this write fail with a conflict instead of silently reverting it.
        A rollout retry sets the attempt annotation on the template, so Cloud Run makes a new
        revision even where nothing else changes.
        """
        if observed.service_handle is None:
            raise ValueError("observed has no service to update")
        service: Any = copy.deepcopy(observed.service_handle)
        container = _container(service, observed.container)
        _edit_env(container, plan.env_set, plan.env_remove)
        _edit_settings(service, container, plan.settings_set)
        if plan.rollout_retry is not None:
            service.template.annotations[ROLLOUT_ATTEMPT_ANNOTATION] = str(
                plan.rollout_retry.attempt
            )
        request = run_v2.UpdateServiceRequest(service=service)
        with _translate(f"service {observed.ref}"):
            operation = await self._call(
                "UpdateService",
                lambda: self._run.update_service(
                    request=request, retry=None, timeout=self._timeout
                ),
                region=observed.ref.region,
                write=True,
            )
            _tune_polling(operation)
            try:
                result = await operation.result(  # type: ignore[no-untyped-call]
                    timeout=self._rollout_timeout
                )
            except gexc.GoogleAPICallError as exc:
                if exc.grpc_status_code is not None:
                    raise  # the polling itself failed: translated below
                # The operation finished with an error status (api-core keeps only the raw one).
                error = operation.operation.error
                if error.code == grpc.StatusCode.ABORTED.value[0]:
                    raise Conflict(
                        f"the update of service {observed.ref} was superseded by another",
                        "ABORTED",
                    ) from exc
                revision = _rolled_out_revision(operation)
                raise RevisionFailed(
                    f"{f'revision {revision}' if revision else 'the new revision'} of service "
                    f"{observed.ref} failed to become ready; the previous revision keeps serving",
                    code=_code_name(error.code),
                ) from exc
        return _observed(observed.ref, observed.container, result, observed.policy_handle)

    async def set_invokers(
        self,
        observed: Observed,
        role: str,
        add: frozenset[str],
        remove: frozenset[str],
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
            edited = _edit_policy(policy, role, add, remove)
            if edited is None:
                return bytes(policy.etag)  # already as wanted (someone did it meanwhile)
            request = iam_policy_pb2.SetIamPolicyRequest(resource=ref.resource_name, policy=edited)
            result = await self._call(
                "SetIamPolicy",
                lambda: self._run.set_iam_policy(
                    request=request, retry=None, timeout=self._timeout
                ),
                region=ref.region,
                write=True,
            )
            return bytes(result.etag)

        with _translate(f"IAM policy of service {ref}"):
            return await IAM_CONFLICT_RETRY(attempt)()

    # ------------------------------------------------------------------ plumbing

    async def _get_service(self, ref: ServiceRef, paced: bool = False) -> Any:
        """GetService (``paced``: its read token is taken already)."""
        request = run_v2.GetServiceRequest(name=ref.resource_name)
        with _translate(f"service {ref}"):
            return await self._read(
                "GetService",
                lambda: self._run.get_service(request=request, retry=None, timeout=self._timeout),
                region=ref.region,
                paced=paced,
            )

    async def _get_policy(self, ref: ServiceRef, paced: bool = False) -> policy_pb2.Policy:
        with _translate(f"IAM policy of service {ref}"):
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
        try:
            result = await fn()
        except gexc.GoogleAPICallError as exc:
            metrics.GCP_REQUESTS.labels(method=method, code=_code(exc)).inc()
            if region is not None and isinstance(exc, gexc.ResourceExhausted):
                self._pacer.retry_after(region, write, _retry_delay(exc))
            raise
        except grpc.aio.AioRpcError as exc:
            metrics.GCP_REQUESTS.labels(method=method, code=exc.code().name).inc()
            raise
        except TimeoutError:
            metrics.GCP_REQUESTS.labels(method=method, code="DEADLINE_EXCEEDED").inc()
            raise
        metrics.GCP_REQUESTS.labels(method=method, code="OK").inc()
        return result


# ---------------------------------------------------------------------- errors


def _retry_delay(exc: gexc.GoogleAPICallError) -> float:
    """The delay Google's RetryInfo asks for (0 without one)."""
    for detail in exc.details or ():
        delay = getattr(detail, "retry_delay", None)  # google.rpc.RetryInfo
        if delay is not None:
            return float(delay.seconds + delay.nanos / 1e9)
    return 0.0


def _code(exc: gexc.GoogleAPICallError) -> str:
    code = exc.grpc_status_code
    return str(code.name) if code is not None else type(exc).__name__


def _code_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return str(code.name)
    return str(number)


@contextmanager
def _translate(what: str) -> Iterator[None]:
    """Google's exceptions -> the gateway's vocabulary. Messages name the object, not values."""
    try:
        yield
    except GatewayError:
        raise
    except gexc.NotFound as exc:
        raise NotFound(f"{what} not found", _code(exc)) from exc
    except (gexc.PermissionDenied, gexc.Unauthenticated) as exc:
        raise PermissionDenied(f"permission denied on {what}: {exc.message}", _code(exc)) from exc
    except gexc.ResourceExhausted as exc:
        raise QuotaExceeded(f"quota exceeded on {what}", _code(exc)) from exc
    except (gexc.Aborted, gexc.Conflict, gexc.FailedPrecondition) as exc:
        raise Conflict(f"concurrent change to {what}", _code(exc)) from exc
    except gexc.InvalidArgument as exc:
        raise Invalid(f"Cloud Run refused the change to {what} as invalid", _code(exc)) from exc
    except gexc.RetryError as exc:
        cause = exc.cause
        if isinstance(cause, gexc.Aborted):
            raise Conflict(f"{what} kept changing concurrently", _code(cause)) from exc
        if isinstance(cause, gexc.ResourceExhausted):
            raise QuotaExceeded(
                f"quota exceeded on {what} (retries exhausted)", _code(cause)
            ) from exc
        raise Unavailable(f"{what} unavailable (retries exhausted)", "UNAVAILABLE") from exc
    except gexc.GoogleAPICallError as exc:
        raise Unavailable(f"{what} unavailable ({_code(exc)})", _code(exc)) from exc
    except grpc.aio.AioRpcError as exc:
        raise Unavailable(f"{what} unavailable ({exc.code().name})", exc.code().name) from exc
    except TimeoutError as exc:
        raise Unavailable(f"{what} timed out", "DEADLINE_EXCEEDED") from exc


# ---------------------------------------------------------------------- proto <-> model


def _container(service: Any, name: str) -> Any:
    """The managed container: by name, else the ingress one (with a port), else the only one."""
    containers = service.template.containers
    if name:
        for c in containers:
            if c.name == name:
                return c
        raise Invalid(f"spec.service.container {name} names no container of the service")
    for c in containers:
        if len(c.ports):
            return c
    if len(containers) == 1:
        return containers[0]
    if not len(containers):
        raise Invalid("the service has no container")
    raise Invalid(
        "the service has several containers and none serves a port; set spec.service.container"
    )


def _observed(ref: ServiceRef, container: str, service: Any, policy: Any) -> Observed:
    pb = run_v2.Service.pb(service) if isinstance(service, run_v2.Service) else service
    c = _container(pb, container)
    env: dict[str, EnvValue] = {}
    for e in c.env:
        if e.HasField("value_source"):
            ref_ = e.value_source.secret_key_ref
            env[e.name] = EnvValue.from_secret(ref_.secret, ref_.version or "latest")
        else:
            env[e.name] = EnvValue.literal(e.value)
    return Observed(
        ref=ref,
        container=c.name if container else container,
        env=env,
        settings=_settings(pb, c),
        bindings=_bindings(policy) if policy is not None else {},
        uri=pb.uri,
        latest_ready_revision=pb.latest_ready_revision.rsplit("/", 1)[-1],
        generation=int(pb.generation),
        iam_etag=bytes(policy.etag) if policy is not None else b"",
        rollout=_rollout(pb),
        service_handle=pb,
        policy_handle=policy,
    )


def _rollout(service: Any) -> Rollout:
    """The rollout as Cloud Run reports it. Failed: no longer reconciling, the terminal condition
    failed, and the latest created revision is not the latest ready one (the older one serves).
    A rollout still under way (reconciling) is never failed, whatever its conditions say."""
    created = service.latest_created_revision.rsplit("/", 1)[-1]
    ready = service.latest_ready_revision.rsplit("/", 1)[-1]
    try:
        attempt = int(service.template.annotations.get(ROLLOUT_ATTEMPT_ANNOTATION, "0"))
    except ValueError:
        attempt = 0  # not ours to read: the next retry starts over at 1
    if service.reconciling:
        state = RolloutState.IN_PROGRESS
    elif (
        created
        and created != ready
        and service.terminal_condition.state == run_v2.Condition.State.CONDITION_FAILED
    ):
        state = RolloutState.FAILED
    else:
        state = RolloutState.READY
    return Rollout(state=state, latest_created_revision=created, attempt=max(0, attempt))


def _rolled_out_revision(operation: Any) -> str:
    """The revision an UpdateService operation rolled out ("" if it does not say): the
    operation's metadata is the Service as the update left it."""
    try:
        service = operation.metadata
    except (TypeError, ValueError):
        return ""
    name = getattr(service, "latest_created_revision", "") or ""
    return str(name).rsplit("/", 1)[-1]


def _settings(service: Any, container: Any) -> dict[str, SettingValue]:
    t = service.template
    settings: dict[str, SettingValue] = {
        "timeoutSeconds": int(t.timeout.seconds),
        "minInstances": int(t.scaling.min_instance_count),
        "maxInstances": int(t.scaling.max_instance_count),
        "concurrency": int(t.max_instance_request_concurrency),
    }
    if t.service_account:
        settings["serviceAccount"] = t.service_account
    for key in ("cpu", "memory"):
        if key in container.resources.limits:
            settings[key] = container.resources.limits[key]
    if int(service.ingress) in INGRESS_FROM_API:
        settings["ingress"] = INGRESS_FROM_API[int(service.ingress)]
    for key, value in service.labels.items():
        settings[f"labels.{key}"] = value
    return settings


def _bindings(policy: Any) -> dict[str, frozenset[str]]:
    """Role -> members of the unconditional bindings (conditional ones are not ours)."""
    bindings: dict[str, frozenset[str]] = {}
    for b in policy.bindings:
        if b.HasField("condition"):
            continue
        bindings[b.role] = bindings.get(b.role, frozenset()) | frozenset(b.members)
    return bindings


def _edit_env(container: Any, env_set: Mapping[str, EnvValue], remove: frozenset[str]) -> None:
    """Set/replace/remove variables in place; everything else keeps its value and order."""
    kept = [e for e in container.env if e.name not in remove]
    by_name = {e.name: e for e in kept}
    for name, value in env_set.items():
        e = by_name.get(name)
        if e is None:
            e = run_v2.EnvVar.pb()(name=name)
            kept.append(e)
        e.ClearField("value")
        e.ClearField("value_source")
        if value.secret is not None:
            e.value_source.secret_key_ref.secret = value.secret.secret
            e.value_source.secret_key_ref.version = value.secret.version
        else:
            e.value = value.value or ""
    new = [copy.deepcopy(e) for e in kept]
    del container.env[:]
    container.env.extend(new)


def _edit_settings(service: Any, container: Any, settings: Mapping[str, SettingValue]) -> None:
    t = service.template
    for key, value in settings.items():
        if key == "serviceAccount":
            t.service_account = str(value)
        elif key == "timeoutSeconds":
            t.timeout.CopyFrom(duration_pb2.Duration(seconds=int(value)))
        elif key == "minInstances":
            t.scaling.min_instance_count = int(value)
        elif key == "maxInstances":
            t.scaling.max_instance_count = int(value)
        elif key == "concurrency":
            t.max_instance_request_concurrency = int(value)
        elif key in ("cpu", "memory"):
            container.resources.limits[key] = str(value)
        elif key == "ingress":
            service.ingress = INGRESS_TO_API[str(value)]
        elif key.startswith("labels."):
            service.labels[key.removeprefix("labels.")] = str(value)
        else:
            raise ValueError(f"unknown setting {key}")


def _edit_policy(
    policy: policy_pb2.Policy, role: str, add: frozenset[str], remove: frozenset[str]
) -> policy_pb2.Policy | None:
    """The policy with the delta applied to ``role``'s unconditional binding; None if a no-op."""
    edited = policy_pb2.Policy()
    edited.CopyFrom(policy)
    binding = next(
        (b for b in edited.bindings if b.role == role and not b.HasField("condition")), None
    )
    current = set(binding.members) if binding is not None else set()
    wanted = (current - remove) | add
    if wanted == current:
        return None
    if binding is None:
        binding = edited.bindings.add(role=role)
    del binding.members[:]
    binding.members.extend(sorted(wanted))
    if not wanted:
        edited.bindings.remove(binding)
    if any(b.HasField("condition") for b in edited.bindings):
        edited.version = 3
    return edited


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
