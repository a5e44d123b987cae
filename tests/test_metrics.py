"""Metrics: hot-path counters, histogram buckets, snapshots, aggregation, carry-over, bounded labels, exposition."""

from __future__ import annotations

import gc
import tracemalloc

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from o7s_cluster.admin.metrics import (
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    OTHER,
    CounterCarry,
    LabelBudget,
    WorkerMetrics,
    aggregate,
    render_prometheus,
)
from o7s_cluster.usage.counters import OrgCounters


def parse(text: bytes) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from Prometheus text, via prometheus_client's parser."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def lbl(**kw: str) -> tuple:
    return tuple(sorted(kw.items()))


def test_histogram_buckets_boundaries_and_overflow() -> None:
    m = OrgCounters("acme", "pro")
    m.query_done(0.0, 0, True)  # first bucket
    m.query_done(0.001, 0, True)  # exactly a bound: counted in le="0.001" (Prometheus buckets are <=)
    m.query_done(0.0010001, 0, True)  # just above: the next bucket
    m.query_done(10.0, 0, True)  # the last finite bound
    m.query_done(99.0, 0, True)  # above every bound: +Inf
    i_1ms = LATENCY_BUCKETS.index(0.001)
    assert m.latency_counts[0] == 1
    assert m.latency_counts[i_1ms] == 1
    assert m.latency_counts[i_1ms + 1] == 1
    assert m.latency_counts[len(LATENCY_BUCKETS) - 1] == 1
    assert m.latency_counts[len(LATENCY_BUCKETS)] == 1
    assert sum(m.latency_counts) == 5
    assert m.query_seconds == pytest.approx(0.001 + 0.0010001 + 10.0 + 99.0)
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert LATENCY_BUCKETS[0] == 0.00025 and LATENCY_BUCKETS[-1] == 10.0


def test_hot_path_has_fixed_shape_and_does_not_grow() -> None:
    m = WorkerMetrics(0, 1).org("acme", "pro")
    with pytest.raises(AttributeError):
        m.some_new_field = 1  # type: ignore[attr-defined]  # __slots__: no per-object dict
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(50_000):
            m.bytes_in += 100
            m.bytes_out += 2000
            m.query_done((i % 1000) / 100_000, i % 3, i % 7 != 0)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0 and
                s.traceback[0].filename.endswith(("o7s_cluster/admin/metrics.py", "o7s_cluster/usage/counters.py")))
    assert grown < 1024, f"the hot path retained {grown} bytes"
    assert m.queries == 50_000 and sum(m.latency_counts) == 50_000


def test_org_cache_and_tier_change() -> None:
    w = WorkerMetrics(3, 4242)
    a = w.org("acme", "pro")
    assert w.org("acme", "pro") is a
    b = w.org("acme", "enterprise")  # tier changed: a new object, the old one keeps its counters
    assert b is not a
    a.queries, b.queries = 5, 7
    a.client_connections, b.client_connections = 0, 2
    snap = w.snapshot()
    assert {(o["org"], o["tier"], o["queries"]) for o in snap["orgs"]} == {("acme", "pro", 5),
                                                                           ("acme", "enterprise", 7)}


def test_snapshot_is_complete_and_json_able() -> None:
    w = WorkerMetrics(1, 999)
    m = w.org("acme", "pro")
    m.query_done(0.002, 0, True)
    m.client_connections, m.backend_connections = 3, 1
    m.queries, m.errors, m.throttled, m.refused = 10, 1, 2, 3
    m.bytes_in, m.bytes_out, m.pool_waits, m.pool_wait_seconds, m.handoffs_in = 100, 2000, 4, 0.5, 6
    w.handoffs_out, w.cancels_forwarded, w.sessions_total, w.auth_failures, w.protocol_errors = 1, 2, 3, 4, 5
    w.limits_degraded, w.usage_spool_bytes, w.usage_shipping_lag_seconds = 1, 4096, 2.5
    w.pool_state = lambda: {"acme": {"pool_in_use": 1, "pool_idle": 2, "pool_waiting": 0}}
    snap = orjson.loads(orjson.dumps(w.snapshot()))
    assert snap["version"] == 1 and snap["worker"] == 1 and snap["pid"] == 999
    assert snap["buckets"] == list(LATENCY_BUCKETS)
    assert (snap["handoffs_out"], snap["cancels_forwarded"], snap["sessions_total"], snap["auth_failures"],
            snap["protocol_errors"]) == (1, 2, 3, 4, 5)
    assert (snap["limits_degraded"], snap["usage_spool_bytes"], snap["usage_shipping_lag_seconds"]) == (1, 4096, 2.5)
    (o,) = snap["orgs"]
    assert o == {
        "org": "acme", "tier": "pro", "db_type": "postgres", "client_connections": 3, "backend_connections": 1,
        "queries": 10, "errors": 1, "throttled": 2, "refused": 3, "bytes_in": 100, "bytes_out": 2000,
        "pool_waits": 4, "pool_wait_seconds": 0.5, "handoffs_in": 6, "listener_connections": 0,
        "notifications": 0, "latency_counts": o["latency_counts"], "latency_sum": 0.002,
        "pool_in_use": 1, "pool_idle": 2, "pool_waiting": 0,
    }
    assert len(o["latency_counts"]) == len(LATENCY_BUCKETS) + 1 and sum(o["latency_counts"]) == 1
    # A broken pool-state provider costs the pool fields, never the snapshot.
    w.pool_state = lambda: 1 / 0  # type: ignore[assignment,return-value]
    assert "pool_in_use" not in w.snapshot()["orgs"][0]


