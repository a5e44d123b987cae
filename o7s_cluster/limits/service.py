"""A worker's `Limits`: the object the server holds and the session calls.

It combines the connection gate (gate.py), the rate sync (sync.py) and the tier watch (tiers.py) over one
state: the per-org buckets (bucket.py) and gates, the Redis connection, the worker's index of orgs in Redis,
the login breaker (logins.py), and the degraded mode (Redis unreachable: node-local decisions, probed every
`probe_interval` until it answers again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from o7s_cluster.config import Settings
from o7s_cluster.control_plane.db import TierLimits
from o7s_cluster.limits.bucket import Bucket
from o7s_cluster.limits.gate import GATE_LUA, ConnectionGate, Gate
from o7s_cluster.limits.keys import WORKERS_KEY, bucket_keys, gate_keys, worker_index_key
from o7s_cluster.limits.logins import LoginGuard, policy_from
from o7s_cluster.limits.sync import TAKE_LUA, RateSync
from o7s_cluster.limits.tiers import TierCache, TierWatch
from o7s_cluster.redisconn import REDIS_ERRORS, client as redis_client, redact

log = logging.getLogger("o7s.limits")


class Limits(ConnectionGate, RateSync, TierWatch):
    """A worker's limits: per-org buckets and connection counts, Redis sync, tier-change subscription."""

    def __init__(self, settings: Settings, *, worker_key: str, conn_expiry: float = 30.0,
                 idle_after: float = 2.0, probe_interval: float = 0.5, redis_timeout: float = 0.5) -> None:
        self.settings = settings
        self.worker_key = worker_key
        self.conn_expiry = conn_expiry
        self.heartbeat_interval = min(5.0, conn_expiry / 4)
        self.idle_after = max(idle_after, 2 * settings.rate_sync_interval)
        self.evict_after = 600.0
        self.probe_interval = probe_interval
        self.holder_ttl = max(2.0, 10 * settings.rate_sync_interval, self.idle_after + 1.0)
        self._url = settings.redis_url
        self._timeout = redis_timeout
        self._redis: Any = None
        self._take_script: Any = None
        self._gate_script: Any = None
        self._buckets: dict[str, Bucket] = {}
        self._gates: dict[str, Gate] = {}
        self._callbacks: list[Callable[[str | None], None]] = []
        self._kicked = trio.Event()
        self._flush = trio.Event()
        self._limiter = trio.CapacityLimiter(4)
        self.degraded = False
        self.degraded_since: float | None = None
        self.degraded_count = 0  # times limits went degraded (a counter for metrics)
        self.workers_seen = 1  # live workers in Redis's registry, the fallback k
        self.tiers: list[TierLimits] = []  # the tier table in upgrade order, for hints (set_tiers)
        # org -> tier: local, then Redis (1 h), then the control plane
        self.tier_cache = TierCache(platform_dsn=settings.platform_dsn, ttl=max(1.0, settings.catalog_ttl),
                                    limiter=self._limiter)
        self._refresh: set[str | None] = set()
        self._refresh_event = trio.Event()
        self.started = False
        self.subscribed = False  # listening for tier changes
        self.logins = LoginGuard(policy_from(settings), lambda: None if self.degraded else self._redis,  # breaker
                                 self._limiter, member_prefix=worker_key)

    # -- the interface the session calls

    def bucket(self, org_id: str, org_name: str, limits: TierLimits) -> Bucket:
        b = self._buckets.get(org_id)
        if b is None:
            b = self._buckets[org_id] = Bucket(self, org_id, org_name, limits)
        elif b.limits != limits:
            b.update_limits(limits)
        return b

    def on_invalidate(self, callback: Callable[[str | None], None]) -> None:
        self._callbacks.append(callback)

    def set_tiers(self, tiers: list[TierLimits]) -> None:
        """The tier table in upgrade order (free, starter, ...), so a refusal can name the next tier."""
        self.tiers = list(tiers)

    def _kick(self) -> None:
        self._kicked.set()

    # -- background

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started = True
        try:
            async with trio.open_nursery() as nursery:
                if self._url is not None:
                    self._connect()
                    try:
                        await trio.to_thread.run_sync(self._redis.ping, limiter=self._limiter)
                        await trio.to_thread.run_sync(self._register, limiter=self._limiter)
                        log.info("limits: shared through Redis", extra={"redis": redact(self._url)})
                    except REDIS_ERRORS as e:
                        self._set_degraded(e)
                    for fn in (self._heartbeat_loop, self._flush_loop, self._probe_loop, self._subscriber):
                        nursery.start_soon(self._guard, fn)
                else:
                    log.info("limits: node-local (no Redis configured)")
                nursery.start_soon(self._guard, self._sync_loop)
                nursery.start_soon(self._guard, self._tier_loop)
                task_status.started()
        finally:
            if self._url is not None and self._redis is not None and not self.degraded:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await trio.to_thread.run_sync(self._goodbye, limiter=self._limiter)
                    except REDIS_ERRORS:
                        pass

    async def _guard(self, fn: Callable[[], Any]) -> None:
        while True:
            try:
                await fn()
                return
            except REDIS_ERRORS as e:
                self._set_degraded(e)
            except Exception:
                log.exception("limits: background task failed; restarting it", extra={"task": fn.__name__})
            await trio.sleep(0.5)

    def _connect(self) -> None:
        assert self._url is not None
        self._redis = redis_client(self._url, timeout=self._timeout)
        self._take_script = self._redis.register_script(TAKE_LUA)
        self.tier_cache.redis = self._redis
        self._gate_script = self._redis.register_script(GATE_LUA)

    def _set_degraded(self, err: BaseException) -> None:
        if self.degraded:
            return
        self.degraded = True
        self.degraded_since = time.monotonic()
        self.degraded_count += 1
        log.warning("limits degraded: Redis unreachable; each worker enforces a local share of every org's"
                    " limits until it is back", extra={"error": f"{type(err).__name__}: {err}"[:200]})
        self._kick()

    async def _recover(self) -> None:
        # connection counts taken while degraded are unknown to Redis: state them, absolutely
        await trio.to_thread.run_sync(self._force_counts, limiter=self._limiter)
        await trio.to_thread.run_sync(self._register, limiter=self._limiter)
        was = time.monotonic() - (self.degraded_since or time.monotonic())
        self.degraded = False
        self.degraded_since = None
        for b in self._buckets.values():
            b._share = None
            b._next_poll = 0.0
        log.warning("limits restored: Redis is back, shared buckets in use again",
                    extra={"degraded_seconds": round(was, 3)})
        self._invalidate(None)  # tier changes published while we were away were missed
        self._kick()

    async def _probe_loop(self) -> None:
        while True:
            await trio.sleep(self.probe_interval)
            if not self.degraded:
                continue
            try:
                await trio.to_thread.run_sync(self._redis.ping, limiter=self._limiter)
                await self._recover()
            except REDIS_ERRORS:
                pass

    def _index(self, pipe: Any, kind: str, org_id: str) -> None:
        """Name an org this worker counts connections (c) or holds tokens (r) for in its index in Redis, in the
        pipeline that counts them: if the worker dies (kill -9), the supervisor reads the index and releases
        them at once (limits/release.py) instead of letting them expire (conn_expiry)."""
        key = worker_index_key(self.worker_key)
        pipe.sadd(key, f"{kind}:{org_id}")
        pipe.pexpire(key, int(self.conn_expiry * 4000))

    def _register(self) -> None:
        """This worker in the cluster-wide registry (the fallback k for orgs never synced)."""
        r = self._redis
        t = r.time()
        now_ms = t[0] * 1000 + t[1] // 1000
        pipe = r.pipeline(transaction=False)
        pipe.zadd(WORKERS_KEY, {self.worker_key: now_ms})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now_ms - int(self.conn_expiry * 1000))
        pipe.pexpire(worker_index_key(self.worker_key), int(self.conn_expiry * 4000))
        pipe.zcard(WORKERS_KEY)
        self.workers_seen = max(1, int(pipe.execute()[-1]))

    def _goodbye(self) -> None:
        """Shutting down: give tokens back, drop this worker's counts and registry entry."""
        pipe = self._redis.pipeline(transaction=False)
        for b in self._buckets.values():
            if b._holding:
                self._take_script(keys=bucket_keys(b.org_id),
                                  args=[repr(b.rate), repr(b.capacity), -b.stock, 0, self.worker_key,
                                        int(self.holder_ttl * 1000), 10000, "1"], client=pipe)
        for g in self._gates.values():
            self._gate_script(keys=gate_keys(g.org_id),
                              args=[self.worker_key, "force", 0, int(self.conn_expiry * 1000), 0, 0], client=pipe)
        pipe.zrem(WORKERS_KEY, self.worker_key)
        pipe.delete(worker_index_key(self.worker_key))
        pipe.execute()

    # -- figures for metrics

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-org live figures on this worker (org name -> connections, throttled, refused, ...)."""
        out: dict[str, dict[str, Any]] = {}
        for b in self._buckets.values():
            out[b.org_name] = {"admitted": b.admitted, "throttled": b.throttled, "refused": b.refused,
                               "waiting": b._queued, "stock": b.stock, "holders": b.holders,
                               "connections": self.connections(b.org_id)}
        return out
