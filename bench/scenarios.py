"""The four measurements of issue 7: API economy, overhead ratio, scale, quota pacing.

Each scenario takes a ``Run`` (control plane + emulator + a work directory) and returns a plain
result object; bench.report turns those into tables. Nothing here asserts a goal: the report
says which goals are met, so one missed goal never hides the other numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    DRIFTS,
    INITIAL,
    PROJECT,
    REGION,
    REPO,
    SA_EMAIL,
    Controller,
    Metrics,
    Watch,
    annotate_namespace,
    apply_orchestrators,
    apply_orchestrators_parallel,
    calls_delta,
    create_namespace,
    orchestrator,
    put_services,
    service_name,
    short,
    status_writes,
)
from cloudrun_emulator.control import WRITE_METHODS
from cloudrun_emulator.testing import EmulatorProcess
from controller.domain.tenancy import PROJECTS_ANNOTATION
from tests.fixtures.k8s import ControlPlane

# The controller's per-region Cloud Run budgets. Unlimited where the emulator has no quota (as
# if the project's quota had been raised for that many services); under quota, the budget we
# give it equals the quota we set.
ENV_READS_PER_MINUTE = "RUNWARDEN_READS_PER_MINUTE"
ENV_WRITES_PER_MINUTE = "RUNWARDEN_WRITES_PER_MINUTE"
UNLIMITED = {ENV_READS_PER_MINUTE: "0", ENV_WRITES_PER_MINUTE: "0"}
PERIOD_METRIC = "runwarden_effective_check_period_seconds"
EXHAUSTED = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class Config:
    """What to run; `python -m bench` fills it from BENCH_* variables (see bench/__main__.py)."""

    economy_n: int = 10
    overhead_n: int = 20
    overhead_resync: float = 1.0
    overhead_seconds: float = 20.0
    overhead_rounds: int = 3
    scales: tuple[int, ...] = (100, 300, 1000)
    scale_resync: float = 30.0
    latency_ms: int = 20
    steady_seconds: float = 0.0  # the steady-state window at scale; 0 = one resync period
    quota_n: int = 1000
    quota_rpm: int = 600
    quota_seconds: float = 240.0
    quota_warmup: float = 60.0
    ready_timeout: float = 900.0
    failover_n: int = 100  # without a scale run to reuse; 0 = no failover scenario
    estate_n: int = 10_000  # 0 = no estate scenario
    estate_projects: int = 20
    estate_shards: int = 3  # the same estate again with this many shards; 0 = one replica only
    estate_resync: float = 120.0


@dataclass
class Run:
    """The shared components of one benchmark run."""

    plane: ControlPlane
    emulator: EmulatorProcess
    work: Path
    run_id: str
    say: Callable[[str], None] = print

    def namespace(self, what: str) -> str:
        ns = f"bench-{self.run_id}-{what}"
        create_namespace(self.plane, ns)
        return ns

    def controller(
        self,
        namespace: str,
        resync: float | None,
        log_name: str,
        extra_env: dict[str, str] | None = None,
    ) -> Controller:
        return Controller(
            self.plane,
            self.emulator.grpc_endpoint,
            [namespace],
            self.work / f"{log_name}.log",
            resync,
            extra_env=extra_env if extra_env is not None else UNLIMITED,
        )

    def populate(self, what: str, n: int) -> tuple[str, list[str]]:
        """A namespace and n services deployed by someone else (nothing declared holds yet)."""
        ns = self.namespace(what)
        names = [service_name(f"{what}-{self.run_id}", i) for i in range(n)]
        admin = self.emulator.admin
        admin.put_service_account(SA_EMAIL)
        put_services(admin, names, INITIAL)
        return ns, names

    def apply(self, ns: str, names: list[str]) -> None:
        apply_orchestrators(self.plane, ns, [orchestrator(s, s) for s in names])


# ---------------------------------------------------------------------- 1. API economy


@dataclass
class EconomyRow:
    scenario: str
    checks: int
    repairs: int
    per: dict[str, float]  # short method name -> calls per check (steady) or per repair
    ok: bool
    target: str


@dataclass
class Economy:
    n: int
    rows: list[EconomyRow]


def _settle(emulator: EmulatorProcess, quiet: float = 1.0, timeout: float = 30.0) -> dict[str, int]:
    """The emulator's counters once no call has arrived for ``quiet`` seconds."""
    last = emulator.admin.calls()
    since = time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = emulator.admin.calls()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def economy(run: Run, cfg: Config) -> Economy:
    """Calls per steady-state check and per repair, exactly, from the emulator's counters.

    The controller runs with a long resync, so it checks only when (re)started: each restart
    makes every Orchestrator check once (kopf's resume), and nothing else calls the emulator.
    Per-repair figures are the repair checks' calls minus what the plain checks cost.
    """
    n = cfg.economy_n
    ns, names = run.populate("economy", n)
    admin = run.emulator.admin
    ctl = run.controller(ns, resync=3600, log_name="economy")
    watch = Watch(run.plane, ns).start()
    try:
        ctl.start()
        run.apply(ns, names)
        watch.wait(watch.n_ready, n, cfg.ready_timeout, "economy: initial sync")
        rows: list[EconomyRow] = []
        steady: dict[str, float] = {}
        for scenario in ("steady", "env", "invokers", "settings", "env+invokers"):
            ctl.stop()
            if scenario != "steady":
                watch.mark_drift_baseline()
                put_services(admin, names, DRIFTS[scenario])
            admin.reset_calls()
            ctl.start()
            if scenario == "steady":
                m = ctl.wait_metrics(lambda m: m.checks >= n, 120)
            else:
                m = ctl.wait_metrics(lambda m: m.total("runwarden_reconcile_total",
                                                       result="repaired") >= n, 120)  # fmt: skip
                watch.wait(watch.n_repaired, n, 60, f"economy: {scenario} repair in status")
            calls = {short(k): v for k, v in _settle(run.emulator).items() if v}
            m = ctl.metrics()
            checks = int(m.checks)
            repairs = int(m.total("runwarden_reconcile_total", result="repaired"))
            if scenario == "steady":
                steady = {k: v / checks for k, v in calls.items()}
                per = steady
            else:
                plain = checks - repairs
                methods = set(calls) | set(steady)
                per = {k: (calls.get(k, 0) - plain * steady.get(k, 0.0)) / repairs for k in methods}
            rows.append(_economy_row(scenario, checks, repairs, per))
            run.say(f"economy {scenario}: {checks} checks, {repairs} repairs, {per}")
        return Economy(n, rows)
    finally:
        watch.stop()
        ctl.stop()


