"""Run the whole benchmark once: start what is needed, run the scenarios, write the results."""

from __future__ import annotations

import datetime as dt
import functools
import os
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench import report, scenarios
from bench.harness import REPO, control_plane_up
from bench.report import Results
from bench.scenarios import Config, Run
from cloudrun_emulator.testing import EmulatorProcess
from tests.fixtures.k8s import ControlPlane

T = TypeVar("T")
AUDIT_SCRIPT = REPO / "bench" / "audit_latency.py"
NOTES = REPO / "bench" / "results" / "notes.md"


def run(
    cfg: Config,
    out_dir: Path,
    work: Path,
    *,
    plane: ControlPlane | None = None,
    command: str = "make bench",
    audit: bool = True,
    say: Callable[[str], None] = print,
) -> Results:
    """Run every scenario; write ``out_dir``/latest.md (+ latest.png). A scenario that fails is
    recorded in the results and the others still run. ``plane``: an already running control
    plane with the CRDs (the smoke test's); else one is started in ``work`` and stopped."""
    started = time.monotonic()
    results = Results(
        config=cfg,
        started=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=command,
        load_before=os.getloadavg(),
    )
    work.mkdir(parents=True, exist_ok=True)
    own_plane = plane is None
    if plane is None:
        say(f"starting kube-apiserver + etcd in {work / 'testenv'}")
        plane = control_plane_up(work / "testenv")
    emulator = EmulatorProcess(log_dir=work / "emulator").start()
    ctx = Run(plane, emulator, work, secrets.token_hex(3), say)

    def attempt(name: str, fn: Callable[[], T]) -> T | None:
        say(f"--- {name}")
        try:
            return fn()
        except Exception as exc:
            say(traceback.format_exc())
            results.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:400]}")
            return None

    try:
        if cfg.economy_n:
            results.economy = attempt("economy", lambda: scenarios.economy(ctx, cfg))
        if cfg.overhead_n:
            results.overhead = attempt("overhead", lambda: scenarios.overhead(ctx, cfg))
        reuse: tuple[str, list[str]] | None = None
        for n in cfg.scales:
            got = attempt(f"scale {n}", functools.partial(scenarios.scale, ctx, cfg, n))
            if got is not None:
                results.scales.append(got[0])
                reuse = got[1]
        if cfg.failover_n:
            results.failover = attempt("failover", lambda: scenarios.failover(ctx, cfg, reuse))
        if cfg.quota_n:
            results.quota = attempt("quota", lambda: scenarios.quota(ctx, cfg, reuse))
        if cfg.estate_n:
            for shards in dict.fromkeys(k for k in (1, cfg.estate_shards) if k):
                got_estate = attempt(
                    f"estate {cfg.estate_n} x{shards}",
                    functools.partial(scenarios.estate, ctx, cfg, shards),
                )
                if got_estate is not None:
                    results.estates.append(got_estate)
    finally:
        emulator.stop()
        if own_plane:
            plane.down()
    if audit and AUDIT_SCRIPT.exists() and os.environ.get("BENCH_AUDIT", "1") != "0":
        results.audit = attempt("audit latency (issue 8)", lambda: run_audit(work))

    results.load_after = os.getloadavg()
    results.duration = time.monotonic() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "latest.png"
    has_chart = bool(results.scales) and report.chart(results.scales, png)
    notes = NOTES.read_text() if NOTES.exists() else None
    text = report.document(results, png.name if has_chart else None, notes)
    (out_dir / "latest.md").write_text(text)
    return results


def run_audit(work: Path) -> str:
    """bench/audit_latency.py (issue 8) prints its own markdown table; include it verbatim."""
    done = subprocess.run(
        [sys.executable, str(AUDIT_SCRIPT)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        # 20 drift events per mode (the script's own default is 50) keep `make bench` near 20 min.
        env={"BENCH_AUDIT_EVENTS": "20", **os.environ, "BENCH_WORK": str(work / "audit")},
    )
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout
