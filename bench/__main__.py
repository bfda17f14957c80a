"""`python -m bench`: run the benchmark, print the table, write bench/results/latest.md.

Sizes and durations come from the environment (defaults in brackets):
  BENCH_SCALES=100,300,1000   Orchestrator counts for the scale runs ("" = none)
  BENCH_ECONOMY_N=10          Orchestrators for API economy (0 = skip)
  BENCH_OVERHEAD_N=20         Orchestrators for the overhead ratio (0 = skip)
  BENCH_OVERHEAD_SECONDS=20   its steady-state window (per round)
  BENCH_OVERHEAD_ROUNDS=3     controller / bare rounds, interleaved
  BENCH_SCALE_RESYNC=30       resync (s) during the scale runs
  BENCH_LATENCY_MS=20         emulator latency per call for scale and quota runs
  BENCH_FAILOVER_N=100        leader failover: on the last scale run's Orchestrators, else
                              on this many (0 = skip)
  BENCH_QUOTA_N=1000          Orchestrators for quota pacing (0 = skip)
  BENCH_QUOTA_RPM=600         the emulator's read quota (and the controller's read budget)
  BENCH_QUOTA_SECONDS=240     how long to watch the pacing (warm-up: BENCH_QUOTA_WARMUP=60)
  BENCH_ESTATE_N=10000        the estate (issue 17): this many Orchestrators on one replica,
                              then on BENCH_ESTATE_SHARDS controllers (0 = skip)
  BENCH_ESTATE_PROJECTS=20    ... across this many projects (namespace bound to them)
  BENCH_ESTATE_SHARDS=3       ... shards by --selector, as manifests/shards/ (0 = one replica only)
  BENCH_ESTATE_RESYNC=120     resync (s) of the estate runs
  BENCH_OUT=bench/results     where latest.md and latest.png go
  BENCH_AUDIT=1               0 skips bench/audit_latency.py (issue 8; 20 events per mode)
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
from pathlib import Path

from bench.harness import REPO
from bench.report import tables
from bench.scenarios import Config
from bench.suite import run


def config_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> Config:
    d = Config()

    def num(key: str, default: float) -> float:
        raw = env.get(key, "").strip()
        return float(raw) if raw else default

    raw_scales = env.get("BENCH_SCALES")
    scales = d.scales
    if raw_scales is not None:
        scales = tuple(int(x) for x in raw_scales.replace(" ", "").split(",") if x)
    return Config(
        economy_n=int(num("BENCH_ECONOMY_N", d.economy_n)),
        overhead_n=int(num("BENCH_OVERHEAD_N", d.overhead_n)),
        overhead_seconds=num("BENCH_OVERHEAD_SECONDS", d.overhead_seconds),
        overhead_rounds=int(num("BENCH_OVERHEAD_ROUNDS", d.overhead_rounds)),
        scales=scales,
        scale_resync=num("BENCH_SCALE_RESYNC", d.scale_resync),
        latency_ms=int(num("BENCH_LATENCY_MS", d.latency_ms)),
        quota_n=int(num("BENCH_QUOTA_N", d.quota_n)),
        failover_n=int(num("BENCH_FAILOVER_N", d.failover_n)),
        quota_rpm=int(num("BENCH_QUOTA_RPM", d.quota_rpm)),
        quota_seconds=num("BENCH_QUOTA_SECONDS", d.quota_seconds),
        quota_warmup=num("BENCH_QUOTA_WARMUP", d.quota_warmup),
        estate_n=int(num("BENCH_ESTATE_N", d.estate_n)),
        estate_projects=int(num("BENCH_ESTATE_PROJECTS", d.estate_projects)),
        estate_shards=int(num("BENCH_ESTATE_SHARDS", d.estate_shards)),
        estate_resync=num("BENCH_ESTATE_RESYNC", d.estate_resync),
    )


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so every controller, emulator and control plane is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = config_from_env()
    out = Path(os.environ.get("BENCH_OUT") or REPO / "bench" / "results")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = REPO / ".cache" / "bench" / stamp
    settings = " ".join(
        f"{k}={v}"
        for k, v in sorted(os.environ.items())
        if k.startswith("BENCH_") and k not in ("BENCH_COMMAND", "BENCH_COMMIT")
    )
    command = os.environ.get("BENCH_COMMAND") or f"{settings} make bench".strip()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    say(f"bench: {cfg}; logs in {work}")
    results = run(cfg, out, work, command=command, say=say)
    print(tables(results))
    print(f"written: {out / 'latest.md'}", file=sys.stderr)
    return 1 if results.errors else 0


if __name__ == "__main__":
    sys.exit(main())