def _workers() -> list[WorkerMetrics]:
    ws = [WorkerMetrics(i, 100 + i) for i in range(3)]
    for i, w in enumerate(ws):
        a = w.org("acme", "pro")
        for _ in range(i + 1):
            a.query_done(0.003, 0, True)
        a.queries, a.client_connections, a.bytes_out = 10 * (i + 1), i, 1000
        g = w.org("globex", "free")
        g.queries, g.errors, g.refused = 1, 1, i
        w.handoffs_out, w.cancels_forwarded = i, 1
        w.usage_shipping_lag_seconds = float(i)
    ws[2].limits_degraded = 1
    return ws


def test_redis_figures_kept_apart_and_carried() -> None:
    """An org's Redis entry (database type redis) is summed into its figures and also shown alone, across
    workers, in the o7s_redis_* families and /v1/orgs, and survives a worker's death in the carry."""
    ws = [WorkerMetrics(i, 200 + i) for i in range(2)]
    for i, w in enumerate(ws):
        w.org("acme", "pro").queries = 100
        r = w.org("acme", "pro", "redis")
        r.queries, r.errors, r.throttled, r.refused, r.bytes_in, r.bytes_out = 10 + i, 1, 2, 3, 40, 50
        r.client_connections = 1
    (o,) = aggregate([w.snapshot() for w in ws])["orgs"]
    assert o["queries"] == 221 and o["redis_queries"] == 21 and o["redis_refused"] == 6
    assert o["redis_client_connections"] == 2
    text = render_prometheus([w.snapshot() for w in ws], cluster={}).decode()
    assert 'o7s_redis_commands_total{org="acme",tier="pro"} 21.0' in text
    assert 'o7s_redis_bytes_sent_total{org="acme",tier="pro"} 100.0' in text
    assert 'o7s_queries_total{org="acme",tier="pro"} 221.0' in text
    from o7s_cluster.admin.http import org_figures

    fig = org_figures("acme", [w.snapshot() for w in ws], [])
    assert fig["redis"] == {"client_connections": 2, "commands": 21, "errors": 2, "throttled": 4, "refused": 6,
                            "bytes_in": 80, "bytes_out": 100}
    carry = CounterCarry()
    carry.update([w.snapshot() for w in ws])
    after = carry.update([ws[0].snapshot()])  # worker 1 is gone: its counters are carried, not its gauges
    fig = org_figures("acme", after, [])
    assert fig["redis"]["commands"] == 21 and fig["redis"]["client_connections"] == 1
    assert 'o7s_redis_commands_total{org="acme",tier="pro"} 21.0' in render_prometheus(after, cluster={}).decode()
    assert org_figures("acme", [WorkerMetrics(9, 9).snapshot()] + [ws[0].snapshot()], [])["redis"] is not None


def test_aggregate_sums_over_workers() -> None:
    total = aggregate([w.snapshot() for w in _workers()])
    assert total["workers"] == 3
    orgs = {(o["org"], o["tier"]): o for o in total["orgs"]}
    assert orgs["acme", "pro"]["queries"] == 60
    assert orgs["acme", "pro"]["client_connections"] == 3
    assert orgs["acme", "pro"]["bytes_out"] == 3000
    assert sum(orgs["acme", "pro"]["latency_counts"]) == 6
    assert orgs["acme", "pro"]["latency_sum"] == pytest.approx(0.018)
    assert orgs["globex", "free"]["refused"] == 3 and orgs["globex", "free"]["errors"] == 3
    assert total["handoffs_out"] == 3 and total["cancels_forwarded"] == 3
    assert total["limits_degraded"] == 1  # any worker degraded
    assert total["usage_shipping_lag_seconds"] == 2.0  # the worst worker