_WRITES = {short(m) for m in WRITE_METHODS}
_IAM_API = {"GetServiceAccount"}  # iam.googleapis.com: not a Cloud Run read


def _economy_row(scenario: str, checks: int, repairs: int, per: dict[str, float]) -> EconomyRow:
    per = {k: round(v, 3) for k, v in per.items() if abs(v) > 1e-9}
    writes = {k: v for k, v in per.items() if k in _WRITES}
    run_reads = sum(v for k, v in per.items() if k not in _WRITES and k not in _IAM_API)
    if scenario == "steady":
        target = "1 GetService + 1 GetIamPolicy, 0 writes"
        ok = per.get("GetService") == 1 and per.get("GetIamPolicy") == 1 and run_reads == 2
        ok = ok and not writes
    elif scenario == "env+invokers":
        target = "1 UpdateService + 1 SetIamPolicy"
        ok = writes == {"UpdateService": 1, "SetIamPolicy": 1}
    else:
        wanted = "SetIamPolicy" if scenario == "invokers" else "UpdateService"
        target = f"1 {wanted} + ≤1 verify read"
        ok = writes == {wanted: 1} and run_reads - 2 <= 1
    return EconomyRow(scenario, checks, repairs, per, bool(ok), target)


# ---------------------------------------------------------------------- 2. overhead ratio


@dataclass
class Overhead:
    n: int
    resync: float
    window: float
    checks: int
    calls_per_check: float
    controller_cpu: float
    bare_cpu: float
    bare_checks: int
    bare_calls_per_check: float
    floor_cpu: float = 0.0  # the bare script plus one status patch per check
    floor_checks: int = 0
    round_ratios: list[float] = field(default_factory=list)  # controller / bare, per round
    # Orchestrator status PATCHes the apiserver served during the controller's windows (its
    # apiserver_request_total): with the status heartbeat, 0 for steady checks.
    status_writes: int = 0

    @property
    def status_writes_per_check(self) -> float:
        return self.status_writes / max(1, self.checks)

    @property
    def controller_ms(self) -> float:
        return 1000 * self.controller_cpu / max(1, self.checks)

    @property
    def bare_ms(self) -> float:
        return 1000 * self.bare_cpu / max(1, self.bare_checks)

    @property
    def floor_ms(self) -> float:
        return 1000 * self.floor_cpu / max(1, self.floor_checks)

    @property
    def ratio(self) -> float:
        return self.controller_ms / self.bare_ms if self.bare_ms else float("inf")

    @property
    def floor_ratio(self) -> float:
        return self.controller_ms / self.floor_ms if self.floor_ms else float("inf")


def overhead(run: Run, cfg: Config) -> Overhead:
    """Controller CPU per steady-state check vs a bare script's CPU for the same two calls.

    ``cfg.overhead_rounds`` rounds, each: the controller's window, then the bare script and the
    bare script + status write at the rate the controller just checked at. Interleaving keeps a
    change in the machine's load from landing on one side only; totals are pooled, and each
    round's ratio is kept to show the spread.
    """
    n = cfg.overhead_n
    ns, names = run.populate("overhead", n)
    admin = run.emulator.admin
    total = Overhead(n=n, resync=cfg.overhead_resync, window=0.0, checks=0,
                     calls_per_check=0.0, controller_cpu=0.0, bare_cpu=0.0, bare_checks=0,
                     bare_calls_per_check=0.0)  # fmt: skip
    calls = bare_calls = 0
    warmup = 5
    for i in range(max(1, cfg.overhead_rounds)):
        ctl = run.controller(ns, resync=cfg.overhead_resync, log_name=f"overhead-{i}")
        watch = Watch(run.plane, ns).start()
        try:
            ctl.start()
            if i == 0:
                run.apply(ns, names)
            watch.wait(watch.n_ready, n, cfg.ready_timeout, "overhead: initial sync")
            time.sleep(max(3.0, 2 * cfg.overhead_resync))  # past the first round of checks
            w0 = status_writes(run.plane)
            m0, s0, c0 = ctl.metrics(), ctl.stat(), admin.calls()
            time.sleep(cfg.overhead_seconds)
            m1, s1, c1 = ctl.metrics(), ctl.stat(), admin.calls()
            total.status_writes += status_writes(run.plane) - w0
        finally:
            watch.stop()
            ctl.stop()
        checks = int(m1.checks - m0.checks)
        wall = s1.at - s0.at
        calls += sum(calls_delta(c1, c0).values())
        rate = checks / wall
        cpu = s1.cpu - s0.cpu
        run.say(f"overhead {i}: controller {checks} checks in {wall:.1f}s, cpu {cpu:.2f}s")

        admin.reset_calls()

        bare = _bare(run, names, rate, checks, warmup)
        bare_calls += sum(_settle(run.emulator, quiet=0.5).values())
        run.say(f"overhead {i}: bare {bare}")
        floor = _bare(run, names, rate, checks, warmup, "--patch-status", ns)
        run.say(f"overhead {i}: bare + status patch {floor}")
        one = Overhead(n=n, resync=cfg.overhead_resync, window=wall, checks=checks,
                       calls_per_check=0.0, controller_cpu=s1.cpu - s0.cpu,
                       bare_cpu=float(bare["cpu_seconds"]), bare_checks=int(bare["checks"]),
                       bare_calls_per_check=0.0, floor_cpu=float(floor["cpu_seconds"]),
                       floor_checks=int(floor["checks"]))  # fmt: skip
        total.round_ratios.append(one.ratio)
        total.window += one.window
        total.checks += one.checks
        total.controller_cpu += one.controller_cpu
        total.bare_cpu += one.bare_cpu
        total.bare_checks += one.bare_checks
        total.floor_cpu += one.floor_cpu
        total.floor_checks += one.floor_checks
    rounds = len(total.round_ratios)
    total.calls_per_check = calls / max(1, total.checks)
    total.bare_calls_per_check = bare_calls / (total.bare_checks + warmup * rounds)
    return total


