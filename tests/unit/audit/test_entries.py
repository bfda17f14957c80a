"""controller.audit.entries: LogEntry JSON -> the write it records; own writes told apart.
Table-driven."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.audit.entries import AuditEntry, Ignored, Result, parse, parse_entry
from controller.audit.provenance import Origin, OwnWrites, normalize_principal
from controller.domain.model import ServiceRef, WriteRecord

REF = ServiceRef("nba-props-platform", "us-west2", "phase3-to-phase4")
V2_NAME = "projects/nba-props-platform/locations/us-west2/services/phase3-to-phase4"
ETAG = b"\x00\x01\x02\x03\x04\x05\x06\x07"
STAMP = datetime(2026, 11, 28, 18, 0, 0, 123456, tzinfo=UTC).timestamp()


def v2_update(**over: Any) -> dict[str, Any]:
    """A v2 UpdateService entry as Cloud Audit Logs writes it (the operation's last entry)."""
    entry: dict[str, Any] = {
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "status": {},
            "authenticationInfo": {"principalEmail": "deployer@example.com"},
            "serviceName": "run.googleapis.com",
            "methodName": "google.cloud.run.v2.Services.UpdateService",
            "resourceName": V2_NAME,
            "request": {"service": {"name": V2_NAME}},
            "response": {
                "@type": "type.googleapis.com/google.cloud.run.v2.Service",
                "name": V2_NAME,
                "generation": "7",
            },
            "resourceLocation": {"currentLocations": ["us-west2"]},
        },
        "insertId": "abc123",
        "resource": {
            "type": "cloud_run_revision",
            "labels": {
                "project_id": "nba-props-platform",
                "location": "us-west2",
                "service_name": "phase3-to-phase4",
                "revision_name": "",
                "configuration_name": "",
            },
        },
        "timestamp": "2026-11-28T18:00:00.123456789Z",
        "logName": "projects/nba-props-platform/logs/cloudaudit.googleapis.com%2Factivity",
        "operation": {"id": "op-1", "producer": "run.googleapis.com", "last": True},
    }
    for path, value in over.items():
        target = entry
        *parents, leaf = path.split("__")
        for p in parents:
            target = target.setdefault(p, {})
        if value is _DELETE:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return entry


_DELETE = object()


def v1_replace() -> dict[str, Any]:
    """`gcloud run deploy` (v1 ReplaceService): no operation, knative Service in the response."""
    entry = v2_update(
        protoPayload__methodName="google.cloud.run.v1.Services.ReplaceService",
        protoPayload__resourceName="namespaces/nba-props-platform/services/phase3-to-phase4",
        protoPayload__request={"name": "namespaces/nba-props-platform/services/phase3-to-phase4"},
        protoPayload__response={
            "@type": "type.googleapis.com/google.cloud.run.v1.Service",
            "metadata": {"name": "phase3-to-phase4", "generation": 7},
        },
        operation=_DELETE,
    )
    return entry


def set_iam(version: str = "v2", etag: bytes = ETAG) -> dict[str, Any]:
    return v2_update(
        protoPayload__methodName=f"google.cloud.run.{version}.Services.SetIamPolicy",
        protoPayload__request={"resource": V2_NAME},
        protoPayload__response={
            "@type": "type.googleapis.com/google.iam.v1.Policy",
            "bindings": [{"role": "roles/run.invoker", "members": ["user:a@example.com"]}],
            "etag": base64.b64encode(etag).decode(),
        },
        operation=_DELETE,
    )


def without_labels(entry: dict[str, Any]) -> dict[str, Any]:
    entry = copy.deepcopy(entry)
    del entry["resource"]["labels"]
    return entry


# ---------------------------------------------------------------------- what counts


