"""Backend DSN parsing: both forms, defaults, validation, and no password in any error or repr."""

import pytest

from o7s_cluster.control_plane.dsn import BackendTarget, parse_dsn


def test_uri_form():
    t = parse_dsn("postgresql://alice:s3cr%40t@db.example.com:6543/app?sslmode=require&options=-c%20search_path%3Dx")
    assert t == BackendTarget("db.example.com", 6543, "alice", "s3cr@t", "app", "require", "-c search_path=x")


def test_key_value_form_and_defaults():
    t = parse_dsn("host=10.0.0.5 user=bob password='a b' dbname=shop")
    assert (t.host, t.port, t.user, t.password, t.dbname, t.sslmode, t.options) == (
        "10.0.0.5", 5432, "bob", "a b", "shop", "prefer", None)


def test_postgres_scheme_ipv6_and_unix_socket():
    assert parse_dsn("postgres://u@[::1]:5/d").host == "::1"
    t = parse_dsn("host=/var/run/postgresql user=u dbname=d")
    assert t.host == "/var/run/postgresql" and t.password is None


def test_conninfo_round_trip():
    t = parse_dsn("postgresql://u:p'q\\r@h:1/d?sslmode=verify-full&options=-c%20x%3D1")
    assert parse_dsn(t.conninfo()) == t


def test_redacted_and_repr_hide_password():
    t = parse_dsn("postgresql://alice:TopSecret99@h:5433/app?sslmode=disable")
    assert t.redacted() == "postgresql://alice@h:5433/app?sslmode=disable"
    assert "TopSecret99" not in repr(t) and "TopSecret99" not in str(t) and "TopSecret99" not in f"{[t]}"


@pytest.mark.parametrize(
    "dsn, why",
    [
        ("", "empty"),
        ("postgresql://u:TopSecret99@/d", "no host"),
        ("postgresql://TopSecret99@h/", "no database"),
        ("host=h dbname=d password=TopSecret99", "no user"),
        ("postgresql://u:TopSecret99@h:99999/d", "port"),
        ("postgresql://u:TopSecret99@h:abc/d", "port"),
        ("postgresql://u:TopSecret99@h/d?sslmode=maybe", "sslmode"),
        ("postgresql://u:TopSecret99@h1,h2/d", "multiple hosts"),
        ("mysql://u:TopSecret99@h/d", "scheme"),
        ("host=h user=u dbname=d password=TopSecret99 bogus", "malformed"),
        ("host=h user=u dbname=d password='TopSecret99", "malformed"),
        ("host=h user=u dbname=d nosuchoption=1 password=TopSecret99", "malformed"),
        ("TopSecret99", "malformed"),
    ],
)
def test_malformed(dsn, why):
    with pytest.raises(ValueError, match=why) as ei:
        parse_dsn(dsn)
    msg = str(ei.value)
    assert "TopSecret99" not in msg and "\n" not in msg and msg.startswith("malformed backend DSN")
