"""Metrics: per-worker counters on the hot path, aggregated and rendered as Prometheus text by the supervisor.

Hot path (a worker)
    A session calls ``WorkerMetrics.org(org, tier)`` once, after authentication, keeps the ``OrgCounters``
    (usage/counters.py) it gets and only adds to its plain attributes. The usage recorder reads the same
    objects (the worker's ``CounterBook``), so metrics and usage records cannot disagree. There are no locks
    (a worker is one trio thread) and nothing is allocated per query.

    Gauges (``client_connections``, ``backend_connections``) must be decremented on the *same* object they
    were incremented on, so a session holds its ``OrgCounters`` for its whole life. A tier change gives a new
    ``OrgCounters`` for the new (org, tier) pair; the old one keeps its counters (labelled with the old tier)
    and its gauges fall to zero as its sessions end.

Snapshot (a worker → the supervisor)
    ``WorkerMetrics.snapshot()`` returns a JSON-able dict with the complete state (format below, see
    ``SNAPSHOT_VERSION``); the supervisor gathers one per live worker.

Aggregation and exposition (the supervisor)
    ``aggregate(snapshots)`` sums over workers; ``render_prometheus(snapshots, cluster=...)`` produces the
    Prometheus text format through ``prometheus_client`` (a custom Collector yielding metric families into a
    private registry), with a bounded org label set: see ``LabelBudget``. ``CounterCarry`` keeps the
    cluster's counters monotonic across worker restarts and scale-downs (the counters of a worker that is
    gone are carried forward, so a worker's death never looks like a counter reset).

Snapshot format (``SNAPSHOT_VERSION`` 1)::

    {
      "version": 1,
      "worker": 0, "pid": 1234,
      "started_at": 1767000000.0,          # time.time() when WorkerMetrics was made
      "taken_at": 1767000042.5,            # time.time() of the snapshot
      "buckets": [0.00025, ..., 10.0],     # LATENCY_BUCKETS (upper bounds; +Inf implied)
      "handoffs_out": 0, "cancels_forwarded": 0, "sessions_total": 0,
      "auth_failures": 0, "protocol_errors": 0, "logins_blocked": 0, "login_blocks": 0,
      "limits_degraded": 0, "usage_spool_bytes": 0, "usage_shipping_lag_seconds": 0.0,
      "orgs": [
        {"org": "acme", "tier": "pro", "db_type": "postgres",
         "client_connections": 3, "backend_connections": 1,
         "queries": 120, "errors": 1, "throttled": 4, "refused": 0,
         "bytes_in": 5120, "bytes_out": 90210,
         "pool_waits": 2, "pool_wait_seconds": 0.013,
         "handoffs_in": 3,
         "latency_counts": [0, 5, ..., 0],  # len(buckets) + 1, NOT cumulative; the last one is > 10 s
         "latency_sum": 0.84,
         # only when the worker has a pool state provider (WorkerMetrics.pool_state):
         "pool_in_use": 1, "pool_idle": 2, "pool_waiting": 0},
        ...
      ]
    }
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from o7s_cluster.usage.counters import LATENCY_BUCKETS, NBUCKETS as _NBUCKETS, CounterBook, OrgCounters

SNAPSHOT_VERSION = 1
# The classic text format generate_latest() writes (prometheus_client's CONTENT_TYPE_LATEST now names 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

OTHER = "_other"  # the org label of every org past the label budget
DEFAULT_MAX_ORG_LABELS = 200

# Per-org fields: counters (monotonic) and gauges (current values).
ORG_COUNTERS = (
    "queries", "errors", "throttled", "refused", "bytes_in", "bytes_out", "pool_waits", "pool_wait_seconds",
    "handoffs_in", "notifications",
)
ORG_GAUGES = ("client_connections", "backend_connections", "listener_connections")
POOL_GAUGES = ("pool_in_use", "pool_idle", "pool_waiting")  # optional, from WorkerMetrics.pool_state
# An org's Redis figures (database type redis, issue 12), also kept apart as `redis_<field>` in aggregated
# entries: the per-org families sum every database type, the o7s_redis_* families show Redis alone.
REDIS_FIELDS = ("client_connections", "queries", "errors", "throttled", "refused", "bytes_in", "bytes_out")
WORKER_COUNTERS = ("handoffs_out", "cancels_forwarded", "sessions_total", "auth_failures", "protocol_errors",
                   "logins_blocked", "login_blocks")
WORKER_GAUGES = ("limits_degraded", "usage_spool_bytes", "usage_shipping_lag_seconds")


def org_dict(c: OrgCounters) -> dict[str, Any]:
    """One OrgCounters in the snapshot format."""
    d: dict[str, Any] = {"org": c.org, "tier": c.tier or "unknown", "db_type": c.db_type}
    for name in ORG_GAUGES:
        d[name] = getattr(c, name)
    for name in ORG_COUNTERS:
        d[name] = getattr(c, name)
    d["latency_counts"] = list(c.latency_counts)
    d["latency_sum"] = c.query_seconds
    return d


PoolState = Callable[[], Mapping[str, Mapping[str, int]]]


class WorkerMetrics:
    """All the metrics of one worker process."""

    __slots__ = (
        "worker_index", "pid", "started_at", "book", "pool_state", *WORKER_COUNTERS, *WORKER_GAUGES,
    )

    def __init__(self, worker_index: int, pid: int, book: CounterBook | None = None) -> None:
        self.worker_index = worker_index
        self.pid = pid
        self.started_at = time.time()
        self.book = CounterBook() if book is None else book  # shared with the worker's usage recorder
        # Optional provider of the pool state, called at snapshot time (not on the hot path):
        # () -> {org: {"pool_in_use": n, "pool_idle": n, "pool_waiting": n}}. The fields it gives are added to
        # the org's most recently made Postgres entry in the snapshot.
        self.pool_state: PoolState | None = None
        self.handoffs_out = 0  # connections this worker accepted and handed to another (the org's home)
        self.cancels_forwarded = 0  # CancelRequests this worker passed on to the worker that owns the key
        self.sessions_total = 0  # client sessions started on this worker (after any hand-off)
        self.auth_failures = 0
        self.protocol_errors = 0
        self.logins_blocked = 0  # logins refused by the login breaker, before authentication
        self.login_blocks = 0  # blocks the login breaker started (an org and address over the failure limit)
        self.limits_degraded = 0  # 0/1 gauge: Redis unreachable, limits are node-local (set by limits/)
        self.usage_spool_bytes = 0  # gauge: bytes in the local usage spool not yet in every sink (set by usage/)
        self.usage_shipping_lag_seconds = 0.0  # gauge: age of the oldest usage record not yet in every sink (usage/)

    def org(self, org: str, tier: str, db_type: str = "postgres", org_id: str | None = None) -> OrgCounters:
        """The counters of (org, tier, database type), made on first use. No allocation when they exist."""
        return self.book.get(org, tier, db_type, org_id)

    def orgs(self) -> Iterator[OrgCounters]:
        return iter(self.book)

    def snapshot(self) -> dict[str, Any]:
        """The complete state, JSON-able (orjson), in the format of the module docstring."""
        orgs = []
        pools: Mapping[str, Mapping[str, int]] = {}
        if self.pool_state is not None:
            try:
                pools = self.pool_state() or {}
            except Exception:  # noqa: BLE001 - a broken provider must not break metrics
                pools = {}
        pooled: dict[str, dict[str, Any]] = {}  # org -> the entry its pool gauges go on
        for c in self.book:
            d = org_dict(c)
            orgs.append(d)
            if c.db_type == "postgres" or c.org not in pooled:
                pooled[c.org] = d
        for name, pool in pools.items():
            if not pool:
                continue
            d = pooled.get(name)
            if d is None:  # pools of orgs that have no session counters yet
                d = org_dict(OrgCounters(name, "unknown"))
                orgs.append(d)
            d.update({k: int(pool[k]) for k in POOL_GAUGES if k in pool})
        snap: dict[str, Any] = {
            "version": SNAPSHOT_VERSION,
            "worker": self.worker_index,
            "pid": self.pid,
            "started_at": self.started_at,
            "taken_at": time.time(),
            "buckets": list(LATENCY_BUCKETS),
        }
        for name in WORKER_COUNTERS:
            snap[name] = getattr(self, name)
        for name in WORKER_GAUGES:
            snap[name] = getattr(self, name)
        snap["orgs"] = orgs
        return snap


# ---------------------------------------------------------------------------------------------- aggregation


def _empty_org(org: str, tier: str) -> dict[str, Any]:
    d: dict[str, Any] = {"org": org, "tier": tier}
    for name in (*ORG_GAUGES, *ORG_COUNTERS):
        d[name] = 0
    d["pool_wait_seconds"] = 0.0
    for name in REDIS_FIELDS:
        d["redis_" + name] = 0
    d["latency_counts"] = [0] * _NBUCKETS
    d["latency_sum"] = 0.0
    return d


def _add_org(into: dict[str, Any], src: Mapping[str, Any], *, gauges: bool = True) -> None:
    names = (*ORG_GAUGES, *ORG_COUNTERS) if gauges else ORG_COUNTERS
    for name in names:
        into[name] += src.get(name, 0)
    redis = src.get("db_type") == "redis"  # a worker's Redis entry, or an aggregate that kept them apart
    for name in REDIS_FIELDS:
        if gauges or name != "client_connections":
            into["redis_" + name] += src.get(name, 0) if redis else src.get("redis_" + name, 0)
    counts = src.get("latency_counts")
    if counts:
        acc = into["latency_counts"]
        for i, c in enumerate(counts[:_NBUCKETS]):
            acc[i] += c
    into["latency_sum"] += src.get("latency_sum", 0.0)
    if gauges:
        for name in POOL_GAUGES:
            if name in src:
                into[name] = into.get(name, 0) + src[name]


def aggregate(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum worker snapshots into one cluster-wide dict of the same shape (without worker/pid).

    ``orgs`` is keyed by (org, tier) and sorted by org then tier; ``workers`` is how many snapshots were summed.
    """
    total: dict[str, Any] = {"version": SNAPSHOT_VERSION, "workers": 0, "buckets": list(LATENCY_BUCKETS)}
    for name in (*WORKER_COUNTERS, *WORKER_GAUGES):
        total[name] = 0
    total["usage_shipping_lag_seconds"] = 0.0
    orgs: dict[tuple[str, str], dict[str, Any]] = {}
    for snap in snapshots:
        _check_buckets(snap)
        total["workers"] += 1
        for name in (*WORKER_COUNTERS, "usage_spool_bytes"):
            total[name] += snap.get(name, 0)
        # Not sums: degraded if any worker is; the lag is the worst one.
        total["limits_degraded"] = max(total["limits_degraded"], int(snap.get("limits_degraded", 0)))
        total["usage_shipping_lag_seconds"] = max(total["usage_shipping_lag_seconds"],
                                                  float(snap.get("usage_shipping_lag_seconds", 0.0)))
        for o in snap.get("orgs", ()):
            key = (o["org"], o["tier"])
            acc = orgs.get(key)
            if acc is None:
                acc = orgs[key] = _empty_org(*key)
            _add_org(acc, o)
    total["orgs"] = [orgs[k] for k in sorted(orgs)]
    return total


