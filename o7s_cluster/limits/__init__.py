"""Tier enforcement across workers and machines: the global connection gate and per-org query rates.

Query rate (issue 4, layer 4). Each org has one central token bucket in Redis (capacity B, rate L),
refilled by a Lua script on Redis's own clock (`TIME`), so every worker of every machine draws from the
same bucket and clock skew between machines does not matter. A worker never asks Redis on a query's path:
it keeps a local stock of at most c = ceil(L*T) tokens per org (T = `rate_sync_interval`) that a background
task tops up in batches, before it runs dry. `Bucket.admit` takes a local token without a checkpoint; with
none left the query waits (FIFO, open transactions first) for the next batch, up to the tier's
`max_query_wait_ms`, then is refused with SQLSTATE 53400. Inside an open transaction it waits as long as
it takes. A worker with no demand for an org for `idle_after` seconds gives its tokens back and stops
drawing, so only workers that serve the org hold tokens (n below).

    Over any window tau: admitted <= L*tau + B + n*c     (central output <= L*tau + B; local stocks <= n*c)
    Under saturation:    admitted >= L*tau - n*c - (tokens lost while the central bucket sat full)

Redis unreachable: `degraded` goes up, a log line says so, and each worker refills its stock from a
local share, L/k, where k is the last number of workers seen holding tokens for the org (a sorted set in
Redis); Redis is probed every `probe_interval` and the shared buckets are used again when it answers.

Connection ceiling (layer 3): a Redis hash per org of worker_key -> open connections, plus a sorted set of
worker_key -> last heartbeat. A Lua script drops the counts of workers that have not heartbeaten for
`conn_expiry` seconds, sums the rest and increments atomically if under the ceiling. Closing a connection
is a local decrement flushed to Redis by a background task at once. Without Redis (or while it is down)
the decision is node-local: this worker's count plus the other workers' last known count.

A worker that dies without its goodbye (kill -9, OOM) would leave its counts for `conn_expiry` (30 s), blocking
its orgs at their ceiling although nothing is open. So each worker names, in an index set in Redis
(`o7s:wk:{worker_key}`), every org it counts connections or holds tokens for, in the same pipeline, and the
supervisor, which knows at once that a worker exited, releases them all (limits/release.py).

Redis is reached with the sync redis-py client in worker threads (`trio.to_thread`), from background
tasks only; see redisconn.py for why.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from o7s_cluster.control_plane.catalog import TierLimits
from o7s_cluster.config import Settings
from o7s_cluster.redisconn import REDIS_ERRORS, client as redis_client, redact
from o7s_cluster.limits.logins import LoginGuard, policy_from
from o7s_cluster.limits.tiers import TIER_CHANNEL, TierCache, parse_tier_message, tier_message

__all__ = ["LimitError", "Limits", "Bucket", "Ticket", "TierCache", "TIER_CHANNEL", "tier_message",
           "parse_tier_message", "SQLSTATE_TOO_MANY_CONNECTIONS", "SQLSTATE_RATE_LIMIT"]

log = logging.getLogger("o7s.limits")

SQLSTATE_TOO_MANY_CONNECTIONS = "53300"
SQLSTATE_RATE_LIMIT = "53400"
WORKERS_KEY = "o7s:workers"


class LimitError(Exception):
    """What the session sends to the client: ErrorResponse(severity, code, message, hint)."""

    def __init__(self, code: str, severity: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.severity = severity
        self.message = message
        self.hint = hint


# ------------------------------------------------------------------------------------------- Lua scripts

# Take up to `want` tokens from the org's central bucket, on Redis's clock; with leave = 1, give back
# -want tokens and stop being a holder. KEYS: bucket hash, holders zset. ARGV: rate, capacity, want,
# init level, worker_key, holder_ttl_ms, key_ttl_ms, leave. Returns {granted, holders, tokens left}.
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = math.min(cap, tonumber(ARGV[4]))
  ts = now
end
if now > ts then
  tokens = tokens + (now - ts) * rate / 1000000
end
if tokens > cap then tokens = cap end
local now_ms = math.floor(now / 1000)
if ARGV[8] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[5])
else
  redis.call('ZADD', KEYS[2], now_ms, ARGV[5])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - tonumber(ARGV[6]))
redis.call('PEXPIRE', KEYS[2], ARGV[7])
local holders = redis.call('ZCARD', KEYS[2])
local granted = 0
if want > 0 then
  local avail = math.floor(tokens + 1e-9)
  granted = math.min(want, avail)
  if holders > 1 and avail < want * holders then
    -- contended: take a fair part of what is there and leave the rest for the other holders
    granted = math.min(granted, math.max(1, math.ceil(avail / holders)))
  end
  if granted < 0 then granted = 0 end
  tokens = tokens - granted
elseif want < 0 and ARGV[8] == '1' then
  tokens = math.min(cap, tokens - want)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.9f', tokens), 'ts', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {granted, holders, string.format('%.9f', tokens)}
"""

