"""Results -> the markdown table (printed and written to bench/results/latest.md) and the chart."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.scenarios import Config, Economy, Estate, Failover, Overhead, Quota, Scale

GOAL_RATIO = 1.25  # issue 17 (was 2.0 in issue 7)
GOAL_REPAIR_SECONDS = 60.0
GOAL_RSS_MB = 250.0
# The estate (issue 17): 10,000 Orchestrators on one replica.
GOAL_ESTATE_READY_SECONDS = 60.0
GOAL_ESTATE_REPAIR_SECONDS = 300.0
GOAL_ESTATE_RSS_MB = 400.0
GOAL_ESTATE_CPU_PERCENT = 50.0
METHOD_ORDER = (
    "GetService",
    "GetIamPolicy",
    "UpdateService",
    "SetIamPolicy",
    "GetOperation",
    "GetServiceAccount",
)


@dataclass
class Results:
    config: Config
    started: str  # ISO date-time, UTC
    command: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    duration: float = 0.0
    economy: Economy | None = None
    overhead: Overhead | None = None
    scales: list[Scale] = field(default_factory=list)
    quota: Quota | None = None
    failover: Failover | None = None
    estates: list[Estate] = field(default_factory=list)  # one replica, then the shards
    audit: str | None = None  # bench/audit_latency.py's table (issue 8), when it exists
    errors: list[str] = field(default_factory=list)


def _ok(flag: bool) -> str:
    return "✅" if flag else "❌"


def _num(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{v:.0f}"


def tables(r: Results) -> str:
    """The markdown tables (what `make bench` prints)."""
    out: list[str] = []
    if r.economy is not None:
        e = r.economy
        out += [
            f"### 1. API economy — {e.n} Orchestrators; calls per steady-state check, and per "
            "repair (the repair check's own reads included)",
            "",
            "| scenario | checks | repairs | " + " | ".join(METHOD_ORDER) + " | target | ok |",
            "|---|---:|---:|" + "---:|" * len(METHOD_ORDER) + "---|---|",
        ]
        for row in e.rows:
            cells = [_num(row.per.get(m, 0.0)) for m in METHOD_ORDER]
            extra = sorted(set(row.per) - set(METHOD_ORDER))
            target = row.target + (f" (also: {', '.join(extra)})" if extra else "")
            out.append(
                f"| {row.scenario} | {row.checks} | {row.repairs} | "
                + " | ".join(cells)
                + f" | {target} | {_ok(row.ok)} |"
            )
        out.append("")
    if r.overhead is not None:
        o = r.overhead
        out += [
            f"### 2. Overhead — {o.n} Orchestrators, resync {_num(o.resync)} s, "
            f"{len(o.round_ratios) or 1} interleaved rounds, {_num(o.window, 1)} s of windows",
            "",
            "| | checks | calls/check | CPU ms/check |",
            "|---|---:|---:|---:|",
            f"| controller (`python -m controller`) | {o.checks} | {_num(o.calls_per_check)} | "
            f"{_num(o.controller_ms)} |",
            f"| bare script, same clients and rate (`python -m bench.bare`) | {o.bare_checks} | "
            f"{_num(o.bare_calls_per_check)} | {_num(o.bare_ms)} |",
            f"| **ratio** controller / bare (goal ≤ {_num(GOAL_RATIO)}) | | | "
            f"**{_num(o.ratio)}** {_ok(o.ratio <= GOAL_RATIO)} |",
            f"| bare script + the status write the contract asks after every check "
            f"(`--patch-status`) | {o.floor_checks} | 2 + 1 PATCH | {_num(o.floor_ms)} |",
            f"| ratio controller / (bare + status write) | | | {_num(o.floor_ratio)} |",
            "",
            f"Apiserver writes per steady check (Orchestrator status PATCHes counted by the "
            f"apiserver over the controller's windows; goal 0): "
            f"**{_num(o.status_writes_per_check, 3)}** ({o.status_writes} in {o.checks} checks) "
            f"{_ok(o.status_writes == 0)}",
            "",
        ]
        if len(o.round_ratios) > 1:
            each = ", ".join(_num(x) for x in o.round_ratios)
            out += [f"Ratio per round (controller / bare): {each}; the table pools the rounds.", ""]
    if r.scales:
        s0 = r.scales[0]
        out += [
            f"### 3. Scale — emulator latency {s0.latency_ms} ms per call, resync "
            f"{_num(s0.resync)} s",
            "",
            "| Orchestrators | kubectl apply (s) | apply → all Ready (s) "
            "| all drift → all repaired (s) | peak RSS (MB) | CPU s to Ready | CPU s to repair "
            "| steady CPU (% of a core) | steady checks/s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in r.scales:
            out.append(
                f"| {s.n} | {_num(s.apply_seconds, 1)} | {_num(s.ready_seconds, 1)} | "
                f"{_num(s.repair_seconds, 1)} {_ok(s.repair_seconds <= GOAL_REPAIR_SECONDS)} | "
                f"{_num(s.peak_rss_mb, 0)} {_ok(s.peak_rss_mb <= GOAL_RSS_MB)} | "
                f"{_num(s.cpu_ready, 1)} | {_num(s.cpu_repair, 1)} | "
                f"{_num(s.steady_cpu_percent, 1)} | {_num(s.steady_checks_per_second, 1)} |"
            )
        out += [
            "",
            f"Goals: all repaired ≤ {_num(GOAL_REPAIR_SECONDS)} s after the drift (detection "
            f"waits for the next check: up to {_num(s0.resync * 1.1)} s at this resync), "
            f"peak RSS ≤ {_num(GOAL_RSS_MB)} MB.",
            "",
        ]
    if r.failover is not None:
        f = r.failover
        out += [
            f"### Leader failover — {f.n} Orchestrators, 2 replicas with `--leader-election` "
            f"(lease {_num(f.lease_seconds)} s), resync {_num(f.resync)} s",
            "",
            "SIGKILL of the leader, then every service drifted at once; times from the kill.",
            "",
            "| standby's Google calls while the leader lived | first repair (s) | all repaired (s) "
            "| goal: first repair ≤ 15 s |",
            "|---:|---:|---:|---|",
            f"| {f.standby_calls_before} | {_num(f.first_repair_seconds, 1)} | "
            f"{_num(f.all_repaired_seconds, 1)} | {_ok(f.first_repair_seconds <= 15)} |",
            "",
        ]
    if r.quota is not None:
        q = r.quota
        period = q.reported_period
        measured = q.measured_period
        out += [
            f"### 4. Quota pacing — {q.n} Orchestrators, emulator quota {q.rpm} reads/min, "
            f"default resync, {_num(q.seconds)} s (warm-up {_num(q.warmup)} s)",
            "",
            "| RESOURCE_EXHAUSTED total | after warm-up | max reads in a 60 s window | "
            "checks/min after warm-up | effective period reported (s) | measured (s) |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {q.exhausted_total} | {q.exhausted_after_warmup} "
            f"{_ok(q.exhausted_after_warmup == 0)} | {q.max_reads_per_minute} | "
            f"{_num(q.checks_per_minute, 0)} | "
            f"{_num(period, 0) if period is not None else 'not reported ❌'} | "
            f"{_num(measured, 0) if measured is not None else '-'} |",
            "",
            "Controller settings used: "
            + ", ".join(f"`{k}={v}`" for k, v in sorted(q.budget_env.items())),
            "",
        ]
    if r.estates:
        out += _estate_tables(r.estates)
    out += ["### 5. Detection → repair latency, audit events vs polling (issue 8)", ""]
    skipped = "_not measured: skipped (BENCH_AUDIT=0) or failed (see the errors below)_"
    out += [r.audit.strip() if r.audit else skipped, ""]
    if r.errors:
        out += ["### Errors", "", *(f"- {e}" for e in r.errors), ""]
    return "\n".join(out)


def _estate_tables(estates: list[Estate]) -> list[str]:
    e0 = estates[0]
    out = [
        f"### 6. Estate — {e0.n} Orchestrators across {e0.projects} projects, emulator latency "
        f"{e0.latency_ms} ms, quotas and budgets unlimited, resync {_num(e0.resync)} s",
        "",
        "| controllers | kubectl apply (s) | apply returned → all Ready (s) "
        "| all drift → all repaired (s) | peak RSS (MB) | steady CPU (% of a core) "
        "| status writes per steady check |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in estates:
        label = "1 replica" if e.shards <= 1 else f"{e.shards} shards (`--selector`)"
        rss = max(s.peak_rss_mb for s in e.per_shard)
        cpu = max(s.steady_cpu_percent for s in e.per_shard)
        out.append(
            f"| **{label}** | {_num(e.apply_seconds, 1)} | {_num(e.ready_seconds, 1)} "
            f"{_ok(e.ready_seconds <= GOAL_ESTATE_READY_SECONDS)} | "
            f"{_num(e.repair_seconds, 1)} {_ok(e.repair_seconds <= GOAL_ESTATE_REPAIR_SECONDS)} | "
            f"{_num(rss, 0)}{' (max)' if e.shards > 1 else ''} "
            f"{_ok(rss <= GOAL_ESTATE_RSS_MB)} | "
            f"{_num(cpu, 1)}{' (max)' if e.shards > 1 else ''} "
            f"{_ok(cpu <= GOAL_ESTATE_CPU_PERCENT)} | "
            f"{_num(e.writes_per_check, 3)} ({e.steady_status_writes} in {e.steady_checks}) "
            f"{_ok(e.steady_status_writes == 0)} |"
        )
        if e.shards > 1:
            for s in e.per_shard:
                out.append(
                    f"| shard {s.shard} (`{s.selector}`, {s.n}) | | {_num(s.ready_seconds, 1)} | "
                    f"{_num(s.repair_seconds, 1)} | {_num(s.peak_rss_mb, 0)} | "
                    f"{_num(s.steady_cpu_percent, 1)} | {_num(s.writes_per_check, 3)} "
                    f"({s.steady_status_writes} in {s.steady_checks}) |"
                )
    out += [
        "",
        f"Goals (one replica): all Ready ≤ {_num(GOAL_ESTATE_READY_SECONDS)} s after `kubectl "
        f"apply` returns (the apply itself is apiserver-bound: reported), all repaired ≤ "
        f"{_num(GOAL_ESTATE_REPAIR_SECONDS)} s after the drift began (detection waits for the "
        f"next check: up to {_num(e0.resync * 1.1)} s), peak RSS ≤ {_num(GOAL_ESTATE_RSS_MB)} MB, "
        f"steady CPU ≤ {_num(GOAL_ESTATE_CPU_PERCENT)} % of one core, 0 status writes per "
        "steady check; shards are held to the same. Apply: batches of 1,000 documents, 4 "
        "`kubectl apply --server-side` at a time. The namespace is bound to the projects "
        "(`runwarden.dev/projects`, `--namespace-binding=required`, as manifests/ install it). "
        "Steady: a window of one resync that starts once every Orchestrator has been checked "
        "again after its repair (Ready reason back from DriftRepaired to Synced: a change, "
        "written). Status writes: the apiserver's count over that window for the row; per "
        "shard, the changes of its Orchestrators the watch saw.",
        "",
    ]
    return out


def document(r: Results, chart: str | None, notes: str | None) -> str:
    """The whole of bench/results/latest.md."""
    # BENCH_COMMIT: a run from an exported tree (git archive) names the commit it came from.
    commit = os.environ.get("BENCH_COMMIT") or _git("rev-parse", "--short", "HEAD")
    dirty = ""
    if not os.environ.get("BENCH_COMMIT") and _git("status", "--porcelain", "controller"):
        dirty = " (with uncommitted changes in controller/)"
    head = [
        "# Runwarden benchmark — latest results",
        "",
        f"- Date: {r.started} (took {_num(r.duration / 60, 1)} min)",
        f"- Command: `{r.command}`",
        f"- Commit: `{commit}`{dirty}",
        f"- Machine: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()} {platform.release()}",
        "- Load average (1/5/15 min) before: "
        + "/".join(_num(x) for x in r.load_before)
        + ", after: "
        + "/".join(_num(x) for x in r.load_after)
        + " — the machine is shared; CPU-time figures are less affected than wall-clock ones",
        "- Components: kube-apiserver + etcd (`hack/testenv`), `cloudrun-emulator`, "
        "`python -m controller` as a subprocess, all on this machine",
        "",
    ]
    body = tables(r)
    tail = []
    if chart:
        tail += ["", f"![Ready Orchestrators over time]({chart})", ""]
    tail += ["", _METHOD, ""]
    if notes:
        tail += ["", notes.strip(), ""]
    return "\n".join(head) + "\n" + body + "\n".join(tail)


_METHOD = """## How it is measured
- **API economy**: the controller runs with a resync of 1 h, so it checks only when started
  (kopf resumes every Orchestrator: one check each). Before each start the emulator's call
  counters are reset and, for the repair rows, every service is drifted through the admin API.
  Calls are the emulator's counters once quiet; checks and repairs the controller's
  `runwarden_reconcile_total`. A repair row is the repair check's calls (its own 2 reads included)
  minus what the plain checks in that start cost. GetServiceAccount is the IAM API, not Cloud
  Run: it is asked before a member is (re)granted, and cached for 10 min in the process.