@pytest.mark.parametrize(
    ("entry", "method", "generation", "etag"),
    [
        (v2_update(), "google.cloud.run.v2.Services.UpdateService", 7, None),
        (v1_replace(), "google.cloud.run.v1.Services.ReplaceService", 7, None),
        (set_iam("v2"), "google.cloud.run.v2.Services.SetIamPolicy", None, ETAG),
        (set_iam("v1"), "google.cloud.run.v1.Services.SetIamPolicy", None, ETAG),
        (
            v2_update(protoPayload__methodName="google.cloud.run.v2.Services.CreateService"),
            "google.cloud.run.v2.Services.CreateService",
            7,
            None,
        ),
        (
            v2_update(protoPayload__methodName="google.cloud.run.v2.Services.DeleteService"),
            "google.cloud.run.v2.Services.DeleteService",
            7,
            None,
        ),
        # A v2 Operation as the response: its metadata is the Service.
        (
            v2_update(
                protoPayload__response={
                    "@type": "type.googleapis.com/google.longrunning.Operation",
                    "metadata": {"generation": "9"},
                }
            ),
            "google.cloud.run.v2.Services.UpdateService",
            9,
            None,
        ),
    ],
    ids=["v2-update", "v1-replace", "v2-iam", "v1-iam", "v2-create", "v2-delete", "v2-op"],
)
def test_write_entries_are_read(
    entry: dict[str, Any], method: str, generation: int | None, etag: bytes | None
) -> None:
    parsed = parse(json.dumps(entry).encode())
    assert isinstance(parsed, AuditEntry), parsed
    assert parsed.ref == REF
    assert parsed.method == method
    assert parsed.principal == "deployer@example.com"
    assert parsed.generation == generation
    assert parsed.iam_etag == etag
    assert parsed.insert_id == "abc123"
    assert parsed.timestamp == pytest.approx(STAMP, abs=1e-5)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (v2_update(protoPayload__serviceName="iam.googleapis.com"), "service iam.googleapis.com"),
        (
            v2_update(protoPayload__methodName="google.cloud.run.v2.Services.GetService"),
            "method google.cloud.run.v2.Services.GetService",
        ),
        (
            v2_update(protoPayload__methodName="google.cloud.run.v1.Services.UpdateService"),
            "method google.cloud.run.v1.Services.UpdateService",  # v1 has ReplaceService
        ),
        (v2_update(protoPayload__status={"code": 9, "message": "rollout"}), "failed call"),
        (v2_update(operation={"id": "op-1", "first": True}), "not the last entry"),
        (v2_update(operation={"id": "op-1"}), "not the last entry"),
    ],
    ids=["other-api", "read", "v1-update", "failed", "op-first", "op-middle"],
)
def test_entries_of_no_concern_are_unmatched(entry: dict[str, Any], why: str) -> None:
    parsed = parse_entry(entry)
    assert isinstance(parsed, Ignored)
    assert parsed.result is Result.UNMATCHED
    assert why in parsed.why


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'"a string"',
        b"{}",
        json.dumps({"textPayload": "hello"}).encode(),
        json.dumps(v2_update(protoPayload__methodName=_DELETE)).encode(),
        json.dumps(v2_update(protoPayload__methodName=5)).encode(),
        json.dumps(v2_update(protoPayload__status="broken")).encode(),
        json.dumps(v2_update(operation="last")).encode(),
        json.dumps(v2_update(protoPayload__authenticationInfo="someone")).encode(),
        # A write that names no service anywhere.
        json.dumps(
            without_labels(v2_update(protoPayload__resourceName="", protoPayload__request={}))
        ).encode(),
    ],
)
def test_malformed_messages(data: bytes) -> None:
    parsed = parse(data)
    assert isinstance(parsed, Ignored)
    assert parsed.result is Result.MALFORMED


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_never_raises(data: bytes) -> None:
    assert isinstance(parse(data), AuditEntry | Ignored)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "protoPayload",
                        "serviceName",
                        "methodName",
                        "status",
                        "code",
                        "operation",
                        "last",
                        "resource",
                        "labels",
                        "resourceName",
                        "request",
                        "response",
                        "name",
                        "generation",
                        "etag",
                        "authenticationInfo",
                        "principalEmail",
                        "timestamp",
                    ]
                ),
                children,
                max_size=6,
            )
        ),
        max_leaves=30,
    )
)
def test_parse_entry_never_raises_on_odd_shapes(entry: Any) -> None:
    assert isinstance(parse_entry(entry), AuditEntry | Ignored)


# ---------------------------------------------------------------------- the service key


def test_key_falls_back_to_v2_resource_name() -> None:
    parsed = parse_entry(without_labels(v2_update()))
    assert isinstance(parsed, AuditEntry)
    assert parsed.ref == REF


