"""The gateway's error vocabulary: Google's exceptions as a few kinds, each with its reason.

Messages name the object, never values. Everything above the gcp package sees only these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from google.api_core import exceptions as gexc

from controller.domain.model import Failure, Reason, Retry


class GatewayError(Exception):
    """A failed call to Google, as a condition reason and a message without values.

    A kind says its reason and retry class in its bases:
    ``class NotFound(GatewayError, reason=..., retry=...)`` (what it leaves out, it inherits).
    """

    reason: str = Reason.UNAVAILABLE
    retry: Retry = Retry.TRANSIENT

    def __init_subclass__(cls, *, reason: str | None = None, retry: Retry | None = None) -> None:
        super().__init_subclass__()
        if reason is not None:
            cls.reason = reason
        if retry is not None:
            cls.retry = retry

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def failure(self) -> Failure:
        return Failure(self.reason, self.message, self.retry)


class NotFound(GatewayError, reason=Reason.SERVICE_NOT_FOUND, retry=Retry.RESYNC): ...


class ServiceAccountMissing(
    GatewayError, reason=Reason.SERVICE_ACCOUNT_NOT_FOUND, retry=Retry.RESYNC
): ...


class PermissionDenied(GatewayError, reason=Reason.PERMISSION_DENIED, retry=Retry.RESYNC): ...


class QuotaExceeded(GatewayError, reason=Reason.QUOTA_EXCEEDED, retry=Retry.QUOTA): ...


class Unavailable(GatewayError, reason=Reason.UNAVAILABLE): ...


class NotLeader(GatewayError, reason=Reason.UNAVAILABLE):
    """A write held back: this replica no longer holds a valid leader Lease (fencing)."""


class Conflict(GatewayError, reason=Reason.CONFLICT): ...


class AlreadyExists(GatewayError, reason=Reason.ALREADY_EXISTS, retry=Retry.SLOWLY):
    """Cloud Run refused a write because something of that name exists (for UpdateService: a
    revision named in ``template.revision`` with a different template). Not transient: the same
    write fails the same way until someone changes it."""


class RevisionFailed(GatewayError, reason=Reason.REVISION_FAILED, retry=Retry.SLOWLY): ...


class Invalid(GatewayError, reason=Reason.INVALID_SPEC, retry=Retry.SLOWLY):
    """Google refused the request as invalid (or the spec names something the service lacks)."""


def retry_delay(exc: gexc.GoogleAPICallError) -> float:
    """The delay Google's RetryInfo asks for (0 without one). Over gRPC a detail is the
    message; over REST api-core keeps it as JSON (``{"@type": ".../google.rpc.RetryInfo",
    "retryDelay": "5s"}``, the Duration's JSON form)."""
    for detail in exc.details or ():
        if isinstance(detail, dict):
            if str(detail.get("@type", "")).endswith("/google.rpc.RetryInfo"):
                try:
                    return float(str(detail.get("retryDelay", "0s")).removesuffix("s"))
                except ValueError:
                    return 0.0
            continue
        delay = getattr(detail, "retry_delay", None)  # google.rpc.RetryInfo
        if delay is not None:
            return float(delay.seconds + delay.nanos / 1e9)
    return 0.0


def code_of(exc: gexc.GoogleAPICallError) -> str:
    code = exc.grpc_status_code
    return str(code.name) if code is not None else type(exc).__name__


def code_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return str(code.name)
    return str(number)


@contextmanager
def translate(what: str) -> Iterator[None]:
    """Google's exceptions -> the gateway's vocabulary. Messages name the object, not values."""
    try:
        yield
    except GatewayError:
        raise
    except gexc.NotFound as exc:
        raise NotFound(f"{what} not found", code_of(exc)) from exc
    except (gexc.PermissionDenied, gexc.Unauthenticated) as exc:
        raise PermissionDenied(f"permission denied on {what}: {exc.message}", code_of(exc)) from exc
    except gexc.ResourceExhausted as exc:
        raise QuotaExceeded(f"quota exceeded on {what}", code_of(exc)) from exc
    except gexc.AlreadyExists as exc:  # a subclass of Conflict (409), but never transient
        raise AlreadyExists(
            f"Cloud Run refused the change to {what}: ALREADY_EXISTS ({exc.message}); a "
            "revision name pinned in template.revision must change with the template "
            "(or be left empty)",
            code_of(exc),
        ) from exc
    except (gexc.Aborted, gexc.Conflict, gexc.FailedPrecondition) as exc:
        raise Conflict(f"concurrent change to {what}", code_of(exc)) from exc
    except gexc.InvalidArgument as exc:
        raise Invalid(f"Cloud Run refused the change to {what} as invalid", code_of(exc)) from exc
    except gexc.RetryError as exc:
        cause = exc.cause
        if isinstance(cause, gexc.Aborted):
            raise Conflict(f"{what} kept changing concurrently", code_of(cause)) from exc
        if isinstance(cause, gexc.ResourceExhausted):
            raise QuotaExceeded(
                f"quota exceeded on {what} (retries exhausted)", code_of(cause)
            ) from exc
        raise Unavailable(f"{what} unavailable (retries exhausted)", "UNAVAILABLE") from exc
    except gexc.GoogleAPICallError as exc:
        raise Unavailable(f"{what} unavailable ({code_of(exc)})", code_of(exc)) from exc
    except grpc.aio.AioRpcError as exc:
        raise Unavailable(f"{what} unavailable ({exc.code().name})", exc.code().name) from exc
    except TimeoutError as exc:
        raise Unavailable(f"{what} timed out", "DEADLINE_EXCEEDED") from exc
