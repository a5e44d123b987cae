"""Usage attribution through a real `o7s serve` (several worker processes): known numbers of queries land in
platform.usage_metrics exactly, attributed to the right orgs; a sink database stopped under load loses
nothing and counts nothing twice; a worker killed with kill -9 after its windows were spooled loses nothing,
and its replay counts nothing twice (Postgres and MongoDB over the wire)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from decimal import Decimal as D
from pathlib import Path

import httpx
import psycopg
import pytest

from conftest import OrgFactory, admin_dsn, free_port, run_o7s, start_proxy, stop_proxy
from mongo_wire import FakeMongo

# mockupdb's accept thread can trip over its own closed socket when the test server is stopped
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

WINDOW = "0.5"


def usage_env(env: dict[str, str], tmp: Path, **extra: str) -> dict[str, str]:
    out = dict(env)
    out.update(O7S_SPOOL_DIR=str(tmp / "spool"), O7S_USAGE_WINDOW=WINDOW, O7S_LOG_LEVEL="info", **extra)
    return out


def totals(dsn: str, orgs: list[str]) -> dict[str, tuple[int, int, int, int]]:
    """org -> (records, queries, errors, rows) in platform.usage_metrics, attributed by org_id."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT o.name, count(u.id), coalesce(sum(u.query_count), 0), coalesce(sum(u.error_count), 0),"
            " coalesce(sum(u.row_count), 0) FROM platform.organizations o"
            " LEFT JOIN platform.usage_metrics u ON u.org_id = o.id WHERE o.name = ANY(%s) GROUP BY o.name",
            (orgs,)).fetchall()
    return {r[0]: tuple(int(x) for x in r[1:]) for r in rows}


