"""The connection ceiling: each org's open client connections, counted across workers and machines.

A Redis hash per org of worker_key -> open connections, plus a sorted set of worker_key -> last
heartbeat. A Lua script drops the counts of workers that have not heartbeaten for `conn_expiry`
seconds, sums the rest and increments atomically if under the ceiling. Closing a connection is a local
decrement flushed to Redis by a background task at once. Without Redis (or while it is down) the
decision is node-local: this worker's count plus the other workers' last known count.

`ConnectionGate` holds the methods of `Limits` (service.py) that do this; `Ticket` is what a session
holds while its connection is open.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from o7s_cluster.control_plane.db import TierLimits
from o7s_cluster.limits.errors import SQLSTATE_TOO_MANY_CONNECTIONS, LimitError
from o7s_cluster.limits.keys import gate_keys
from o7s_cluster.redisconn import REDIS_ERRORS

# Connection gate. KEYS: counts hash, heartbeat zset. ARGV: worker_key, mode, limit, expiry_ms, n, absolute.
#   mode 'acquire': count one more for worker if the live total is under limit -> {1, total} or {0, total}
#   mode 'release': subtract n from worker's count -> {1, total}
#   mode 'beat':    refresh worker's heartbeat; (re)set its count to `absolute` when missing -> {1, total}
#   mode 'force':   set worker's count to `absolute` -> {1, total}
# A worker whose heartbeat is older than expiry_ms no longer counts (its field is deleted). Before
# counting, a missing field of this worker is restored from `absolute` (Redis restarted, or this worker
# was cut off for longer than the expiry), so a worker's connections are never forgotten while it lives.
# A release leaves the field at 0 rather than deleting it: `absolute` is the worker's count when the call
# was made, and a release landing in between (the calls run on several threads) must not make an
# acquire "restore" a count that was just released (that leaked one connection for good).
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
  if left < 0 then
    redis.call('HSET', KEYS[1], w, 0)
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



class Ticket:
    """One client connection counted against its org's ceiling; `release` when it closes."""

    __slots__ = ("_owner", "_gate", "_released")

    def __init__(self, owner: ConnectionGate, gate: Gate) -> None:
        self._owner, self._gate, self._released = owner, gate, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._owner._release(self._gate)



class Gate:
    __slots__ = ("org_id", "count", "pending", "remote", "idle_since")

    def __init__(self, org_id: str) -> None:
        self.org_id = org_id
        self.count = 0  # this worker's open connections for the org
        self.pending = 0  # releases not yet subtracted in Redis
        self.remote = 0  # the other workers' count, as last seen in Redis
        self.idle_since: float | None = None



class ConnectionGate:
    """The connection-ceiling part of `Limits`: admission, release, and the counts kept in Redis."""

    settings: Any
    worker_key: str
    conn_expiry: float
    heartbeat_interval: float
    degraded: bool
    tiers: list[TierLimits]
    _url: str | None
    _redis: Any
    _gate_script: Any
    _gates: dict[str, Gate]
    _flush: trio.Event
    _limiter: trio.CapacityLimiter

    if TYPE_CHECKING:  # provided by Limits (service.py)
        def _set_degraded(self, err: BaseException) -> None: ...
        def _register(self) -> None: ...
        def _index(self, pipe: Any, kind: str, org_id: str) -> None: ...

    async def open_connection(self, org_id: str, org_name: str, limits: TierLimits) -> Ticket:
        g = self._gates.get(org_id)
        if g is None:
            g = self._gates[org_id] = Gate(org_id)
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

    def _release(self, g: Gate) -> None:
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

    def _gate_call(self, org_id: str, mode: str, limit: int, n: int, absolute: int) -> tuple[int, int]:
        pipe = self._redis.pipeline(transaction=False)
        self._gate_script(keys=gate_keys(org_id),
                          args=[self.worker_key, mode, limit, int(self.conn_expiry * 1000), n, absolute], client=pipe)
        self._index(pipe, "c", org_id)
        ok, total = pipe.execute()[0]
        return int(ok), int(total)

    def _gate_many(self, calls: list[tuple[Gate, str, int, int]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for g, mode, n, absolute in calls:
            self._gate_script(keys=gate_keys(g.org_id),
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
