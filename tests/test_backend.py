"""Backend authentication with the stored credentials: SCRAM-SHA-256, md5, cleartext password, trust."""

from __future__ import annotations

import psycopg
import pytest


@pytest.mark.parametrize("role_kind, method", [("scram", "scram-sha-256"), ("md5", "md5"),
                                               ("plain", "password"), ("trust", "trust")])
def test_backend_auth_methods(proxy, make_org, pg_server, role_kind, method):
    org = make_org(f"auth_{role_kind}", "starter", role_kind=role_kind)
    with psycopg.connect(proxy.dsn(org), autocommit=True) as conn:
        user, db = conn.execute("select current_user, current_database()").fetchone()
    assert db == org.dbname
    # The server really used the method the role's pg_hba line names.
    hba = psycopg.connect(f"host={pg_server.host} port={pg_server.port} user=postgres dbname=postgres",
                          autocommit=True)
    with hba:
        rows = hba.execute("select auth_method from pg_hba_file_rules where %s = any(user_name)", (user,)).fetchall()
    if role_kind != "scram":
        assert rows == [(method,)]


def test_wrong_stored_backend_password_is_a_clear_error(proxy, make_org, migrated, pg_server):
    from conftest import create_backend_db, run_o7s

    dsn = create_backend_db(pg_server, "badpw_db", "badpw_owner", "right-pw").replace("right-pw", "wrong-pw")
    run_o7s(migrated, "org", "create", "badpw", "--tier", "free", "--backend", dsn, "--password", "org-pw")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(f"host={proxy.host} port={proxy.port} user=badpw password=org-pw dbname=badpw_db "
                        "sslmode=disable")
    text = str(info.value)
    assert 'database "badpw_db"' in text and "credentials" in text
    assert "wrong-pw" not in text and "badpw_owner" not in text and str(pg_server.port) not in text
    from conftest import RawPG, first_error

    with RawPG(proxy.host, proxy.port) as raw:
        err = first_error(raw.login("badpw", "org-pw", "badpw_db"))
    assert err is not None and err["C"] == "57P03" and err["S"] == "FATAL"