# Connection gate. KEYS: counts hash, heartbeat zset. ARGV: worker_key, mode, limit, expiry_ms, n, absolute.
#   mode 'acquire': count one more for worker if the live total is under limit -> {1, total} or {0, total}
#   mode 'release': subtract n from worker's count -> {1, total}
#   mode 'beat':    refresh worker's heartbeat; (re)set its count to `absolute` when missing -> {1, total}
#   mode 'force':   set worker's count to `absolute` -> {1, total}
# A worker whose heartbeat is older than expiry_ms no longer counts (its field is deleted). Before
# counting, a missing field of this worker is restored from `absolute` (Redis restarted, or this worker
# was cut off for longer than the expiry), so a worker's connections are never forgotten while it lives.
GATE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local w = ARGV[1]
local mode = ARGV[2]
local expiry = tonumber(ARGV[4])
local absolute = tonumber(ARGV[6])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - expiry)
for _, s in ipairs(stale) do
  if s ~= w then
    redis.call('HDEL', KEYS[1], s)
    redis.call('ZREM', KEYS[2], s)
  end
end
if mode == 'force' or (redis.call('HEXISTS', KEYS[1], w) == 0 and mode ~= 'release') then
  if absolute > 0 then redis.call('HSET', KEYS[1], w, absolute) else redis.call('HDEL', KEYS[1], w) end
end
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(v) end
local ok = 1
if mode == 'acquire' then
  if total >= tonumber(ARGV[3]) then
    ok = 0
  else
    redis.call('HINCRBY', KEYS[1], w, 1)
    total = total + 1
  end
elseif mode == 'release' then
  local left = redis.call('HINCRBY', KEYS[1], w, -tonumber(ARGV[5]))
  if left <= 0 then
    redis.call('HDEL', KEYS[1], w)
    total = total - tonumber(ARGV[5]) - left
  else
    total = total - tonumber(ARGV[5])
  end
end
if redis.call('HEXISTS', KEYS[1], w) == 1 then
  redis.call('ZADD', KEYS[2], now, w)
else
  redis.call('ZREM', KEYS[2], w)