def clear(dsn: str, orgs: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM platform.usage_metrics WHERE org_name = ANY(%s)", (orgs,))


def wait_for(pred, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def run_queries(proxy, org, n_ok: int, n_err: int = 0, rows_each: int = 1) -> None:
    with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
        for _ in range(n_ok):
            conn.execute(f"SELECT generate_series(1, {rows_each})").fetchall()
        for _ in range(n_err):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1/0")


# ---------------------------------------------------------------------------------------------- attribution


@pytest.fixture(scope="module")
def e2e_orgs(make_org):
    return {n: make_org(n, t) for n, t in (("use_a", "pro"), ("use_b", "starter"), ("use_c", "enterprise"))}


def test_known_queries_are_attributed_exactly(migrated, platform_dsn, e2e_orgs, tmp_path):
    names = list(e2e_orgs)
    clear(platform_dsn, names)
    proxy = start_proxy(usage_env(migrated, tmp_path), tmp_path, "--workers", "2")
    want = {"use_a": (37, 3, 2), "use_b": (23, 0, 5), "use_c": (11, 1, 1)}  # ok queries, errors, rows each
    try:
        threads = [threading.Thread(target=run_queries, args=(proxy, e2e_orgs[n], ok, err, rows))
                   for n, (ok, err, rows) in want.items() for _ in range(2)]  # two clients per org at once
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expect = {n: (2 * (ok + err), 2 * err, 2 * ok * rows) for n, (ok, err, rows) in want.items()}
        wait_for(lambda: {n: v[1:] for n, v in totals(platform_dsn, names).items()} == expect, 30,
                 f"usage_metrics never held {expect}: {totals(platform_dsn, names)}")
        time.sleep(3 * float(WINDOW))  # later windows add nothing: no double counting
        got = totals(platform_dsn, names)
        assert {n: v[1:] for n, v in got.items()} == expect
    finally:
        stop_proxy(proxy)
    # after a SIGTERM drain, still exactly the same
    assert {n: v[1:] for n, v in totals(platform_dsn, names).items()} == expect
    with psycopg.connect(platform_dsn) as conn:
        r = conn.execute("SELECT count(DISTINCT worker), bool_and(vcpu_hours > 0), min(tier), max(tier)"
                         " FROM platform.usage_metrics WHERE org_name = 'use_a' AND query_count > 0").fetchone()
    assert r[1] and r[2] == r[3] == "pro"
    # the CLI reads the same figures
    out = json.loads(run_o7s(migrated, "usage", "use_a", "--format", "json", "--by", "month").stdout)
    assert out["rows"][-1]["period"] == "total" and out["rows"][-1]["queries"] == 80 and out["rows"][-1]["errors"] == 6
    month = time.strftime("%Y-%m", time.gmtime())
    bill = json.loads(run_o7s(migrated, "bill", "--period", month, "--format", "json", "--org", "use_a",
                              "--infra-cost", "10").stdout)
    assert [(i["org"], i["tier"], i["queries"], i["total"]) for i in bill["invoices"]] == [("use_a", "pro", 80, "50.00")]
    assert D(bill["invoices"][0]["vcpu_hours"]) > 0


def test_failed_logins_are_counted(migrated, platform_dsn, e2e_orgs, tmp_path):
    clear(platform_dsn, ["use_a"])
    proxy = start_proxy(usage_env(migrated, tmp_path), tmp_path, "--workers", "1")
    try:
        org = e2e_orgs["use_a"]
        for _ in range(2):
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(proxy.dsn(org, password="wrong-password"), connect_timeout=10)

        def failures() -> int:
            with psycopg.connect(platform_dsn) as conn:
                return int(conn.execute("SELECT coalesce(sum(auth_failures), 0) FROM platform.usage_metrics"
                                        " WHERE org_name = 'use_a'").fetchone()[0])

        wait_for(lambda: failures() == 2, 20, "auth failures not recorded")
    finally:
        stop_proxy(proxy)


# ---------------------------------------------------------------------------------------------- sink down


def test_sink_database_down_under_load_every_record_once(pg_server, pg_breakable, secret_key, tmp_path):
    """A control plane of its own on the breakable server (the Postgres sink is the control plane)."""
    dbname = "o7s_platform_e2e_usage"
    with psycopg.connect(admin_dsn(pg_breakable), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {dbname}")
    dsn = f"postgresql://{pg_breakable.user}@{pg_breakable.host}:{pg_breakable.port}/{dbname}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("O7S_", "PG"))}
    env.pop("DATABASE_URL", None)
    env.update(O7S_PLATFORM_DSN=dsn, O7S_SECRET_KEY=secret_key)
    run_o7s(env, "migrate")
    orgs = OrgFactory(pg_server, env)
    a, b = orgs("usd_a", "pro"), orgs("usd_b", "pro")
    proxy = start_proxy(usage_env(env, tmp_path), tmp_path, "--workers", "2")
    counts = {"usd_a": 0, "usd_b": 0}
    stop = threading.Event()
    errors: list[BaseException] = []

    def load(org) -> None:
        try:
            with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:
                while not stop.is_set():
                    conn.execute("SELECT 1")
                    counts[org.name] += 1
                    time.sleep(0.005)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    try:
        threads = [threading.Thread(target=load, args=(o,)) for o in (a, b)]
        for t in threads:
            t.start()
        # both clients logged in and querying before the control plane goes (a login needs it)
        wait_for(lambda: all(counts.values()) or errors, 30, "the load never started")
        time.sleep(1.0)
        pg_breakable.stop()
        try:
            time.sleep(4)  # several windows while the sink (and control plane) is down; sessions go on
        finally:
            pg_breakable.start()
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(counts.values())
        wait_for(lambda: {n: v[1] for n, v in totals(dsn, list(counts)).items()} == counts, 60,
                 f"want {counts}, have {totals(dsn, list(counts))}")
    finally:
        stop.set()
        if not pg_breakable.running():
            pg_breakable.start()
        stop_proxy(proxy)
    assert {n: v[1] for n, v in totals(dsn, list(counts)).items()} == counts


# ---------------------------------------------------------------------------------------------- kill -9


def test_kill_9_after_flush_loses_nothing_and_replays_once(migrated, platform_dsn, make_org, tmp_path):
    """MongoDB (over the wire) is down, so the spooled windows stay unacknowledged; Postgres has them all
    meanwhile (the queries span several windows: a sink that is down never holds back the other). kill -9
    the org's worker, bring MongoDB up: the restarted worker replays its spool; both sinks end up with every
    query exactly once."""
    org = make_org("use_k", "pro")
    clear(platform_dsn, [org.name])
    fake = FakeMongo(port=free_port())
    admin = free_port()
    env = usage_env(migrated, tmp_path, O7S_MONGODB_URL=f"mongodb://127.0.0.1:{fake.port}/o7s_e2e")
    proxy = start_proxy(env, tmp_path, "--workers", "2", "--admin", f"127.0.0.1:{admin}")
    try:
        with psycopg.connect(proxy.dsn(org), autocommit=True, connect_timeout=10) as conn:  # one worker
            for i in range(42):
                if i == 21:
                    time.sleep(2 * float(WINDOW))  # a window boundary (at least) between the two halves
                conn.execute("SELECT 1").fetchall()
        # every window is in Postgres, so it was spooled (the shipper reads from the spool), not acked
        wait_for(lambda: totals(platform_dsn, [org.name])[org.name][1] == 42, 30, "postgres never got 42")
        spooled = list((tmp_path / "spool").rglob("seg-*.spool"))
        assert spooled and sum(p.stat().st_size for p in spooled) > 0
        state = httpx.get(f"http://127.0.0.1:{admin}/v1/cluster", timeout=5).json()
        pids = [w["pid"] for w in state["workers"] if org.name in w.get("orgs", [])] or \
               [w["pid"] for w in state["workers"]]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        fake.start()
        wait_for(lambda: sum(d.get("queryCount", 0) for d in fake.docs() if d.get("orgName") == org.name) == 42,
                 60, "MongoDB never got the 42 queries")
        time.sleep(3 * float(WINDOW))
        docs = [d for d in fake.docs() if d.get("orgName") == org.name]
        assert sum(d["queryCount"] for d in docs) == 42 and len(docs) == len({d["_id"] for d in docs})
        assert totals(platform_dsn, [org.name])[org.name][1] == 42  # the replay added nothing
    finally:
        stop_proxy(proxy)
        fake.stop()
