"""The control plane: schema migrations, admin operations for the CLI, and the proxy's cached read API.

Admin writes go through one transaction each, after proving O7S_SECRET_KEY is the key already in use,
so an error never leaves half an org behind and a wrong key never mixes ciphertexts.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import trio
from psycopg import errors as pgerr
from psycopg.rows import dict_row

from o7s_cluster.control_plane.dsn import BackendTarget, parse_dsn, scrub_libpq_error
from o7s_cluster.pgwire.scram import make_verifier
from o7s_cluster.control_plane.vault import Vault, VaultError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATE_LOCK = 0x07_5C_A7_A1  # pg_advisory_lock key: one migrator at a time
DB_TYPES = ("postgres", "neon")
_ORG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
T = TypeVar("T")


class CatalogError(Exception):
    """A one-line, secret-free reason an admin or read operation failed."""


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


# ---------------------------------------------------------------------------------------------- migrations


def _connect(dsn: str, **kw: Any) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, connect_timeout=10, **kw)
    except psycopg.ProgrammingError as e:  # libpq could not parse it; its message may quote the password
        raise CatalogError(f"malformed control-plane DSN: {scrub_libpq_error(str(e))}") from None
    except psycopg.Error as e:
        raise CatalogError(f"cannot connect to the control plane: {_one_line(e)}") from None


def migrate(dsn: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the pending migrations in name order; returns their names (empty when already up to date)."""
    files = sorted(migrations_dir.glob("*.sql"))
    applied: list[str] = []
    with _connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATE_LOCK,))
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS platform")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS platform.schema_migrations ("
                " name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT name FROM platform.schema_migrations")}
            for f in files:
                if f.name in done:
                    continue
                try:
                    with conn.transaction():
                        conn.execute(f.read_text().encode())  # no parameters: simple protocol, many statements
                        conn.execute("INSERT INTO platform.schema_migrations (name) VALUES (%s)", (f.name,))
                except psycopg.Error as e:
                    raise CatalogError(f"migration {f.name} failed: {_one_line(e)}") from None
                applied.append(f.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATE_LOCK,))
    return applied


# ---------------------------------------------------------------------------------------------- admin


@dataclass(frozen=True)
class TierLimits:
    tier: str
    max_connections: int
    max_qps: int
    max_storage_gb: int
    pool_size: int
    max_query_wait_ms: int
    statement_timeout_ms: int
    work_mem: str
    can_burst: bool


_LIMIT_COLS = ", ".join(f"t.{f}" for f in TierLimits.__dataclass_fields__)


@dataclass(frozen=True)
class DatabaseInfo:
    db_name: str
    database_type: str
    is_active: bool
    target: str | None  # redacted DSN; None when no key was given to decrypt it


@dataclass(frozen=True)
class OrgSummary:
    name: str
    tier: str
    databases: int
    created_at: datetime


@dataclass(frozen=True)
class OrgDetails:
    id: str
    name: str
    tier: str
    created_at: datetime
    limits: TierLimits
    has_password: bool
    databases: list[DatabaseInfo] = field(default_factory=list)


def _check_name(name: str) -> None:
    if not _ORG_RE.match(name or ""):
        raise CatalogError(
            f"invalid org name {name!r}: 1-63 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
        )


def _check_db_type(db_type: str) -> None:
    if db_type not in DB_TYPES:
        raise CatalogError(f"unknown database type {db_type!r} (one of {', '.join(DB_TYPES)})")


def _check_db_name(db_name: str) -> None:
    if not db_name or "\x00" in db_name or len(db_name.encode()) > 63:
        raise CatalogError("invalid database name: 1-63 bytes, no NUL")


def _check_password(password: str) -> None:
    if not password:
        raise CatalogError("the org password must not be empty")


