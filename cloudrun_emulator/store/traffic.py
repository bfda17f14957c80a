"""Traffic: Service.traffic (who should serve) and Service.traffic_statuses (who serves), as
Cloud Run v2 has them.

Grounding (googleapis google/cloud/run/v2/service.proto and traffic_target.proto):
- ``traffic``: "Specifies how to distribute traffic over a collection of Revisions belonging to
  the Service. If traffic is empty or not provided, defaults to 100% traffic to the latest
  `Ready` Revision" (the store fills that default, convert.fill_defaults).
- TrafficTarget: ``type`` TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST ("Allocates instances to the
  Service's latest ready Revision") or _REVISION ("Allocates instances to a Revision by name"),
  ``revision`` ("Revision to which to send this portion of traffic, if traffic allocation is by
  revision"), ``percent``, ``tag`` ("Indicates a string to be part of the URI to exclusively
  reference this target").
- ``traffic_statuses`` (output only): "Detailed status information for corresponding traffic
  targets"; one TrafficTargetStatus (type, revision, percent, tag, uri) per target. A LATEST
  status does not name the revision it resolved to: Config Connector's recording of real v2
  traffic (pkg/test/resourcefixture/testdata/basic/run/v1beta1/runservice/runservicebasic/
  _vcr_cassettes/tf.yaml) shows `"trafficStatuses": [{"type":
  "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST", "percent": 100}]` next to a `latestReadyRevision`;
  readers resolve it to ``latest_ready_revision`` (the v1 view names it, as Knative does).
- A new revision serves only through a LATEST target: ``gcloud run deploy --no-traffic`` (and
  canaries, ``update-traffic --to-revisions``) pin REVISION targets, and the new revision gets 0%
  (Cloud Run docs, "Rollbacks, gradual rollouts, and traffic migration").

Validation follows Knative serving's Route rules that Cloud Run applies: the percents sum to 100,
REVISION targets name an existing revision of the service (or the one this very write creates),
LATEST targets name none, tags are unique DNS labels.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import invalid
from .records import ServiceEntry

LATEST = 1  # TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
REVISION = 2  # TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION
TYPE_NAMES = {LATEST: "LATEST", REVISION: "REVISION"}
_TAG_RE = re.compile(r"^[a-z]([-a-z0-9]{0,44}[a-z0-9])?$")


def validate(spec: Any, entry: ServiceEntry | None, creating: str) -> None:
    """Refuse what Cloud Run refuses in Service.traffic (INVALID_ARGUMENT). ``creating``: the
    revision name this write creates, if the template names one."""
    known = set(entry.revisions) if entry is not None else set()
    if creating:
        known.add(creating)
    total = 0
    tags: set[str] = set()
    for i, t in enumerate(spec.traffic):
        where = f"spec.traffic[{i}]"
        kind = int(t.type_)
        if kind == REVISION:
            if not t.revision:
                raise invalid(f"{where}.revision: Required when type is REVISION.")
            if t.revision not in known:
                raise invalid(
                    f"{where}.revision: Revision '{t.revision}' does not exist for service "
                    f"'{spec.name.rsplit('/', 1)[-1]}'."
                )
        elif kind == LATEST:
            if t.revision:
                raise invalid(f"{where}.revision: must be empty when type is LATEST.")
        else:
            raise invalid(f"{where}.type: must be LATEST or REVISION.")
        if t.percent < 0 or t.percent > 100:
            raise invalid(f"{where}.percent: must be between 0 and 100.")
        total += t.percent
        if t.tag:
            if not _TAG_RE.match(t.tag):
                raise invalid(f"{where}.tag: '{t.tag}' must be a lowercase DNS label.")
            if t.tag in tags:
                raise invalid(f"{where}.tag: duplicate tag '{t.tag}'.")
            tags.add(t.tag)
    if len(spec.traffic) and total != 100:
        raise invalid(f"spec.traffic: Traffic targets sum to {total}, want 100.")


def route(svc: Any) -> None:
    """Recompute ``traffic_statuses`` from ``traffic`` and the latest ready revision."""
    del svc.traffic_statuses[:]
    host = svc.uri.removeprefix("https://")
    for t in svc.traffic:
        kind = int(t.type_)
        if kind == LATEST and not svc.latest_ready_revision:
            continue  # LATEST before any revision is ready: nothing serves yet
        status = svc.traffic_statuses.add(type_=kind, percent=t.percent, tag=t.tag)
        if kind == REVISION:
            status.revision = t.revision
        if t.tag and host:
            status.uri = f"https://{t.tag}---{host}"