def test_aggregate_refuses_other_buckets() -> None:
    snap = WorkerMetrics(0, 1).snapshot()
    snap["buckets"] = [1.0]
    with pytest.raises(ValueError, match="latency buckets"):
        aggregate([snap])


def test_render_parses_and_numbers_match() -> None:
    ws = _workers()
    ws[0].pool_state = lambda: {"acme": {"pool_in_use": 2, "pool_idle": 3, "pool_waiting": 1}}
    cluster = {"workers": [{"index": 0, "pid": 100, "state": "up", "restarts": 2},
                           {"index": 1, "pid": 101, "state": "up"},
                           {"index": 2, "pid": 102, "state": "starting"}],
               "ready": False, "target_workers": 3, "stale_workers": 0}
    text = render_prometheus([w.snapshot() for w in ws], cluster=cluster)
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    m = parse(text)
    acme, globex = lbl(org="acme", tier="pro"), lbl(org="globex", tier="free")
    assert m["o7s_queries_total"] == {acme: 60, globex: 3}
    assert m["o7s_query_errors_total"][globex] == 3
    assert m["o7s_queries_refused_total"][globex] == 3
    assert m["o7s_queries_throttled_total"][acme] == 0
    assert m["o7s_client_connections"][acme] == 3
    assert m["o7s_backend_connections"][acme] == 0
    assert m["o7s_bytes_sent_total"][acme] == 3000
    assert m["o7s_bytes_received_total"][acme] == 0
    assert m["o7s_pool_waits_total"][acme] == 0 and m["o7s_pool_wait_seconds_total"][acme] == 0
    assert m["o7s_handoffs_total"][acme] == 0
    assert m["o7s_pool_connections"] == {lbl(org="acme", tier="pro", state="in_use"): 2,
                                         lbl(org="acme", tier="pro", state="idle"): 3}
    assert m["o7s_pool_waiting_clients"] == {acme: 1}
    # A real histogram: cumulative buckets, +Inf == _count, _sum.
    buckets = m["o7s_query_duration_seconds_bucket"]
    assert buckets[lbl(org="acme", tier="pro", le="0.0025")] == 0
    assert buckets[lbl(org="acme", tier="pro", le="0.005")] == 6
    assert buckets[lbl(org="acme", tier="pro", le="+Inf")] == 6
    assert m["o7s_query_duration_seconds_count"][acme] == 6
    assert m["o7s_query_duration_seconds_sum"][acme] == pytest.approx(0.018)
    assert len([k for k in buckets if ("org", "acme") in k]) == len(LATENCY_BUCKETS) + 1
    # Worker-level and cluster-level families.
    assert m["o7s_handoffs_sent_total"][()] == 3
    assert m["o7s_cancels_forwarded_total"][()] == 3
    assert m["o7s_sessions_total"][()] == 0
    assert m["o7s_auth_failures_total"][()] == 0 and m["o7s_protocol_errors_total"][()] == 0
    assert m["o7s_limits_degraded"][()] == 1
    assert m["o7s_usage_spool_bytes"][()] == 0
    assert m["o7s_usage_shipping_lag_seconds"][()] == 2.0
    assert m["o7s_worker_client_connections"] == {lbl(worker="0"): 0, lbl(worker="1"): 1, lbl(worker="2"): 2}
    assert m["o7s_workers"][lbl(state="up")] == 2 and m["o7s_workers"][lbl(state="starting")] == 1
    assert m["o7s_workers"][lbl(state="dead")] == 0 and m["o7s_workers"][lbl(state="retiring")] == 0
    assert m["o7s_worker_up"] == {lbl(worker="0"): 1, lbl(worker="1"): 1, lbl(worker="2"): 0}
    assert m["o7s_worker_restarts_total"] == {lbl(worker="0"): 2}
    assert m["o7s_workers_target"][()] == 3
    assert m["o7s_ready"][()] == 0
    assert m["o7s_metrics_stale_workers"][()] == 0
    # Every name starts with o7s_.
    assert all(name.startswith("o7s_") for name in m)


