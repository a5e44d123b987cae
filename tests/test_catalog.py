"""Control plane against a real PostgreSQL: migrations, admin operations, and the proxy's cached reads."""

from __future__ import annotations

import re
import secrets
import threading

import psycopg
import pytest
import trio

from o7s_cluster.control_plane.catalog import OrgLogin, TrioCatalog
from o7s_cluster.control_plane.db import CatalogError, TierLimits
from o7s_cluster.control_plane.migrate import MIGRATIONS_DIR, migrate
from o7s_cluster.control_plane.orgs import Admin
from o7s_cluster.control_plane.dsn import parse_dsn
from o7s_cluster.pgwire.scram import make_verifier, parse_verifier
from o7s_cluster.control_plane.vault import Vault, VaultError, generate_key
from tests.conftest import admin_dsn, create_backend_db

VERIFIER_RE = re.compile(r"^SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]{44}:[A-Za-z0-9+/=]{44}$")


@pytest.fixture
def fresh_db(pg_server) -> str:
    """An empty database of its own, for tests that must see a control plane from nothing."""
    name = f"cp_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn(pg_server), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://{pg_server.user}@{pg_server.host}:{pg_server.port}/{name}"
    with psycopg.connect(admin_dsn(pg_server), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def cp(fresh_db) -> tuple[Admin, Vault, str]:
    migrate(fresh_db)
    return Admin(fresh_db), Vault(generate_key()), fresh_db


@pytest.fixture(scope="module")
def backend(pg_server) -> tuple[str, str]:
    pw = secrets.token_urlsafe(12)
    return create_backend_db(pg_server, "catalog_backend", "catalog_owner", pw), pw


def q(dsn: str, sql: str, *params):
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def counts(dsn: str) -> tuple[int, int, int, int]:
    return q(dsn, "SELECT (SELECT count(*) FROM platform.organizations), (SELECT count(*) FROM platform.org_logins),"
                  " (SELECT count(*) FROM platform.database_credentials),"
                  " (SELECT count(*) FROM platform.secret_key_check)")[0]


# ---------------------------------------------------------------------------------------------- migrate


ALL_MIGRATIONS = sorted(p.name for p in MIGRATIONS_DIR.glob("*.sql"))


def test_migrate_is_idempotent(fresh_db):
    assert ALL_MIGRATIONS[0] == "001_platform.sql"
    assert migrate(fresh_db) == ALL_MIGRATIONS
    assert migrate(fresh_db) == []
    assert [r[0] for r in q(fresh_db, "SELECT name FROM platform.schema_migrations ORDER BY name")] == ALL_MIGRATIONS
    tiers = q(fresh_db, "SELECT tier, max_connections, max_qps, base_fee_usd::float FROM platform.tier_limits ORDER BY rank")
    assert tiers == [("free", 5, 10, 0.0), ("starter", 10, 50, 10.0), ("pro", 50, 200, 50.0),
                     ("enterprise", 200, 1000, 200.0)]


def test_concurrent_migrations_apply_once(fresh_db):
    results, errors = [], []

    def run():
        try:
            results.append(migrate(fresh_db))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [[], [], [], ALL_MIGRATIONS]


def test_new_migration_files_apply_in_order(fresh_db, tmp_path):
    from o7s_cluster.control_plane.migrate import MIGRATIONS_DIR

    (tmp_path / "001_platform.sql").write_text((MIGRATIONS_DIR / "001_platform.sql").read_text())
    (tmp_path / "003_b.sql").write_text("ALTER TABLE platform.t2 ADD COLUMN y int;")
    (tmp_path / "002_a.sql").write_text("CREATE TABLE platform.t2 (x int); INSERT INTO platform.t2 VALUES (1);")
    assert migrate(fresh_db, tmp_path) == ["001_platform.sql", "002_a.sql", "003_b.sql"]
    (tmp_path / "004_bad.sql").write_text("CREATE TABLE platform.t3 (x int); SELECT no_such_function();")
    with pytest.raises(CatalogError, match="migration 004_bad.sql failed"):
        migrate(fresh_db, tmp_path)
    # the failed file left nothing behind and is not recorded
    assert q(fresh_db, "SELECT to_regclass('platform.t3') IS NULL")[0][0]
    assert "004_bad.sql" not in [r[0] for r in q(fresh_db, "SELECT name FROM platform.schema_migrations")]


def test_unreachable_control_plane(pg_server):
    with pytest.raises(CatalogError, match="cannot connect to the control plane"):
        migrate("postgresql://nobody:TopSecret@127.0.0.1:1/x")
    with pytest.raises(CatalogError, match="malformed control-plane DSN") as ei:
        migrate("host=h password=TopSecret bogus")
    assert "TopSecret" not in str(ei.value)


def test_unmigrated_control_plane(fresh_db):
    with pytest.raises(CatalogError, match="not migrated: run `o7s migrate`"):
        Admin(fresh_db).list_orgs()


# ---------------------------------------------------------------------------------------------- admin


def test_create_show_list(cp, backend):
    admin, vault, dsn = cp
    dsn_b, backend_pw = backend
    org_id = admin.create_org("acme", "starter", dsn_b, "postgres", "acme-login-pw", vault)
    d = admin.show_org("acme", vault)
    assert (d.id, d.name, d.tier, d.has_password) == (org_id, "acme", "starter", True)
    assert d.limits == TierLimits("starter", 10, 50, 10, 5, 1000, 15000, "8MB", True)
    [db] = d.databases
    assert (db.db_name, db.database_type, db.is_active) == ("catalog_backend", "postgres", True)
    assert db.target == parse_dsn(dsn_b).redacted() and backend_pw not in db.target
    assert admin.show_org("acme").databases[0].target is None  # no key: nothing decrypted
    assert [(o.name, o.tier, o.databases) for o in admin.list_orgs()] == [("acme", "starter", 1)]


def test_verifier_only_and_no_plain_secret_anywhere(cp, backend):
    admin, vault, dsn = cp
    login_pw = "Login-" + secrets.token_urlsafe(8)
    admin.create_org("acme", "pro", backend[0], "neon", login_pw, vault)
    [(verifier,)] = q(dsn, "SELECT scram_verifier FROM platform.org_logins")
    assert VERIFIER_RE.match(verifier)
    iterations, salt, _, _ = parse_verifier(verifier)
    assert make_verifier(login_pw, salt, iterations) == verifier  # it verifies this password
    assert make_verifier("other", salt, iterations) != verifier
    # every row of every platform table, as text and with bytea as hex
    dump = "".join(
        r[0] for (t,) in q(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'platform'")
        for r in q(dsn, f"SELECT row_to_json(x)::text FROM platform.{t} x")
    )
    for secret in (login_pw, backend[1]):
        assert secret not in dump and secret.encode().hex() not in dump
    assert "catalog_backend" in dump  # the dump did read the credentials table


def test_db_name_override_and_add_db(cp, backend, pg_server):
    admin, vault, dsn = cp
    admin.create_org("acme", "free", backend[0], "postgres", "pw", vault, db_name="main")
    second = create_backend_db(pg_server, "catalog_second", "catalog_owner2", "pw2")
    assert admin.add_db("acme", second, "neon", vault) == "catalog_second"
    assert admin.add_db("acme", second, "postgres", vault, db_name="alias") == "alias"
    assert [(d.db_name, d.database_type) for d in admin.show_org("acme").databases] == [
        ("alias", "postgres"), ("catalog_second", "neon"), ("main", "postgres")]
    before = counts(dsn)
    with pytest.raises(CatalogError, match="already has a database named 'main'"):
        admin.add_db("acme", second, "postgres", vault, db_name="main")
    with pytest.raises(CatalogError, match="unknown org 'nope'"):
        admin.add_db("nope", second, "postgres", vault)
    with pytest.raises(CatalogError, match="unknown database type"):
        admin.add_db("acme", second, "mysql", vault)
    assert counts(dsn) == before


def test_errors_write_nothing(cp, backend):
    admin, vault, dsn = cp
    with pytest.raises(CatalogError, match=r"unknown tier 'gold' \(one of free, starter, pro, enterprise\)"):
        admin.create_org("acme", "gold", backend[0], "postgres", "pw", vault)
    with pytest.raises(CatalogError, match="malformed backend DSN") as ei:
        admin.create_org("acme", "pro", "postgresql://u:TopSecret@h:0/d", "postgres", "pw", vault)
    assert "TopSecret" not in str(ei.value)
    with pytest.raises(CatalogError, match="invalid org name"):
        admin.create_org("Bad Name", "pro", backend[0], "postgres", "pw", vault)
    with pytest.raises(CatalogError, match="must not be empty"):
        admin.create_org("acme", "pro", backend[0], "postgres", "", vault)
    assert counts(dsn) == (0, 0, 0, 0)
    admin.create_org("acme", "pro", backend[0], "postgres", "pw", vault)
    with pytest.raises(CatalogError, match="org 'acme' already exists"):
        admin.create_org("acme", "free", backend[0], "postgres", "pw2", vault)
    assert counts(dsn) == (1, 1, 1, 1)


def test_failure_after_org_insert_rolls_back(cp, backend):
    """A fault halfway through create_org (here: the credentials insert) leaves no org and no login."""
    admin, vault, dsn = cp
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION platform.boom() RETURNS trigger LANGUAGE plpgsql AS"
                     " $$ BEGIN RAISE EXCEPTION 'disk full'; END $$")
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON platform.database_credentials"
                     " FOR EACH ROW EXECUTE FUNCTION platform.boom()")
    with pytest.raises(CatalogError, match="disk full"):
        admin.create_org("acme", "pro", backend[0], "postgres", "pw", vault)
    assert counts(dsn) == (0, 0, 0, 0)


