"""The reconcile's vocabulary: what the spec wants, what GCP holds, and what to change.

Frozen dataclasses, no I/O. Everything downstream of the CR body and upstream of the Google
clients speaks these types, so the planner can be tested without either.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# A managed setting's value in the CRD's own units: ints for counts and seconds, strings for
# cpu/memory/ingress/serviceAccount and for each label (flattened as "labels.<key>").
SettingValue = int | str

DEFAULT_ROLE = "roles/run.invoker"
PUBLIC_MEMBERS = frozenset({"allUsers", "allAuthenticatedUsers"})
# Runwarden's revision-template annotation: a new value makes Cloud Run create a new revision from
# an otherwise identical template (how a failed rollout is retried).
ROLLOUT_ATTEMPT_ANNOTATION = "runwarden.dev/rollout-attempt"
# The claim on a service (CONTRACT §6.1): SERVICE-level annotations (Service.annotations, not the
# revision template's), so setting them never makes a revision. OWNER_ANNOTATION holds
# "<cluster>/<namespace>/<name>" of the one Orchestrator that owns the service; OWNED_ANNOTATION
# holds, as compact JSON, the names it owns: {"env":[names],"invokers":{role:[members]}}.
OWNER_ANNOTATION = "runwarden.dev/owner"
OWNED_ANNOTATION = "runwarden.dev/owned"


class Mode(enum.StrEnum):
    ENFORCE = "Enforce"
    OBSERVE = "Observe"


class EnvPolicy(enum.StrEnum):
    MERGE = "Merge"
    AUTHORITATIVE = "Authoritative"


class InvokerPolicy(enum.StrEnum):
    ADDITIVE = "Additive"
    AUTHORITATIVE = "Authoritative"


class DeletionPolicy(enum.StrEnum):
    ABANDON = "Abandon"
    REVOKE = "Revoke"


class Aspect(enum.StrEnum):
    """The three things an Orchestrator manages; each has its own condition and metric label."""

    ENV = "env"
    INVOKERS = "invokers"
    SETTINGS = "settings"


# The aspects the one UpdateService writes (and a failed rollout leaves not serving).
SERVICE_ASPECTS = frozenset({Aspect.ENV, Aspect.SETTINGS})


@dataclass(frozen=True)
class ServiceRef:
    project: str
    region: str
    name: str

    @property
    def resource_name(self) -> str:
        """The Cloud Run v2 resource name."""
        return f"projects/{self.project}/locations/{self.region}/services/{self.name}"

    def __str__(self) -> str:
        return f"{self.project}/{self.region}/{self.name}"


@dataclass(frozen=True)
class SecretRef:
    secret: str
    version: str = "latest"


@dataclass(frozen=True)
class EnvValue:
    """One variable's value: a literal or a Secret Manager reference (exactly one is set)."""

    value: str | None = None
    secret: SecretRef | None = None

    @classmethod
    def literal(cls, value: str) -> EnvValue:
        return cls(value=value)

    @classmethod
    def from_secret(cls, secret: str, version: str = "latest") -> EnvValue:
        return cls(secret=SecretRef(secret, version))


@dataclass(frozen=True)
class Policy:
    mode: Mode = Mode.ENFORCE
    env: EnvPolicy = EnvPolicy.MERGE
    invokers: InvokerPolicy = InvokerPolicy.ADDITIVE
    deletion: DeletionPolicy = DeletionPolicy.ABANDON
    resync_seconds: float = 60.0
    allow_public_invokers: bool = False
    take_over: bool = False  # spec.policy.takeOver: claim a service another owner holds


@dataclass(frozen=True)
class Desired:
    """What one Orchestrator declares, validated."""

    ref: ServiceRef
    container: str = ""  # "" = the ingress container, or the only one
    env: Mapping[str, EnvValue] = field(default_factory=dict)
    role: str = DEFAULT_ROLE
    invokers: frozenset[str] = frozenset()
    settings: Mapping[str, SettingValue] = field(default_factory=dict)
    policy: Policy = Policy()
    # "<cluster>/<namespace>/<name>": the claim this Orchestrator puts on the service
    # (OWNER_ANNOTATION). "" = no claims (only pure unit tests build a Desired without one).
    owner: str = ""


# An owned invoker grant: (role, member). The role is kept so that a role edit or a revocation
# removes the grant from the role it was made under.
Grant = tuple[str, str]


