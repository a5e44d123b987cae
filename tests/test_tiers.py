"""Tiers operators define (issue 13, step 1): `o7s tier ...` through the real CLI against a real control plane,
and the change live on every worker of a real `o7s serve --workers 2` sharing a real Redis."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import psycopg
import psycopg.errors
import pytest

from conftest import run_o7s, start_proxy, stop_proxy
from o7s_cluster.control_plane.db import CatalogError
from o7s_cluster.control_plane.tiers import BY_NAME, parse_value

SEED = ["free", "starter", "pro", "enterprise"]


def fail(env, *args) -> str:
    p = run_o7s(env, *args, check=False)
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith("o7s: error: ") and p.stderr.count("\n") == 1 and p.stdout == "", p.stderr
    return p.stderr


def tiers(env) -> list[dict]:
    return json.loads(run_o7s(env, "tier", "list", "--json").stdout)


def wait_for(pred, timeout: float = 5.0):
    """pred() until it returns something true (a psycopg error counts as not yet)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = pred()
        except psycopg.Error as e:
            value, last = None, e
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s (last error: {last})")
        time.sleep(0.1)


@pytest.mark.parametrize("col,raw,expect", [
    ("max_qps", "0", "max_qps: 0 is outside 1..100000000"),
    ("max_qps", "ten", "max_qps: expected a whole number"),
    ("rank", "-1", "rank: expected a whole number"),
    ("pool_size", "10001", "pool_size: 10001 is outside 1..10000"),
    ("work_mem", "lots", "work_mem: expected a size with a unit"),
    ("work_mem", "32kB", "work_mem: 32kB is outside 64kB..2147483647kB"),
    ("can_burst", "maybe", "can_burst: expected true or false"),
    ("base_fee_usd", "1.234", "base_fee_usd: expected a number with at most 2 decimals"),
    ("overage_vcpu_usd", "1000000", "overage_vcpu_usd: 1000000 is outside 0..999999.9999"),
    ("included_vcpu_hours", "NaN", "included_vcpu_hours: expected a number with at most 2 decimals"),
])
def test_every_column_is_checked(col, raw, expect):
    with pytest.raises(CatalogError) as e:
        parse_value(BY_NAME[col], raw)
    assert str(e.value).startswith(expect), str(e.value)


def test_values_parse():
    assert parse_value(BY_NAME["work_mem"], "16MB") == "16MB"
    assert parse_value(BY_NAME["can_burst"], "off") is False
    assert parse_value(BY_NAME["overage_vcpu_usd"], "0.1234") == Decimal("0.1234")
    assert parse_value(BY_NAME["max_qps"], 500) == 500


