"""One org's query rate on one worker: a local stock of tokens that `Bucket.admit` takes from.

The stock is topped up from the org's central bucket in Redis by the rate sync (sync.py); without Redis
(or while it is down) from a `LocalBucket`, the same arithmetic on this worker's clock. With no token
left a query waits, FIFO and open transactions first, up to the tier's `max_query_wait_ms`, then is
refused with SQLSTATE 53400.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Protocol

import trio

from o7s_cluster.config import Settings
from o7s_cluster.control_plane.db import TierLimits
from o7s_cluster.limits.errors import SQLSTATE_RATE_LIMIT, LimitError

log = logging.getLogger("o7s.limits")


class BucketOwner(Protocol):
    """What a bucket needs of the worker's `Limits` (service.py): the settings, whether Redis is
    configured, the table of buckets (to be served again after an eviction), and a sync tick on demand."""

    settings: Settings
    _url: str | None
    _buckets: dict[str, Bucket]

    def _kick(self) -> None: ...


class LocalBucket:
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


class _Waiter:
    __slots__ = ("event", "granted", "gone", "throttled", "round")

    def __init__(self, dry: bool, round: int) -> None:
        self.event = trio.Event()
        self.granted = False
        self.gone = False
        self.throttled = dry  # set when the org had no token for it: it waits for the rate, not a top-up
        self.round = round  # the bucket's short deliveries when it queued


class Bucket:
    """One org's query rate on this worker. `admit` is the only thing on a query's path."""

    def __init__(self, owner: BucketOwner, org_id: str, org_name: str, limits: TierLimits) -> None:
        self._owner = owner
        self.org_id = org_id
        self.org_name = org_name
        self.stock = 0  # local tokens; > 0 only while nobody waits
        self.admitted = 0
        self.throttled = 0  # queries that had to wait for the org's rate (not just for a local top-up)
        self.refused = 0  # queries refused with 53400
        self.holders = 1  # last known number of workers holding tokens for this org (k)
        self._waiters: deque[_Waiter] = deque()
        self._tx_waiters: deque[_Waiter] = deque()  # inside a transaction: served first, never refused
        self._queued = 0
        # A query that finds the local stock empty (the first one, or the first after the worker gave its
        # tokens back while idle) waits for a top-up while the org is well under its rate: that is not
        # throttling. It is when the org itself is short: a top-up brought fewer tokens than asked
        # (`_dry` until one brings enough), or one left this query queued (`_short_rounds` moved on).
        self._dry = False
        self._short_rounds = 0
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
        self._share: LocalBucket | None = None
        self.limits = limits
        self._apply(limits)
        if owner._url is None:
            self._share = LocalBucket(self.rate, self.capacity, self.capacity, now)

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

    async def admit(self, in_transaction: bool) -> bool:
        """Take a token, waiting for one if need be; True when the query was throttled (it waited because
        the org was out of tokens), False when it got one at once or only waited for a local top-up."""
        if self.stock > 0:  # the fast path: no checkpoint, no Redis
            self.stock -= 1
            self.admitted += 1
            if self.stock <= self.low and not self._asked:
                self._asked = True
                self._owner._kick()
            return False
        return await self._wait(in_transaction)

    async def _wait(self, in_transaction: bool) -> bool:
        owner = self._owner
        owner._buckets.setdefault(self.org_id, self)  # evicted (no connection was open): serve again
        if not in_transaction:
            # The org as a whole can get at most B + L*wait more tokens: refuse at once when even that
            # could not reach this query in time, rather than hold the client for nothing.
            ahead = self._queued + 1 - self.capacity - self.cap * max(1, self.holders)
            if ahead > self.rate * self.max_wait:
                self._refuse()
        w = _Waiter(self._dry, self._short_rounds)
        q = self._tx_waiters if in_transaction else self._waiters
        if len(q) > 64 and len(q) > 2 * self._queued:  # drop waiters that gave up
            q = self._prune(q, in_transaction)
        q.append(w)
        self._queued += 1
        owner._kick()
        try:
            if in_transaction:
                await w.event.wait()
            else:
                with trio.move_on_after(self.max_wait):
                    await w.event.wait()
        except BaseException:
            if w.granted:  # cancelled after a token was handed over: pass it on
                self._deliver(1, short=None)
            else:
                w.gone = True
                self._queued -= 1
            raise
        if not w.granted:
            w.gone = True
            self._queued -= 1
            self._refuse()
        self.admitted += 1
        if w.throttled:
            self.throttled += 1
        return w.throttled

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

    def _deliver(self, n: int, short: bool | None) -> None:
        """Hand `n` new tokens to waiters, oldest first (transactions before others), the rest to stock.
        `short`: the top-up brought fewer than it asked for (the org is at its rate); None: not a top-up."""
        for q in (self._tx_waiters, self._waiters):
            while n > 0 and q:
                w = q.popleft()
                if w.gone:
                    continue
                w.granted = True
                if w.round != self._short_rounds:  # an earlier delivery left it waiting
                    w.throttled = True
                self._queued -= 1
                w.event.set()
                n -= 1
        if short is not None:
            self._dry = short
        if self._queued > 0:
            self._short_rounds += 1  # those still queued wait for the rate
        self.stock += n
        if self.stock > self.low:
            self._asked = False
        if self.stock > self.cap:
            self.stock = self.cap

    @property
    def waiting(self) -> int:
        return self._queued
