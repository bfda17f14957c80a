"""`python -m bench.memory`: the controller's memory per Orchestrator (issue 17), measured.

One controller (`python -m controller`, resync 30 s, as in the scale runs) against a fresh
kube-apiserver + emulator: apply N1 Orchestrators, wait until all are Ready and one resync has
passed (steady state: every drift loop has checked again, kopf's per-object workers have gone
idle), read the process's RSS; apply N2 - N1 more, the same again. The difference in RSS over
the difference in objects is the memory each Orchestrator costs above the base:

    .venv/bin/python -m bench.memory --n1 200 --n2 1000

``--tracemalloc DEPTH`` also starts the controller under tracemalloc and prints the allocation
sites whose traced memory grew most between the two points, per object (slower; for finding
what is kept, not for the figure itself).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

from bench.harness import (
    INITIAL,
    SA_EMAIL,
    Controller,
    Watch,
    apply_orchestrators,
    control_plane_up,
    create_namespace,
    orchestrator,
    put_services,
    service_name,
)
from cloudrun_emulator.testing import EmulatorProcess

UNLIMITED = {"RUNWARDEN_READS_PER_MINUTE": "0", "RUNWARDEN_WRITES_PER_MINUTE": "0"}

# Loaded into the controller by PYTHONPATH (sitecustomize): on SIGUSR2, a tracemalloc snapshot.
PROBE = textwrap.dedent(
    """
    import gc, os, signal, tracemalloc
    def _dump(*_):
        gc.collect()
        tracemalloc.take_snapshot().dump(os.environ["BENCH_MEMORY_SNAPSHOT"])
        open(os.environ["BENCH_MEMORY_SNAPSHOT"] + ".done", "w").close()
    if os.environ.get("BENCH_MEMORY_SNAPSHOT"):
        signal.signal(signal.SIGUSR2, _dump)
    """
)


def _snapshot(pid: int, path: Path, timeout: float = 300) -> tracemalloc.Snapshot:
    done = Path(str(path) + ".done")
    done.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no tracemalloc snapshot from {pid} in {timeout:g}s")
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(path))


def _area(tb: tracemalloc.Traceback) -> str:
    """The innermost frame in controller/ or kopf/ (what made the allocation, as we see it)."""
    for frame in reversed(tb):  # most recent last
        if "/controller/" in frame.filename or "/kopf/" in frame.filename:
            return f"{frame.filename.split('/site-packages/')[-1]}:{frame.lineno}"
    return f"{tb[-1].filename}:{tb[-1].lineno}" if len(tb) else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n1", type=int, default=200)
    parser.add_argument("--n2", type=int, default=1000)
    parser.add_argument("--resync", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=0.0, help="seconds after Ready (resync)")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="DEPTH")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"work: {work}")
    plane = control_plane_up(work / "testenv")
    emulator = EmulatorProcess(log_dir=work / "emulator").start()
    env = dict(UNLIMITED)
    snap_path = work / "snapshot.bin"
    if args.tracemalloc:
        probe = work / "probe"
        probe.mkdir()
        (probe / "sitecustomize.py").write_text(PROBE)
        env.update(
            PYTHONPATH=f"{probe}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"),
            PYTHONTRACEMALLOC=str(args.tracemalloc),
            BENCH_MEMORY_SNAPSHOT=str(snap_path),
        )
    run_id = secrets.token_hex(3)
    ns = f"memory-{run_id}"
    create_namespace(plane, ns)
    emulator.admin.put_service_account(SA_EMAIL)
    names = [service_name(f"mem-{run_id}", i) for i in range(args.n2)]
    put_services(emulator.admin, names, INITIAL, workers=8)
    ctl = Controller(
        plane, emulator.grpc_endpoint, [ns], work / "controller.log", args.resync, extra_env=env
    )
    watch = Watch(plane, ns).start()
    points: list[tuple[int, float, float]] = []
    snaps: list[tracemalloc.Snapshot] = []
    try:
        ctl.proc.start(timeout=600)  # tracemalloc slows the imports down a lot
        base = ctl.stat()
        say(f"started: RSS {base.rss_mb:.1f} MB")
        applied = 0
        for n in (args.n1, args.n2):
            apply_orchestrators(plane, ns, [orchestrator(s, s) for s in names[applied:n]])
            applied = n
            watch.wait(watch.n_ready, n, 1800, f"{n} Ready")
            time.sleep(args.settle or args.resync * 1.2)
            st = ctl.stat()
            points.append((n, st.rss_mb, st.peak_rss_mb))
            say(f"{n} Ready + settled: RSS {st.rss_mb:.1f} MB, peak {st.peak_rss_mb:.1f} MB")
            if args.tracemalloc:
                snaps.append(_snapshot(ctl.pid, snap_path))
                snap_path.rename(work / f"snapshot-{n}.bin")
    finally:
        watch.stop()
        ctl.stop()
        emulator.stop()
        plane.down()

    (n1, r1, p1), (n2, r2, p2) = points
    per = 1024 * (r2 - r1) / (n2 - n1)
    per_peak = 1024 * (p2 - p1) / (n2 - n1)
    print("| N | RSS (MB) | peak RSS (MB) |\n|---:|---:|---:|")
    for n, r, p in points:
        print(f"| {n} | {r:.1f} | {p:.1f} |")
    print(f"\nRSS per Orchestrator above the base: {per:.1f} KB (peak: {per_peak:.1f} KB)")
    if snaps:
        by_area: dict[str, int] = {}
        for s in snaps[1].compare_to(snaps[0], "traceback"):
            by_area[_area(s.traceback)] = by_area.get(_area(s.traceback), 0) + s.size_diff
        print("\ntraced growth per object by area (outermost frame of ours or kopf's):")
        for area, size in sorted(by_area.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"{size / (n2 - n1):8.0f} B  {area}")
        stats = snaps[1].compare_to(snaps[0], "traceback" if args.tracemalloc > 1 else "lineno")
        total = sum(s.size_diff for s in stats)
        print(f"\ntraced growth per object: {total / (n2 - n1) / 1024:.1f} KB; top sites:")
        for s in stats[: args.top]:
            per_obj, blocks = s.size_diff / (n2 - n1), s.count_diff / (n2 - n1)
            print(f"\n{per_obj:8.0f} B/object  {blocks:6.1f} blocks")
            for line in s.traceback.format()[-2 * min(args.tracemalloc, 6) :]:
                print("    " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