@dataclass(frozen=True)
class Managed:
    """What this Orchestrator owns in GCP (status.managed, and the OWNED_ANNOTATION on the
    service): the names it may prune or revoke."""

    env: frozenset[str] = frozenset()
    grants: frozenset[Grant] = frozenset()

    @classmethod
    def of(
        cls,
        env: frozenset[str] = frozenset(),
        role: str = DEFAULT_ROLE,
        members: frozenset[str] = frozenset(),
    ) -> Managed:
        """Env names and members of one role."""
        return cls(frozenset(env), frozenset((role, m) for m in members))

    @property
    def invokers(self) -> frozenset[str]:
        """Owned members, whatever their role."""
        return frozenset(m for _, m in self.grants)

    @property
    def roles(self) -> frozenset[str]:
        return frozenset(r for r, _ in self.grants)

    def members(self, role: str) -> frozenset[str]:
        """Owned members of one role."""
        return frozenset(m for r, m in self.grants if r == role)

    def union(self, other: Managed) -> Managed:
        return Managed(self.env | other.env, self.grants | other.grants)

    @property
    def empty(self) -> bool:
        return not (self.env or self.grants)


class RolloutState(enum.StrEnum):
    """Where the service's latest revision stands (Cloud Run's reconciling / terminal condition)."""

    READY = "ready"  # the latest created revision is ready (or there is nothing to tell)
    IN_PROGRESS = "in-progress"  # a rollout is under way (Service.reconciling)
    FAILED = "failed"  # the rollout finished and the latest created revision is not ready


@dataclass(frozen=True)
class Rollout:
    """The service's rollout as observed: whether the template's newest revision serves."""

    state: RolloutState = RolloutState.READY
    latest_created_revision: str = ""  # short name, e.g. svc-00007-xyz
    attempt: int = 0  # the template's ROLLOUT_ATTEMPT_ANNOTATION (0 = none, or not a number)

    @property
    def failed(self) -> bool:
        return self.state is RolloutState.FAILED


@dataclass(frozen=True)
class RolloutRetry:
    """Write the template again with ROLLOUT_ATTEMPT_ANNOTATION set to ``attempt``: Cloud Run
    makes a new revision only when the template changes."""

    failed_revision: str  # the revision that failed (for messages)
    attempt: int


@dataclass(frozen=True)
class TrafficShare:
    """One entry of the service's traffic_statuses: where a share of requests goes."""

    revision: str  # short name; for a LATEST target, the latest ready revision
    percent: int
    latest: bool = False  # TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST (follows new revisions)
    tag: str = ""


@dataclass(frozen=True)
class Claim:
    """What the reconcile writes on the service with its first write: the owner and the owned
    names (None = leave the annotations as they are). ``release`` removes both."""

    owner: str
    owned: Managed
    release: bool = False


@dataclass(frozen=True)
class Observed:
    """What GCP holds for one service, in the CRD's vocabulary.

    ``service_handle``/``policy_handle`` carry the gateway's raw objects (proto messages) so a
    write can start from exactly what was read; nothing outside the gateway looks inside them.
    """

    ref: ServiceRef
    container: str
    env: Mapping[str, EnvValue]
    settings: Mapping[str, SettingValue]
    bindings: Mapping[str, frozenset[str]]  # role -> members (unconditional bindings only)
    uri: str = ""
    # role -> members of the role's conditional bindings: never ours to change, but a member
    # that holds a role only under a condition is worth saying (see plan.notes).
    conditional: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Cloud Run v2 Service.invoker_iam_disabled: anyone may invoke, IAM is not checked.
    invoker_iam_disabled: bool = False
    latest_ready_revision: str = ""
    generation: int = 0
    iam_etag: bytes = b""
    rollout: Rollout = Rollout()
    owner: str = ""  # OWNER_ANNOTATION on the service ("" = unclaimed)
    owned: Managed | None = None  # OWNED_ANNOTATION (None = absent or unreadable)
    traffic: tuple[TrafficShare, ...] = ()  # Service.traffic_statuses, LATEST resolved
    # Service.last_modifier (output only): the principal of the service's last change. IAM
    # policy changes do not set it (they are not changes of the Service resource).
    last_modifier: str = ""
    service_handle: object = field(default=None, compare=False, repr=False)
    policy_handle: object = field(default=None, compare=False, repr=False)

    def members(self, role: str) -> frozenset[str]:
        return self.bindings.get(role, frozenset())


class ChangeKind(enum.StrEnum):
    MISSING = "missing"  # declared, absent
    CHANGED = "changed"  # declared, present with another value
    UNDECLARED = "not declared"  # Authoritative: present, never declared by anyone here
    PRUNED = "no longer declared"  # owned earlier, dropped from the spec
    # Declared, but holds the role only under an IAM condition (granted unconditionally).
    CONDITIONAL_ONLY = "holds the role only under a condition"
    # Service.invoker_iam_disabled is true: IAM is not checked, anyone can invoke.
    IAM_DISABLED = "true: anyone can invoke, invoker IAM is not checked"


_ASPECT_WORD = {Aspect.ENV: "env", Aspect.INVOKERS: "invoker", Aspect.SETTINGS: "setting"}


@dataclass(frozen=True, order=True)
class Change:
    """One difference between spec and service. Its text names the field, never a value."""

    aspect: Aspect
    name: str
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{_ASPECT_WORD[self.aspect]} {self.name} {self.kind}"


# Change.name of the service's invoker_iam_disabled field.
INVOKER_IAM_DISABLED = "invokerIamDisabled"


@dataclass(frozen=True, order=True)
class Note:
    """Something a check found worth saying that is not a change it makes (names, no values):
    it goes into the aspect's condition message and, as ``reason``, a Warning Event."""

    aspect: Aspect
    reason: str
    text: str


@dataclass(frozen=True)
class Plan:
    """The writes that make one service hold the spec: at most one UpdateService and one
    SetIamPolicy."""

    env_set: Mapping[str, EnvValue] = field(default_factory=dict)
    env_remove: frozenset[str] = frozenset()
    settings_set: Mapping[str, SettingValue] = field(default_factory=dict)
    role: str = DEFAULT_ROLE
    invokers_add: frozenset[str] = frozenset()
    invokers_remove: frozenset[str] = frozenset()
    # Owned grants to remove under roles other than ``role`` (spec.invokers.role was edited):
    # written in the same SetIamPolicy.
    grants_remove: frozenset[Grant] = frozenset()
    changes: tuple[Change, ...] = ()
    managed: Managed = Managed()  # status.managed once the plan is applied
    # The latest revision failed: the UpdateService also retries the rollout (even if it changes
    # nothing else).
    rollout_retry: RolloutRetry | None = None
    # Set Service.invoker_iam_disabled to this in the UpdateService (None: leave it).
    invoker_iam_disabled: bool | None = None
    notes: tuple[Note, ...] = ()
    # The service-level claim annotations to write with the UpdateService (set by the reconcile
    # when it writes anyway and the claim on the service is not yet as it should be).
    claim: Claim | None = None

    @property
    def touches_service(self) -> bool:
        return bool(
            self.env_set
            or self.env_remove
            or self.settings_set
            or self.rollout_retry is not None
            or self.invoker_iam_disabled is not None
            or self.claim is not None
        )

    @property
    def service_aspects(self) -> frozenset[Aspect]:
        """The aspects the UpdateService writes (invokers too when it re-enables invoker IAM)."""
        aspects = self.aspects & SERVICE_ASPECTS
        if self.rollout_retry is not None:
            # The template holds env and settings, yet the revision made of it does not serve.
            aspects = SERVICE_ASPECTS
        if self.invoker_iam_disabled is not None:
            aspects |= {Aspect.INVOKERS}
        return frozenset(aspects)

    def note_lines(self, aspect: Aspect | None = None) -> list[str]:
        return [n.text for n in self.notes if aspect is None or n.aspect == aspect]

    @property
    def touches_iam(self) -> bool:
        return bool(self.invokers_add or self.invokers_remove or self.grants_remove)

    @property
    def empty(self) -> bool:
        return not (self.touches_service or self.touches_iam)

    @property
    def aspects(self) -> frozenset[Aspect]:
        return frozenset(c.aspect for c in self.changes)

    def lines(self, aspect: Aspect | None = None) -> list[str]:
        """Human-readable changes (names only), optionally for one aspect."""
        return [str(c) for c in self.changes if aspect is None or c.aspect == aspect]


