"""Redis as a tenant database, the operator's side (issue 12): the tier's command rate through a real
`o7s serve --redis-listen` (a free org held to 10 commands/s; a refusal names the limit and leaves the
connection usable), usage records with database type redis attributed to the right org and reaching
`o7s usage` / `o7s bill`, and the Redis backend killed mid-session (a clear error naming the database,
no hang; after a restart the clients go on)."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import httpx
import psycopg
import pytest
import redis

from conftest import extra_tier, free_port, run_o7s, start_proxy, stop_proxy, wait_port
from conftest import add_redis

# A tier of our own for the refusal test (4 commands/s, 100 ms of patience): the seed tiers' waits are
# long enough that no honest client is refused (as in test_limits_e2e.py).
TINY = ("redis-tiny", 90, 5, 4, 1, 3, 100, 5000, "4MB", False, 0, 0, 0, 0, 0)


def serve_redis(env: dict[str, str], tmp, *extra: str):
    port = free_port()
    p = start_proxy(env, tmp, "--redis-listen", f"127.0.0.1:{port}", "--workers", "1", *extra)
    wait_port("127.0.0.1", port, proc=p.proc)
    return p, port


def client(port: int, org, **kw) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, username=org.name, password=org.password, socket_timeout=10,
                       **kw)


# ---------------------------------------------------------------------------------------------- rate


def test_free_org_is_held_to_ten_commands_a_second(rp, make_org) -> None:
    org = make_org("rfree", "free")
    c = rp.client(org)
    c.ping()
    time.sleep(1.2)  # the bucket is full (burst 1) and nobody holds tokens
    t0 = time.monotonic()
    for i in range(20):
        c.set(f"rate:{i}", i)
    took = time.monotonic() - t0
    print(f"\n20 free Redis commands through o7s serve: {took:.3f} s")
    assert took >= 1.8  # 20 commands at 10/s with a burst of one, less the worker's local stock
    assert c.get("rate:19") == b"19"


@pytest.fixture
def tiny_tier(migrated):
    with extra_tier(migrated, TINY) as name:
        yield name


def test_rate_refusal_names_the_limit_and_the_connection_stays_usable(migrated, make_org, backend, tmp_path,
                                                                      tiny_tier) -> None:
    org = make_org("rtiny", "free")
    add_redis(migrated, org, backend)
    run_o7s(migrated, "org", "set-tier", org.name, tiny_tier)
    p, port = serve_redis(migrated, tmp_path)
    try:
        refusals: list[str] = []
        other: list[BaseException] = []
        stop = time.monotonic() + 2.0

        def hammer() -> None:
            c = client(port, org, lib_name=None, lib_version=None)
            while time.monotonic() < stop:
                try:
                    c.incr("hits")
                except redis.ResponseError as e:
                    refusals.append(str(e))
                except BaseException as e:  # noqa: BLE001 - reported below
                    other.append(e)
                    return

        ts = [threading.Thread(target=hammer) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        assert not other, other
        assert refusals, "expected refusals at 4 commands/s from 4 clients"
        assert refusals[0].startswith(f'O7s: rate limit exceeded for org "{org.name}" (tier {tiny_tier}): '
                                      "limit 4 queries per second"), refusals[0]
        assert "retry after " in refusals[0]
        time.sleep(1.2)  # the bucket refills
        c = client(port, org, lib_name=None, lib_version=None)  # no CLIENT SETINFO: each command costs a token
        hits = int(c.get("hits") or 0)
        assert 0 < hits <= 4 * 2.0 + 1 + 4  # rate * time + burst + what was queued
        # a connection that was refused goes on working (burst 1: back-to-back commands are refused)
        refused = 0
        while True:
            try:
                c.incr("hits")
            except redis.ResponseError:
                refused += 1
                break
        time.sleep(1.2)
        assert refused == 1 and c.set("after", "ok")
        time.sleep(0.5)
        assert c.get("after") == b"ok"
    finally:
        stop_proxy(p)
        run_o7s(migrated, "org", "set-tier", org.name, "free")


# ---------------------------------------------------------------------------------------------- usage


def redis_totals(dsn: str, names: list[str]) -> dict[str, tuple[int, int]]:
    """org -> (commands, errors) of its usage records with database type redis."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT o.name, coalesce(sum(u.query_count), 0), coalesce(sum(u.error_count), 0)"
            " FROM platform.organizations o LEFT JOIN platform.usage_metrics u ON u.org_id = o.id"
            " AND u.database_type = 'redis' WHERE o.name = ANY(%s) GROUP BY o.name", (names,)).fetchall()
    return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def test_usage_records_of_redis_reach_usage_and_bill(migrated, platform_dsn, make_org, backend, tmp_path) -> None:
    orgs = {n: make_org(n, "pro") for n in ("ruse_a", "ruse_b")}
    for o in orgs.values():
        add_redis(migrated, o, backend)
    with psycopg.connect(platform_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM platform.usage_metrics WHERE org_name = ANY(%s)", (list(orgs),))
    env = dict(migrated, O7S_SPOOL_DIR=str(tmp_path / "spool"), O7S_USAGE_WINDOW="0.5")
    admin = free_port()
    p, port = serve_redis(env, tmp_path, "--admin", f"127.0.0.1:{admin}")
    want = {"ruse_a": (30, 4), "ruse_b": (12, 1)}  # commands that reach the backend, of which errors
    try:
        for name, (n, errs) in want.items():
            c = client(port, orgs[name])
            c.set("s", "text")
            for i in range(n - errs - 1):
                c.set(f"k{i}", i)
            for _ in range(errs):
                with pytest.raises(redis.ResponseError, match="not an integer"):
                    c.incr("s")
            c.close()
        # the admin port shows the same figures, the Redis part apart
        held = client(port, orgs["ruse_b"])
        held.ping()
        fig = httpx.get(f"http://127.0.0.1:{admin}/v1/orgs/ruse_a", timeout=10).json()
        assert fig["redis"]["commands"] == 30 and fig["redis"]["errors"] == 4
        assert fig["redis"]["bytes_in"] > 0 and fig["redis"]["bytes_out"] > 0 and fig["redis"]["refused"] == 0
        assert fig["totals"]["queries"] == 30  # this org has used no Postgres here
        assert httpx.get(f"http://127.0.0.1:{admin}/v1/orgs/ruse_b", timeout=10).json()["redis"][
            "client_connections"] == 1
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
        assert 'o7s_redis_commands_total{org="ruse_a",tier="pro"} 30.0' in metrics
        assert 'o7s_redis_errors_total{org="ruse_b",tier="pro"} 1.0' in metrics
        held.close()
        deadline = time.monotonic() + 30
        while redis_totals(platform_dsn, list(orgs)) != want:
            assert time.monotonic() < deadline, redis_totals(platform_dsn, list(orgs))
            time.sleep(0.2)
    finally:
        stop_proxy(p)
    assert redis_totals(platform_dsn, list(orgs)) == want  # nothing more after the final flush
    month = datetime.now(timezone.utc).strftime("%Y-%m")
    rows = json.loads(run_o7s(migrated, "usage", "ruse_a", "--format", "json").stdout)["rows"]
    redis_rows = [r for r in rows if r["db_type"] == "redis"]
    assert redis_rows and sum(r["queries"] for r in redis_rows) == 30
    assert rows[-1]["period"] == "total" and rows[-1]["errors"] >= 4
    bill = json.loads(run_o7s(migrated, "bill", "--period", month, "--format", "json").stdout)
    inv = {i["org"]: i for i in bill["invoices"]}
    assert inv["ruse_a"]["queries"] >= 30 and inv["ruse_b"]["queries"] >= 12


# ---------------------------------------------------------------------------------------------- backend loss


def test_backend_killed_mid_session_is_a_clear_error_and_restart_recovers(migrated, make_org, redis_server,
                                                                          tmp_path) -> None:
    org = make_org("rlost", "pro")
    run_o7s(migrated, "org", "add-db", org.name, redis_server.url, "--type", "redis", "--db-name", "lostdb")
    p, port = serve_redis(migrated, tmp_path)
    try:
        c = client(port, org)
        assert c.set("k", "v") and c.get("k") == b"v"
        sub = client(port, org).pubsub()
        sub.subscribe("ch")
        assert sub.get_message(timeout=2)["type"] == "subscribe"
        redis_server.stop()
        t0 = time.monotonic()
        with pytest.raises(redis.ResponseError, match='database "lostdb"'):
            c.get("k")
        assert time.monotonic() - t0 < 8  # an answer, not the client's socket timeout (10 s)
        # the subscribed client is told too and disconnected (its subscriptions are gone with the backend)
        got = None
        with pytest.raises((redis.ConnectionError, redis.ResponseError)) as ei:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                got = sub.get_message(timeout=1)
                if got is not None:
                    break
            raise AssertionError(f"subscriber got no error: {got}")
        assert 'database "lostdb"' in str(ei.value) or isinstance(ei.value, redis.ConnectionError)
        redis_server.start()  # same port, empty (no persistence)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert c.set("k2", "back") and c.get("k2") == b"back"
                break
            except redis.ResponseError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        fresh = client(port, org)
        assert fresh.get("k2") == b"back" and fresh.get("k") is None
    finally:
        stop_proxy(p)