end
redis.call('PEXPIRE', KEYS[1], expiry * 4)
redis.call('PEXPIRE', KEYS[2], expiry * 4)
return {ok, total}
"""


def worker_key(machine_id: int, index: int, pid: int) -> str:
    """How a worker is named in Redis (counts, holders, registry): the supervisor names a dead one the same way."""
    return f"m{machine_id}-w{index}-{pid}"


def worker_index_key(worker_key: str) -> str:
    """The set of orgs a worker counts connections (c:ORG_ID) or holds tokens (r:ORG_ID) for."""
    return f"o7s:wk:{{{worker_key}}}"


def _bucket_keys(org_id: str) -> list[str]:
    return [f"o7s:rl:{{{org_id}}}", f"o7s:rlw:{{{org_id}}}"]  # one hash slot: fine on Redis Cluster


def _gate_keys(org_id: str) -> list[str]:
    return [f"o7s:conn:{{{org_id}}}", f"o7s:connhb:{{{org_id}}}"]


# ------------------------------------------------------------------------------------------- buckets


class _LocalBucket:
    """The central bucket's arithmetic on this worker's clock: node-local mode, and the degraded share."""

    __slots__ = ("rate", "capacity", "level", "ts")

    def __init__(self, rate: float, capacity: float, level: float, now: float) -> None:
        self.rate, self.capacity, self.level, self.ts = rate, capacity, level, now

    def _refill(self, now: float) -> None:
        if now > self.ts:
            self.level = min(self.capacity, self.level + (now - self.ts) * self.rate)
            self.ts = now

    def take(self, want: int, now: float) -> int:
        self._refill(now)
        got = max(0, min(want, int(self.level + 1e-9)))
        self.level -= got
        return got

    def put(self, n: int, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + n)

    def wait_for(self, need: float) -> float:
        return max(0.0, (need - self.level) / self.rate)


class _Flag(threading.Event):
    def on_connect(self, _connection: object) -> None:
        self.set()


class _Waiter:
    __slots__ = ("event", "granted", "gone")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False
        self.gone = False


class Bucket:
    """One org's query rate on this worker. `admit` is the only thing on a query's path."""

    def __init__(self, owner: Limits, org_id: str, org_name: str, limits: TierLimits) -> None:
        self._owner = owner
        self.org_id = org_id
        self.org_name = org_name
        self.stock = 0  # local tokens; > 0 only while nobody waits
        self.admitted = 0
        self.throttled = 0  # queries that had to wait for a token
        self.refused = 0  # queries refused with 53400
        self.holders = 1  # last known number of workers holding tokens for this org (k)
        self._waiters: deque[_Waiter] = deque()
        self._tx_waiters: deque[_Waiter] = deque()  # inside a transaction: served first, never refused
        self._queued = 0
        self._asked = False  # a top-up was requested since the stock last fell to its low mark
        self._seen = 0  # `admitted` as the sync loop last saw it (demand detection without a clock read)
        now = trio.current_time()
        # No demand until the first query: a bucket draws no tokens just because a client connected
        # (that would hand an org B + c at once after any pause: the seed's 20 free queries must take 1.9 s).
        self._last_demand = -math.inf
        self._created = now
        self._next_poll = 0.0
        self._last_poll = -math.inf
        self._synced_at: float | None = None  # last successful take from Redis
        self._holding = False  # listed as a holder in Redis
        self._share: _LocalBucket | None = None
        self.limits = limits
        self._apply(limits)
        if owner._url is None:
            self._share = _LocalBucket(self.rate, self.capacity, self.capacity, now)

    def _apply(self, limits: TierLimits) -> None:
        s = self._owner.settings
        self.limits = limits
        self.rate = float(limits.max_qps)
        self.capacity = max(1.0, self.rate * s.rate_burst_seconds) if limits.can_burst else 1.0  # B
        self.cap = max(1, math.ceil(self.rate * s.rate_sync_interval))  # c: most tokens held locally
        self.low = self.cap // 2
        self.max_wait = limits.max_query_wait_ms / 1000.0

    def update_limits(self, limits: TierLimits) -> None:
        """The org's tier changed: the new rate applies from the next sync (within T)."""
        if limits == self.limits:
            return
        old = self.limits
        self._apply(limits)
        if self.stock > self.cap:
            self.stock = self.cap  # a downgrade: never hold more than the new c
        if self._share is not None:
            if self._owner._url is None:
                self._share.rate, self._share.capacity = self.rate, self.capacity
            else:
                self._share.rate = self.rate / max(1, self.holders)
        self._next_poll = 0.0
        self._owner._kick()
        log.info("org limits updated", extra={"org": self.org_name, "tier": limits.tier, "from_tier": old.tier,
                                              "max_qps": limits.max_qps})

    def try_admit(self) -> bool:
        """A token now if one is in stock (the usual case): no checkpoint, no Redis, no clock."""
        if self.stock > 0:
            self.stock -= 1
            self.admitted += 1
            if self.stock <= self.low and not self._asked:
                self._asked = True
                self._owner._kick()
            return True
        return False

    async def admit(self, in_transaction: bool) -> None:
        if self.stock > 0:  # the fast path: no checkpoint, no Redis
            self.stock -= 1
            self.admitted += 1
            if self.stock <= self.low and not self._asked:
                self._asked = True
                self._owner._kick()
            return
        await self._wait(in_transaction)

    async def _wait(self, in_transaction: bool) -> None:
        owner = self._owner
        owner._buckets.setdefault(self.org_id, self)  # evicted (no connection was open): serve again
        if not in_transaction:
            # The org as a whole can get at most B + L*wait more tokens: refuse at once when even that
            # could not reach this query in time, rather than hold the client for nothing.
            ahead = self._queued + 1 - self.capacity - self.cap * max(1, self.holders)
            if ahead > self.rate * self.max_wait:
                self._refuse()
        w = _Waiter()
        q = self._tx_waiters if in_transaction else self._waiters
        if len(q) > 64 and len(q) > 2 * self._queued:  # drop waiters that gave up
            q = self._prune(q, in_transaction)
        q.append(w)
        self._queued += 1
        self.throttled += 1
        owner._kick()
        try:
            if in_transaction:
                await w.event.wait()
            else:
                with trio.move_on_after(self.max_wait):
                    await w.event.wait()
        except BaseException:
            if w.granted:  # cancelled after a token was handed over: pass it on
                self._deliver(1)
            else:
                w.gone = True
                self._queued -= 1
            raise
        if not w.granted:
            w.gone = True
            self._queued -= 1
            self._refuse()
        self.admitted += 1

    def _prune(self, q: deque[_Waiter], tx: bool) -> deque[_Waiter]:
        fresh = deque(w for w in q if not w.gone)
        if tx:
            self._tx_waiters = fresh
        else:
            self._waiters = fresh
        return fresh

    def _refuse(self) -> None:
        self.refused += 1
        retry = max(1.0 / self.rate, (self._queued + 1) / self.rate)
        retry = math.ceil(retry * 10) / 10
        raise LimitError(
            SQLSTATE_RATE_LIMIT, "ERROR",
            f'rate limit exceeded for org "{self.org_name}" (tier {self.limits.tier}): '
            f"limit {self.limits.max_qps} queries per second",
            f"retry after {retry:.1f} s",
        )

    def _deliver(self, n: int) -> None:
        """Hand `n` new tokens to waiters, oldest first (transactions before others), the rest to stock."""
        for q in (self._tx_waiters, self._waiters):
            while n > 0 and q:
                w = q.popleft()
                if w.gone:
                    continue
                w.granted = True
                self._queued -= 1
                w.event.set()
                n -= 1
        self.stock += n
        if self.stock > self.low:
            self._asked = False
        if self.stock > self.cap:
            self.stock = self.cap

    @property
    def waiting(self) -> int:
        return self._queued