def test_key_falls_back_to_v1_request_name_with_the_resource_location() -> None:
    entry = without_labels(v1_replace())
    entry["protoPayload"]["resourceName"] = ""
    parsed = parse_entry(entry)
    assert isinstance(parsed, AuditEntry)
    assert parsed.ref == REF


def test_key_from_v1_name_needs_a_region() -> None:
    entry = without_labels(v1_replace())
    del entry["protoPayload"]["resourceLocation"]
    parsed = parse_entry(entry)
    assert isinstance(parsed, Ignored)
    assert parsed.result is Result.MALFORMED


def test_key_from_v2_create_parent_and_service_id() -> None:
    entry = without_labels(
        v2_update(
            protoPayload__methodName="google.cloud.run.v2.Services.CreateService",
            protoPayload__resourceName="projects/nba-props-platform/locations/us-west2",
            protoPayload__request={
                "parent": "projects/nba-props-platform/locations/us-west2",
                "serviceId": "phase3-to-phase4",
            },
        )
    )
    parsed = parse_entry(entry)
    assert isinstance(parsed, AuditEntry)
    assert parsed.ref == REF


def test_labels_win_over_names() -> None:
    entry = v2_update(protoPayload__resourceName="projects/x/locations/y/services/z")
    parsed = parse_entry(entry)
    assert isinstance(parsed, AuditEntry)
    assert parsed.ref == REF


def test_odd_details_do_not_make_an_entry_malformed() -> None:
    entry = v2_update(timestamp="yesterday", protoPayload__response="opaque")
    del entry["protoPayload"]["authenticationInfo"]
    parsed = parse_entry(entry)
    assert isinstance(parsed, AuditEntry)
    assert (parsed.timestamp, parsed.generation, parsed.principal) == (None, None, "")


def test_url_safe_etag() -> None:
    etag = b"\xfb\xff\xfe\x00"
    entry = set_iam(etag=etag)
    entry["protoPayload"]["response"]["etag"] = base64.urlsafe_b64encode(etag).decode()
    parsed = parse_entry(entry)
    assert isinstance(parsed, AuditEntry)
    assert parsed.iam_etag == etag


# ---------------------------------------------------------------------- own writes


def entry_by(principal: str, **kw: Any) -> AuditEntry:
    base = {
        "ref": REF,
        "method": "google.cloud.run.v2.Services.UpdateService",
        "principal": principal,
        "generation": 7,
    }
    return AuditEntry(**{**base, **kw})


@pytest.mark.parametrize(
    ("principal", "recorded", "entry", "origin"),
    [
        # someone else, whatever Runwarden wrote
        ("runwarden@example.com", WriteRecord(7), entry_by("deployer@example.com"), Origin.FOREIGN),
        # own identity, the write Runwarden recorded, or an older one
        ("runwarden@example.com", WriteRecord(7), entry_by("runwarden@example.com"), Origin.OWN),
        ("runwarden@example.com", WriteRecord(9), entry_by("runwarden@example.com"), Origin.OWN),
        # own identity, newer than the record: not yet known
        (
            "runwarden@example.com",
            WriteRecord(6),
            entry_by("runwarden@example.com"),
            Origin.UNCONFIRMED,
        ),
        ("runwarden@example.com", None, entry_by("runwarden@example.com"), Origin.UNCONFIRMED),
        (
            "runwarden@example.com",
            WriteRecord(7),
            entry_by("runwarden@example.com", generation=None),
            Origin.UNCONFIRMED,
        ),
        # case and member prefixes do not matter
        (
            "serviceAccount:Runwarden@Example.com",
            WriteRecord(7),
            entry_by("runwarden@example.com"),
            Origin.OWN,
        ),
        # IAM: by etag
        (
            "runwarden@example.com",
            WriteRecord(iam_etag=ETAG),
            entry_by(
                "runwarden@example.com",
                method="google.cloud.run.v2.Services.SetIamPolicy",
                generation=None,
                iam_etag=ETAG,
            ),
            Origin.OWN,
        ),
        (
            "runwarden@example.com",
            WriteRecord(iam_etag=b"other"),
            entry_by(
                "runwarden@example.com",
                method="google.cloud.run.v2.Services.SetIamPolicy",
                generation=None,
                iam_etag=ETAG,
            ),
            Origin.UNCONFIRMED,
        ),
        # Runwarden never creates or deletes services
        (
            "runwarden@example.com",
            WriteRecord(7),
            entry_by("runwarden@example.com", method="google.cloud.run.v2.Services.DeleteService"),
            Origin.FOREIGN,
        ),
        # unknown own identity: everything is someone else's
        (None, WriteRecord(7), entry_by("runwarden@example.com"), Origin.FOREIGN),
    ],
)
def test_origin(
    principal: str | None, recorded: WriteRecord | None, entry: AuditEntry, origin: Origin
) -> None:
    own = OwnWrites(principal)
    own.record(REF, recorded)
    assert own.origin(entry) is origin


