"""Tier lookup (issue 4, layer 2): a local cache, then Redis (TTL one hour), then the control plane.

    o7s:tier:org:<name>  -> JSON TierLimits of the org's tier   (EX 3600)
    o7s:tiers            -> JSON list of TierLimits, upgrade order (EX 3600)

`o7s org set-tier` writes the org's new entry through to Redis and publishes on `o7s:tier`
(`publish_tier_change`); `o7s tier create|set|delete` writes the entries of the tier's orgs, drops the
table and publishes "every org" (`publish_tier_table_change`); every worker's Limits hears it, drops its local entry, calls the registered
invalidation callbacks (the catalog) and applies the new rate to the org's open connections.

Every Redis or control-plane call is a sync call made in a worker thread, never on a query's path.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from o7s_cluster.control_plane.db import TierLimits
from o7s_cluster.redisconn import REDIS_ERRORS, client as redis_client

REDIS_TTL = 3600
TIER_CHANNEL = "o7s:tier"
TIERS_KEY = "o7s:tiers"
_FIELDS = tuple(TierLimits.__dataclass_fields__)

log = logging.getLogger("o7s.limits")


def org_key(org_name: str) -> str:
    return f"o7s:tier:org:{org_name}"


def dump_limits(limits: TierLimits) -> dict[str, Any]:
    return {f: getattr(limits, f) for f in _FIELDS}


def load_limits(doc: Any) -> TierLimits | None:
    if not isinstance(doc, dict):
        return None
    try:
        return TierLimits(**{f: doc[f] for f in _FIELDS})
    except (KeyError, TypeError):
        return None


def tier_message(org_name: str | None, limits: TierLimits | None = None) -> str:
    """The payload published on TIER_CHANNEL: the org (None: every org) and, when known, its new limits."""
    return json.dumps({"org": org_name, "limits": None if limits is None else dump_limits(limits)})


def parse_tier_message(data: bytes | str) -> tuple[str | None, TierLimits | None]:
    text = data.decode() if isinstance(data, bytes) else data
    try:
        doc = json.loads(text)
    except ValueError:
        return (text.strip() or None), None  # a bare org name
    if not isinstance(doc, dict):
        return None, None
    org = doc.get("org")
    return (org if isinstance(org, str) else None), load_limits(doc.get("limits"))


def publish_tier_change(redis_url: str, org_name: str | None, limits: TierLimits | None = None,
                        timeout: float = 2.0) -> int:
    """Write the org's new tier through to Redis and tell every worker. Returns how many listened.

    Raises one of REDIS_ERRORS when Redis cannot be reached (the control plane is already changed;
    workers then pick the change up when their local cache expires)."""
    r = redis_client(redis_url, timeout=timeout)
    try:
        pipe = r.pipeline(transaction=False)
        if org_name is None:
            pipe.delete(TIERS_KEY)
        elif limits is None:
            pipe.delete(org_key(org_name))
        else:
            pipe.set(org_key(org_name), json.dumps(dump_limits(limits)), ex=REDIS_TTL)
        pipe.publish(TIER_CHANNEL, tier_message(org_name, limits))
        return int(pipe.execute()[-1])
    finally:
        r.close()


def publish_tier_table_change(redis_url: str, orgs: dict[str, TierLimits], timeout: float = 2.0) -> int:
    """A tier was created, changed or deleted (`o7s tier ...`): write the new limits of the orgs on it
    through to Redis, drop the cached tier table and tell every worker to look everything up again.
    Returns how many listened; raises one of REDIS_ERRORS like publish_tier_change."""
    r = redis_client(redis_url, timeout=timeout)
    try:
        pipe = r.pipeline(transaction=False)
        for name, limits in orgs.items():
            pipe.set(org_key(name), json.dumps(dump_limits(limits)), ex=REDIS_TTL)
        pipe.delete(TIERS_KEY)
        pipe.publish(TIER_CHANNEL, tier_message(None))
        return int(pipe.execute()[-1])
    finally:
        r.close()


# ---------------------------------------------------------------------------------------------- control plane


def _control_plane_loaders(dsn: str) -> tuple[Callable[[str], TierLimits | None], Callable[[], list[TierLimits]]]:
    import psycopg
    from psycopg.rows import dict_row

    cols = ", ".join(f"t.{f}" for f in _FIELDS)

    def org(name: str) -> TierLimits | None:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(f"SELECT {cols} FROM platform.organizations o JOIN platform.tier_limits t"
                              " ON t.tier = o.tier WHERE o.name = %s", (name,)).fetchone()
        return None if row is None else TierLimits(**{f: row[f] for f in _FIELDS})

    def tiers() -> list[TierLimits]:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn, conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(f"SELECT {cols} FROM platform.tier_limits t ORDER BY t.rank").fetchall()
        return [TierLimits(**{f: r[f] for f in _FIELDS}) for r in rows]

    return org, tiers


class TierCache:
    """org name -> TierLimits, and the tier table; local (ttl) -> Redis (1 h) -> control plane.

    `redis` is a redis-py client or None; `org_loader`/`tiers_loader` are sync control-plane reads
    (default: queries on `platform_dsn`). An entry is `None` when the org does not exist (cached too).
    """

    def __init__(self, *, redis: Any = None, platform_dsn: str | None = None, ttl: float = 60.0,
                 org_loader: Callable[[str], TierLimits | None] | None = None,
                 tiers_loader: Callable[[], list[TierLimits]] | None = None,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        self.redis = redis
        self.ttl = ttl
        if platform_dsn is not None and (org_loader is None or tiers_loader is None):
            o, t = _control_plane_loaders(platform_dsn)
            org_loader, tiers_loader = org_loader or o, tiers_loader or t
        self._org_loader = org_loader
        self._tiers_loader = tiers_loader
        self._local: dict[str, tuple[float, TierLimits | None]] = {}
        self._tiers: tuple[float, list[TierLimits]] | None = None
        self._limiter = limiter or trio.CapacityLimiter(2)
        self.hits = {"local": 0, "redis": 0, "control_plane": 0}

    @classmethod
    def from_url(cls, redis_url: str | None, **kw: Any) -> TierCache:
        return cls(redis=None if redis_url is None else redis_client(redis_url), **kw)

    def _lookup(self, name: str) -> TierLimits | None:
        if self.redis is not None:
            try:
                raw = self.redis.get(org_key(name))
            except REDIS_ERRORS:
                raw = None
            if raw is not None:
                self.hits["redis"] += 1
                return load_limits(json.loads(raw))
        if self._org_loader is None:
            raise LookupError("no control plane configured for tier lookups")
        self.hits["control_plane"] += 1
        limits = self._org_loader(name)
        if limits is not None and self.redis is not None:
            try:
                self.redis.set(org_key(name), json.dumps(dump_limits(limits)), ex=REDIS_TTL)
            except REDIS_ERRORS:
                pass
        return limits

    def _lookup_tiers(self) -> list[TierLimits]:
        if self.redis is not None:
            try:
                raw = self.redis.get(TIERS_KEY)
            except REDIS_ERRORS:
                raw = None
            if raw is not None:
                tiers = [t for t in (load_limits(d) for d in json.loads(raw)) if t is not None]
                if tiers:
                    return tiers
        if self._tiers_loader is None:
            return []
        tiers = self._tiers_loader()
        if self.redis is not None and tiers:
            try:
                self.redis.set(TIERS_KEY, json.dumps([dump_limits(t) for t in tiers]), ex=REDIS_TTL)
            except REDIS_ERRORS:
                pass
        return tiers

    async def get(self, org_name: str) -> TierLimits | None:
        hit = self._local.get(org_name)
        if hit is not None and hit[0] > time.monotonic():
            self.hits["local"] += 1
            return hit[1]
        limits = await trio.to_thread.run_sync(self._lookup, org_name, limiter=self._limiter)
        self._local[org_name] = (time.monotonic() + self.ttl, limits)
        return limits

    async def tiers(self) -> list[TierLimits]:
        if self._tiers is not None and self._tiers[0] > time.monotonic():
            return self._tiers[1]
        tiers = await trio.to_thread.run_sync(self._lookup_tiers, limiter=self._limiter)
        self._tiers = (time.monotonic() + self.ttl, tiers)
        return tiers

    def put(self, org_name: str, limits: TierLimits) -> None:
        """A published change carried the new limits: keep them locally."""
        self._local[org_name] = (time.monotonic() + self.ttl, limits)

    def invalidate(self, org_name: str | None = None) -> None:
        if org_name is None:
            self._local.clear()
            self._tiers = None
        else:
            self._local.pop(org_name, None)



# ---------------------------------------------------------------------------------------------- tier changes


class _Flag(threading.Event):
    def on_connect(self, _connection: object) -> None:
        self.set()



class TierWatch:
    """The tier-change part of `Limits`: the subscription to TIER_CHANNEL and applying what it hears."""

    settings: Any
    tiers: list[TierLimits]
    tier_cache: TierCache
    subscribed: bool
    _url: str | None
    _timeout: float
    _buckets: dict[str, Any]  # org id -> Bucket (bucket.py)
    _callbacks: list[Callable[[str | None], None]]
    _refresh: set[str | None]
    _refresh_event: trio.Event

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