def test_wrong_key_fails_before_writing(cp, backend):
    admin, vault, dsn = cp
    assert counts(dsn)[3] == 0
    admin.create_org("acme", "pro", backend[0], "postgres", "pw", vault)  # first write records the key
    assert counts(dsn) == (1, 1, 1, 1)
    other = Vault(generate_key())
    with pytest.raises(VaultError, match="not the key"):
        admin.create_org("beta", "pro", backend[0], "postgres", "pw", other)
    with pytest.raises(VaultError, match="not the key"):
        admin.add_db("acme", backend[0], "postgres", other, db_name="x")
    with pytest.raises(VaultError, match="not the key"):
        admin.show_org("acme", other)
    with pytest.raises(VaultError):
        admin.verify(other)
    admin.verify(vault)
    assert counts(dsn) == (1, 1, 1, 1)


def test_set_tier_passwd_delete(cp, backend):
    admin, vault, dsn = cp
    admin.create_org("acme", "free", backend[0], "postgres", "pw1", vault)
    admin.set_tier("acme", "enterprise")
    assert admin.show_org("acme").tier == "enterprise"
    with pytest.raises(CatalogError, match="unknown tier"):
        admin.set_tier("acme", "platinum")
    with pytest.raises(CatalogError, match="unknown org"):
        admin.set_tier("ghost", "pro")
    [(v1,)] = q(dsn, "SELECT scram_verifier FROM platform.org_logins")
    admin.set_password("acme", "pw2")
    [(v2,)] = q(dsn, "SELECT scram_verifier FROM platform.org_logins")
    it, salt, _, _ = parse_verifier(v2)
    assert v1 != v2 and make_verifier("pw2", salt, it) == v2
    with pytest.raises(CatalogError, match="unknown org"):
        admin.set_password("ghost", "x")
    admin.delete_org("acme")
    assert counts(dsn)[:3] == (0, 0, 0)
    with pytest.raises(CatalogError, match="unknown org"):
        admin.delete_org("acme")
    with pytest.raises(CatalogError, match="unknown org"):
        admin.show_org("acme")


