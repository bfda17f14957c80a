"""The reliability suite's harness: targets, the invariant checker, the canary collector, call
sampling and the figures table. The fixtures that hand these to the scenarios are in conftest.py.

Counts are small by default so the suite fits in `make test`; RUNWARDEN_SOAK=1 (`make soak`)
selects the big ones.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudrun_emulator.admin import AdminClient
from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.bodies import orchestrator
from tests.fixtures.controller import ControllerProcess
from tests.fixtures.k8s import ControlPlane
from tests.fixtures.wait import wait_for

SOAK = os.environ.get("RUNWARDEN_SOAK") == "1"
# The suite-wide canary scan (tests/reliability/test_secrets.py): the conftest runs it last.
FINAL_SCAN = "test_no_canary_anywhere_in_the_suite"

PROJECT = "runwarden-rel"
REGION = "us-west2"
ROLE = "roles/run.invoker"
OTHER_ROLE = "roles/run.developer"
RUN = "google.cloud.run.v2.Services/"
IAM = "google.iam.admin.v1.IAM/"
WRITE_METHODS = tuple(
    f"{RUN}{m}" for m in ("CreateService", "UpdateService", "DeleteService", "SetIamPolicy")
)


def scaled(in_suite: int, soak: int) -> int:
    """``soak`` under RUNWARDEN_SOAK=1, else ``in_suite``."""
    return soak if SOAK else in_suite


def sa_email(name: str) -> str:
    return f"{name}@{PROJECT}.iam.gserviceaccount.com"


def writes(calls: Mapping[str, int]) -> int:
    """Write calls (refused ones included) in an emulator call counter."""
    return sum(n for method, n in calls.items() if method in WRITE_METHODS)


def reads(calls: Mapping[str, int]) -> int:
    return sum(n for method, n in calls.items() if method not in WRITE_METHODS)


def delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0)
        for k in set(after) | set(before)
        if after.get(k, 0) != before.get(k, 0)
    }


# ---------------------------------------------------------------------- canaries


class CanaryCollector:
    """Distinctive env values, and a scan of logs, Events and statuses for them.

    Every canary value starts with one random mark, so the scan looks for the mark: a value that
    leaks in part (truncated, quoted, escaped) is still found.
    """

    def __init__(self) -> None:
        self.mark = f"CANARY{secrets.token_hex(4).upper()}"
        self.logs: list[Path] = []
        self.namespaces: list[str] = []
        self.issued = 0
        self._test_logs: list[Path] = []
        self._test_namespaces: list[str] = []

    def value(self, label: str) -> str:
        """A fresh canary value (never logged, never in an Event or a status, if all is well)."""
        self.issued += 1
        return f"{self.mark}-{label}-{secrets.token_hex(4)}"

    def watch_log(self, path: Path) -> None:
        if path not in self.logs:
            self.logs.append(path)
            self._test_logs.append(path)

    def watch_namespace(self, namespace: str) -> None:
        if namespace not in self.namespaces:
            self.namespaces.append(namespace)
            self._test_namespaces.append(namespace)

    def begin_test(self) -> None:
        self._test_logs, self._test_namespaces = [], []

    def scan_test(self, plane: ControlPlane) -> Scan:
        """Scan what the current test registered."""
        return self.scan(plane, self._test_logs, self._test_namespaces)

    def scan_all(self, plane: ControlPlane) -> Scan:
        return self.scan(plane, self.logs, self.namespaces)

    def scan(self, plane: ControlPlane, logs: Iterable[Path], namespaces: Iterable[str]) -> Scan:
        result = Scan(self.mark)
        for path in logs:
            text = path.read_text(errors="replace") if path.exists() else ""
            for number, line in enumerate(text.splitlines(), 1):
                result.look(f"{path.name}:{number}", line, "log lines")
        for ns in namespaces:
            events = plane.kubectl("get", "events", "-n", ns, "-o", "json", timeout=60)
            for item in json.loads(events.stdout)["items"]:
                result.look(f"Event {ns}/{item['metadata']['name']}", json.dumps(item), "events")
            orchs = plane.kubectl("get", "orchestrators", "-n", ns, "-o", "json", timeout=60)
            for item in json.loads(orchs.stdout)["items"]:
                where = f"Orchestrator {ns}/{item['metadata']['name']} status"
                result.look(where, json.dumps(item.get("status") or {}), "statuses")
        return result


@dataclass
class Scan:
    mark: str
    counts: Counter[str] = field(default_factory=Counter)
    hits: list[str] = field(default_factory=list)

    def look(self, where: str, text: str, kind: str) -> None:
        self.counts[kind] += 1
        if self.mark in text:
            self.hits.append(where)

    def summary(self) -> str:
        parts = [f"{self.counts[k]} {k}" for k in ("log lines", "events", "statuses")]
        return f"{', '.join(parts)} scanned, {len(self.hits)} hit(s)"


# ---------------------------------------------------------------------- targets


@dataclass
class Target:
    """One Orchestrator and its Cloud Run service, with what each party put there.

    After convergence the service must hold exactly: the declared variables (at their values)
    and the foreign ones (at theirs), the declared and the foreign members of ``role`` — each
    once — and ``other_roles`` exactly as deployed. ``gone_*`` must be absent (pruned by the
    controller, or removed by their owner).
    """

    name: str
    service: str
    env: dict[str, str]
    members: set[str]
    foreign_env: dict[str, str]
    foreign_members: set[str]
    other_roles: dict[str, list[str]]
    role: str = ROLE
    gone_env: set[str] = field(default_factory=set)
    gone_members: set[str] = field(default_factory=set)
    policy: dict[str, Any] = field(default_factory=dict)
    service_accounts: set[str] = field(default_factory=set)

    def body(self) -> dict[str, Any]:
        return orchestrator(
            self.name,
            self.service,
            project=PROJECT,
            region=REGION,
            env=dict(sorted(self.env.items())),
            role=self.role,
            invokers=sorted(self.members),
            policy=self.policy or None,
        )

    def declare_env(self, name: str, value: str) -> None:
        self.env[name] = value
        self.gone_env.discard(name)

    def undeclare_env(self, name: str) -> None:
        self.env.pop(name, None)
        self.gone_env.add(name)

    def declare_member(self, member: str) -> None:
        self.members.add(member)
        self.gone_members.discard(member)

    def undeclare_member(self, member: str) -> None:
        self.members.discard(member)
        self.gone_members.add(member)


def make_target(canary: CanaryCollector, name: str, service: str | None = None) -> Target:
    """A target with two declared variables and members, and someone else's variable, member
    and other role already on the service."""
    sa = sa_email(f"{name}-inv")
    return Target(
        name=name,
        service=service or name,
        env={
            f"{_upper(name)}_A": canary.value(f"{name}-a"),
            f"{_upper(name)}_B": canary.value(f"{name}-b"),
        },
        members={f"serviceAccount:{sa}", f"group:{name}-team@example.com"},
        foreign_env={"FOREIGN_TOKEN": canary.value(f"{name}-foreign")},
        foreign_members={f"user:{name}-human@example.com"},
        other_roles={OTHER_ROLE: [f"user:{name}-dev@example.com", "group:ops@example.com"]},
        service_accounts={sa},
    )


def _upper(name: str) -> str:
    return name.upper().replace("-", "_")


def deploy(admin: AdminClient, target: Target) -> None:
    """Someone else's deploy: the service with its foreign variable, member and other role."""
    for email in target.service_accounts:
        admin.put_service_account(email)
    admin.put_service(
        PROJECT,
        REGION,
        target.service,
        env=dict(target.foreign_env),
        invokers={target.role: sorted(target.foreign_members), **target.other_roles},
    )


