"""Org administration for the CLI: create, add databases, tiers, passwords, list, show, delete.

Admin writes go through one transaction each, after proving O7S_SECRET_KEY is the key already in use,
so an error never leaves half an org behind and a wrong key never mixes ciphertexts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import errors as pgerr
from psycopg.rows import dict_row

from o7s_cluster.control_plane.db import DB_TYPES, LIMIT_COLS, ORG_RE, CatalogError, TierLimits, connect, one_line
from o7s_cluster.control_plane.dsn import BackendTarget, parse_dsn
from o7s_cluster.control_plane.migrate import MIGRATIONS_DIR
from o7s_cluster.control_plane.redis_dsn import RedisTarget, parse_redis_dsn
from o7s_cluster.control_plane.vault import Vault
from o7s_cluster.pgwire.scram import make_verifier


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
    if not ORG_RE.match(name or ""):
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
        with connect(self.dsn) as conn:
            try:
                with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                    yield cur
            except (pgerr.UndefinedTable, pgerr.InvalidSchemaName):
                raise CatalogError("the control plane is not migrated: run `o7s migrate`") from None
            except psycopg.Error as e:
                raise CatalogError(f"control plane error: {one_line(e)}") from None

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
    def _insert_db(cur: psycopg.Cursor, org: str, org_id: str, target: BackendTarget | RedisTarget, db_type: str,
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
        target = _parse(backend_dsn, db_type)
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
        target = _parse(dsn, db_type)
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
                f"SELECT o.id, o.name, o.created_at, l.org_id IS NOT NULL AS has_password, {LIMIT_COLS}"
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
                _parse(vault.decrypt(d["connection_string"]), d["database_type"]).redacted() if vault is not None else None,
            )
            for d in dbs
        ]
        return OrgDetails(str(row["id"]), row["name"], limits.tier, row["created_at"], limits,
                          row["has_password"], databases)

    def delete_org(self, org: str) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM platform.organizations WHERE id = %s", (self._org_id(cur, org),))


def _parse(dsn: str, db_type: str = "postgres") -> BackendTarget | RedisTarget:
    try:
        return parse_redis_dsn(dsn) if db_type == "redis" else parse_dsn(dsn)
    except ValueError as e:
        raise CatalogError(str(e)) from None
