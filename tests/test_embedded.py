"""The embedded default: a throwaway PostgreSQL with a migrated control plane and a working demo org."""

from __future__ import annotations

import socket

import psycopg
import trio

from o7s_cluster.control_plane.catalog import TrioCatalog
from o7s_cluster.control_plane.orgs import Admin
from o7s_cluster.config import Settings
from o7s_cluster.control_plane.embedded import EmbeddedPostgres, embedded_platform
from o7s_cluster.pgwire.scram import make_verifier, parse_verifier
from o7s_cluster.control_plane.vault import Vault, generate_key


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_embedded_platform_starts_sets_up_and_stops():
    key = generate_key()
    with embedded_platform(Settings(listen_port=7654, secret_key=key)) as (settings, psql):
        assert settings.secret_key == key and settings.platform_dsn and settings.listen_port == 7654
        port = int(settings.platform_dsn.rsplit(":", 1)[1].split("/")[0])
        assert _listening(port)
        # the control plane is migrated and holds the demo org, on the free tier
        org = Admin(settings.platform_dsn).show_org("demo", Vault(key))
        assert org.tier == "free" and [d.db_name for d in org.databases] == ["demo"]
        # the printed psql line carries the demo password, which the stored verifier accepts
        assert psql.startswith('psql "postgresql://demo:') and psql.endswith('@127.0.0.1:7654/demo"')
        password = psql.split("demo:", 1)[1].split("@", 1)[0]

        async def check() -> None:
            cat = TrioCatalog(settings.platform_dsn, Vault(key))
            try:
                login = await cat.login("demo")
                it, salt, _, _ = parse_verifier(login.verifier)
                assert make_verifier(password, salt, it) == login.verifier
                target, _ = await cat.backend(login.org_id, "demo")
            finally:
                cat.close()
            # the demo backend is a real database the stored credentials can reach
            with psycopg.connect(target.conninfo()) as conn:
                assert conn.execute("SELECT current_user, current_database()").fetchone() == ("demo_owner", "demo")

        trio.run(check)
        # the server itself requires a password (no trust auth on the throwaway server)
        try:
            psycopg.connect(f"host=127.0.0.1 port={port} user=o7s dbname=postgres password=wrong").close()
            raise AssertionError("connected with a wrong password")
        except psycopg.OperationalError:
            pass
    assert not _listening(port)


def test_embedded_generates_a_key_when_none_given():
    with embedded_platform(Settings(listen_host="0.0.0.0")) as (settings, psql):
        Vault(settings.secret_key)
        Admin(settings.platform_dsn).verify(Vault(settings.secret_key))
        assert "@127.0.0.1:6432/demo" in psql


def test_embedded_postgres_stops_when_the_body_fails():
    pg = EmbeddedPostgres()
    try:
        with pg:
            assert _listening(pg.port)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert not _listening(pg.port) and not pg.tmp.exists()
