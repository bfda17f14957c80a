"""Services by full name, and the projects they live in: every part of the store finds a
service here, by a name that may use the project's number instead of its id."""

from __future__ import annotations

from .. import names
from ..errors import ApiError, not_found
from .accounts import ServiceAccounts
from .records import ServiceEntry


def missing(key: names.ServiceKey) -> ApiError:
    """NOT_FOUND as the v1 API (gcloud) words it; seen in gcloud output, e.g.
    GoogleCloudPlatform/generative-ai#1795: "Resource 'gemini-live-demo' of kind 'SERVICE' in
    region 'us-central1' in project '' does not exist." """
    return not_found(
        f"Resource '{key.service}' of kind 'SERVICE' in region '{key.region}' "
        f"in project '{key.project}' does not exist."
    )


def missing_v2(key: names.ServiceKey) -> ApiError:
    """NOT_FOUND as the v2 API words it (Config Connector's recording of real traffic,
    pkg/test/resourcefixture/testdata/basic/run/v1beta1/runservice/runservicebasic/_http.log:
    `service "projects/P/locations/R/services/S" not found`)."""
    return not_found(f'service "{key.name}" not found')


class Directory:
    def __init__(self, accounts: ServiceAccounts) -> None:
        self.services: dict[str, ServiceEntry] = {}
        # project number -> project id, so names may use either (as Cloud Run allows)
        self.numbers: dict[str, str] = {}
        self._accounts = accounts

    def resolve(self, key: names.ServiceKey) -> names.ServiceKey:
        if key.project.isdigit() and key.project in self.numbers:
            return names.ServiceKey(self.numbers[key.project], key.region, key.service)
        return key

    def entry(self, name: str, field_name: str = "name") -> ServiceEntry:
        """The service a request names; NOT_FOUND as Cloud Run words it."""
        key = self.resolve(names.parse_service_name(name, field_name))
        entry = self.services.get(key.name)
        if entry is None:
            raise missing_v2(key)
        return entry

    def register_project(self, project: str) -> None:
        """Remember the project's number and create its default compute service account."""
        number = names.project_number(project)
        if number not in self.numbers and not project.isdigit():
            self.numbers[number] = project
            self._accounts.put(names.default_compute_sa(project))
