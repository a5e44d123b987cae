"""Per-org figures from the workers' snapshots: connections, totals, latency percentiles, pool state.

Shared by ``/v1/orgs/{org}``, ``/v1/orgs`` (every org at once, for the dashboard) and ``/v1/cluster``; kept
apart from the HTTP routing so both stay small. The snapshots are grouped by org once per request, so listing
every org costs one pass over them, not one per org.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from o7s_cluster.admin.metrics import LATENCY_BUCKETS, POOL_GAUGES, REDIS_FIELDS


def fill_orgs(workers: list[dict], snapshots: list[Mapping[str, Any]]) -> None:
    """Per worker, ``orgs_connected``: the orgs with client connections open on it now; and ``orgs`` (the orgs
    it holds) from the orgs it has served since it started, when the view does not say."""
    by_pid = {int(s.get("pid", 0)): s for s in snapshots}
    for w in workers:
        snap = by_pid.get(int(w.get("pid") or 0))
        if snap is None:
            continue
        entries = snap.get("orgs", ())
        w["orgs_connected"] = sorted({o["org"] for o in entries if o.get("client_connections", 0) > 0})
        if "orgs" not in w:
            w["orgs"] = sorted({o["org"] for o in entries})


def org_figures(name: str, snapshots: list[Mapping[str, Any]], workers: list[Mapping[str, Any]]) -> dict | None:
    """Everything the snapshots say about one org, or None when no worker has ever seen it."""
    entries = [(s, o) for s in snapshots for o in s.get("orgs", ()) if o.get("org") == name]
    home = [w.get("index") for w in workers if name in (w.get("orgs") or ())]
    if not entries and not home:
        return None
    return _figures(name, entries, home)


def all_org_figures(snapshots: list[Mapping[str, Any]], workers: list[Mapping[str, Any]]) -> dict[str, dict]:
    """org_figures of every org the snapshots or the workers' lists name, in one pass over the snapshots."""
    entries: dict[str, list[tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for s in snapshots:
        for o in s.get("orgs", ()):
            entries.setdefault(o.get("org"), []).append((s, o))
    homes: dict[str, list[Any]] = {}
    for w in workers:
        for name in w.get("orgs") or ():
            homes.setdefault(name, []).append(w.get("index"))
    return {name: _figures(name, entries.get(name, []), homes.get(name, []))
            for name in sorted({*entries, *homes}, key=str) if name is not None}


def _figures(name: str, entries: list[tuple[Mapping[str, Any], Mapping[str, Any]]], home: list[Any]) -> dict:
    tiers: dict[str, list[int]] = {}
    totals = {k: 0 for k in ("client_connections", "backend_connections", "queries", "errors", "throttled",
                             "refused", "bytes_in", "bytes_out", "pool_waits", "handoffs_in")}
    wait_seconds, lat_sum = 0.0, 0.0
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    pool: dict[str, int] = {}
    per_worker: dict[int, dict[str, Any]] = {}
    redis = {k: 0 for k in REDIS_FIELDS}
    for snap, o in entries:
        is_redis = o.get("db_type") == "redis"
        for k in REDIS_FIELDS:
            redis[k] += o.get(k, 0) if is_redis else o.get("redis_" + k, 0)
        t = tiers.setdefault(o.get("tier", "unknown"), [0, 0])
        t[0] += o.get("client_connections", 0)
        t[1] += o.get("queries", 0)
        for k in totals:
            totals[k] += o.get(k, 0)
        wait_seconds += o.get("pool_wait_seconds", 0.0)
        lat_sum += o.get("latency_sum", 0.0)
        for i, c in enumerate(o.get("latency_counts", ())[: len(counts)]):
            counts[i] += c
        for k in POOL_GAUGES:
            if k in o:
                pool[k.removeprefix("pool_")] = pool.get(k.removeprefix("pool_"), 0) + o[k]
        widx = int(snap.get("worker", -1))
        if widx >= 0:
            w = per_worker.setdefault(widx, {"worker": widx, "pid": snap.get("pid"), "client_connections": 0,
                                             "backend_connections": 0, "queries": 0})
            w["client_connections"] += o.get("client_connections", 0)
            w["backend_connections"] += o.get("backend_connections", 0)
            w["queries"] += o.get("queries", 0)
    # The org's current tier: the one with open sessions, else the busiest.
    tier = max(tiers, key=lambda k: (tiers[k][0], tiers[k][1])) if tiers else None
    n = sum(counts)
    return {
        "org": name,
        "tier": tier,
        "tiers": sorted(tiers),
        "home_worker": home[0] if home else None,
        "held_by": home,
        "client_connections": totals["client_connections"],
        "backend_connections": totals["backend_connections"],
        "pool": pool or None,
        "totals": {
            "queries": totals["queries"], "errors": totals["errors"], "throttled": totals["throttled"],
            "refused": totals["refused"], "bytes_in": totals["bytes_in"], "bytes_out": totals["bytes_out"],
            "pool_waits": totals["pool_waits"], "pool_wait_seconds": round(wait_seconds, 6),
            "handoffs_in": totals["handoffs_in"],
        },
        "throttled": totals["throttled"],
        "refused": totals["refused"],
        # the Redis part of the figures above (database type redis); None when the org has used no Redis
        "redis": ({"client_connections": redis["client_connections"], "commands": redis["queries"],
                   "errors": redis["errors"], "throttled": redis["throttled"], "refused": redis["refused"],
                   "bytes_in": redis["bytes_in"], "bytes_out": redis["bytes_out"]}
                  if any(redis.values()) else None),
        "latency_ms": {
            "count": n,
            "mean": round(lat_sum / n * 1000, 3) if n else None,
            "p50": quantile_ms(0.50, counts), "p95": quantile_ms(0.95, counts), "p99": quantile_ms(0.99, counts),
        },
        "workers": [per_worker[k] for k in sorted(per_worker)],
    }


def quantile_ms(q: float, counts: list[int]) -> float | None:
    """Estimate a quantile from (non-cumulative) bucket counts by linear interpolation inside the bucket, as
    Prometheus's histogram_quantile does; observations above the last bound report that bound."""
    n = sum(counts)
    if not n:
        return None
    rank = q * n
    running = 0
    for i, c in enumerate(counts):
        if running + c >= rank and c:
            if i >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1] * 1000
            lo = LATENCY_BUCKETS[i - 1] if i else 0.0
            hi = LATENCY_BUCKETS[i]
            return round((lo + (hi - lo) * (rank - running) / c) * 1000, 3)
        running += c
    return None  # pragma: no cover - rank <= n always lands in a bucket
