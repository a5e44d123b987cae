"""Tenant isolation: no startup parameters, database or user names, or protocol messages let one org
reach another org's database or learn anything about it."""

from __future__ import annotations

import secrets
import struct
import threading
import time
from urllib.parse import urlsplit

import psycopg
import pytest
from conftest import RawPG, error_fields, first_error
from psycopg import errors as pgerr

pytestmark = [
    pytest.mark.parametrize("proxy", ["transaction", "session"], indirect=True, scope="module"),
    pytest.mark.timeout(60),
]


@pytest.fixture(scope="module")
def orgs(make_org):
    a = make_org("iso_a", "pro")
    b = make_org("iso_b", "pro")
    # Something secret in B's database.
    with psycopg.connect(b.backend_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS b_secret (v text)")
        conn.execute("TRUNCATE b_secret")
        conn.execute("INSERT INTO b_secret VALUES ('the-b-secret')")
    return a, b


def secrets_of(org) -> list[str]:
    """Strings about an org's backend that must never appear in any error text."""
    u = urlsplit(org.backend_dsn)
    return [org.backend_dsn, u.password, f"{u.hostname}:{u.port}", f"port={u.port}", str(u.port),
            u.username, org.password]


def assert_no_leak(text: str, *orgs, sent: str = "") -> None:
    """`sent`: what the client itself sent, which an error may echo (e.g. a database name)."""
    for word in sent.replace("=", " ").split():
        text = text.replace(word, "<sent>")
    for org in orgs:
        for s in secrets_of(org):
            assert s and s not in text, f"error text leaks {s!r}: {text!r}"


def raw_login(proxy, user, password, dbname, **params):
    with RawPG(proxy.host, proxy.port) as c:
        msgs = c.login(user, password, dbname, **params)
        closed = c.is_closed(5) if first_error(msgs) else None
    return msgs, closed


def raw_error(proxy, user, password, dbname, **params) -> dict[str, str]:
    msgs, closed = raw_login(proxy, user, password, dbname, **params)
    err = first_error(msgs)
    assert err is not None, f"expected an error, got {[t for t, _ in msgs]}"
    assert err["S"] == "FATAL"
    assert closed, "the proxy must close the connection after a FATAL error"
    return err


def error_text(err: dict[str, str]) -> str:
    return " | ".join(f"{k}={v}" for k, v in sorted(err.items()))


def test_each_org_reaches_only_its_own_database(proxy, orgs):
    for org in orgs:
        with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
            assert conn.execute("SELECT current_database(), current_user").fetchone() == (
                org.dbname, f"{org.name}_owner")
    a, _ = orgs
    with psycopg.connect(proxy.dsn(a), autocommit=True, connect_timeout=10) as conn:
        with pytest.raises(pgerr.UndefinedTable):
            conn.execute("SELECT * FROM b_secret")


@pytest.mark.parametrize("user_fmt", ["{a}", "x.{a}", "{b}.{a}", "a.b.c.{a}"])
def test_other_orgs_database_is_unknown(proxy, orgs, user_fmt):
    a, b = orgs
    user = user_fmt.format(a=a.name, b=b.name)
    err_b = raw_error(proxy, user, a.password, b.dbname)
    assert err_b["C"] == "3D000"
    # Exactly what a name that exists nowhere gets.
    err_none = raw_error(proxy, user, a.password, "zz_nowhere_db")
    assert err_b["M"].replace(b.dbname, "X") == err_none["M"].replace("zz_nowhere_db", "X")
    assert err_b.get("H") == err_none.get("H") and err_b.get("D") == err_none.get("D")
    assert_no_leak(error_text(err_b), a, b)


@pytest.mark.parametrize("dbname", ["postgres", "template1", "o7s_platform", "iso_b_db ", "ISO_B_DB",
                                    "iso_a_db/../iso_b_db", "iso_a_db iso_b_db", "iso_b_owner",
                                    "dbname=iso_b_db", "postgresql://iso_b_owner@localhost/iso_b_db"])
def test_databases_that_exist_elsewhere_get_3d000(proxy, orgs, dbname):
    a, b = orgs
    err = raw_error(proxy, a.name, a.password, dbname)
    assert err["C"] == "3D000", err
    assert_no_leak(error_text(err), a, b, sent=dbname)


def test_default_database_is_not_another_orgs(proxy, orgs):
    a, b = orgs
    # No database in the startup packet: Postgres would default to the user name.
    # User "iso_b_db.iso_a" is org iso_a; it must never land in iso_b_db.
    for user in (f"{b.dbname}.{a.name}", a.name):
        with RawPG(proxy.host, proxy.port) as c:
            msgs = c.login(user, a.password, None)
            err = first_error(msgs)
            if err is not None:
                assert err["C"] == "3D000", err
                continue
            out = c.simple_query("SELECT current_database()")
            rows = [body for t, body in out if t == b"D"]
            assert rows and a.dbname.encode() in rows[0] and b.dbname.encode() not in rows[0]


@pytest.mark.parametrize(
    "options",
    [
        "-c search_path=iso_b_db.public",
        "-c role=iso_b_owner",
        "-c session_authorization=iso_b_owner",
        "--role=iso_b_owner",
        "-d iso_b_db",
        "-c default_transaction_read_only=on -c search_path=public,iso_b",
    ],
)
def test_startup_options_do_not_cross_orgs(proxy, orgs, options):
    a, b = orgs
    try:
        conn = psycopg.connect(proxy.dsn(a, options=options), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        # Refusing is fine; it must not leak (beyond echoing what the client sent).
        assert_no_leak(str(e), a, b, sent=options)
        return
    with conn:
        db, user = conn.execute("SELECT current_database(), current_user").fetchone()
        assert db == a.dbname
        assert user == f"{a.name}_owner"
        with pytest.raises(pgerr.Error):
            conn.execute("SELECT v FROM b_secret")


def test_sql_cannot_switch_role_or_database(proxy, orgs):
    a, b = orgs
    with psycopg.connect(proxy.dsn(a), autocommit=True, connect_timeout=10) as conn:
        with pytest.raises(pgerr.Error):
            conn.execute(f'SET ROLE "{b.name}_owner"')
        with pytest.raises(pgerr.Error):
            conn.execute(f'SET SESSION AUTHORIZATION "{b.name}_owner"')
        with pytest.raises(pgerr.Error):
            conn.execute(f"SELECT * FROM {b.dbname}.public.b_secret")
        assert conn.execute("SELECT current_database()").fetchone() == (a.dbname,)


def test_wrong_password_and_unknown_org_look_the_same(proxy, orgs):
    a, b = orgs
    wrong = raw_error(proxy, a.name, "wrong-" + secrets.token_hex(4), a.dbname)
    ghost = raw_error(proxy, "ghostorg", "wrong-" + secrets.token_hex(4), "ghostorg_db")
    other_pw = raw_error(proxy, b.name, a.password, b.dbname)  # A's password for B
    bad_name = raw_error(proxy, "Not A Valid Org!", "pw", "x")
    for err, user in [(wrong, a.name), (ghost, "ghostorg"), (other_pw, b.name), (bad_name, "Not A Valid Org!")]:
        assert err["C"] == "28P01", err
        assert err["S"] == "FATAL"
    norm = {e["M"].replace(u, "U") for e, u in [(wrong, a.name), (ghost, "ghostorg"), (other_pw, b.name),
                                               (bad_name, "Not A Valid Org!")]}
    assert len(norm) == 1, norm
    assert {(e.get("D"), e.get("H")) for e in (wrong, ghost, other_pw, bad_name)} == {(wrong.get("D"), wrong.get("H"))}
    for e in (wrong, ghost, other_pw):
        assert_no_leak(error_text(e), a, b)


def _server_first_shape(proxy, user: str) -> tuple:
    """The SCRAM server-first-message's shape for a login attempt (and the mechanisms offered)."""
    from o7s_cluster.pgwire.scram import ScramClient

    with RawPG(proxy.host, proxy.port) as c:
        c.send_startup({"user": user, "database": "whatever"})
        t, body = c.recv()
        assert t == b"R" and struct.unpack("!I", body[:4])[0] == 10
        mechs = body[4:]
        cli = ScramClient("guess")
        first = cli.client_first()
        c.send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first)
        t, body = c.recv()
        assert t == b"R" and struct.unpack("!I", body[:4])[0] == 11
        r, s, i = body[4:].split(b",")
        salt = s[2:]
        return mechs, len(r), len(salt), i, salt


def test_unknown_org_scram_exchange_has_the_same_shape(proxy, orgs):
    a, _ = orgs
    real = _server_first_shape(proxy, a.name)
    ghost = _server_first_shape(proxy, "ghostorg")
    assert real[:4] == ghost[:4]
    # The mock salt is stable for a name (a changing salt would tell the org does not exist).
    assert _server_first_shape(proxy, "ghostorg")[4] == ghost[4]
    assert _server_first_shape(proxy, a.name)[4] == real[4]


def test_random_cancel_requests_cancel_nothing(proxy, orgs):
    a, b = orgs
    result = {}

    def run():
        with psycopg.connect(proxy.dsn(b), autocommit=True, connect_timeout=10) as conn:
            t0 = time.monotonic()
            conn.execute("SELECT pg_sleep(1.5)")
            result["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    for _ in range(50):
        with RawPG(proxy.host, proxy.port) as c:
            c.sendall(struct.pack("!IIII", 16, 80877102, secrets.randbits(31), secrets.randbits(32)))
            c.is_closed(2)
    t.join(15)
    assert "elapsed" in result, "B's query failed: a random cancel key reached it"


def test_cancel_key_of_a_finished_session_does_not_hit_the_next_user(proxy, orgs):
    """The BackendKeyData O7s hands out are its own: a stale key from A never cancels B's query."""
    a, b = orgs
    with RawPG(proxy.host, proxy.port) as c:
        msgs = c.login(a.name, a.password, a.dbname)
        keys = [body for t, body in msgs if t == b"K"]
        assert keys, "BackendKeyData expected"
        pid, secret = struct.unpack("!II", keys[0])
        c.send(b"X")
    result = {}

    def run():
        with psycopg.connect(proxy.dsn(b), autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT pg_sleep(1.2)")
            result["ok"] = True

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.4)
    with RawPG(proxy.host, proxy.port) as c:
        c.sendall(struct.pack("!IIII", 16, 80877102, pid, secret))
        c.is_closed(2)
    t.join(15)
    assert result.get("ok"), "a stale cancel key cancelled another org's query"


def test_error_texts_never_leak(proxy, orgs):
    """A sweep of failing logins and statements: no error text carries a backend DSN, host, port,
    role or password (of this org or any other)."""
    a, b = orgs
    texts = []
    for user, pw, db in [
        (a.name, a.password, b.dbname), (a.name, "x", a.dbname), (b.name, a.password, a.dbname),
        ("ghost", "x", "ghost_db"), (f"{b.name}.{a.name}", a.password, b.dbname), ("", "x", a.dbname),
    ]:
        msgs, _ = raw_login(proxy, user, pw, db)
        texts += [error_text(error_fields(body)) for t, body in msgs if t in b"EN"]
    with psycopg.connect(proxy.dsn(a), autocommit=True, connect_timeout=10) as conn:
        for sql in ["SELECT 1/0", "SELECT * FROM b_secret", "SELEC", "SET ROLE postgres",
                    "SET SESSION AUTHORIZATION postgres", "SELECT pg_terminate_backend(1)"]:
            try:
                conn.execute(sql)
            except pgerr.Error as e:
                texts.append(str(e) + " " + str(e.diag.message_detail) + " " + str(e.diag.message_hint))
    assert texts
    for text in texts:
        assert_no_leak(text, a, b)
