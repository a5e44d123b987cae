"""`o7s migrate`: the SQL files in migrations/ applied in name order, each once, one migrator at a time."""

from __future__ import annotations

from pathlib import Path

import psycopg

from o7s_cluster.control_plane.db import CatalogError, connect, one_line

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_MIGRATE_LOCK = 0x07_5C_A7_A1  # pg_advisory_lock key: one migrator at a time


def migrate(dsn: str, migrations_dir: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the pending migrations in name order; returns their names (empty when already up to date)."""
    files = sorted(migrations_dir.glob("*.sql"))
    applied: list[str] = []
    with connect(dsn, autocommit=True) as conn:
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
                    raise CatalogError(f"migration {f.name} failed: {one_line(e)}") from None
                applied.append(f.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATE_LOCK,))
    return applied
