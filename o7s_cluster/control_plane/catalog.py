"""The proxy's cached read API on the control plane: org logins and backend targets, for trio.

Imported by the data path; the CLI's admin operations are in orgs.py, the schema's migrations in migrate.py.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from psycopg.rows import dict_row

from o7s_cluster.auth.apikeys import StoredKey
from o7s_cluster.control_plane.db import LIMIT_COLS, ORG_RE, CatalogError, TierLimits, one_line
from o7s_cluster.control_plane.dsn import BackendTarget, parse_dsn
from o7s_cluster.control_plane.redis_dsn import RedisTarget, parse_redis_dsn
from o7s_cluster.control_plane.vault import Vault, VaultError

T = TypeVar("T")
KEY_TOUCH_INTERVAL = 60.0  # seconds: an API key's last_used_at is written at most this often per worker


@dataclass(frozen=True)
class OrgLogin:
    org_id: str
    name: str
    tier: str
    verifier: str
    limits: TierLimits
    databases: frozenset[str]


@dataclass
class _Flight:
    """One in-progress lookup that concurrent callers for the same key wait on instead of querying."""

    done: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None


class TrioCatalog:
    """Cached control-plane reads for the trio proxy.

    A TTL cache plus single-flight per key, so a burst of connects for one org costs one query and a
    flood of unknown names is cached too. While the control plane is unreachable, answers up to
    `max_stale` seconds past their TTL are still served, so a control-plane blip does not lock every
    org out; the cache is bounded so random names cannot grow it without limit.
    """

    def __init__(self, dsn: str, vault: Vault, ttl: float = 5.0, *, max_stale: float = 300.0,
                 max_connections: int = 4, timeout: float = 5.0, max_entries: int = 100_000) -> None:
        self.dsn = dsn
        self.vault = vault
        self.ttl = ttl
        self.max_stale = max_stale
        self.timeout = timeout
        self.max_entries = max_entries
        self._count = itertools.count(1)
        self.queries = 0  # round trips issued; lets tests and metrics see the cache working
        self._max = max_connections
        self._pool: Any = None
        self._pool_lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(max_connections)
        self._cache: dict[tuple, tuple[float, float, Any]] = {}  # key -> (expires, fetched, value), oldest first
        self._flights: dict[tuple, _Flight] = {}
        self._touched: dict[str, float] = {}  # API key id -> when its last_used_at was last written

    # -- plumbing

    def _get_pool(self) -> Any:
        with self._pool_lock:
            if self._pool is None:
                from psycopg_pool import ConnectionPool

                self._pool = ConnectionPool(
                    self.dsn, min_size=1, max_size=self._max, open=False, timeout=self.timeout,
                    kwargs={"autocommit": True, "connect_timeout": max(1, round(self.timeout))},
                    check=ConnectionPool.check_connection,  # a control-plane restart must not fail a login
                    name="o7s-catalog",
                )
                self._pool.open(wait=False)
            return self._pool

    def _query(self, sql: str, params: tuple) -> list[dict[str, Any]]:
        self.queries = next(self._count)
        try:
            with self._get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                return cur.execute(sql, params).fetchall()
        except Exception as e:  # PoolTimeout, OperationalError, ...
            raise CatalogError(f"control plane unavailable: {one_line(e)}") from None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)

    def _store(self, key: tuple, value: Any, fetched: float) -> None:
        if len(self._cache) >= self.max_entries:
            now = time.monotonic()
            for k in [k for k, (_, fetched, _) in self._cache.items() if fetched + self.ttl + self.max_stale < now]:
                del self._cache[k]
            while len(self._cache) >= self.max_entries * 0.9:
                del self._cache[next(iter(self._cache))]
        self._cache.pop(key, None)  # re-insert at the end: the dict stays oldest-first
        self._cache[key] = (time.monotonic() + self.ttl, fetched, value)

    async def _cached(self, key: tuple, fn: Callable[..., Any], *args: Any) -> Any:
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[2]
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is None:
                return flight.value
            if not isinstance(flight.error, trio.Cancelled):
                raise flight.error
            return await self._cached(key, fn, *args)  # the leader was cancelled: try ourselves
        flight = self._flights[key] = _Flight()
        try:
            try:
                flight.value = await self._run(fn, *args)
            except CatalogError:
                if hit is None or hit[1] + self.ttl + self.max_stale < time.monotonic():
                    raise
                # control plane down: the last answer beats locking the org out; retry after a TTL
                flight.value = hit[2]
                self._store(key, flight.value, hit[1])
            else:
                self._store(key, flight.value, time.monotonic())
            return flight.value
        except BaseException as e:
            flight.error = e
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    # -- reads

    def _load_login(self, org_name: str) -> OrgLogin | None:
        rows = self._query(
            f"SELECT o.id::text AS org_id, o.name, l.scram_verifier, {LIMIT_COLS},"
            " coalesce(array_agg(d.db_name) FILTER (WHERE d.is_active), '{}') AS dbs"
            " FROM platform.organizations o JOIN platform.org_logins l ON l.org_id = o.id"
            " JOIN platform.tier_limits t ON t.tier = o.tier"
            " LEFT JOIN platform.database_credentials d ON d.org_id = o.id"
            " WHERE o.name = %s GROUP BY o.id, l.scram_verifier, t.tier",
            (org_name,),
        )
        if not rows:
            return None
        r = rows[0]
        limits = TierLimits(**{f: r[f] for f in TierLimits.__dataclass_fields__})
        return OrgLogin(r["org_id"], r["name"], limits.tier, r["scram_verifier"], limits, frozenset(r["dbs"]))

    def _load_backend(self, org_id: str, db_name: str) -> tuple[BackendTarget, str] | None:
        rows = self._query(
            "SELECT connection_string, database_type FROM platform.database_credentials"
            " WHERE org_id = %s AND db_name = %s AND is_active",
            (org_id, db_name),
        )
        if not rows:
            return None
        if rows[0]["database_type"] == "redis":
            return None  # not a Postgres backend: a Postgres client naming it gets "does not exist"
        return parse_dsn(self.vault.decrypt(rows[0]["connection_string"])), rows[0]["database_type"]

    def _load_api_key(self, prefix: str) -> StoredKey | None:
        rows = self._query(
            "SELECT id::text AS id, org_id::text AS org_id, name, key_hash, expires_at, revoked_at IS NOT NULL AS revoked"
            " FROM platform.api_keys WHERE prefix = %s", (prefix,))
        if not rows:
            return None
        r = rows[0]
        return StoredKey(r["id"], r["org_id"], r["name"], bytes(r["key_hash"]), r["expires_at"], r["revoked"])

    def _touch_api_key(self, key_id: str) -> None:
        self._query("UPDATE platform.api_keys SET last_used_at = now() WHERE id = %s RETURNING id", (key_id,))

    def _load_redis(self, org_id: str) -> list[tuple[str, RedisTarget]]:
        rows = self._query(
            "SELECT db_name, connection_string FROM platform.database_credentials"
            " WHERE org_id = %s AND database_type = 'redis' AND is_active ORDER BY created_at, db_name",
            (org_id,),
        )
        return [(r["db_name"], parse_redis_dsn(self.vault.decrypt(r["connection_string"]))) for r in rows]

    async def redis_databases(self, org_id: str) -> list[tuple[str, RedisTarget]]:
        """The org's Redis databases (client-facing name, decrypted target), the first registered first."""
        try:
            uuid.UUID(org_id)
        except ValueError:
            return []
        return await self._cached(("redis", org_id), self._load_redis, org_id)

    def _load_key_check(self) -> None:
        rows = self._query("SELECT token FROM platform.secret_key_check", ())
        if rows:
            self.vault.verify_check_token(rows[0]["token"])

    async def login(self, org_name: str) -> OrgLogin | None:
        """The org's login verifier, tier limits and database names; None when no such org."""
        if not ORG_RE.match(org_name or ""):
            return None
        return await self._cached(("login", org_name), self._load_login, org_name)

    async def backend(self, org_id: str, db_name: str) -> tuple[BackendTarget, str] | None:
        """The decrypted backend target and database type for (org, database); None when unregistered."""
        try:
            uuid.UUID(org_id)
        except ValueError:
            return None
        return await self._cached(("backend", org_id, db_name), self._load_backend, org_id, db_name)

    async def api_key(self, prefix: str) -> StoredKey | None:
        """An API key's row by its prefix (cached like logins: a revocation shows within the TTL)."""
        return await self._cached(("apikey", prefix), self._load_api_key, prefix)

    async def touch_api_key(self, key_id: str) -> None:
        """Record a key's use (`last_used_at`), at most once per KEY_TOUCH_INTERVAL per worker."""
        now = time.monotonic()
        if now - self._touched.get(key_id, -KEY_TOUCH_INTERVAL) < KEY_TOUCH_INTERVAL:
            return
        if len(self._touched) > 10_000:
            self._touched.clear()
        self._touched[key_id] = now
        await self._run(self._touch_api_key, key_id)

    async def check_key(self) -> None:
        """Raise VaultError now, at start-up, rather than at the first client, when the key is wrong."""
        await self._run(self._load_key_check)

    async def ping(self) -> bool:
        try:
            await self._run(self._query, "SELECT 1 AS ok", ())
            return True
        except (CatalogError, VaultError):
            return False

    def invalidate(self, org_name: str | None = None) -> None:
        """Drop cached entries: everything, or one org's login, backends and API keys."""
        if org_name is None:
            self._cache.clear()
            return
        for key in [k for k in self._cache if k[0] == "apikey"]:  # keys are cached by prefix: drop them all
            del self._cache[key]
        hit = self._cache.pop(("login", org_name), None)
        org_id = hit[2].org_id if hit is not None and hit[2] is not None else None
        if org_id is not None:
            for key in [k for k in self._cache if k[0] in ("backend", "redis") and k[1] == org_id]:
                del self._cache[key]

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