# ---------------------------------------------------------------------------------------------- TrioCatalog


async def test_trio_catalog_login_and_backend(cp, backend):
    admin, vault, dsn = cp
    org_id = admin.create_org("acme", "pro", backend[0], "postgres", "pw", vault)
    admin.add_db("acme", backend[0], "neon", vault, db_name="analytics")
    cat = TrioCatalog(dsn, vault)
    try:
        login = await cat.login("acme")
        assert isinstance(login, OrgLogin)
        assert (login.org_id, login.name, login.tier) == (org_id, "acme", "pro")
        assert login.databases == frozenset({"catalog_backend", "analytics"})
        assert (login.limits.max_connections, login.limits.pool_size, login.limits.work_mem) == (50, 20, "32MB")
        assert make_verifier("pw", *parse_verifier(login.verifier)[1::-1]) == login.verifier
        assert await cat.login("nobody") is None
        assert await cat.login("Not An Org; DROP TABLE x") is None

        target, db_type = await cat.backend(org_id, "catalog_backend")
        assert db_type == "postgres" and target == parse_dsn(backend[0])
        assert (await cat.backend(org_id, "analytics"))[1] == "neon"
        assert await cat.backend(org_id, "other_db") is None
        assert await cat.backend("not-a-uuid", "catalog_backend") is None
        # the decrypted target is a working connection to the backend
        with await trio.to_thread.run_sync(psycopg.connect, target.conninfo()) as conn:
            assert conn.execute("SELECT current_database()").fetchone()[0] == "catalog_backend"
        assert await cat.ping()
        await cat.check_key()
    finally:
        cat.close()


