"""Resource names, identifiers and the derived values Cloud Run computes from them."""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass

from .errors import invalid

_PROJECT = r"(?:[a-z][a-z0-9-]{4,28}[a-z0-9]|\d{1,20})"
_REGION = r"[a-z]+(?:-[a-z]+)+\d+"
_SERVICE = r"[a-z](?:[-a-z0-9]{0,47}[a-z0-9])?"

SERVICE_NAME_RE = re.compile(
    rf"^projects/(?P<project>{_PROJECT})/locations/(?P<region>{_REGION})"
    rf"/services/(?P<service>{_SERVICE})$"
)
PARENT_RE = re.compile(rf"^projects/(?P<project>{_PROJECT})/locations/(?P<region>{_REGION}|-)$")
PROJECT_RE = re.compile(rf"^{_PROJECT}$")
REGION_RE = re.compile(rf"^{_REGION}$")
SERVICE_ID_RE = re.compile(rf"^{_SERVICE}$")
OPERATION_RE = re.compile(rf"^projects/{_PROJECT}/locations/{_REGION}/operations/[A-Za-z0-9-]+$")
SA_NAME_RE = re.compile(r"^projects/(?P<project>[^/]+)/serviceAccounts/(?P<email>[^/]+)$")
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")

# Cloud Run's short region codes in *.a.run.app hosts (the rest fall back to initials).
_REGION_ABBREV = {
    "us-central1": "uc",
    "us-east1": "ue",
    "us-east4": "uk",
    "us-west1": "uw",
    "us-west2": "wl",
    "europe-west1": "ew",
    "europe-west2": "nw",
    "europe-west3": "ey",
    "europe-west4": "ez",
    "asia-east1": "de",
    "asia-northeast1": "an",
    "australia-southeast1": "ts",
}


@dataclass(frozen=True, slots=True)
class ServiceKey:
    """project / region / service, with the full resource name."""

    project: str
    region: str
    service: str

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.region}/services/{self.service}"

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def revision_name(self, revision: str) -> str:
        """A revision's full resource name, as Service.latest_ready_revision and
        latest_created_revision carry it (a `run.googleapis.com/Revision` reference in
        google/cloud/run/v2/service.proto; Config Connector's recording of real traffic,
        runservicebasic/_vcr_cassettes/tf.yaml: `projects/P/locations/R/services/S/revisions/
        S-00001-vqh`)."""
        return f"{self.name}/revisions/{revision}"


def short_revision(name: str) -> str:
    """`projects/…/revisions/S-00001-abc` (or already `S-00001-abc`) -> `S-00001-abc`."""
    return name.rsplit("/", 1)[-1]


def parse_service_name(name: str, field: str = "name") -> ServiceKey:
    """Parse `projects/P/locations/R/services/S`; INVALID_ARGUMENT when malformed."""
    if not name:
        raise invalid(f"The request is missing the required field '{field}'.")
    m = SERVICE_NAME_RE.match(name)
    if m is None:
        raise invalid(
            f"Invalid value for field '{field}': '{name}'. Expected the form "
            "'projects/{project}/locations/{location}/services/{service}'."
        )
    return ServiceKey(m["project"], m["region"], m["service"])


def service_key(project: str, region: str, service: str) -> ServiceKey:
    """Validate the three parts (used by the admin API and the seed file)."""
    if not PROJECT_RE.match(project):
        raise invalid(f"invalid project id {project!r}")
    if not REGION_RE.match(region):
        raise invalid(f"invalid region {region!r}")
    if not SERVICE_ID_RE.match(service):
        raise invalid(
            f"invalid service name {service!r}: must be an RFC 1035 label of at most 49 "
            "characters (lowercase letters, digits, hyphens; starts with a letter)"
        )
    return ServiceKey(project, region, service)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def project_number(project: str) -> str:
    """A stable 12-digit project number for a project id (numbers map to themselves)."""
    if project.isdigit():
        return project
    return str(100_000_000_000 + int.from_bytes(_digest(project)[:8], "big") % 900_000_000_000)


def default_compute_sa(project: str) -> str:
    return f"{project_number(project)}-compute@developer.gserviceaccount.com"


def _project_hash(project: str) -> str:
    alphabet = string.ascii_lowercase + string.digits
    raw = int.from_bytes(_digest("uri:" + project)[:8], "big")
    out = []
    for _ in range(10):
        raw, i = divmod(raw, len(alphabet))
        out.append(alphabet[i])
    return "".join(out)


def region_abbrev(region: str) -> str:
    if region in _REGION_ABBREV:
        return _REGION_ABBREV[region]
    parts = region.split("-")
    return (parts[0][:1] + parts[-1][:1]).lower()


def service_uri(key: ServiceKey) -> str:
    """The legacy-style URL: https://<name>-<hash>-<region-abbrev>.a.run.app."""
    return (
        f"https://{key.service}-{_project_hash(key.project)}-{region_abbrev(key.region)}.a.run.app"
    )


def service_urls(key: ServiceKey) -> list[str]:
    return [
        f"https://{key.service}-{project_number(key.project)}.{key.region}.run.app",
        service_uri(key),
    ]


def sa_project(email: str) -> str:
    """The project a service account belongs to, from its email."""
    local, _, domain = email.partition("@")
    if domain.endswith(".iam.gserviceaccount.com"):
        return domain.removesuffix(".iam.gserviceaccount.com")
    if domain == "developer.gserviceaccount.com":
        return local.split("-", 1)[0]
    if domain == "appspot.gserviceaccount.com":
        return local
    return "-"


def sa_unique_id(email: str) -> str:
    return str(100_000_000_000_000_000_000 + int.from_bytes(_digest("sa:" + email)[:8], "big"))