def state(admin: AdminClient, target: Target) -> dict[str, Any]:
    return admin.get_service(PROJECT, REGION, target.service)


def apply(plane: ControlPlane, namespace: str, targets: Sequence[Target]) -> None:
    """kubectl apply of the targets' Orchestrators, in one call."""
    doc = {"apiVersion": "v1", "kind": "List", "items": [t.body() for t in targets]}
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))


def knock_out(
    admin: AdminClient, target: Target, canary: CanaryCollector, round_: int
) -> dict[str, Any]:
    """Out-of-band drift, as a careless deploy: one declared variable and one declared member
    gone, and the deployer's own variable changed and one added (others' things are theirs).
    Returns the service as the deploy left it (the controller may repair it at any moment)."""
    current = state(admin, target)
    lost_var = sorted(target.env)[round_ % len(target.env)]
    lost_member = sorted(target.members)[round_ % len(target.members)]
    target.foreign_env["FOREIGN_TOKEN"] = canary.value(f"{target.name}-foreign-{round_}")
    target.foreign_env[f"FOREIGN_R{round_}"] = canary.value(f"{target.name}-r{round_}")
    env = {k: v for k, v in current["env"].items() if k != lost_var}
    env.update(target.foreign_env)
    members = [m for m in current["iam"].get(target.role, []) if m != lost_member]
    return admin.put_service(
        PROJECT, REGION, target.service, env=env, invokers={target.role: members}
    )


