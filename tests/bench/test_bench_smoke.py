"""A smoke run of the benchmark harness (issue 7): every scenario with N=3, real components.

`make bench` is never part of `make test`; this only proves the harness still works end to end
(and the API economy it measures exactly still holds) so the benchmark does not rot unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import tables
from bench.scenarios import Config
from bench.suite import run
from tests.fixtures.k8s import ControlPlane

pytestmark = pytest.mark.e2e

SMOKE = Config(
    economy_n=3,
    overhead_n=3,
    overhead_seconds=2,
    overhead_rounds=2,
    scales=(3,),
    scale_resync=2,
    steady_seconds=1,
    quota_n=3,
    quota_rpm=600,
    quota_seconds=3,
    quota_warmup=1,
    ready_timeout=60,
    failover_n=3,
    estate_n=30,
    estate_projects=3,
    estate_shards=3,
    estate_resync=2,
)


@pytest.mark.timeout(720)  # failover and the two estate runs add ~2 min on a busy machine
def test_bench_smoke(crds: ControlPlane, tmp_path: Path) -> None:
    results = run(SMOKE, tmp_path / "results", tmp_path / "work", plane=crds, audit=False,
                  command="pytest tests/bench", say=lambda _: None)  # fmt: skip

    assert results.errors == []
    # API economy is exact (counted by the emulator), so the smoke run can hold it to its goal.
    assert results.economy is not None
    assert {r.scenario: r.ok for r in results.economy.rows} == {
        "steady": True,
        "env": True,
        "invokers": True,
        "settings": True,
        "env+invokers": True,
    }, tables(results)
    assert results.overhead is not None
    assert results.overhead.checks > 0 and results.overhead.bare_checks == results.overhead.checks
    assert results.overhead.bare_calls_per_check == 2
    # The status heartbeat: steady checks cost the apiserver no write (counted by the apiserver).
    assert results.overhead.status_writes == 0, tables(results)
    [scale] = results.scales
    assert scale.n == 3 and 0 < scale.ready_seconds < scale.repair_seconds + 60
    assert scale.ready_series[-1][1] == 3 and scale.repaired_series[-1][1] == 3
    assert scale.peak_rss_mb > 0
    assert results.quota is not None and results.quota.samples
    # Leader failover on the scale run's 3 Orchestrators: the standby made no call while the
    # leader lived, and repaired all after the kill (times are reported, not asserted).
    assert results.failover is not None and results.failover.n == 3
    assert results.failover.standby_calls_before == 0
    assert 0 < results.failover.first_repair_seconds <= results.failover.all_repaired_seconds

    # The estate (issue 17) at a tiny size: one replica, then 3 shards by --selector, every
    # Orchestrator of a namespace bound to its 3 projects served by exactly one of them.
    assert [(e.n, e.shards) for e in results.estates] == [(30, 1), (30, 3)], tables(results)
    one, sharded = results.estates
    assert one.ready_seconds > 0 and one.per_shard[0].n == 30 and one.per_shard[0].peak_rss_mb > 0
    assert [s.n for s in sharded.per_shard] == [10, 10, 10]
    assert all(s.steady_checks > 0 and s.peak_rss_mb > 0 for s in sharded.per_shard)

    text = (tmp_path / "results" / "latest.md").read_text()
    for heading in ("API economy", "Overhead", "Scale", "Quota pacing", "issue 8", "Estate"):
        assert heading in text