- **Overhead**: process CPU (utime+stime from /proc) of the controller over a steady-state window
  divided by the checks it made (`runwarden_reconcile_total`), against `python -m bench.bare`,
  which makes the same number of checks (GetService + GetIamPolicy, same clients from
  `controller.gcp.clients.make_clients`, same emulator) at the same rate, measured with
  `time.process_time()` around the calls. The controller's figure includes everything a check
  costs it; with the status heartbeat (`--status-heartbeat`, default 300 s) a steady check writes
  no status, so there is no watch event to handle either.
- **Scale**: services exist in the emulator as someone else deployed them (no declared env,
  invoker or setting yet); one `kubectl apply --server-side` of a multi-document YAML creates the
  Orchestrators; Ready and drift counts come from a watch on the apiserver. "All drift" changes
  the env of every service through the admin API (8 threads) and waits until every
  Orchestrator's `status.drift.count` has grown. Peak RSS is the controller's VmHWM.
- **Quota**: the emulator refuses reads beyond its per-minute budget with RESOURCE_EXHAUSTED and
  RetryInfo, like Google. The controller restarts with the default resync (60 s) and the budget
  as a setting; refusals are the controller's `runwarden_gcp_requests_total{code=
  "RESOURCE_EXHAUSTED"}`, reads the emulator's counters sampled every 5 s."""


def chart(scales: list[Scale], path: Path) -> bool:
    """Ready (and repaired) Orchestrators over time, one line per scale; False without
    matplotlib (bench/requirements.txt; `make bench` installs it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in scales:
        xs, ys = _steps(s.ready_series)
        ax1.step(xs, ys, where="post", label=f"{s.n} Orchestrators")
        xs, ys = _steps([(0.0, 0), *s.repaired_series])
        ax2.step(xs, ys, where="post", label=f"{s.n} Orchestrators")
    ax1.set(title="Ready after kubectl apply", xlabel="seconds since apply", ylabel="Ready")
    ax2.set(
        title=f"Repaired after all services drift (resync {_num(scales[0].resync)} s)",
        xlabel="seconds since drift",
        ylabel="repaired",
    )
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _steps(series: list[tuple[float, int]]) -> tuple[list[float], list[int]]:
    return [t for t, _ in series], [k for _, k in series]


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return done.stdout.strip()
