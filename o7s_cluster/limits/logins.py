"""The login circuit breaker on a worker: the state machine of breaker.py, its clock, and Redis sharing.

Scope. Every worker keeps its own breaker (limits/breaker.py): an org's logins land on its home worker (hand-off),
so one worker sees all of them on its machine, except TLS clients that send no SNI (served where accepted).
With Redis (`redis_url`) the failures are also counted in Redis, per (org, address), across every worker and
machine sharing it, and a block decided there is honoured everywhere: before any SCRAM work a login asks Redis
whether its key is blocked (one PTTL, in a worker thread, like the connection gate's call a login makes anyway),
and a failure is added by a Lua script on Redis's clock that starts the block when the count is reached. If
Redis is unreachable (limits degraded) each worker enforces the limit alone; the local breaker always runs, so a
block never waits on Redis.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from o7s_cluster.limits.breaker import BreakerPolicy, LoginBreaker, Trip, key
from o7s_cluster.redisconn import REDIS_ERRORS

if TYPE_CHECKING:
    from o7s_cluster.config import Settings

__all__ = ["LoginGuard", "policy_from"]

log = logging.getLogger("o7s.limits.logins")

# One failed login for a key. KEYS: failures zset, block key. ARGV: window_ms, failures_max, block_ms,
# force ('1': this worker's own breaker tripped, e.g. after failures Redis missed), member.
# Returns {blocked 0/1, block ms left, tripped now 0/1, failures counted}.
FAIL_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = redis.call('PTTL', KEYS[2])
if left > 0 then return {1, left, 0, 0} end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[2]) or ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  return {1, tonumber(ARGV[3]), 1, n}
end
return {0, 0, 0, n}
"""


def policy_from(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(settings.auth_breaker_failures, settings.auth_breaker_window, settings.auth_breaker_block)


def _redis_keys(org: str, address: str) -> list[str]:
    """Fixed-length keys whatever the client sent, in one hash slot (Redis Cluster)."""
    k = key(org, address)
    h = hashlib.blake2b(f"{k[0]}\0{k[1]}".encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    return [f"o7s:loginf:{{{h}}}", f"o7s:loginb:{{{h}}}"]


class LoginGuard:
    """What a session asks before authenticating (`blocked_for`) and tells after a failure (`failed`)."""

    def __init__(self, policy: BreakerPolicy, redis: Callable[[], Any] | None = None,
                 limiter: trio.CapacityLimiter | None = None, *, member_prefix: str = "w") -> None:
        """`redis`: the limits' Redis client, or None while there is none or it is unreachable (degraded)."""
        self.breaker = LoginBreaker(policy)
        self._redis_source = redis
        self._limiter = limiter
        self._script: Any = None
        self._members = (f"{member_prefix}:{n}" for n in itertools.count())

    @property
    def policy(self) -> BreakerPolicy:
        return self.breaker.policy

    def set_policy(self, policy: BreakerPolicy) -> None:
        """SIGHUP: new limits from now on (blocks already running keep their end)."""
        self.breaker.policy = policy

    def _redis(self) -> Any:
        redis = self._redis_source() if self._redis_source is not None else None
        if redis is not None and self._script is None:
            self._script = redis.register_script(FAIL_LUA)
        return redis

    async def blocked_for(self, org: str, address: str) -> float:
        """Seconds this org and address stay blocked (0.0: go ahead and authenticate)."""
        if not self.policy.enabled:
            return 0.0
        now = trio.current_time()
        left = self.breaker.blocked_for(org, address, now)
        if left > 0:
            return left
        redis = self._redis()
        if redis is None:
            return 0.0
        try:
            ms = await trio.to_thread.run_sync(redis.pttl, _redis_keys(org, address)[1],
                                               limiter=self._limiter)
        except REDIS_ERRORS:
            return 0.0  # the local breaker still holds; the limits' probe notices the outage
        if ms is None or ms <= 0:
            return 0.0
        now = trio.current_time()
        self.breaker.impose(org, address, now + ms / 1000, now)
        return ms / 1000

    async def failed(self, org: str, address: str) -> Trip | None:
        """Count a failed login; the Trip (logged here) when it starts a block."""
        if not self.policy.enabled:
            return None
        trip = self.breaker.failure(org, address, trio.current_time())
        redis = self._redis()
        if redis is not None:
            p = self.policy
            try:
                blocked, left, tripped, count = await trio.to_thread.run_sync(
                    lambda: self._script(keys=_redis_keys(org, address),
                                         args=[int(p.window * 1000), p.failures_max, int(p.block * 1000),
                                               "1" if trip else "0", next(self._members)]),
                    limiter=self._limiter)
            except REDIS_ERRORS:
                pass
            else:
                now = trio.current_time()
                if int(blocked):
                    self.breaker.impose(org, address, now + int(left) / 1000, now)
                if int(tripped) and trip is None:  # counted over several workers or machines
                    k = key(org, address)
                    trip = Trip(k[0], k[1], int(count), now + int(left) / 1000)
        if trip is not None:
            log.warning("login breaker tripped: logins refused for this org from this address",
                        extra={"org": trip.org, "address": trip.address, "failures": trip.failures,
                               "window_seconds": self.policy.window, "block_seconds": self.policy.block})
        return trip
