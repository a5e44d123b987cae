"""API keys (issue 13, step 3): `o7s org apikey create|list|revoke` through the real CLI, and logins with a key
through a real `o7s serve --workers 2` with TLS and Redis, before and after revocation."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from conftest import run_o7s, start_proxy, stop_proxy
from o7s_cluster.auth.apikeys import check_key, hash_key, looks_like_key, new_key, StoredKey
from o7s_cluster.control_plane.apikeys import parse_expiry
from o7s_cluster.control_plane.db import CatalogError
from test_tls import _PROXY_CERT, _PROXY_KEY

KEY_RE = re.compile(r"o7s_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


def fail(env, *args) -> str:
    p = run_o7s(env, *args, check=False)
    assert p.returncode == 1 and p.stderr.startswith("o7s: error: ") and p.stdout == "", (p.stdout, p.stderr)
    return p.stderr


def create(env, org: str, *extra: str) -> str:
    p = run_o7s(env, "org", "apikey", "create", org, *extra)
    key = p.stdout.strip()
    assert KEY_RE.fullmatch(key) and p.stdout.count("\n") == 1, p.stdout
    assert "not shown again" in p.stderr
    return key


def keys(env, org: str) -> dict[str, dict]:
    return {k["name"]: k for k in json.loads(run_o7s(env, "org", "apikey", "list", org, "--json").stdout)}


def refused(dsn: str, user: str) -> None:
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(dsn, connect_timeout=10)
    assert f'password authentication failed for user "{user}"' in str(e.value), str(e.value)


def test_key_checks():
    key, prefix, digest = new_key()
    assert looks_like_key(key) and key.startswith(f"o7s_{prefix}_") and digest == hashlib.sha256(key.encode()).digest()
    now = datetime.now(timezone.utc)
    row = StoredKey("id", "org-a", "k", digest, None, False)
    assert check_key(key, row, "org-a", now) is None
    assert check_key(key, row, "org-b", now) == "key of another org"
    assert check_key(key[:-1] + ("A" if key[-1] != "A" else "B"), row, "org-a", now) == "wrong secret"
    assert check_key(key, StoredKey("id", "org-a", "k", digest, None, True), "org-a", now) == "revoked"
    assert check_key(key, StoredKey("id", "org-a", "k", digest, now, False), "org-a", now) == "expired"
    assert check_key(key, None, "org-a", now) == "no such key"
    assert not looks_like_key("eyJhbGciOi.x.y") and not looks_like_key(key + "x")
    with pytest.raises(CatalogError, match="not in the future"):
        parse_expiry("2020-01-01")
    with pytest.raises(CatalogError, match="expected a date"):
        parse_expiry("next week")
    assert parse_expiry("2999-01-31").tzinfo is not None


def test_apikey_cli(migrated, make_org):
    env = migrated
    org = make_org("key_cli", "pro")
    key = create(env, org.name, "--name", "ci", "--expires", "2999-01-31")
    assert "already has a key named 'ci'" in fail(env, "org", "apikey", "create", org.name, "--name", "ci")
    assert "unknown org 'key_ghost'" in fail(env, "org", "apikey", "create", "key_ghost")
    assert "not in the future" in fail(env, "org", "apikey", "create", org.name, "--expires", "2001-01-01")
    listed = keys(env, org.name)["ci"]
    assert listed["prefix"] == key[4:16] and listed["state"] == "active" and listed["last_used_at"] is None
    assert listed["expires_at"].startswith("2999-01-31")
    text = run_o7s(env, "org", "apikey", "list", org.name).stdout
    assert text.splitlines()[0].split() == ["NAME", "PREFIX", "STATE", "CREATED", "LAST", "USED", "EXPIRES"]
    assert key not in text
    with psycopg.connect(env["O7S_PLATFORM_DSN"]) as conn:  # stored hashed: the key itself is nowhere
        row = conn.execute("SELECT k::text FROM platform.api_keys k WHERE prefix = %s", (key[4:16],)).fetchone()[0]
        stored = conn.execute("SELECT key_hash FROM platform.api_keys WHERE prefix = %s", (key[4:16],)).fetchone()[0]
    assert key.split("_")[2] not in row and bytes(stored) == hash_key(key)
    assert run_o7s(env, "org", "apikey", "revoke", org.name, "ci").stdout.startswith("revoked API key ci")
    assert "already revoked" in fail(env, "org", "apikey", "revoke", org.name, "ci")
    assert "has no key 'nope'" in fail(env, "org", "apikey", "revoke", org.name, "nope")
    assert keys(env, org.name)["ci"]["state"] == "revoked"


@pytest.fixture
def key_proxy(migrated, tmp_path, redis_server):
    # a long catalog cache: a revocation seen within seconds is Redis's doing, not the cache expiring
    env = dict(migrated, O7S_CATALOG_TTL="120")
    p = start_proxy(env, tmp_path, "--workers", "2", "--tls-cert", _PROXY_CERT, "--tls-key", _PROXY_KEY,
                    "--redis-url", redis_server.url)
    yield p
    stop_proxy(p)


def test_key_login_before_and_after_revocation(migrated, make_org, key_proxy, redis_server):
    env = dict(migrated, REDIS_URL=redis_server.url)
    org, other = make_org("key_login", "pro"), make_org("key_other", "pro")
    user = f"token.{org.name}"
    key = create(env, org.name, "--name", "app")
    dsn = key_proxy.dsn(org, user=user, password=key, sslmode="require")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_user, 6 * 7").fetchone() == (f"{org.name}_owner", 42)
    # psql too
    conninfo = f"host={key_proxy.host} port={key_proxy.port} user={user} dbname={org.dbname} sslmode=require"
    penv = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGPASSWORD": key}
    out = subprocess.run(["psql", conninfo, "-tAc", "SELECT 1"], env=penv, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    # a key of another org, a wrong secret, a made-up key: all just a wrong password
    other_key = create(env, other.name)
    refused(key_proxy.dsn(org, user=user, password=other_key, sslmode="require"), user)
    refused(key_proxy.dsn(org, user=user, password=key[:-4] + "AAAA", sslmode="require"), user)
    refused(key_proxy.dsn(org, user=user, password=new_key()[0], sslmode="require"), user)
    deadline = time.monotonic() + 5
    while keys(env, org.name)["app"]["last_used_at"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert keys(env, org.name)["app"]["last_used_at"] is not None

    open_conn = psycopg.connect(dsn, autocommit=True)
    run_o7s(env, "org", "apikey", "revoke", org.name, "app")
    t0 = time.monotonic()
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=10).close()
        except psycopg.OperationalError as e:
            assert f'password authentication failed for user "{user}"' in str(e)
            break
        assert time.monotonic() - t0 < 3.0, "the revoked key still logs in"
        time.sleep(0.1)
    print(f"\nrevoked key refused {time.monotonic() - t0:.2f} s after `apikey revoke` (catalog_ttl 120 s)")
    assert open_conn.execute("SELECT 1").fetchone() == (1,)  # sessions already open are not cut
    open_conn.close()


def test_expired_key_is_refused(migrated, make_org, key_proxy):
    org = make_org("key_exp", "pro")
    user = f"token.{org.name}"
    soon = (datetime.now(timezone.utc) + timedelta(seconds=2)).isoformat()
    key = create(migrated, org.name, "--expires", soon)
    dsn = key_proxy.dsn(org, user=user, password=key, sslmode="require")
    psycopg.connect(dsn).close()
    time.sleep(max(0.0, (datetime.fromisoformat(soon) - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    refused(dsn, user)
    assert keys(migrated, org.name)[key[4:16]]["state"] == "expired"