# ---------------------------------------------------------------------- the invariant checker


def violations(svc: Mapping[str, Any], t: Target, *, declared: bool = True) -> list[str]:
    """Every way the service breaks the invariants; names only, never values.

    - every declared variable and member is present (unless ``declared=False``: a scenario where
      the spec cannot be applied) and every foreign one is still there, variables at their value;
    - nothing else is there: no pruned or removed variable or member came back;
    - no member is listed twice in any role;
    - other roles are exactly as deployed.
    """
    out: list[str] = []
    env: dict[str, str] = svc.get("env", {})
    iam: dict[str, list[str]] = svc.get("iam", {})
    members = iam.get(t.role, [])
    wanted_env = {**t.foreign_env, **(t.env if declared else {})}
    for name, value in wanted_env.items():
        if name not in env:
            out.append(f"{t.service}: env {name} missing")
        elif env[name] != value:
            out.append(f"{t.service}: env {name} has another value")
    wanted_members = t.foreign_members | (t.members if declared else set())
    out += [f"{t.service}: member {m} missing" for m in sorted(wanted_members - set(members))]
    known_env = set(t.foreign_env) | set(t.env)
    out += [f"{t.service}: env {n} present, nobody wants it" for n in sorted(set(env) - known_env)]
    known_members = t.foreign_members | t.members
    out += [
        f"{t.service}: member {m} present, nobody wants it"
        for m in sorted(set(members) - known_members)
    ]
    out += [f"{t.service}: env {n} should be gone" for n in sorted(t.gone_env & set(env))]
    out += [
        f"{t.service}: member {m} should be gone" for m in sorted(t.gone_members & set(members))
    ]
    for role, listed in iam.items():
        dups = sorted(m for m, n in Counter(listed).items() if n > 1)
        out += [f"{t.service}: {role} lists {m} more than once" for m in dups]
    for role in sorted(set(iam) - {t.role} | set(t.other_roles)):
        if sorted(iam.get(role, [])) != sorted(t.other_roles.get(role, [])):
            out.append(f"{t.service}: other role {role} changed")
    return out


def condition(obj: Mapping[str, Any] | None, kind: str = "Ready") -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return {}


def in_sync(obj: Mapping[str, Any] | None, since: str = "") -> bool:
    """Ready=True, computed for the current generation, by a check completed at ``since`` or
    later (an RFC 3339 UTC second, as status writes them)."""
    if not obj:
        return False
    st = obj.get("status") or {}
    gen = obj["metadata"]["generation"]
    ready = condition(obj)
    return (
        ready.get("status") == "True"
        and st.get("observedGeneration") == gen
        and ready.get("observedGeneration") == gen
        and str(st.get("lastSyncTime") or "") >= since
    )