class Reason(enum.StrEnum):
    """Condition reasons (CONTRACT §1)."""

    SYNCED = "Synced"
    DRIFT_REPAIRED = "DriftRepaired"
    DRIFT_DETECTED = "DriftDetected"
    SERVICE_NOT_FOUND = "ServiceNotFound"
    SERVICE_ACCOUNT_NOT_FOUND = "ServiceAccountNotFound"
    PERMISSION_DENIED = "PermissionDenied"
    QUOTA_EXCEEDED = "QuotaExceeded"
    UNAVAILABLE = "Unavailable"
    REVISION_FAILED = "RevisionFailed"
    VERIFICATION_FAILED = "VerificationFailed"
    INVALID_SPEC = "InvalidSpec"
    PUBLIC_INVOKER_REFUSED = "PublicInvokerRefused"
    ALREADY_EXISTS = "AlreadyExists"  # Cloud Run refused a write: that name exists already
    PROJECT_NOT_ALLOWED = "ProjectNotAllowed"  # the namespace's binding does not list the project
    CONFLICT = "Conflict"  # someone else wrote in between; retried shortly
    INTERNAL_ERROR = "InternalError"  # a bug in Runwarden; retried with backoff
    PROGRESSING = "Progressing"
    DRIFT_FIGHT = "DriftFight"  # someone keeps undoing the spec; repairs held (audit/fights.py)
    OWNED_ELSEWHERE = "OwnedElsewhere"  # another Orchestrator claims the service (§6.1)
    TRAFFIC_PINNED = "TrafficPinned"  # traffic serves a revision without the spec (§6.1)
    # Warning Events (not condition reasons): what a check saw and leaves alone.
    CONDITIONAL_BINDING = "ConditionalBinding"
    INVOKER_IAM_DISABLED = "InvokerIamDisabled"


@dataclass(frozen=True)
class Condition:
    """One condition as computed by a reconcile; kube/status_patch.py adds the timestamps."""

    type: str
    status: bool
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the Orchestrator."""

    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class DriftReport:
    """Drift found by one check at an unchanged spec (not a spec change being applied)."""

    detected: tuple[str, ...] = ()
    repaired: bool = False
    aspects: frozenset[Aspect] = frozenset()
    # Who changed the service, as its last_modifier said when the drift was read ("" when the
    # drift was IAM only, which last_modifier does not record, or it named nobody).
    by: str = ""


@dataclass(frozen=True)
class WriteRecord:
    """What a reconcile wrote to GCP, so later readers (the audit-log listener) can tell their own
    writes apart: the service generation after UpdateService and the IAM etag after
    SetIamPolicy."""

    generation: int | None = None
    iam_etag: bytes | None = None


class Retry(enum.StrEnum):
    """How soon to check again after a failure."""

    TRANSIENT = "transient"  # outage or conflict: capped exponential backoff, shorter than resync
    QUOTA = "quota"  # quota exceeded: back off harder
    RESYNC = "resync"  # needs someone to act (service, SA, permission): from resync, doubling
    SLOWLY = "slowly"  # a write keeps failing for good (rollout failed): back off beyond resync
    # A write whose read-back does not hold the spec: the same difference again and again is a
    # normalisation Runwarden does not know, and each retry is one more revision. Identical
    # ones back off from the resync, doubling, with one Warning; a different one starts over.
    UNVERIFIED = "unverified"
    SPEC_CHANGE = "spec-change"  # only a new spec can help
    STEADY = "steady"  # a standing state, checked (reads only) at the resync: no backoff


@dataclass(frozen=True)
class Failure:
    """Why a reconcile did not reach the spec: a condition reason and a message naming
    fields, never values."""

    reason: str
    message: str
    retry: Retry = Retry.TRANSIENT


@dataclass(frozen=True)
class StatusUpdate:
    """The outcome of one reconcile, ready to be written as status and Events."""

    ready: Condition
    aspects: Mapping[Aspect, Condition]
    checked: bool  # the check completed (drift or not): lastSyncTime moves
    managed: Managed | None = None  # None = leave status.managed as it is
    uri: str | None = None
    latest_ready_revision: str | None = None
    drift: DriftReport = DriftReport()
    pending: tuple[str, ...] | None = None  # None = leave as is; () = nothing pending
    events: tuple[Event, ...] = ()
    failure: Failure | None = None  # what went wrong, for the loop's backoff
    wrote: WriteRecord = WriteRecord()
    serving: Condition | None = None  # ServingSynced; None = leave it as it is
    # A rollout this controller started is under way (Ready=False Progressing): the loop checks
    # again when it ends, keeping its backoff streak (the rollout may yet fail).
    rolling_out: bool = False
