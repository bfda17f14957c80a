"""IAM Credentials (service account impersonation) and who may touch which project.

``GenerateAccessToken`` issues an opaque token for a registered service account; a call that
presents it (``authorization: Bearer T``) is made as that account, so its writes carry the account
as their principal (``last_modifier``, audit entries), as with Google.
Request and response as in google/iam/credentials/v1/common.proto and the REST reference
(https://cloud.google.com/iam/docs/reference/credentials/rest/v1/projects.serviceAccounts/generateAccessToken):
``name`` is ``projects/-/serviceAccounts/{email}`` (the ``-`` wildcard is required), ``lifetime``
defaults to 3600 s and may not exceed it without the org policy that extends it; an unknown
account is NOT_FOUND.

Grants (admin API ``PUT /admin/grants``) say which projects a principal may touch: a principal
with grants is PERMISSION_DENIED on any other project, with Google's message for a missing
permission; a principal without grants may touch every project (the emulator's default).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from .. import names
from ..errors import ApiError, invalid, not_found
from .accounts import ServiceAccounts

MAX_LIFETIME = 3600
TOKEN_PREFIX = "ya29.emulator-"  # Google's OAuth access tokens start with ya29.


@dataclass(frozen=True)
class Token:
    principal: str
    expires: float  # time.time()


class Credentials:
    """Tokens issued by GenerateAccessToken, and the per-principal project grants."""

    def __init__(self, accounts: ServiceAccounts, clock: Callable[[], float] = time.time) -> None:
        self._accounts = accounts
        self._clock = clock
        self._tokens: dict[str, Token] = {}
        self.grants: dict[str, frozenset[str]] = {}  # lower-cased principal -> projects
        self.lifetime_cap: int | None = None  # admin: issue shorter tokens than asked for
        self.issued: dict[str, int] = {}  # lower-cased account -> tokens issued

    def generate(self, name: str, lifetime: float | None) -> tuple[str, float]:
        """A token for the account ``name`` names; returns (token, expiry as time.time())."""
        m = names.SA_NAME_RE.match(name or "")
        if m is None or m["project"] != "-":
            raise invalid(
                f"Invalid value for field 'name': '{name}'. Expected the form "
                "'projects/-/serviceAccounts/{email}'."
            )
        email = m["email"]
        if email.lower() not in self._accounts.by_email:
            raise not_found(f"Not found; Gaia id not found for email {email}")
        seconds = int(lifetime or MAX_LIFETIME)
        if not 0 < seconds <= MAX_LIFETIME:
            raise invalid(
                "The lifetime of an access token may not exceed 3600s (requested "
                f"{seconds}s) unless the constraints/iam.allowServiceAccountCredentialLifetime"
                "Extension organization policy allows it."
            )
        if self.lifetime_cap is not None:
            seconds = min(seconds, self.lifetime_cap)
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        expires = float(int(self._clock() + seconds))  # whole seconds, as reported
        self._tokens[token] = Token(email, expires)
        self.issued[email.lower()] = self.issued.get(email.lower(), 0) + 1
        return token, expires

    def principal_of(self, token: str) -> str | None:
        """The account a token was issued for; None for a token this emulator did not issue.
        An expired token is UNAUTHENTICATED, as Google refuses it."""
        found = self._tokens.get(token)
        if found is None:
            return None
        if found.expires <= self._clock():
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
        return found.principal

    def set_grants(self, principal: str, projects: Iterable[str]) -> None:
        if not isinstance(principal, str) or not principal:
            raise invalid("'principal' must be a non-empty string")
        self.grants[principal.lower()] = frozenset(projects)

    def check(self, principal: str, project: str | None, resource: str) -> None:
        """PERMISSION_DENIED when ``principal`` has grants and ``project`` is not among them."""
        allowed = self.grants.get(principal.lower())
        if allowed is None or project is None or project in allowed or "*" in allowed:
            return
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"Permission denied on resource '{resource}' (or it may not exist): {principal} "
            f"has no role on project {project}.",
        )

    def clear(self) -> None:
        self.grants.clear()
        self.lifetime_cap = None