class Admin:
    """Admin operations on the control plane; each method is one transaction."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor]:
        with _connect(self.dsn) as conn:
            try:
                with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                    yield cur
            except (pgerr.UndefinedTable, pgerr.InvalidSchemaName):
                raise CatalogError("the control plane is not migrated: run `o7s migrate`") from None
            except psycopg.Error as e:
                raise CatalogError(f"control plane error: {_one_line(e)}") from None

    @staticmethod
    def _check_key(cur: psycopg.Cursor, vault: Vault, *, write: bool) -> None:
        """Fail on a wrong key before anything is written; the first write records the key in use."""
        row = cur.execute("SELECT token FROM platform.secret_key_check").fetchone()
        if row is None and write:
            cur.execute(
                "INSERT INTO platform.secret_key_check (token) VALUES (%s) ON CONFLICT DO NOTHING",
                (vault.check_token(),),
            )
            row = cur.execute("SELECT token FROM platform.secret_key_check").fetchone()
        if row is not None:
            vault.verify_check_token(row["token"])

    @staticmethod
    def _tier(cur: psycopg.Cursor, tier: str) -> None:
        if cur.execute("SELECT 1 FROM platform.tier_limits WHERE tier = %s", (tier,)).fetchone() is None:
            tiers = [r["tier"] for r in cur.execute("SELECT tier FROM platform.tier_limits ORDER BY rank")]
            raise CatalogError(f"unknown tier {tier!r} (one of {', '.join(tiers)})")

    @staticmethod
    def _org_id(cur: psycopg.Cursor, org: str) -> str:
        row = cur.execute("SELECT id FROM platform.organizations WHERE name = %s FOR UPDATE", (org,)).fetchone()
        if row is None:
            raise CatalogError(f"unknown org {org!r}")
        return row["id"]

    @staticmethod
    def _insert_db(cur: psycopg.Cursor, org: str, org_id: str, target: BackendTarget, db_type: str,
                   db_name: str, vault: Vault) -> None:
        try:
            with cur.connection.transaction():  # savepoint: turn the duplicate into a clear message
                cur.execute(
                    "INSERT INTO platform.database_credentials (org_id, db_name, database_type, connection_string)"
                    " VALUES (%s, %s, %s, %s)",
                    (org_id, db_name, db_type, vault.encrypt(target.conninfo())),
                )
        except pgerr.UniqueViolation:
            raise CatalogError(f"org {org!r} already has a database named {db_name!r}") from None

    def create_org(self, name: str, tier: str, backend_dsn: str, db_type: str, password: str, vault: Vault,
                   db_name: str | None = None) -> str:
        """Create an org with its login and first backend; returns the org id."""
        _check_name(name)
        _check_db_type(db_type)
        _check_password(password)
        target = _parse(backend_dsn)
        db_name = db_name or target.dbname
        _check_db_name(db_name)
        verifier = make_verifier(password)
        with self._tx() as cur:
            self._check_key(cur, vault, write=True)
            self._tier(cur, tier)
            try:
                with cur.connection.transaction():
                    org_id = cur.execute(
                        "INSERT INTO platform.organizations (name, tier) VALUES (%s, %s) RETURNING id", (name, tier)
                    ).fetchone()["id"]
            except pgerr.UniqueViolation:
                raise CatalogError(f"org {name!r} already exists") from None
            cur.execute("INSERT INTO platform.org_logins (org_id, scram_verifier) VALUES (%s, %s)", (org_id, verifier))
            self._insert_db(cur, name, org_id, target, db_type, db_name, vault)
        return str(org_id)

    def add_db(self, org: str, dsn: str, db_type: str, vault: Vault, db_name: str | None = None) -> str:
        """Register another backend database for an org; returns its client-facing name."""
        _check_db_type(db_type)
        target = _parse(dsn)
        db_name = db_name or target.dbname
        _check_db_name(db_name)
        with self._tx() as cur:
            self._check_key(cur, vault, write=True)
            self._insert_db(cur, org, self._org_id(cur, org), target, db_type, db_name, vault)
        return db_name

    def verify(self, vault: Vault) -> None:
        """Fail before serving when the schema is behind or the key is not the one in use."""
        with self._tx() as cur:
            done = {r["name"] for r in cur.execute("SELECT name FROM platform.schema_migrations")}
            pending = [f.name for f in sorted(MIGRATIONS_DIR.glob("*.sql")) if f.name not in done]
            if pending:
                raise CatalogError(f"the control plane is not migrated (pending: {', '.join(pending)}): run `o7s migrate`")
            self._check_key(cur, vault, write=False)

    def set_tier(self, org: str, tier: str) -> None:
        with self._tx() as cur:
            self._tier(cur, tier)
            cur.execute("UPDATE platform.organizations SET tier = %s WHERE id = %s", (tier, self._org_id(cur, org)))

    def set_password(self, org: str, password: str) -> None:
        _check_password(password)
        verifier = make_verifier(password)
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO platform.org_logins (org_id, scram_verifier) VALUES (%s, %s)"
                " ON CONFLICT (org_id) DO UPDATE SET scram_verifier = excluded.scram_verifier, updated_at = now()",
                (self._org_id(cur, org), verifier),
            )

    def list_orgs(self) -> list[OrgSummary]:
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT o.name, o.tier, count(d.id) AS databases, o.created_at FROM platform.organizations o"
                " LEFT JOIN platform.database_credentials d ON d.org_id = o.id"
                " GROUP BY o.id ORDER BY o.name"
            ).fetchall()
        return [OrgSummary(**r) for r in rows]

    def show_org(self, org: str, vault: Vault | None = None) -> OrgDetails:
        """Everything about an org but its secrets; backend DSNs are shown redacted when a key is given."""
        with self._tx() as cur:
            if vault is not None:
                self._check_key(cur, vault, write=False)
            row = cur.execute(
                f"SELECT o.id, o.name, o.created_at, l.org_id IS NOT NULL AS has_password, {_LIMIT_COLS}"
                " FROM platform.organizations o JOIN platform.tier_limits t ON t.tier = o.tier"
                " LEFT JOIN platform.org_logins l ON l.org_id = o.id WHERE o.name = %s",
                (org,),
            ).fetchone()
            if row is None:
                raise CatalogError(f"unknown org {org!r}")
            dbs = cur.execute(
                "SELECT db_name, database_type, is_active, connection_string FROM platform.database_credentials"
                " WHERE org_id = %s ORDER BY db_name",
                (row["id"],),
            ).fetchall()
        limits = TierLimits(**{f: row[f] for f in TierLimits.__dataclass_fields__})
        databases = [
            DatabaseInfo(
                d["db_name"], d["database_type"], d["is_active"],
                parse_dsn(vault.decrypt(d["connection_string"])).redacted() if vault is not None else None,
            )
            for d in dbs
        ]
        return OrgDetails(str(row["id"]), row["name"], limits.tier, row["created_at"], limits,
                          row["has_password"], databases)

    def delete_org(self, org: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM platform.organizations WHERE id = %s", (self._org_id(cur, org),))


def _parse(dsn: str) -> BackendTarget:
    try:
        return parse_dsn(dsn)
    except ValueError as e:
        raise CatalogError(str(e)) from None


# ---------------------------------------------------------------------------------------------- proxy reads


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
            raise CatalogError(f"control plane unavailable: {_one_line(e)}") from None

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
            f"SELECT o.id::text AS org_id, o.name, l.scram_verifier, {_LIMIT_COLS},"
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
        return parse_dsn(self.vault.decrypt(rows[0]["connection_string"])), rows[0]["database_type"]

    def _load_key_check(self) -> None:
        rows = self._query("SELECT token FROM platform.secret_key_check", ())
        if rows:
            self.vault.verify_check_token(rows[0]["token"])

    async def login(self, org_name: str) -> OrgLogin | None:
        """The org's login verifier, tier limits and database names; None when no such org."""
        if not _ORG_RE.match(org_name or ""):
            return None
        return await self._cached(("login", org_name), self._load_login, org_name)

    async def backend(self, org_id: str, db_name: str) -> tuple[BackendTarget, str] | None:
        """The decrypted backend target and database type for (org, database); None when unregistered."""
        try:
            uuid.UUID(org_id)
        except ValueError:
            return None
        return await self._cached(("backend", org_id, db_name), self._load_backend, org_id, db_name)

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
        """Drop cached entries: everything, or one org's login and backends."""
        if org_name is None:
            self._cache.clear()
            return
        hit = self._cache.pop(("login", org_name), None)
        org_id = hit[2].org_id if hit is not None and hit[2] is not None else None
        if org_id is not None:
            for key in [k for k in self._cache if k[0] == "backend" and k[1] == org_id]:
                del self._cache[key]

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