async def test_trio_catalog_cache_burst_ttl_invalidate(cp, backend):
    admin, vault, dsn = cp
    admin.create_org("acme", "free", backend[0], "postgres", "pw", vault)
    cat = TrioCatalog(dsn, vault, ttl=60)
    try:
        results = []

        async def one():
            results.append(await cat.login("acme"))

        async with trio.open_nursery() as n:
            for _ in range(1000):
                n.start_soon(one)
        assert len(results) == 1000 and all(r is results[0] for r in results) and results[0].tier == "free"
        assert cat.queries == 1

        async with trio.open_nursery() as n:  # unknown names are cached too: a flood costs one query
            for _ in range(200):
                n.start_soon(cat.login, "ghost")
        assert cat.queries == 2

        admin.set_tier("acme", "pro")
        assert (await cat.login("acme")).tier == "free"  # still cached
        cat.invalidate("acme")
        assert (await cat.login("acme")).tier == "pro"
        assert cat.queries == 3

        cat.ttl = 0.05
        cat.invalidate()
        await cat.login("acme")
        await trio.sleep(0.1)
        await cat.login("acme")
        assert cat.queries == 5
    finally:
        cat.close()


async def test_trio_catalog_wrong_key_and_down_control_plane(cp, backend):
    admin, vault, dsn = cp
    org_id = admin.create_org("acme", "free", backend[0], "postgres", "pw", vault)
    cat = TrioCatalog(dsn, Vault(generate_key()))
    try:
        with pytest.raises(VaultError):
            await cat.check_key()
        with pytest.raises(VaultError):
            await cat.backend(org_id, "catalog_backend")
    finally:
        cat.close()
    down = TrioCatalog("postgresql://x:TopSecret@127.0.0.1:1/x", vault, timeout=1)
    try:
        assert not await down.ping()
        with pytest.raises(CatalogError, match="control plane unavailable") as ei:
            await down.login("acme")
        assert "TopSecret" not in str(ei.value)
    finally:
        down.close()


async def test_trio_catalog_serves_stale_answers_while_control_plane_is_down(cp, backend, pg_server):
    admin, vault, dsn = cp
    org_id = admin.create_org("acme", "free", backend[0], "postgres", "pw", vault)
    cat = TrioCatalog(dsn, vault, ttl=0.5, max_stale=30, timeout=1)
    dbname = dsn.rsplit("/", 1)[1]
    try:
        login = await cat.login("acme")
        found = await cat.backend(org_id, "catalog_backend")
        with psycopg.connect(admin_dsn(pg_server), autocommit=True) as conn:  # the control plane goes away
            conn.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS false")
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
        await trio.sleep(0.6)
        n = cat.queries
        assert await cat.login("acme") == login
        assert cat.queries == n + 1  # it did try, and fell back on the last answer
        assert await cat.login("acme") == login and cat.queries == n + 1  # no retry storm within a TTL
        assert await cat.backend(org_id, "catalog_backend") == found
        with pytest.raises(CatalogError, match="control plane unavailable"):
            await cat.login("beta")  # nothing to fall back on
        assert not await cat.ping()

        with psycopg.connect(admin_dsn(pg_server), autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS true")
        admin.set_tier("acme", "pro")
        with trio.fail_after(15):
            while (await cat.login("acme")).tier != "pro":  # recovers on its own
                await trio.sleep(0.2)
    finally:
        cat.close()


async def test_trio_catalog_cache_is_bounded(cp):
    admin, vault, dsn = cp
    cat = TrioCatalog(dsn, vault, ttl=60, max_entries=50)
    try:
        for i in range(200):
            assert await cat.login(f"nobody{i}") is None
        assert len(cat._cache) <= 50
        assert cat.queries == 200
        assert await cat.login("nobody199") is None and cat.queries == 200  # the newest are kept
    finally:
        cat.close()