def test_tier_commands(migrated, make_org):
    env = migrated
    assert [t["tier"] for t in tiers(env)][:4] == SEED  # the seed's four stay the default data
    assert "needs a value for: max_connections" in fail(env, "tier", "create", "t13-bare", "--max-qps", "5")
    assert "unknown tier 'nope'" in fail(env, "tier", "create", "t13-x", "--like", "nope")
    assert "invalid tier name 'Bad Name'" in fail(env, "tier", "create", "Bad Name", "--like", "free")
    assert "rank 2 is taken by tier 'pro'" in fail(env, "tier", "create", "t13-x", "--like", "free", "--rank", "2")
    assert "max_qps: 0 is outside" in fail(env, "tier", "create", "t13-x", "--like", "free", "--max-qps", "0")
    assert not [t for t in tiers(env) if t["tier"] == "t13-x"]  # nothing half-written

    out = run_o7s(env, "tier", "create", "t13-team", "--like", "starter", "--max-qps", "70", "--rank", "500",
                  "--base-fee-usd", "19.99", "--work-mem", "12MB").stdout
    assert out == "created tier t13-team (rank 500)\n"
    assert "tier 't13-team' already exists" in fail(env, "tier", "create", "t13-team", "--like", "free", "--rank", "501")
    shown = json.loads(run_o7s(env, "tier", "show", "t13-team", "--json").stdout)
    assert shown["max_qps"] == 70 and shown["base_fee_usd"] == "19.99" and shown["work_mem"] == "12MB"
    assert shown["max_connections"] == 10 and shown["can_burst"] is True and shown["orgs"] == 0  # from starter
    listing = run_o7s(env, "tier", "list").stdout.splitlines()
    assert listing[0].split()[:3] == ["TIER", "RANK", "MAX_CONNECTIONS"] and listing[-1].split()[0] == "t13-team"

    assert "nothing to change" in fail(env, "tier", "set", "t13-team")
    assert "unknown tier 'ghost'" in fail(env, "tier", "set", "ghost", "--max-qps", "5")
    run_o7s(env, "tier", "set", "t13-team", "--max-qps", "90", "--can-burst", "false")
    shown = json.loads(run_o7s(env, "tier", "show", "t13-team", "--json").stdout)
    assert shown["max_qps"] == 90 and shown["can_burst"] is False

    org = make_org("t13_user", "free")
    run_o7s(env, "org", "set-tier", org.name, "t13-team")
    assert json.loads(run_o7s(env, "org", "show", org.name, "--json").stdout)["limits"]["max_qps"] == 90
    err = fail(env, "tier", "delete", "t13-team")
    assert "tier 't13-team' is in use by 1 org(s) (t13_user)" in err and "o7s org set-tier" in err
    run_o7s(env, "org", "set-tier", org.name, "free")
    assert run_o7s(env, "tier", "delete", "t13-team").stdout == "deleted tier t13-team\n"
    assert "unknown tier 't13-team'" in fail(env, "org", "set-tier", org.name, "t13-team")
    assert [t["tier"] for t in tiers(env)][:4] == SEED


def test_tier_change_is_live_on_every_worker(migrated, make_org, redis_server, tmp_path):
    """An org on an operator's tier: its connection ceiling and its rate change while clients are connected."""
    env = dict(migrated, REDIS_URL=redis_server.url)
    run_o7s(env, "tier", "create", "t13-live", "--like", "free", "--max-connections", "2", "--max-qps", "2",
            "--can-burst", "false", "--max-query-wait-ms", "0")
    org = make_org("t13_live", "free")
    run_o7s(env, "org", "set-tier", org.name, "t13-live")
    p = start_proxy(migrated, tmp_path, "--workers", "2", "--redis-url", redis_server.url)
    conns: list[psycopg.Connection] = []
    try:
        conns = [psycopg.connect(p.dsn(org), autocommit=True) for _ in range(2)]
        with pytest.raises(psycopg.OperationalError, match=r'too many connections for org "t13_live" \(tier t13-live\): limit 2'):
            psycopg.connect(p.dsn(org), autocommit=True)
        refused = 0
        for _ in range(10):
            try:
                conns[0].execute("SELECT 1")
            except psycopg.errors.ConfigurationLimitExceeded as exc:  # 53400 at 2 queries/s, no waiting
                refused += 1
                assert "(tier t13-live): limit 2 queries per second" in str(exc)
        assert refused >= 5

        run_o7s(env, "tier", "set", "t13-live", "--max-connections", "4", "--max-qps", "5000", "--can-burst", "true",
                "--max-query-wait-ms", "1000")
        conns.append(wait_for(lambda: psycopg.connect(p.dsn(org), autocommit=True), 3.0))  # the ceiling rose
        conns.append(psycopg.connect(p.dsn(org), autocommit=True))

        def fast() -> bool:  # an open connection gets the new rate: 50 queries, none refused, in well under
            t0 = time.monotonic()  # the 25 s they would take at 2/s
            try:
                for _ in range(50):
                    conns[0].execute("SELECT 1")
            except psycopg.errors.ConfigurationLimitExceeded:
                return False
            return time.monotonic() - t0 < 2.0

        assert wait_for(fast, 3.0)
        with pytest.raises(psycopg.OperationalError, match=r"\(tier t13-live\): limit 4"):
            psycopg.connect(p.dsn(org), autocommit=True)
    finally:
        for c in conns:
            c.close()
        stop_proxy(p)
        run_o7s(migrated, "org", "set-tier", org.name, "free")
        run_o7s(migrated, "tier", "delete", "t13-live")