# ------------------------------------------------------------------------------------------- gate


class Ticket:
    """One client connection counted against its org's ceiling; `release` when it closes."""

    __slots__ = ("_owner", "_gate", "_released")

    def __init__(self, owner: Limits, gate: _Gate) -> None:
        self._owner, self._gate, self._released = owner, gate, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._owner._release(self._gate)


class _Gate:
    __slots__ = ("org_id", "count", "pending", "remote", "idle_since")

    def __init__(self, org_id: str) -> None:
        self.org_id = org_id
        self.count = 0  # this worker's open connections for the org
        self.pending = 0  # releases not yet subtracted in Redis
        self.remote = 0  # the other workers' count, as last seen in Redis
        self.idle_since: float | None = None


# ------------------------------------------------------------------------------------------- Limits


class Limits:
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
        self._gates: dict[str, _Gate] = {}
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

    async def open_connection(self, org_id: str, org_name: str, limits: TierLimits) -> Ticket:
        g = self._gates.get(org_id)
        if g is None:
            g = self._gates[org_id] = _Gate(org_id)
        g.idle_since = None
        limit = limits.max_connections
        if self._url is not None and not self.degraded and self._gate_script is not None:
            try:
                ok, total = await trio.to_thread.run_sync(
                    self._gate_call, org_id, "acquire", limit, 1, g.count + g.pending, limiter=self._limiter)
            except REDIS_ERRORS as e:
                self._set_degraded(e)
            else:
                if not ok:
                    g.remote = max(0, total - g.count - g.pending)
                    self._too_many(org_name, limits)
                g.count += 1
                g.remote = max(0, total - g.count - g.pending)
                return Ticket(self, g)
        if g.count + g.remote >= limit:
            self._too_many(org_name, limits)
        g.count += 1
        return Ticket(self, g)

    def _too_many(self, org_name: str, limits: TierLimits) -> None:
        nxt = None
        for i, t in enumerate(self.tiers):
            if t.tier == limits.tier and i + 1 < len(self.tiers):
                nxt = self.tiers[i + 1]
        if nxt is not None:
            hint = (f'Close idle connections, or move to tier "{nxt.tier}" '
                    f"(limit {nxt.max_connections} connections).")
        else:
            hint = "Close idle connections, or move to a higher tier."
        raise LimitError(
            SQLSTATE_TOO_MANY_CONNECTIONS, "FATAL",
            f'too many connections for org "{org_name}" (tier {limits.tier}): limit {limits.max_connections}',
            hint,
        )

    def _release(self, g: _Gate) -> None:
        g.count -= 1
        if self._url is not None and not self.degraded:
            g.pending += 1
            self._flush.set()
        if g.count <= 0 and g.pending == 0:
            g.idle_since = time.monotonic()

    def connections(self, org_id: str) -> int:
        """This worker's open connections for an org."""
        g = self._gates.get(org_id)
        return g.count if g else 0

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

    # -- rate sync

    async def _sync_loop(self) -> None:
        T = self.settings.rate_sync_interval
        while True:
            self._kicked = trio.Event()
            next_at = await self._sync_once()
            now = trio.current_time()
            # at most one tick per millisecond, however often admit() kicks
            with trio.move_on_at(max(now + 0.001, min(next_at, now + T))):
                await self._kicked.wait()
            if not self._kicked.is_set():
                continue
            await trio.sleep(0.0005)  # let a burst of kicks coalesce into one tick

    async def _sync_once(self) -> float:
        T = self.settings.rate_sync_interval
        now = trio.current_time()
        remote = self._url is not None and not self.degraded and self._take_script is not None
        reqs: list[tuple[Bucket, int]] = []  # want < 0 encodes a leave: -1 - tokens given back
        for org_id, b in list(self._buckets.items()):
            if b.admitted != b._seen or b._queued:
                b._seen = b.admitted
                b._last_demand = now
            if now - b._last_demand > self.idle_after:
                if b.stock or b._holding:  # no demand: give the tokens back, stop drawing
                    give, b.stock = b.stock, 0
                    b._asked = False
                    if remote and b._holding:
                        reqs.append((b, -give - 1))  # encoded: -1 - tokens given back
                    elif b._share is not None and self._url is None:
                        b._share.put(give, now)
                    b._holding = False
                if (now - max(b._last_demand, b._created) > self.evict_after and not b._queued
                        and self.connections(org_id) == 0):  # no session can hold it any more
                    del self._buckets[org_id]
                continue
            want = b.cap - b.stock
            if want <= 0 or now < b._next_poll:
                continue
            if not (b.stock <= b.low or b._queued or now - b._last_poll >= T):
                continue
            if remote:
                reqs.append((b, want))
                continue
            share = b._share
            if share is None:  # degraded: this worker's share of the org's rate, no burst
                k = max(1, b.holders if b._synced_at is not None else self.workers_seen)
                share = b._share = _LocalBucket(b.rate / k, 1.0, 0.0, now)
                log.info("limits: local share", extra={"org": b.org_name, "qps": round(b.rate / k, 3), "k": k})
            if self._url is not None:
                share.capacity = float(want)  # level + stock <= c: the share never builds a burst
            got = share.take(want, now)
            b._deliver(got)
            b._last_poll = now
            b._next_poll = now + (share.wait_for(1.0) if got < want else 0.0)
        if reqs:
            try:
                results = await trio.to_thread.run_sync(self._take_many, reqs, now, limiter=self._limiter)
            except REDIS_ERRORS as e:
                self._set_degraded(e)
                for b, want in reqs:
                    b._next_poll = 0.0
                return trio.current_time()  # run again at once, on the local share
            now = trio.current_time()
            for (b, want), (granted, holders, left) in zip(reqs, results, strict=True):
                granted, holders, left = int(granted), int(holders), float(left)
                if want < 0:
                    continue
                b.holders = max(1, holders)
                b._holding = True
                b._synced_at = now
                b._last_poll = now
                b._deliver(granted)
                if granted < want:
                    need = min(want - granted, max(1, b.cap // 2))
                    b._next_poll = now + min(T, max(0.0005, (need - left) / b.rate))
                else:
                    b._next_poll = now
        # when to look again: the earliest bucket that needs tokens and may ask
        next_at = now + T
        for b in self._buckets.values():
            if b.stock < b.cap and (b.stock <= b.low or b._queued):
                next_at = min(next_at, max(b._next_poll, now))
        return next_at

    def _take_many(self, reqs: list[tuple[Bucket, int]], now: float) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        T = self.settings.rate_sync_interval
        for b, want in reqs:
            leave = want < 0
            if leave:
                want = -(-want - 1)  # decode: -tokens given back (may be 0)
            key_ttl = max(10.0, 4 * b.capacity / b.rate, 4 * self.holder_ttl)
            # A bucket this worker synced recently that Redis no longer has was lost (Redis restarted
            # empty): start it empty rather than hand out a second burst. Otherwise it starts full.
            recent = b._synced_at is not None and now - b._synced_at < key_ttl - 2 * T
            self._take_script(
                keys=_bucket_keys(b.org_id),
                args=[repr(b.rate), repr(b.capacity), want, 0 if recent else repr(b.capacity), self.worker_key,
                      int(self.holder_ttl * 1000), int(key_ttl * 1000), "1" if leave else "0"],
                client=pipe,
            )
        for b, want in reqs:
            if want >= 0:  # a holder of the org's tokens: the supervisor lets go for us if we die
                self._index(pipe, "r", b.org_id)
        return pipe.execute()[: len(reqs)]

    # -- connection counts

    def _index(self, pipe: Any, kind: str, org_id: str) -> None:
        """Name an org this worker counts connections (c) or holds tokens (r) for in its index in Redis, in the
        pipeline that counts them: if the worker dies (kill -9), the supervisor reads the index and releases
        them at once (limits/release.py) instead of letting them expire (conn_expiry)."""
        key = worker_index_key(self.worker_key)
        pipe.sadd(key, f"{kind}:{org_id}")
        pipe.pexpire(key, int(self.conn_expiry * 4000))

    def _gate_call(self, org_id: str, mode: str, limit: int, n: int, absolute: int) -> tuple[int, int]:
        pipe = self._redis.pipeline(transaction=False)
        self._gate_script(keys=_gate_keys(org_id),
                          args=[self.worker_key, mode, limit, int(self.conn_expiry * 1000), n, absolute], client=pipe)
        self._index(pipe, "c", org_id)
        ok, total = pipe.execute()[0]
        return int(ok), int(total)

    def _gate_many(self, calls: list[tuple[_Gate, str, int, int]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for g, mode, n, absolute in calls:
            self._gate_script(keys=_gate_keys(g.org_id),
                              args=[self.worker_key, mode, 0, int(self.conn_expiry * 1000), n, absolute],
                              client=pipe)
        for g, mode, _n, absolute in calls:
            if mode in ("beat", "force") and absolute > 0:  # counts restored (Redis restarted): index them too
                self._index(pipe, "c", g.org_id)
        return pipe.execute()[: len(calls)]

    async def _flush_loop(self) -> None:
        while True:
            await self._flush.wait()
            self._flush = trio.Event()
            if self.degraded:
                continue
            calls = [(g, "release", g.pending, g.count) for g in self._gates.values() if g.pending > 0]
            if not calls:
                continue
            try:
                results = await trio.to_thread.run_sync(self._gate_many, calls, limiter=self._limiter)
            except REDIS_ERRORS as e:
                for g, *_ in calls:
                    g.pending = 0  # Redis will hear the absolute count when it returns
                self._set_degraded(e)
                continue
            for (g, _, n, _), (_, total) in zip(calls, results, strict=True):
                g.pending -= n
                g.remote = max(0, int(total) - g.count - g.pending)

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            if self.degraded:
                continue
            now = time.monotonic()
            for org_id, g in list(self._gates.items()):
                if g.count <= 0 and g.pending == 0 and g.idle_since is not None and now - g.idle_since > 60:
                    del self._gates[org_id]
            calls = [(g, "beat", 0, g.count + g.pending) for g in self._gates.values()
                     if g.count > 0 or g.pending > 0]
            await trio.to_thread.run_sync(self._register, limiter=self._limiter)
            if calls:
                results = await trio.to_thread.run_sync(self._gate_many, calls, limiter=self._limiter)
                for (g, *_), (_, total) in zip(calls, results, strict=True):
                    g.remote = max(0, int(total) - g.count - g.pending)

    def _force_counts(self) -> None:
        gates = list(self._gates.values())
        for g in gates:
            g.pending = 0
        if gates:
            self._gate_many([(g, "force", 0, max(0, g.count)) for g in gates])

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
                self._take_script(keys=_bucket_keys(b.org_id),
                                  args=[repr(b.rate), repr(b.capacity), -b.stock, 0, self.worker_key,
                                        int(self.holder_ttl * 1000), 10000, "1"], client=pipe)
        for g in self._gates.values():
            self._gate_script(keys=_gate_keys(g.org_id),
                              args=[self.worker_key, "force", 0, int(self.conn_expiry * 1000), 0, 0], client=pipe)
        pipe.zrem(WORKERS_KEY, self.worker_key)
        pipe.delete(worker_index_key(self.worker_key))
        pipe.execute()

    # -- tier changes

    def _invalidate(self, org_name: str | None, limits: TierLimits | None = None) -> None:
        if org_name is not None and limits is not None:
            self.tier_cache.put(org_name, limits)
        else:
            self.tier_cache.invalidate(org_name)
        for cb in list(self._callbacks):
            try:
                cb(org_name)
            except Exception:
                log.exception("limits: invalidation callback failed")
        if limits is not None:
            for b in list(self._buckets.values()):
                if b.org_name == org_name:
                    b.update_limits(limits)
        elif org_name is None or any(b.org_name == org_name for b in self._buckets.values()):
            self._refresh.add(org_name)  # open connections: look the tier up again, in the background
            self._refresh_event.set()

    async def _tier_loop(self) -> None:
        """Keeps the tier table (for hints) and the open buckets' limits current after invalidations."""
        if self.settings.platform_dsn is None and self._url is None:
            return
        warned = False
        next_table = 0.0
        while True:
            with trio.move_on_at(next_table):
                await self._refresh_event.wait()
            self._refresh_event = trio.Event()
            todo, self._refresh = self._refresh, set()
            try:
                if None in todo or trio.current_time() >= next_table:
                    tiers = await self.tier_cache.tiers()
                    if tiers:
                        self.tiers = tiers
                    next_table = trio.current_time() + 600.0
                names = {b.org_name for b in self._buckets.values()} if None in todo else todo - {None}
                for name in names:
                    limits = await self.tier_cache.get(name)  # type: ignore[arg-type]
                    if limits is not None:
                        for b in list(self._buckets.values()):
                            if b.org_name == name:
                                b.update_limits(limits)
                warned = False
            except Exception as e:  # control plane down: keep the current limits, try again soon
                self._refresh |= todo
                next_table = trio.current_time() + 5.0
                if not warned:
                    log.warning("limits: tier lookup failed; keeping the current limits",
                                extra={"error": f"{type(e).__name__}: {e}"[:200]})
                    warned = True

    def _on_message(self, data: bytes | str) -> None:
        org, limits = parse_tier_message(data)
        log.info("tier change received", extra={"org": org, "tier": limits.tier if limits else None})
        self._invalidate(org, limits)

    async def _subscriber(self) -> None:
        stop = threading.Event()
        token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(self._listen, stop, token, abandon_on_cancel=True,
                                          limiter=trio.CapacityLimiter(1))
        finally:
            stop.set()

    def _listen(self, stop: threading.Event, token: trio.lowlevel.TrioToken) -> None:
        """A worker thread: the tier-change channel, reconnecting until stopped."""
        assert self._url is not None
        first = True
        while not stop.is_set():
            ps = conn = None
            try:
                conn = redis_client(self._url, timeout=max(2.0, self._timeout))
                ps = conn.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(TIER_CHANNEL)
                # redis-py may reconnect and resubscribe by itself inside get_message: hear of it
                reconnected = _Flag()
                ps.connection.register_connect_callback(reconnected.on_connect)  # held weakly: keep `reconnected`
                self.subscribed = True
                if not first:  # messages may have been missed while disconnected
                    trio.from_thread.run_sync(self._invalidate, None, trio_token=token)
                first = False
                while not stop.is_set():
                    msg = ps.get_message(timeout=0.25)
                    if reconnected.is_set():
                        reconnected.clear()
                        trio.from_thread.run_sync(self._invalidate, None, trio_token=token)
                    if msg is not None and msg.get("type") == "message":
                        trio.from_thread.run_sync(self._on_message, msg["data"], trio_token=token)
            except trio.RunFinishedError:
                return
            except REDIS_ERRORS:
                self.subscribed = False
                stop.wait(0.2)
            finally:
                for c in (ps, conn):
                    if c is not None:
                        try:
                            c.close()
                        except Exception:
                            pass

    # -- figures for metrics

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-org live figures on this worker (org name -> connections, throttled, refused, ...)."""
        out: dict[str, dict[str, Any]] = {}
        for b in self._buckets.values():
            out[b.org_name] = {"admitted": b.admitted, "throttled": b.throttled, "refused": b.refused,
                               "waiting": b._queued, "stock": b.stock, "holders": b.holders,
                               "connections": self.connections(b.org_id)}
        return out

