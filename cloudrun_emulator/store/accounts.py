"""Service accounts (google.iam.admin.v1.IAM): register, remove, get, list, and the `actAs`
check a service's template account must pass."""

from __future__ import annotations

import os
from typing import Any

import grpc
from google.cloud import iam_admin_v1

from .. import names
from ..errors import ApiError, invalid, not_found

ServiceAccountPb = iam_admin_v1.ServiceAccount.pb()
ListServiceAccountsResponsePb = iam_admin_v1.ListServiceAccountsResponse.pb()


class ServiceAccounts:
    """Accounts by lower-cased email."""

    def __init__(self) -> None:
        self.by_email: dict[str, Any] = {}

    def put(self, email: str) -> tuple[Any, bool]:
        """Register (or re-register) an account; returns (ServiceAccount, created)."""
        if not names.EMAIL_RE.match(email):
            raise invalid(f"invalid service account email {email!r}")
        project = names.sa_project(email)
        sa = ServiceAccountPb(
            name=f"projects/{project}/serviceAccounts/{email}",
            project_id=project,
            unique_id=names.sa_unique_id(email),
            email=email,
            display_name=email.split("@", 1)[0],
            oauth2_client_id=names.sa_unique_id(email),
            etag=b"\x00" + os.urandom(7),
        )
        created = email.lower() not in self.by_email
        self.by_email[email.lower()] = sa
        return sa, created

    def delete(self, email: str) -> None:
        if self.by_email.pop(email.lower(), None) is None:
            raise not_found(f"Unknown service account {email}")

    def get(self, name: str) -> Any:
        if not name:
            raise invalid("The request is missing the required field 'name'.")
        m = names.SA_NAME_RE.match(name)
        if m is None:
            raise invalid(
                f"Invalid value for field 'name': '{name}'. Expected the form "
                "'projects/{project}/serviceAccounts/{email}'."
            )
        sa = self.by_email.get(m["email"].lower())
        if sa is None or (m["project"] not in ("-", sa.project_id)):
            raise not_found("Unknown service account")
        return sa

    def list_page(self, name: str, page_size: int, page_token: str) -> Any:
        if not name.startswith("projects/") or "/" in name[len("projects/") :]:
            raise invalid(f"Invalid value for field 'name': '{name}'. Expected 'projects/{{p}}'.")
        project = name[len("projects/") :]
        accounts = sorted(
            (sa for sa in self.by_email.values() if project in ("-", sa.project_id)),
            key=lambda sa: sa.email,
        )
        start = int(page_token) if page_token.isdigit() else 0
        size = min(page_size or 100, 100)
        resp = ListServiceAccountsResponsePb()
        resp.accounts.extend(accounts[start : start + size])
        if start + size < len(accounts):
            resp.next_page_token = str(start + size)
        return resp

    def check_act_as(self, submitted: Any, current: Any | None) -> None:
        """A template's service account must exist, unless the service already runs as it."""
        sa = submitted.template.service_account
        if not sa:
            return
        if current is not None and current.template.service_account == sa:
            return
        if sa.lower() not in self.by_email:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Permission 'iam.serviceaccounts.actAs' denied on service account {sa} "
                "(or it may not exist).",
            )