def _bare(
    run: Run, names: list[str], rate: float, checks: int, warmup: int, *extra: str
) -> dict[str, Any]:
    """`python -m bench.bare` at ``rate`` for ``checks`` checks; its JSON result."""
    out = subprocess.run(
        [
            sys.executable, "-m", "bench.bare", "--endpoint", run.emulator.grpc_endpoint,
            "--project", PROJECT, "--region", REGION, "--rate", f"{rate:.3f}",
            "--checks", str(checks), "--warmup", str(warmup), *extra, *names,
        ],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=600,
        env={**os.environ, "KUBECONFIG": run.plane.kubeconfig},
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# ---------------------------------------------------------------------- 3. scale


@dataclass
class Scale:
    n: int
    resync: float
    latency_ms: int
    apply_seconds: float
    ready_seconds: float
    drift_inject_seconds: float
    repair_seconds: float
    cpu_ready: float
    cpu_repair: float
    steady_cpu_percent: float
    steady_checks_per_second: float
    peak_rss_mb: float
    ready_series: list[tuple[float, int]] = field(default_factory=list)  # seconds since apply
    repaired_series: list[tuple[float, int]] = field(default_factory=list)  # since drift


def scale(run: Run, cfg: Config, n: int) -> tuple[Scale, tuple[str, list[str]]]:
    """Apply n Orchestrators, time them to Ready; drift all their services at once, time the
    repair; then a steady-state window. Returns the namespace and services for reuse."""
    ns, names = run.populate(f"scale{n}", n)
    admin = run.emulator.admin
    admin.set_faults(latency_ms=cfg.latency_ms)
    ctl = run.controller(ns, resync=cfg.scale_resync, log_name=f"scale-{n}")
    watch = Watch(run.plane, ns).start()
    try:
        ctl.start()
        s0 = ctl.stat()
        t0 = time.monotonic()
        run.apply(ns, names)
        t_applied = time.monotonic()
        t_ready = watch.wait(watch.n_ready, n, cfg.ready_timeout, f"scale {n}: Ready")
        s1 = ctl.stat()
        run.say(f"scale {n}: all Ready {t_ready - t0:.1f}s after apply")

        watch.mark_drift_baseline()
        td0 = time.monotonic()
        put_services(admin, names, DRIFTS["env"], workers=8)
        td1 = time.monotonic()
        t_repaired = watch.wait(
            watch.n_repaired, n, cfg.scale_resync * 1.1 + cfg.ready_timeout, f"scale {n}: repair"
        )
        s2 = ctl.stat()
        run.say(f"scale {n}: all repaired {t_repaired - td0:.1f}s after the drift")

        m0, s3 = ctl.metrics(), ctl.stat()
        time.sleep(cfg.steady_seconds or cfg.scale_resync)
        m1, s4 = ctl.metrics(), ctl.stat()
        with watch.lock:
            ready_series = [(t - t0, k) for t, k in watch.ready_series if t >= t0]
            repaired = sorted(t - td0 for t in watch.repaired_at.values())
        return Scale(
            n=n,
            resync=cfg.scale_resync,
            latency_ms=cfg.latency_ms,
            apply_seconds=t_applied - t0,
            ready_seconds=t_ready - t0,
            drift_inject_seconds=td1 - td0,
            repair_seconds=t_repaired - td0,
            cpu_ready=s1.cpu - s0.cpu,
            cpu_repair=s2.cpu - s1.cpu,
            steady_cpu_percent=100 * (s4.cpu - s3.cpu) / (s4.at - s3.at),
            steady_checks_per_second=(m1.checks - m0.checks) / (s4.at - s3.at),
            peak_rss_mb=s4.peak_rss_mb,
            ready_series=ready_series,
            repaired_series=[(t, i + 1) for i, t in enumerate(repaired)],
        ), (ns, names)
    finally:
        watch.stop()
        ctl.stop()


# ---------------------------------------------------------------------- leader failover


@dataclass
class Failover:
    n: int
    resync: float
    lease_seconds: float
    first_repair_seconds: float  # SIGKILL of the leader -> the standby's first repair
    all_repaired_seconds: float  # SIGKILL of the leader -> every drifted service repaired
    standby_calls_before: int  # Google calls the standby made while the leader lived (goal 0)


def failover(run: Run, cfg: Config, reuse: tuple[str, list[str]] | None) -> Failover:
    """Two replicas with --leader-election on n Orchestrators (the last scale's, or a fresh
    set): SIGKILL the leader, drift every service at once, and time the standby's repairs."""
    ns, names = reuse if reuse is not None else run.populate("failover", cfg.failover_n)
    n = len(names)
    admin = run.emulator.admin
    lease = 10.0

    def replica(name: str) -> Controller:
        return Controller(
            run.plane,
            run.emulator.grpc_endpoint,
            [ns],
            run.work / f"failover-{name}.log",
            cfg.scale_resync,
            extra_args=[
                "--leader-election",
                f"--leader-election-namespace={ns}",
                f"--leader-election-identity={name}",
                f"--leader-election-lease-seconds={lease:g}",
                f"--own-principal={name}@example.com",
            ],
            extra_env=UNLIMITED,
        )

    a, b = replica("leader"), replica("standby")
    watch = Watch(run.plane, ns).start()
    try:
        a.start()
        b.proc.start(wait=False)
        if reuse is None:
            run.apply(ns, names)
        watch.wait(watch.n_ready, n, cfg.ready_timeout, f"failover {n}: Ready")
        standby_before = sum(admin.calls_by_principal().get("standby@example.com", {}).values())
        watch.mark_drift_baseline()
        a.proc.kill()
        killed = time.monotonic()
        put_services(admin, names, DRIFTS["env"], workers=8)
        done = watch.wait(
            watch.n_repaired, n, cfg.scale_resync * 1.1 + cfg.ready_timeout, f"failover {n}"
        )
        with watch.lock:
            first = min(watch.repaired_at.values())
        run.say(f"failover {n}: first repair {first - killed:.1f}s, all {done - killed:.1f}s")
        return Failover(
            n=n,
            resync=cfg.scale_resync,
            lease_seconds=lease,
            first_repair_seconds=first - killed,
            all_repaired_seconds=done - killed,
            standby_calls_before=standby_before,
        )
    finally:
        watch.stop()
        a.stop()
        b.stop()


# ---------------------------------------------------------------------- 4. quota pacing


@dataclass
class QuotaSample:
    t: float
    reads: int  # read calls the emulator received (refused ones included)
    exhausted: float  # RESOURCE_EXHAUSTED answers the controller got
    checks: float
    period: float | None  # the effective check period the controller reports


@dataclass
class Quota:
    n: int
    rpm: int
    seconds: float
    warmup: float
    samples: list[QuotaSample]
    budget_env: dict[str, str]

    @property
    def exhausted_total(self) -> int:
        return int(self.samples[-1].exhausted) if self.samples else 0

    @property
    def exhausted_after_warmup(self) -> int:
        start = next((s for s in self.samples if s.t >= self.warmup), None)
        if start is None:
            return 0
        return int(self.samples[-1].exhausted - start.exhausted)

    @property
    def max_reads_per_minute(self) -> int:
        """The most reads the emulator saw in any sampled 60-second window."""
        best = 0
        for i, a in enumerate(self.samples):
            for b in self.samples[i:]:
                if b.t - a.t <= 60.0:
                    best = max(best, b.reads - a.reads)
        if self.samples and self.samples[-1].t < 60:
            best = max(best, self.samples[-1].reads)
        return best

    @property
    def checks_per_minute(self) -> float:
        """After warm-up."""
        start = next((s for s in self.samples if s.t >= self.warmup), None)
        end = self.samples[-1] if self.samples else None
        if start is None or end is None or end.t <= start.t:
            return 0.0
        return 60 * (end.checks - start.checks) / (end.t - start.t)

    @property
    def measured_period(self) -> float | None:
        per_minute = self.checks_per_minute
        return 60 * self.n / per_minute if per_minute else None

    @property
    def reported_period(self) -> float | None:
        return self.samples[-1].period if self.samples else None


def quota(run: Run, cfg: Config, reuse: tuple[str, list[str]] | None) -> Quota:
    """Quota of cfg.quota_rpm reads/min, cfg.quota_n Orchestrators with the default resync:
    does the controller pace itself instead of being refused?"""
    n = cfg.quota_n
    admin = run.emulator.admin
    admin.set_faults(latency_ms=cfg.latency_ms)
    if reuse is not None and len(reuse[1]) == n:
        ns, names = reuse  # already synced by the scale run; its controller is stopped
    else:
        ns, names = run.populate(f"quota{n}", n)
        ctl = run.controller(ns, resync=3600, log_name=f"quota-{n}-setup")
        watch = Watch(run.plane, ns).start()
        try:
            ctl.start()
            run.apply(ns, names)
            watch.wait(watch.n_ready, n, cfg.ready_timeout, f"quota {n}: initial sync")
        finally:
            watch.stop()
            ctl.stop()

    budget_env = {ENV_READS_PER_MINUTE: str(cfg.quota_rpm), ENV_WRITES_PER_MINUTE: "0"}
    admin.set_quota(reads_per_minute=cfg.quota_rpm)
    admin.reset_calls()
    ctl = run.controller(ns, resync=None, log_name=f"quota-{n}", extra_env=budget_env)
    samples: list[QuotaSample] = []
    try:
        ctl.start()
        t0 = time.monotonic()
        while True:
            t = time.monotonic() - t0
            calls = admin.calls()
            reads = sum(v for k, v in calls.items() if k not in WRITE_METHODS)
            m = ctl.metrics()
            samples.append(
                QuotaSample(
                    t=t,
                    reads=reads,
                    exhausted=m.total("runwarden_gcp_requests_total", code=EXHAUSTED),
                    checks=m.checks,
                    period=_period(m),
                )
            )
            if t >= cfg.quota_seconds:
                break
            time.sleep(min(5.0, max(0.5, cfg.quota_seconds / 20)))
    finally:
        ctl.stop()
        admin.clear_quota()
    result = Quota(n, cfg.quota_rpm, cfg.quota_seconds, cfg.quota_warmup, samples, budget_env)
    run.say(
        f"quota: {result.exhausted_total} exhausted ({result.exhausted_after_warmup} after "
        f"warm-up), max {result.max_reads_per_minute} reads/min, period "
        f"{result.reported_period} reported / {result.measured_period} measured"
    )
    return result


def _period(m: Metrics) -> float | None:
    values = [v for _, v in m.samples.get(PERIOD_METRIC, [])]
    return max(values) if values else None


def describe(obj: Any) -> str:
    return json.dumps(obj, default=lambda o: getattr(o, "__dict__", str(o)))


# ---------------------------------------------------------------------- 6. the estate


SHARD_LABEL = "runwarden.dev/shard"


def shard_selectors(shards: int) -> list[str]:
    """--selector of each shard, as manifests/shards/ has them for 3: shard 0 serves every
    Orchestrator no other shard claims (no label, "0", anything else), shard k>0 its label."""
    if shards <= 1:
        return [""]
    others = ",".join(str(k) for k in range(1, shards))
    return [f"{SHARD_LABEL} notin ({others})"] + [f"{SHARD_LABEL}={k}" for k in range(1, shards)]


@dataclass
class EstateShard:
    """One controller process of an estate run (the only one, or one shard of several)."""

    shard: int
    selector: str
    n: int  # Orchestrators it serves
    ready_seconds: float  # from when `kubectl apply` returned to its last Orchestrator Ready
    repair_seconds: float  # from the start of the drift to its last Orchestrator repaired
    peak_rss_mb: float
    steady_cpu_percent: float
    steady_checks: int
    # Changes of its Orchestrators the watch saw in the steady window (each a status write of
    # its own: nothing else writes them meanwhile).
    steady_status_writes: int

    @property
    def writes_per_check(self) -> float:
        return self.steady_status_writes / max(1, self.steady_checks)


@dataclass
class Estate:
    n: int
    projects: int
    shards: int
    resync: float
    latency_ms: int
    apply_seconds: float  # every `kubectl apply` batch done
    ready_seconds: float  # apply returned -> every Orchestrator Ready
    drift_inject_seconds: float
    repair_seconds: float  # start of the drift -> every Orchestrator repaired
    steady_seconds: float
    steady_checks: int
    steady_status_writes: int  # Orchestrator status PATCHes the apiserver served meanwhile
    per_shard: list[EstateShard]

    @property
    def writes_per_check(self) -> float:
        return self.steady_status_writes / max(1, self.steady_checks)


def estate_project(i: int, projects: int) -> str:
    return f"bench-estate-{i % max(1, projects):02d}"


def estate(run: Run, cfg: Config, shards: int) -> Estate:
    """cfg.estate_n Orchestrators over cfg.estate_projects projects in one namespace bound to
    those projects (`--namespace-binding=required`, as manifests/ install it), served by one
    controller or by ``shards`` controllers with --selector (manifests/shards/), budgets
    unlimited (quotas unlimited: a third of unlimited is unlimited). Apply in parallel
    batches, time to all Ready, drift every service at once, time to all repaired, then a
    steady window of one resync."""
    n, n_projects = cfg.estate_n, max(1, cfg.estate_projects)
    what = f"estate{n}x{shards}"
    ns = run.namespace(what)
    projects = sorted({estate_project(p, n_projects) for p in range(n_projects)})
    annotate_namespace(run.plane, ns, {PROJECTS_ANNOTATION: ",".join(projects)})
    names = [service_name(f"{what}-{run.run_id}", i) for i in range(n)]
    project = {name: estate_project(i, n_projects) for i, name in enumerate(names)}
    shard_of = {name: i % max(1, shards) for i, name in enumerate(names)}
    admin = run.emulator.admin
    admin.put_service_account(SA_EMAIL)
    run.say(f"{what}: seeding {n} services in {n_projects} projects")
    put_services(admin, names, INITIAL, workers=8, project_of=project.__getitem__)
    admin.set_faults(latency_ms=cfg.latency_ms)

    def body(name: str) -> dict[str, Any]:
        labels = {SHARD_LABEL: str(shard_of[name])} if shards > 1 else None
        return orchestrator(name, name, project[name], labels)

    selectors = shard_selectors(shards)
    controllers = [
        Controller(
            run.plane,
            run.emulator.grpc_endpoint,
            [ns],
            run.work / f"{what}-shard{k}.log",
            cfg.estate_resync,
            extra_args=["--namespace-binding=required"]
            + ([f"--selector={selector}"] if selector else []),
            extra_env=UNLIMITED,
        )
        for k, selector in enumerate(selectors)
    ]
    watch = Watch(run.plane, ns).start()
    try:
        for ctl in controllers:
            ctl.start()
        bodies = [body(name) for name in names]
        t0 = time.monotonic()
        apply_orchestrators_parallel(run.plane, ns, bodies, batch=max(1, min(1000, -(-n // 4))))
        t_applied = time.monotonic()
        run.say(f"{what}: kubectl apply {t_applied - t0:.1f}s")
        t_ready = watch.wait(watch.n_ready, n, cfg.ready_timeout, f"{what}: Ready")
        run.say(f"{what}: all Ready {t_ready - t_applied:.1f}s after apply returned")

        watch.mark_drift_baseline()
        td0 = time.monotonic()
        put_services(admin, names, DRIFTS["env"], workers=8, project_of=project.__getitem__)
        td1 = time.monotonic()
        t_repaired = watch.wait(
            watch.n_repaired, n, cfg.estate_resync * 1.1 + cfg.ready_timeout, f"{what}: repair"
        )
        run.say(f"{what}: all repaired {t_repaired - td0:.1f}s after the drift began")
        # The check after a repair reports Synced instead of DriftRepaired: a change, written.
        # The steady window starts once every Orchestrator has had that check.
        watch.wait(
            watch.n_synced, n, cfg.estate_resync * 1.1 + cfg.ready_timeout, f"{what}: settle"
        )

        window = cfg.steady_seconds or cfg.estate_resync
        w0 = status_writes(run.plane)
        with watch.lock:
            mod0 = dict(watch.modified)
        before = [(c.metrics(), c.stat()) for c in controllers]
        time.sleep(window)
        after = [(c.metrics(), c.stat()) for c in controllers]
        writes = status_writes(run.plane) - w0
        with watch.lock:
            ready_at = dict(watch.ready_at)
            repaired_at = dict(watch.repaired_at)
            mod1 = dict(watch.modified)
        per_shard = []
        for k, ((m0, s0), (m1, s1)) in enumerate(zip(before, after, strict=True)):
            mine = [name for name in names if shard_of[name] == k] if shards > 1 else names
            per_shard.append(
                EstateShard(
                    shard=k,
                    selector=selectors[k],
                    n=len(mine),
                    ready_seconds=max((ready_at.get(x, t_ready) for x in mine), default=t_ready)
                    - t_applied,
                    repair_seconds=max(
                        (repaired_at.get(x, t_repaired) for x in mine), default=t_repaired
                    )
                    - td0,
                    peak_rss_mb=s1.peak_rss_mb,
                    steady_cpu_percent=100 * (s1.cpu - s0.cpu) / (s1.at - s0.at),
                    steady_checks=int(m1.checks - m0.checks),
                    steady_status_writes=sum(mod1.get(x, 0) - mod0.get(x, 0) for x in mine),
                )
            )
        checks = sum(s.steady_checks for s in per_shard)
        return Estate(
            n=n,
            projects=n_projects,
            shards=shards,
            resync=cfg.estate_resync,
            latency_ms=cfg.latency_ms,
            apply_seconds=t_applied - t0,
            ready_seconds=t_ready - t_applied,
            drift_inject_seconds=td1 - td0,
            repair_seconds=t_repaired - td0,
            steady_seconds=window,
            steady_checks=checks,
            steady_status_writes=writes,
            per_shard=per_shard,
        )
    finally:
        watch.stop()
        for ctl in controllers:
            ctl.stop()
        admin.set_faults(latency_ms=0)