def test_recorded_generation_only_grows_and_old_etags_are_remembered() -> None:
    own = OwnWrites("runwarden@example.com", keep_etags=2)
    own.record(REF, WriteRecord(generation=9))
    own.record(REF, WriteRecord(generation=None, iam_etag=b"a"))  # an IAM-only write
    own.record(REF, WriteRecord(generation=8, iam_etag=b"b"))
    assert own.origin(entry_by("runwarden@example.com", generation=9)) is Origin.OWN
    iam = "google.cloud.run.v2.Services.SetIamPolicy"
    for tag in (b"a", b"b"):
        e = entry_by("runwarden@example.com", method=iam, generation=None, iam_etag=tag)
        assert own.origin(e) is Origin.OWN
    own.record(REF, WriteRecord(iam_etag=b"c"))  # keeps the last two
    e = entry_by("runwarden@example.com", method=iam, generation=None, iam_etag=b"a")
    assert own.origin(e) is Origin.UNCONFIRMED
    other = ServiceRef("p-other", "us-west2", "x")
    assert own.origin(entry_by("runwarden@example.com", ref=other)) is Origin.UNCONFIRMED


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("runwarden@example.com", "runwarden@example.com"),
        (
            "serviceAccount:RunWarden@p.iam.gserviceaccount.com",
            "runwarden@p.iam.gserviceaccount.com",
        ),
        (" user:A@B.c ", "a@b.c"),
    ],
)
def test_normalize_principal(raw: str, norm: str) -> None:
    assert normalize_principal(raw) == norm


# ---------------------------------------------------------------------- the emulator's entries


def test_reads_what_the_emulator_publishes() -> None:
    """The emulator's LogEntry JSON (cloudrun_emulator.audit) for the four write shapes."""
    from google.cloud.run_v2.types import Service
    from google.iam.v1 import policy_pb2

    from cloudrun_emulator.audit import log_entry
    from cloudrun_emulator.events import AuditEvent
    from cloudrun_emulator.names import ServiceKey

    key = ServiceKey(REF.project, REF.region, REF.name)
    svc = Service.pb(Service(name=REF.resource_name, generation=4))
    policy = policy_pb2.Policy(etag=ETAG)
    v2 = "google.cloud.run.v2.Services."
    v1 = "google.cloud.run.v1.Services."
    cases = [
        (
            AuditEvent(
                v2 + "UpdateService", key, "runwarden@example.com", {}, svc, "op", last=True
            ),
            4,
            None,
        ),
        (AuditEvent(v2 + "SetIamPolicy", key, "runwarden@example.com", {}, policy), None, ETAG),
        (AuditEvent(v1 + "ReplaceService", key, "deployer@example.com", {}, svc), 4, None),
        (AuditEvent(v1 + "SetIamPolicy", key, "deployer@example.com", {}, policy), None, ETAG),
    ]
    for event, generation, etag in cases:
        parsed = parse(json.dumps(log_entry(event)))
        assert isinstance(parsed, AuditEntry), (event.method, parsed)
        assert (parsed.ref, parsed.method, parsed.principal) == (REF, event.method, event.principal)
        assert (parsed.generation, parsed.iam_etag) == (generation, etag)
        assert parsed.timestamp is not None
    first = AuditEvent(v2 + "UpdateService", key, "x@example.com", {}, svc, "op", first=True)
    assert isinstance(parse(json.dumps(log_entry(first))), Ignored)


def test_importable_without_google_kopf_or_asyncio() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('google', 'kopf', 'grpc', 'asyncio'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import controller.audit.entries, controller.audit.fights\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