def _check_buckets(snap: Mapping[str, Any]) -> None:
    b = snap.get("buckets")
    if b is not None and tuple(b) != LATENCY_BUCKETS:
        raise ValueError(f"worker {snap.get('worker')} uses other latency buckets; restart it with this version")


class CounterCarry:
    """Keeps cluster counters monotonic when workers die or are scaled away.

    The supervisor's admin server feeds every gathered set of snapshots through ``update()`` with the pids
    of the workers that are still alive. A worker (pid, started_at) whose snapshot stops arriving while its
    pid is still alive is represented by its last snapshot (stale, but not lost); once its pid is gone (or,
    when `live_pids` is not given, as soon as its snapshot is missing) its
    counters (never its gauges) are folded into a carried-over total, returned as an extra snapshot with
    ``worker == -1``. What the worker counted after its last gathered snapshot is lost (a ``kill -9`` cannot
    be helped); nothing is ever counted twice.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[int, float], dict[str, Any]] = {}  # (pid, started_at) -> last snapshot
        self._carried: dict[tuple[str, str], dict[str, Any]] = {}
        self._carried_worker: dict[str, Any] = {name: 0 for name in WORKER_COUNTERS}
        self.stale: int = 0  # workers represented by an old snapshot in the last update

    @staticmethod
    def _key(snap: Mapping[str, Any]) -> tuple[int, float]:
        return int(snap.get("pid", 0)), float(snap.get("started_at", 0.0))

    def update(self, snapshots: Iterable[Mapping[str, Any]], live_pids: Iterable[int] | None = None) -> list[dict]:
        fresh = {self._key(s): dict(s) for s in snapshots}
        live = None if live_pids is None else set(live_pids)
        out = list(fresh.values())
        self.stale = 0
        for key, last in list(self._last.items()):
            if key in fresh:
                continue
            replaced = any(k[0] == key[0] for k in fresh)  # its pid now belongs to a newer process
            if live is not None and key[0] in live and not replaced:
                # Alive but did not answer this time: keep showing its last state.
                fresh[key] = last
                out.append(last)
                self.stale += 1
            else:
                self._fold(last)
        self._last = fresh
        if self._carried or any(self._carried_worker.values()):
            out.append(self._carry_snapshot())
        return out

    def _fold(self, snap: Mapping[str, Any]) -> None:
        for name in WORKER_COUNTERS:
            self._carried_worker[name] += snap.get(name, 0)
        for o in snap.get("orgs", ()):
            key = (o["org"], o["tier"])
            acc = self._carried.get(key)
            if acc is None:
                acc = self._carried[key] = _empty_org(*key)
            _add_org(acc, o, gauges=False)

    def _carry_snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"version": SNAPSHOT_VERSION, "worker": -1, "pid": 0, "started_at": 0.0,
                                "taken_at": time.time(), "buckets": list(LATENCY_BUCKETS)}
        snap.update(self._carried_worker)
        for name in WORKER_GAUGES:
            snap[name] = 0
        snap["orgs"] = [dict(o, latency_counts=list(o["latency_counts"])) for o in self._carried.values()]
        return snap


class LabelBudget:
    """Which orgs keep their own `org` label; every other org is summed under ``org="_other"`` (per tier).

    Sticky, so counters stay monotonic: an org that got a label keeps it for the life of the process, and
    an org is put under ``_other`` only once the budget is full, so it never leaves it either. While there is
    room, the busiest unnamed orgs (by queries) are named first.
    """

    def __init__(self, max_orgs: int = DEFAULT_MAX_ORG_LABELS) -> None:
        if max_orgs < 0:
            raise ValueError("max_orgs must not be negative")
        self.max_orgs = max_orgs
        self.named: set[str] = set()

    def choose(self, queries_by_org: Mapping[str, int]) -> set[str]:
        room = self.max_orgs - len(self.named)
        if room > 0:
            candidates = [o for o in queries_by_org if o not in self.named]
            if len(candidates) > room:
                candidates.sort(key=lambda o: (-queries_by_org[o], o))
                candidates = candidates[:room]
            self.named.update(candidates)
        return self.named


def bounded_orgs(orgs: Iterable[Mapping[str, Any]], budget: LabelBudget) -> list[dict[str, Any]]:
    """Aggregated org entries with orgs past the budget merged into (``_other``, tier) entries."""
    orgs = list(orgs)
    per_org: dict[str, int] = {}
    for o in orgs:
        per_org[o["org"]] = per_org.get(o["org"], 0) + o.get("queries", 0)
    named = budget.choose(per_org)
    out: list[dict[str, Any]] = []
    other: dict[str, dict[str, Any]] = {}
    for o in orgs:
        if o["org"] in named:
            out.append(dict(o))
            continue
        acc = other.get(o["tier"])
        if acc is None:
            acc = other[o["tier"]] = _empty_org(OTHER, o["tier"])
        _add_org(acc, o)
    out.extend(other[t] for t in sorted(other))
    return out


# ---------------------------------------------------------------------------------------------- exposition

# name -> (kind, help, source field). Every name here is listed in docs/OPERATING.md.
_ORG_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("o7s_client_connections", "gauge", "Client connections open now.", "client_connections"),
    ("o7s_backend_connections", "gauge", "Backend connections attached to client sessions now.",
     "backend_connections"),
    ("o7s_queries", "counter", "Queries run (simple Query messages and extended-protocol Executes).", "queries"),
    ("o7s_query_errors", "counter", "Queries that ended in an error.", "errors"),
    ("o7s_queries_throttled", "counter", "Queries that waited for a rate-limit token because the org was over its rate.", "throttled"),
    ("o7s_queries_refused", "counter", "Queries refused by the rate limiter.", "refused"),
    ("o7s_bytes_received", "counter", "Bytes received from clients.", "bytes_in"),
    ("o7s_bytes_sent", "counter", "Bytes sent to clients.", "bytes_out"),
    ("o7s_pool_waits", "counter", "Times a session waited for a backend connection.", "pool_waits"),
    ("o7s_pool_wait_seconds", "counter", "Time sessions spent waiting for a backend connection.",
     "pool_wait_seconds"),
    ("o7s_handoffs", "counter", "Connections handed to the org's home worker by another worker.", "handoffs_in"),
    ("o7s_listener_connections", "gauge", "LISTEN/NOTIFY listener connections open now (transaction mode, "
     "outside the pools).", "listener_connections"),
    ("o7s_notifications", "counter", "Notifications the listener connections relayed to the org's clients.",
     "notifications"),
)
# name -> (kind, help, source field): the org's Redis figures alone (also counted in the families above).
_REDIS_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("o7s_redis_client_connections", "gauge", "Redis client connections open now.", "redis_client_connections"),
    ("o7s_redis_commands", "counter", "Redis commands answered by the backend.", "redis_queries"),
    ("o7s_redis_errors", "counter", "Redis commands that got an error reply.", "redis_errors"),
    ("o7s_redis_throttled", "counter", "Redis commands that waited for a rate-limit token.", "redis_throttled"),
    ("o7s_redis_refused", "counter", "Redis commands refused by the rate limiter.", "redis_refused"),
    ("o7s_redis_bytes_received", "counter", "Bytes received from Redis clients.", "redis_bytes_in"),
    ("o7s_redis_bytes_sent", "counter", "Bytes sent to Redis clients.", "redis_bytes_out"),
)
_WORKER_COUNTER_FAMILIES = (
    ("o7s_handoffs_sent", "Connections a worker accepted and handed to another worker (all orgs).",
     "handoffs_out"),
    ("o7s_cancels_forwarded", "CancelRequests passed on to the worker that owns the key.", "cancels_forwarded"),
    ("o7s_sessions", "Client sessions started (after any hand-off).", "sessions_total"),
    ("o7s_auth_failures", "Failed client authentications.", "auth_failures"),
    ("o7s_protocol_errors", "Client connections closed for a protocol violation.", "protocol_errors"),
    ("o7s_logins_blocked", "Logins refused by the login breaker (too many failures for the org from the address).",
     "logins_blocked"),
    ("o7s_login_blocks", "Blocks the login breaker started (an org and source address over the failure limit).",
     "login_blocks"),
)


class _SnapshotCollector:
    """A prometheus_client Collector over a fixed set of snapshots (made per scrape)."""

    def __init__(self, snapshots: list[Mapping[str, Any]], cluster: Mapping[str, Any], budget: LabelBudget) -> None:
        self.snapshots = snapshots
        self.cluster = cluster
        self.budget = budget

    def collect(self) -> Iterator[Metric]:
        total = aggregate(self.snapshots)
        orgs = bounded_orgs(total["orgs"], self.budget)
        labels = ["org", "tier"]

        for name, kind, doc, field in _ORG_FAMILIES:
            fam: Any = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=labels)
            for o in orgs:
                fam.add_metric([o["org"], o["tier"]], o[field])
            yield fam
        with_redis = [o for o in orgs if any(o["redis_" + f] for f in REDIS_FIELDS)]
        for name, kind, doc, field in _REDIS_FAMILIES:
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=labels)
            for o in with_redis:
                fam.add_metric([o["org"], o["tier"]], o[field])
            yield fam

        pool = GaugeMetricFamily("o7s_pool_connections", "Backend connections in the org's pools, by state.",
                                 labels=["org", "tier", "state"])
        waiting = GaugeMetricFamily("o7s_pool_waiting_clients", "Sessions waiting for a backend connection now.",
                                    labels=labels)
        for o in orgs:
            if "pool_in_use" in o:
                pool.add_metric([o["org"], o["tier"], "in_use"], o["pool_in_use"])
            if "pool_idle" in o:
                pool.add_metric([o["org"], o["tier"], "idle"], o["pool_idle"])
            if "pool_waiting" in o:
                waiting.add_metric([o["org"], o["tier"]], o["pool_waiting"])
        yield pool
        yield waiting

        hist = HistogramMetricFamily("o7s_query_duration_seconds",
                                     "Query latency through the proxy, first byte in to ReadyForQuery out.",
                                     labels=labels)
        bounds = [*(_fmt(b) for b in LATENCY_BUCKETS), "+Inf"]
        for o in orgs:
            cumulative, running = [], 0
            for bound, c in zip(bounds, o["latency_counts"]):
                running += c
                cumulative.append((bound, running))
            hist.add_metric([o["org"], o["tier"]], cumulative, o["latency_sum"])
        yield hist

        for name, doc, field in _WORKER_COUNTER_FAMILIES:
            yield CounterMetricFamily(name, doc, value=total[field])
        yield GaugeMetricFamily("o7s_limits_degraded",
                                "1 when any worker enforces limits node-locally (Redis unreachable).",
                                value=total["limits_degraded"])
        yield GaugeMetricFamily("o7s_usage_spool_bytes", "Bytes of usage records spooled locally, not yet in every sink.",
                                value=total["usage_spool_bytes"])
        yield GaugeMetricFamily("o7s_usage_shipping_lag_seconds",
                                "Age of the oldest usage record not yet in every sink (worst worker).",
                                value=total["usage_shipping_lag_seconds"])

        per_worker = GaugeMetricFamily("o7s_worker_client_connections", "Client connections open on each worker.",
                                       labels=["worker"])
        for snap in self.snapshots:
            if int(snap.get("worker", -1)) >= 0:
                per_worker.add_metric([str(snap["worker"])],
                                      sum(o.get("client_connections", 0) for o in snap.get("orgs", ())))
        yield per_worker

        yield from self._cluster_families()

    def _cluster_families(self) -> Iterator[Metric]:
        workers = list(self.cluster.get("workers", ()))
        states: dict[str, int] = {"starting": 0, "up": 0, "retiring": 0, "dead": 0}  # always shown, even at 0
        up = GaugeMetricFamily("o7s_worker_up", "1 when the worker process is up and serving.", labels=["worker"])
        restarts = CounterMetricFamily("o7s_worker_restarts", "Times the supervisor restarted the worker slot.",
                                       labels=["worker"])
        for w in workers:
            state = str(w.get("state", "up"))
            states[state] = states.get(state, 0) + 1
            up.add_metric([str(w.get("index"))], 1 if state == "up" else 0)
            if "restarts" in w:
                restarts.add_metric([str(w.get("index"))], w["restarts"])
        fam = GaugeMetricFamily("o7s_workers", "Worker processes by state.", labels=["state"])
        for state in sorted(states):
            fam.add_metric([state], states[state])
        yield fam
        yield up
        yield restarts
        if "target_workers" in self.cluster:
            yield GaugeMetricFamily("o7s_workers_target", "The worker count the supervisor is steering to.",
                                    value=self.cluster["target_workers"])
        if "ready" in self.cluster:
            yield GaugeMetricFamily("o7s_ready", "1 when all workers are up and the control plane is reachable.",
                                    value=1 if self.cluster["ready"] else 0)
        if "stale_workers" in self.cluster:
            yield GaugeMetricFamily("o7s_metrics_stale_workers",
                                    "Live workers that did not answer this scrape (their last figures are shown).",
                                    value=self.cluster["stale_workers"])


def _fmt(bound: float) -> str:
    return repr(float(bound))


def render_prometheus(snapshots: list[Mapping[str, Any]], *, cluster: Mapping[str, Any],
                      budget: LabelBudget | None = None) -> bytes:
    """Prometheus text exposition (format 0.0.4) of `snapshots` summed over workers.

    `cluster` may hold: ``workers`` (the list ``ClusterView.workers()`` returns: index, pid, state and
    optionally restarts), ``ready`` (bool), ``target_workers`` (int), ``stale_workers`` (int). `budget` keeps the
    org labels bounded across scrapes (the admin server holds one); without it, a fresh budget of
    ``DEFAULT_MAX_ORG_LABELS`` (the busiest orgs by queries) is used.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(list(snapshots), cluster, budget or LabelBudget()))  # type: ignore[arg-type]
    return generate_latest(registry)
