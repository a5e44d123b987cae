"""The rate sync: keeps each bucket's local stock topped up from its org's central bucket in Redis.

Each org has one token bucket in Redis (capacity B, rate L), refilled by a Lua script on Redis's own
clock (`TIME`), so every worker of every machine draws from the same bucket and clock skew between
machines does not matter. A worker keeps a local stock of at most c = ceil(L*T) tokens per org
(T = `rate_sync_interval`) that this loop tops up in batches, before it runs dry. A worker with no
demand for an org for `idle_after` seconds gives its tokens back and stops drawing.

While Redis is unreachable each bucket refills from a local share, L/k, where k is the last number of
workers seen holding tokens for the org. `RateSync` holds the methods of `Limits` (service.py) that do this.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from o7s_cluster.limits.bucket import Bucket, LocalBucket
from o7s_cluster.limits.keys import bucket_keys
from o7s_cluster.redisconn import REDIS_ERRORS

log = logging.getLogger("o7s.limits")

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



class RateSync:
    """The rate-sync part of `Limits`: one background loop, one pipelined Redis round trip per tick."""

    settings: Any
    worker_key: str
    idle_after: float
    evict_after: float
    holder_ttl: float
    degraded: bool
    workers_seen: int
    _url: str | None
    _redis: Any
    _take_script: Any
    _buckets: dict[str, Bucket]
    _kicked: trio.Event
    _limiter: trio.CapacityLimiter

    if TYPE_CHECKING:  # provided by Limits (service.py) and ConnectionGate (gate.py)
        def _set_degraded(self, err: BaseException) -> None: ...
        def connections(self, org_id: str) -> int: ...
        def _index(self, pipe: Any, kind: str, org_id: str) -> None: ...

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
                b._dry = False  # idle for a while: the org's bucket has refilled since
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
                share = b._share = LocalBucket(b.rate / k, 1.0, 0.0, now)
                log.info("limits: local share", extra={"org": b.org_name, "qps": round(b.rate / k, 3), "k": k})
            if self._url is not None:
                share.capacity = float(want)  # level + stock <= c: the share never builds a burst
            got = share.take(want, now)
            b._deliver(got, short=got < want)
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
                b._deliver(granted, short=granted < want)
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
                keys=bucket_keys(b.org_id),
                args=[repr(b.rate), repr(b.capacity), want, 0 if recent else repr(b.capacity), self.worker_key,
                      int(self.holder_ttl * 1000), int(key_ttl * 1000), "1" if leave else "0"],
                client=pipe,
            )
        for b, want in reqs:
            if want >= 0:  # a holder of the org's tokens: the supervisor lets go for us if we die
                self._index(pipe, "r", b.org_id)
        return pipe.execute()[: len(reqs)]