def test_bounded_labels_top_orgs_and_other() -> None:
    w = WorkerMetrics(0, 1)
    for i in range(250):
        o = w.org(f"org{i:03d}", "pro" if i % 2 else "free")
        o.queries = i  # the busiest are org249, org248, ...
        o.client_connections = 1
    budget = LabelBudget(200)
    m = parse(render_prometheus([w.snapshot()], cluster={}, budget=budget))
    q = m["o7s_queries_total"]
    named = {dict(k)["org"] for k in q} - {OTHER}
    assert len(named) == 200
    assert named == {f"org{i:03d}" for i in range(50, 250)}  # the top 200 by queries keep their name
    # The other 50 are summed per tier under org="_other".
    assert q[lbl(org=OTHER, tier="free")] == sum(i for i in range(50) if i % 2 == 0)
    assert q[lbl(org=OTHER, tier="pro")] == sum(i for i in range(50) if i % 2)
    assert m["o7s_client_connections"][lbl(org=OTHER, tier="free")] == 25
    assert m["o7s_query_duration_seconds_count"][lbl(org=OTHER, tier="pro")] == 0
    assert len(q) == 202
    # Sticky: a quiet named org stays named, a newly busy org stays under _other (counters stay monotonic).
    w.org("org999", "pro").queries = 10**6
    m2 = parse(render_prometheus([w.snapshot()], cluster={}, budget=budget))
    assert lbl(org="org999", tier="pro") not in m2["o7s_queries_total"]
    assert m2["o7s_queries_total"][lbl(org=OTHER, tier="pro")] == q[lbl(org=OTHER, tier="pro")] + 10**6
    assert m2["o7s_queries_total"][lbl(org="org050", tier="free")] == 50


def test_label_budget_fills_with_new_orgs_while_there_is_room() -> None:
    b = LabelBudget(3)
    assert b.choose({"a": 1}) == {"a"}
    assert b.choose({"a": 1, "b": 0, "c": 5, "d": 2}) == {"a", "c", "d"}
    assert b.choose({"b": 100}) == {"a", "c", "d"}
    with pytest.raises(ValueError):
        LabelBudget(-1)


def test_counter_carry_keeps_counters_of_dead_workers() -> None:
    ws = _workers()
    carry = CounterCarry()
    snaps = carry.update([w.snapshot() for w in ws], live_pids=[100, 101, 102])
    assert aggregate(snaps)["orgs"][0]["queries"] == 60
    # Worker 1 is alive but does not answer: its last figures stand (gauges too), marked stale.
    ws[0].org("acme", "pro").queries += 5
    snaps = carry.update([ws[0].snapshot(), ws[2].snapshot()], live_pids=[100, 101, 102])
    assert carry.stale == 1
    assert {(o["org"], o["tier"]): o for o in aggregate(snaps)["orgs"]}["acme", "pro"]["queries"] == 65
    # Worker 1 dies (kill -9): its counters are carried, its gauges are not.
    snaps = carry.update([ws[0].snapshot(), ws[2].snapshot()], live_pids=[100, 102])
    assert carry.stale == 0
    acme = {(o["org"], o["tier"]): o for o in aggregate(snaps)["orgs"]}["acme", "pro"]
    assert acme["queries"] == 65
    assert acme["client_connections"] == 0 + 2  # worker 1's one connection is gone with it
    assert sum(acme["latency_counts"]) == 6
    assert aggregate(snaps)["handoffs_out"] == 3 and aggregate(snaps)["cancels_forwarded"] == 3
    # Its replacement starts from zero, with the same index; nothing is counted twice.
    new = WorkerMetrics(1, 103)
    new.org("acme", "pro").queries = 1
    snaps = carry.update([ws[0].snapshot(), new.snapshot(), ws[2].snapshot()], live_pids=[100, 102, 103])
    acme = {(o["org"], o["tier"]): o for o in aggregate(snaps)["orgs"]}["acme", "pro"]
    assert acme["queries"] == 66
    m = parse(render_prometheus(snaps, cluster={}))
    assert m["o7s_queries_total"][lbl(org="acme", tier="pro")] == 66
    assert lbl(worker="-1") not in m["o7s_worker_client_connections"]


def test_counter_carry_pid_reuse_and_no_live_list() -> None:
    carry = CounterCarry()
    old = WorkerMetrics(0, 500)
    old.org("a", "free").queries = 4
    carry.update([old.snapshot()], live_pids=[500])
    new = WorkerMetrics(0, 500)  # the same pid, a new process (another started_at)
    new.started_at = old.started_at + 1
    new.org("a", "free").queries = 1
    snaps = carry.update([new.snapshot()], live_pids=[500])
    assert aggregate(snaps)["orgs"][0]["queries"] == 5
    # Without a list of live pids, a missing snapshot means a dead worker.
    snaps = carry.update([], live_pids=None)
    assert aggregate(snaps)["orgs"][0]["queries"] == 5
    assert aggregate(snaps)["orgs"][0]["client_connections"] == 0