def utc_stamp(t: float | None = None, *, round_up: bool = False) -> str:
    """RFC 3339 UTC at second resolution (rounded up if asked: "at or after t")."""
    t = time.time() if t is None else t
    whole = int(t) + (1 if round_up and t != int(t) else 0)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(whole))


def orchestrators(plane: ControlPlane, namespace: str) -> dict[str, dict[str, Any]]:
    out = plane.kubectl("get", "orchestrators", "-n", namespace, "-o", "json", timeout=30)
    return {o["metadata"]["name"]: o for o in json.loads(out.stdout)["items"]}


def events(plane: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    out = plane.kubectl("get", "events", "-n", namespace, "-o", "json", timeout=30)
    return list(json.loads(out.stdout)["items"])


def event_counts(items: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """Events by reason, each counted ``count`` times (the apiserver may aggregate)."""
    counts: Counter[str] = Counter()
    for e in items:
        counts[str(e.get("reason"))] += int(e.get("count") or 1)
    return counts


def wait_converged(
    plane: ControlPlane,
    namespace: str,
    admin: AdminClient,
    targets: Sequence[Target],
    timeout: float,
    *,
    since: str = "",
    together: bool = True,
    declared: bool = True,
) -> dict[str, dict[str, Any]]:
    """Wait until every service holds the invariants and every Orchestrator is in sync.

    ``together``: all Orchestrators Ready at one moment. Under injected faults a check may fail
    at any time, so ``together=False`` accepts each one having been in sync at some poll (after
    ``since``) while the services hold the invariants at the last one.
    Returns the Orchestrators as last seen.
    """
    seen: set[str] = set()
    last: dict[str, Any] = {"violations": ["never checked"], "waiting": [], "laggards": set()}

    def converged() -> dict[str, dict[str, Any]] | None:
        objs = orchestrators(plane, namespace)
        now = {t.name for t in targets if in_sync(objs.get(t.name), since)}
        seen.update(now)
        ok = now if together else seen
        bad: list[str] = []
        laggards: set[str] = set()
        for t in targets:
            found = violations(state(admin, t), t, declared=declared)
            bad += found
            if found or t.name not in ok:
                laggards.add(t.name)
        last["violations"] = bad
        last["laggards"] = laggards
        last["waiting"] = [
            f"{t.name}: {condition(objs.get(t.name)).get('reason')}"
            for t in targets
            if t.name not in ok
        ]
        return objs if not laggards else None

    try:
        return wait_for(converged, timeout, interval=0.5)
    except AssertionError as exc:
        raise NotConverged(
            f"not converged within {timeout:g}s; violations: {last['violations'][:20]}; "
            f"not in sync: {last['waiting']}",
            last["laggards"],
        ) from exc


class NotConverged(AssertionError):
    """wait_converged ran out of time; ``laggards`` names the targets that were not there."""

    def __init__(self, message: str, laggards: set[str]) -> None:
        super().__init__(message)
        self.laggards = laggards


def asleep_on_quota(controller: Any, names: set[str], at_least: float) -> set[str]:
    """The Orchestrators among ``names`` whose last logged check was refused for quota and put
    off the next one by ``at_least`` seconds or more (from the controller's own log)."""
    last: dict[str, dict[str, Any]] = {}
    for line in controller.log_lines():
        name = (line.get("k8s_ref") or {}).get("name")
        if name in names and line.get("event") in ("check", "check_failed"):
            last[name] = line
    return {
        name
        for name, line in last.items()
        if line.get("reason") == "QuotaExceeded" and (line.get("next_check_in") or 0) >= at_least
    }


# ---------------------------------------------------------------------- the controller replicas

LEASE = "runwarden"  # --leader-election-name's default
SINGLE = "controller"  # the one replica's name when there is no leader election
# Without --own-principal the controller's writes reach the emulator under its default caller.
EMULATOR_DEFAULT_PRINCIPAL = "runwarden@example.com"
REPLICA_DEADLINE = 60  # a busy 2-core machine: starting up, standing by, taking over


class Replicas:
    """The controller as a scenario runs it: one process without leader election (as the suite
    always ran it), or two ``python -m controller`` replicas with ``--leader-election`` and
    distinct identities, as manifests/controller/deployment.yaml runs them (its pod name is the
    identity; here ``replica-a`` and ``replica-b``, the Lease in the test's namespace). Each
    replica names itself on its Google writes (``--own-principal <identity>@example.com``, sent as
    the emulator's x-emulator-principal), so the emulator counts every UpdateService and
    SetIamPolicy per replica. Restarting a replica plays the kubelet restarting its container:
    same identity, log appended."""

    def __init__(self, rig: Rig, count: int, **options: Any) -> None:
        if count not in (1, 2):
            raise ValueError(f"replicas: 1 or 2, not {count}")
        self.rig = rig
        self.count = count
        self.options = options
        self.procs: dict[str, ControllerProcess] = {}
        self._marks: dict[str, int] = {}  # identity -> its log's line count at its last start

    @property
    def elected(self) -> bool:
        return self.count > 1

    def start(self) -> Replicas:
        """Start the replica(s): with leader election, ``replica-a`` first (it takes the Lease),
        then ``replica-b``, which stands by."""
        if not self.elected:
            self._launch(SINGLE, wait=True)
            return self
        self._launch("replica-a", wait=True)  # "started" is logged once it holds the Lease
        self._launch("replica-b", wait=False)
        self.wait_standing_by(self.procs["replica-b"])
        return self

    def _launch(self, identity: str, *, wait: bool) -> ControllerProcess:
        extra: list[str] = list(self.options.get("extra_args", ()))
        if self.elected:
            extra += [
                "--leader-election",
                f"--leader-election-namespace={self.rig.ns}",
                f"--leader-election-identity={identity}",
                f"--own-principal={self.principal(identity)}",
            ]
        options = {**self.options, "extra_args": extra}
        proc = self.rig.start_controller(self.rig.emulator, wait=wait, **options)
        self.procs[identity] = proc
        self._marks[identity] = 0
        return proc

    # ------------------------------------------------------------------ who is who

    def identity(self, proc: ControllerProcess) -> str:
        return next(i for i, p in self.procs.items() if p is proc)

    def principal(self, identity: str) -> str:
        return f"{identity}@example.com" if self.elected else EMULATOR_DEFAULT_PRINCIPAL

    def holder(self) -> str:
        """The Lease's holderIdentity ("" when free; always "" without leader election)."""
        if not self.elected:
            return ""
        done = self.rig.plane.kubectl(
            "get", "lease", LEASE, "-n", self.rig.ns, "-o", "json", check=False, timeout=30
        )
        if done.returncode != 0:
            return ""
        return str(json.loads(done.stdout)["spec"].get("holderIdentity") or "")

    def leader(self) -> ControllerProcess:
        """The replica that reconciles: the Lease holder, running (the only one without leader
        election)."""
        if not self.elected:
            return self.procs[SINGLE]
        holder = self.holder()
        proc = self.procs.get(holder)
        if proc is None or not proc.running:
            raise AssertionError(f"no running leader: the Lease names {holder!r}")
        return proc

    def other(self, proc: ControllerProcess) -> ControllerProcess:
        """The other replica (leader election only)."""
        return next(p for p in self.procs.values() if p is not proc)

    def standby(self) -> ControllerProcess:
        return self.other(self.leader())

    def lines(self, proc: ControllerProcess, event: str) -> list[dict[str, Any]]:
        """``proc``'s log lines of ``event`` since its last start."""
        since = self._marks[self.identity(proc)]
        return [line for line in proc.log_lines()[since:] if line.get("event") == event]

    def starts(self) -> int:
        """ "started" lines in all the replicas' logs: one per term as the reconciling leader."""
        lines = (line for p in self.procs.values() for line in p.log_lines())
        return sum(1 for line in lines if line.get("event") == "started")

    # ------------------------------------------------------------------ kills and restarts

    def kill(self, proc: ControllerProcess) -> None:
        """SIGKILL (a crash)."""
        proc.kill()

    def restart(self, proc: ControllerProcess) -> None:
        """Start ``proc`` again, as the kubelet restarts a crashed container (same identity):
        without leader election, wait until it has started; with it, until it either leads
        (started) or stands by."""
        self._marks[self.identity(proc)] = len(proc.log_lines())
        if not self.elected:
            proc.start()
            return
        proc.start(wait=False)
        wait_for(
            lambda: self.lines(proc, "started") or self.lines(proc, "standby"),
            REPLICA_DEADLINE,
            message=f"{self.identity(proc)} restarted: leading or standing by",
        )

    def wait_standing_by(self, proc: ControllerProcess) -> None:
        wait_for(
            lambda: self.lines(proc, "standby"),
            REPLICA_DEADLINE,
            message=f"{self.identity(proc)} standing by\n{proc.tail()}",
        )

    def wait_leads(self, proc: ControllerProcess, timeout: float = REPLICA_DEADLINE) -> None:
        """Until ``proc`` holds the Lease and has started reconciling."""
        identity = self.identity(proc)
        wait_for(
            lambda: self.lines(proc, "started") and self.holder() == identity,
            timeout,
            interval=0.1,
            message=f"{identity} takes the Lease and starts\n{proc.tail()}",
        )

    # ------------------------------------------------------------------ writes per replica

    def writes(self) -> dict[str, dict[str, int]]:
        """Google write calls per replica, per method (the emulator's counts by principal;
        refused calls included)."""
        by_principal = self.rig.admin.calls_by_principal()
        return {
            identity: {
                m: n
                for m, n in by_principal.get(self.principal(identity), {}).items()
                if m in WRITE_METHODS
            }
            for identity in self.procs
        }


def writes_since(
    after: Mapping[str, Mapping[str, int]], before: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    """Per replica, the write calls between two ``Replicas.writes`` snapshots (replicas that
    wrote nothing left out)."""
    out = {r: delta(after[r], before.get(r, {})) for r in after}
    return {r: calls for r, calls in out.items() if calls}


def double_writes(wrote: Mapping[str, Mapping[str, int]], needed: int) -> list[str]:
    """The ways ``wrote`` (``writes_since`` of one drift round) is not exactly one UpdateService
    and one SetIamPolicy per drifted service (``needed``): a repair made twice, by two replicas
    or by one, or not made."""
    out: list[str] = []
    for method in (f"{RUN}UpdateService", f"{RUN}SetIamPolicy"):
        total = sum(calls.get(method, 0) for calls in wrote.values())
        if total != needed:
            who = {r: calls.get(method, 0) for r, calls in wrote.items()}
            out.append(f"{method.rsplit('/', 1)[1]}: {total} calls for {needed} drifts {who}")
    return out


# ---------------------------------------------------------------------- one scenario's rig


@dataclass
class Rig:
    """One scenario's pieces, the suite's one prologue (the ``rig`` fixture of conftest.py): the
    control plane with the CRDs, the test's namespace and an emulator of its own (both scanned
    for canaries), the canary collector, the test's row in the figures table, and a controller
    starter (``start_controller(emulator, resync=2, metrics=False, **ControllerProcess options)``;
    its log is scanned for canaries and it is stopped after the test)."""

    plane: ControlPlane
    ns: str
    emulator: EmulatorProcess
    canary: CanaryCollector
    figures: Callable[[str, str, str], None]
    start_controller: Callable[..., ControllerProcess]
    replicas: int = 1  # the ``replicas`` fixture: 2 = two replicas with leader election

    @property
    def admin(self) -> AdminClient:
        return self.emulator.admin

    def targets(self, n: int, prefix: str = "orch") -> list[Target]:
        """``n`` targets named ``<prefix>-<i>`` with canary values."""
        return [make_target(self.canary, f"{prefix}-{i}") for i in range(n)]

    def deploy(self, targets: Iterable[Target]) -> None:
        """Someone else deploys each target's service (before Runwarden adopts it)."""
        for t in targets:
            deploy(self.admin, t)

    def apply(self, targets: Sequence[Target]) -> None:
        apply(self.plane, self.ns, targets)

    def converged(
        self, targets: Sequence[Target], timeout: float, **options: Any
    ) -> dict[str, dict[str, Any]]:
        """``wait_converged`` in this namespace on this emulator (options: since, together,
        declared); the Orchestrators as last seen."""
        return wait_converged(self.plane, self.ns, self.admin, targets, timeout, **options)

    def synced(
        self, targets: Sequence[Target], timeout: float = 30, **controller: Any
    ) -> ControllerProcess:
        """The usual start: deploy the services, start a controller (``controller``: the
        starter's options), apply the Orchestrators and wait until they converge. The
        controller."""
        self.deploy(targets)
        proc = self.start_controller(self.emulator, **controller)
        self.apply(targets)
        self.converged(targets, timeout)
        return proc

    def start_replicas(self, **controller: Any) -> Replicas:
        """The controller, run as the scenario's ``replicas`` (see Replicas), started."""
        return Replicas(self, self.replicas, **controller).start()

    def synced_replicas(
        self, targets: Sequence[Target], timeout: float = 30, **controller: Any
    ) -> Replicas:
        """``synced`` with the controller run as the scenario's ``replicas`` (see Replicas)."""
        self.deploy(targets)
        group = self.start_replicas(**controller)
        self.apply(targets)
        self.converged(targets, timeout)
        return group

    def orchestrators(self) -> dict[str, dict[str, Any]]:
        return orchestrators(self.plane, self.ns)

    def events(self) -> list[dict[str, Any]]:
        return events(self.plane, self.ns)

    def state(self, target: Target) -> dict[str, Any]:
        """The target's service as the emulator's admin API shows it."""
        return state(self.admin, target)


# ---------------------------------------------------------------------- counters over time


class CallSampler:
    """Polls the emulator's call counters in a thread, to see when calls happened."""

    def __init__(self, admin: AdminClient, interval: float = 0.2) -> None:
        self.admin = admin
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.admin.calls()))
            except OSError:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> CallSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def series(self, value: Callable[[Mapping[str, int]], int]) -> list[tuple[float, int]]:
        return [(t, value(calls)) for t, calls in self.samples]

    def increments(self, value: Callable[[Mapping[str, int]], int]) -> list[float]:
        """The times (sample times, monotonic) at which ``value`` reached a new high, once per
        unit. A derived value (a difference of counters) may blip up and back between two calls
        of one check; counting new highs only keeps the total exact."""
        times: list[float] = []
        high: int | None = None
        for t, v in self.series(value):
            if high is not None and v > high:
                times += [t] * (v - high)
            high = v if high is None else max(high, v)
        return times


def gaps(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# ---------------------------------------------------------------------- controller metrics


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The controller's Prometheus metrics: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric_sum(
    metrics: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


# ---------------------------------------------------------------------- the figures table


@dataclass
class Row:
    scenario: str
    counts: str
    figures: str
    outcome: str = "not run"


class Figures:
    """Rows of the reliability table, one per test that records one."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def record(self, nodeid: str, scenario: str, counts: str, figures: str) -> None:
        self.rows[nodeid] = Row(scenario, counts, figures)

    def outcome(self, nodeid: str, outcome: str) -> None:
        if nodeid in self.rows:
            self.rows[nodeid].outcome = outcome

    def markdown(self) -> str:
        lines = ["| Scenario | Counts | Result | Figures |", "|---|---|---|---|"]
        lines += [
            f"| {r.scenario} | {r.counts} | {r.outcome} | {r.figures} |" for r in self.rows.values()
        ]
        return "\n".join(lines)
