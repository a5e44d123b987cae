"""Tier limits end to end: real `o7s serve --workers N --redis-url ...` processes sharing a real Redis,
psycopg and raw-protocol clients (issue 4). Bounds, with L the limit, B the burst, c = ceil(L*T) and n the
workers holding tokens for the org (at most the total number of workers):

    admitted in any window tau <= L*tau + B + n*c;   under saturation >= 0.97*L*tau - n*c
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import psycopg.errors
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from conftest import RawPG, extra_tier, first_error, free_port, run_o7s, start_proxy, stop_proxy
from o7s_cluster.limits.keys import gate_keys


T = 0.1
# A tier of our own for the refusal tests: no honest client can queue past the seed tiers' longest wait
# (free: 5 connections x 1 query each at 10/s is 0.5 s < 1 s), so this one waits at most 100 ms.
TINY = ("e2e-tiny", 90, 5, 4, 1, 3, 100, 5000, "4MB", False, 0, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def tiny_tier(migrated) -> Iterator[str]:
    with extra_tier(migrated, TINY) as name:
        yield name


def serve(migrated, tmp: Path, redis_url: str | None, workers: int, *extra: str, machine: int = 0):
    env = dict(migrated)
    env["O7S_RATE_SYNC_INTERVAL"] = str(T)
    args = ["--workers", str(workers), "--machine-id", str(machine), *extra]
    if redis_url:
        args += ["--redis-url", redis_url]
    return start_proxy(env, tmp, *args)


def counted_connections(env: dict[str, str], redis_url: str, org_name: str) -> int:
    """The org's open connections as Redis counts them (the gate's hash of per-worker counts)."""
    with psycopg.connect(env["O7S_PLATFORM_DSN"]) as c:
        (org_id,) = c.execute("SELECT id FROM platform.organizations WHERE name = %s", (org_name,)).fetchone()
    r = redis.Redis.from_url(redis_url)
    try:
        return sum(int(v) for v in r.hvals(gate_keys(str(org_id))[0]))
    finally:
        r.close()


def wait_counted_out(env: dict[str, str], redis_url: str, org_name: str, timeout: float = 15.0) -> None:
    """Until Redis counts no open connection of the org."""
    deadline = time.monotonic() + timeout
    while (n := counted_connections(env, redis_url, org_name)) > 0:
        assert time.monotonic() < deadline, f"{n} connections still counted after {timeout} s"
        time.sleep(0.1)


class Load:
    """Client threads, each with its own connection, running `SELECT 1` back to back until `until`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.refused: list[psycopg.Error] = []
        self.refused_in_tx: list[psycopg.Error] = []
        self.other: list[BaseException] = []
        self.lock = threading.Lock()

    def client(self, dsn: str, until: float, in_tx: bool = False) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                while time.monotonic() < until:
                    if in_tx:
                        try:
                            conn.execute("BEGIN")  # outside a transaction: may be refused
                        except psycopg.errors.ConfigurationLimitExceeded as e:
                            with self.lock:
                                self.refused.append(e)
                            continue
                        try:  # inside: delayed, never refused
                            conn.execute("SELECT 1")
                            conn.execute("COMMIT")
                        except psycopg.errors.ConfigurationLimitExceeded as e:
                            with self.lock:
                                self.refused_in_tx.append(e)
                            conn.execute("ROLLBACK")
                        else:
                            with self.lock:
                                self.times.append(time.monotonic())
                        continue
                    try:
                        conn.execute("SELECT 1")
                    except psycopg.errors.ConfigurationLimitExceeded as e:  # 53400
                        with self.lock:
                            self.refused.append(e)
                    else:
                        with self.lock:
                            self.times.append(time.monotonic())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            with self.lock:
                self.other.append(e)

    def run(self, dsns: list[str], seconds: float, in_tx: bool = False) -> float:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(d, t0 + seconds, in_tx)) for d in dsns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
        return t0

    def count(self, a: float, b: float) -> int:
        return sum(1 for t in self.times if a <= t < b)

    def max_window(self, tau: float) -> int:
        ts = sorted(self.times)
        best, j = 0, 0
        for i, t in enumerate(ts):
            while ts[j] <= t - tau:
                j += 1
            best = max(best, i - j + 1)
        return best


def bounds(L: int, B: float, n: int, tau: float) -> tuple[float, float]:
    c = math.ceil(L * T)
    return 0.97 * L * tau - n * c, L * tau + B + n * c


def connect_error(proxy, org) -> dict[str, str]:
    with RawPG(proxy.host, proxy.port) as raw:
        err = first_error(raw.login(org.name, org.password, org.dbname))
        assert err is not None
        assert raw.is_closed(), "a FATAL error must close the connection"
        return err


# ---------------------------------------------------------------------------------------------- connections


def test_sixth_free_connection_gets_53300_across_two_serves(migrated, make_org, redis_server, tmp_path):
    """Two `o7s serve` (two machines) sharing one Redis: the ceiling is global."""
    org = make_org("lim_conn", "free")
    a = serve(migrated, tmp_path, redis_server.url, 2, machine=1)
    b = serve(migrated, tmp_path, redis_server.url, 2, machine=2)
    conns = []
    try:
        for i in range(5):
            conns.append(psycopg.connect((a if i % 2 else b).dsn(org), autocommit=True))
        for p in (a, b):
            err = connect_error(p, org)
            assert (err["S"], err["C"]) == ("FATAL", "53300")
            assert err["M"] == 'too many connections for org "lim_conn" (tier free): limit 5'
            assert "Close idle connections" in err["H"] and 'tier "starter"' in err["H"] and "10" in err["H"]
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            psycopg.connect(a.dsn(org))
        for c in conns:
            c.execute("SELECT 1")  # the five are unaffected
        conns.pop().close()
        time.sleep(0.3)
        conns.append(psycopg.connect(a.dsn(org), autocommit=True))  # a slot came free
        assert connect_error(b, org)["C"] == "53300"
    finally:
        for c in conns:
            c.close()
        stop_proxy(a)
        stop_proxy(b)


def test_sixth_free_connection_gets_53300_through_two_workers_without_redis(migrated, make_org, tmp_path):
    """Without Redis each worker counts its own connections, so the ceiling holds only if every connection of
    an org reaches its home worker from the first one on: a worker that started taking clients before it
    knew the others took itself for every org's home (seen: 2 of 6 fresh starts let a 6th connection in)."""
    for attempt in range(3):
        org = make_org(f"lim_noredis{attempt}", "free")
        p = serve(migrated, tmp_path, None, 2)
        conns = []
        try:
            for _ in range(5):  # at once: the port has just opened
                conns.append(psycopg.connect(p.dsn(org), autocommit=True))
            for _ in range(4):  # each lands on either worker (SO_REUSEPORT)
                assert connect_error(p, org)["C"] == "53300", f"fresh start {attempt}: a 6th connection got in"
        finally:
            for c in conns:
                c.close()
            stop_proxy(p)


def test_kill_9_of_the_home_worker_frees_its_orgs_connections_at_once(migrated, make_org, redis_server, tmp_path):
    """A free org's 5 connections on its home worker, kill -9 of that worker: 5 reconnects within 2 s all
    succeed (before, the dead worker's counts blocked every reconnect with 53300 for 30 s)."""
    import os
    import signal

    import httpx

    from conftest import free_port
    from o7s_cluster.worker.affinity import home_worker

    org = make_org("lim_dead", "free")
    admin = free_port()
    p = serve(migrated, tmp_path, redis_server.url, 2, "--admin", f"127.0.0.1:{admin}")
    url = f"http://127.0.0.1:{admin}"
    conns, fresh = [], []
    try:
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(5):
            c = psycopg.connect(p.dsn(org), autocommit=True)
            c.execute("SELECT 1")
            conns.append(c)
        assert connect_error(p, org)["C"] == "53300"
        workers = httpx.get(f"{url}/v1/cluster", timeout=5).json()["workers"]
        home = home_worker(org.name, sorted(w["index"] for w in workers if w["state"] == "up"))
        victim = next(w for w in workers if w["index"] == home)
        assert org.name in victim["orgs"]
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        refused: list[str] = []
        while len(fresh) < 5 and time.monotonic() - killed < 2.0:
            try:
                c = psycopg.connect(p.dsn(org), autocommit=True, connect_timeout=2)
            except psycopg.OperationalError as e:
                assert "too many connections" in str(e) or "terminating" in str(e) or "closed" in str(e), e
                refused.append(str(e).strip().splitlines()[-1][:120])
                time.sleep(0.02)
                continue
            c.execute("SELECT 1")
            fresh.append(c)
        took = time.monotonic() - killed
        print(f"\n5 reconnects after kill -9 of the home worker: {took:.3f} s, refused on the way: {refused}")
        assert len(fresh) == 5, f"only {len(fresh)} of 5 reconnected within 2 s (refused: {refused[-3:]})"
        assert connect_error(p, org)["C"] == "53300"  # the ceiling still holds
    finally:
        for c in conns + fresh:
            c.close()
        stop_proxy(p)


# ---------------------------------------------------------------------------------------------- rate


def test_twenty_free_queries_take_at_least_1_9_s(migrated, make_org, redis_server, tmp_path):
    org = make_org("lim_twenty", "free")
    p = serve(migrated, tmp_path, redis_server.url, 2)
    try:
        with psycopg.connect(p.dsn(org), autocommit=True) as conn:
            time.sleep(1.2)  # the bucket is full (B = 1) and nobody holds tokens
            t0 = time.monotonic()
            for _ in range(20):
                conn.execute("SELECT 1")
            took = time.monotonic() - t0
        print(f"\n20 free queries through o7s serve: {took:.3f} s")
        assert took >= 1.9
    finally:
        stop_proxy(p)


def test_rate_refusal_is_53400_and_the_connection_stays_usable(migrated, make_org, redis_server, tmp_path,
                                                                tiny_tier):
    org = make_org("lim_refuse", "free")
    run_o7s(migrated, "org", "set-tier", org.name, tiny_tier)
    p = serve(migrated, tmp_path, redis_server.url, 2)
    try:
        load = Load()
        load.run([p.dsn(org)] * 4, 2.0)  # 4 clients at 4/s with 100 ms of patience
        assert not load.other, load.other
        assert load.refused, "expected refusals"
        e = load.refused[0]
        assert e.sqlstate == "53400"
        assert e.diag.severity == "ERROR"
        assert e.diag.message_primary == f'rate limit exceeded for org "{org.name}" (tier {tiny_tier}): limit 4 queries per second'
        assert e.diag.message_hint.startswith("retry after ")
        assert len(load.times) <= 4 * 2.0 + 1 + 2 * 1  # L*tau + B + n*c
        # a connection that was refused goes on working
        with psycopg.connect(p.dsn(org), autocommit=True) as conn:
            others = threading.Thread(target=Load().run, args=([p.dsn(org)] * 3, 1.5))
            others.start()
            refused = 0
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                try:
                    conn.execute("SELECT 1")
                except psycopg.errors.ConfigurationLimitExceeded:
                    refused += 1
            others.join()
            assert refused > 0
            time.sleep(0.6)  # the bucket refills
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
            assert counted_connections(migrated, redis_server.url, org.name) >= 1  # this one is counted
        # inside a transaction a query is delayed, never refused (BEGIN itself may be); first let the
        # connections above be counted out (a worker releases a count after the session's cleanup, which a
        # busy machine may run late)
        wait_counted_out(migrated, redis_server.url, org.name)
        tx = Load()
        tx.run([p.dsn(org)] * 3, 1.5, in_tx=True)
        assert not tx.refused_in_tx and not tx.other
        assert tx.times
    finally:
        stop_proxy(p)
        run_o7s(migrated, "org", "set-tier", org.name, "free")


@pytest.mark.parametrize("workers,tau", [(2, 10.0), (4, 5.0)])
def test_bounds_through_o7s_serve(migrated, make_org, redis_server, tmp_path, workers, tau):
    org = make_org(f"lim_bound{workers}", "starter")  # L = 50, B = 50
    p = serve(migrated, tmp_path, redis_server.url, workers)
    try:
        load = Load()
        t0 = load.run([p.dsn(org)] * 10, tau)
        assert not load.other, load.other
        admitted = load.count(t0, t0 + tau)
        lo, hi = bounds(50, 50, workers, tau)
        print(f"\nstarter through {workers} workers, {tau} s: admitted {admitted} in [{lo}, {hi}],"
              f" max in 1 s {load.max_window(1.0)}, refused {len(load.refused)}")
        assert lo <= admitted <= hi
        assert load.max_window(1.0) <= 50 + 50 + workers * 5
    finally:
        stop_proxy(p)


def test_bounds_two_serves_sharing_redis(migrated, make_org, redis_server, tmp_path):
    org = make_org("lim_two", "starter")
    a = serve(migrated, tmp_path, redis_server.url, 2, machine=1)
    b = serve(migrated, tmp_path, redis_server.url, 2, machine=2)
    try:
        load = Load()
        tau = 6.0
        t0 = load.run([a.dsn(org)] * 5 + [b.dsn(org)] * 5, tau)
        assert not load.other, load.other
        admitted = load.count(t0, t0 + tau)
        lo, hi = bounds(50, 50, 4, tau)
        print(f"\nstarter through two serves: admitted {admitted} in [{lo}, {hi}]")
        assert lo <= admitted <= hi
    finally:
        stop_proxy(a)
        stop_proxy(b)


def test_redis_outage_service_continues(migrated, make_org, redis_server, tmp_path):
    org = make_org("lim_outage", "starter")
    p = serve(migrated, tmp_path, redis_server.url, 2)
    try:
        load = Load()
        tau = 9.0

        def outage() -> None:
            time.sleep(3.0)
            redis_server.stop()
            time.sleep(3.0)
            redis_server.start()

        killer = threading.Thread(target=outage)
        killer.start()
        t0 = load.run([p.dsn(org)] * 8, tau)
        killer.join()
        assert not load.other, load.other
        during = load.count(t0 + 3.6, t0 + 6.0) / 2.4
        admitted = load.count(t0, t0 + tau)
        lo, hi = bounds(50, 50, 2, tau)
        print(f"\noutage through o7s serve: {during:.1f}/s during, admitted {admitted} in [{lo}, {hi + 2 * 5}]")
        assert during >= 0.8 * 50
        assert admitted <= hi + 2 * 5  # + the local shares' stocks
        log = p.log.read_text()
        assert "limits degraded" in log and "limits restored" in log
        with psycopg.connect(p.dsn(org), autocommit=True) as conn:
            conn.execute("SELECT 1")
    finally:
        stop_proxy(p)


def test_set_tier_raises_the_rate_of_open_connections_within_a_second(migrated, make_org, redis_server, tmp_path):
    org = make_org("lim_upgrade", "free")
    a = serve(migrated, tmp_path, redis_server.url, 2, machine=1)
    b = serve(migrated, tmp_path, redis_server.url, 2, machine=2)
    try:
        load = Load()
        env = dict(migrated, REDIS_URL=redis_server.url)
        upgraded: list[float] = []

        def upgrade() -> None:
            time.sleep(2.0)
            upgraded.append(time.monotonic())
            run_o7s(env, "org", "set-tier", org.name, "pro")

        t = threading.Thread(target=upgrade)
        t.start()
        t0 = load.run([a.dsn(org)] * 3 + [b.dsn(org)] * 2, 5.0)
        t.join()
        t_up = upgraded[0]
        before = load.count(t0 + 0.5, t_up) / (t_up - t0 - 0.5)
        end = t0 + 5.0
        after = load.count(t_up + 1.5, end) / (end - t_up - 1.5)  # set-tier itself takes a few hundred ms
        print(f"\nfree {before:.1f}/s, then pro {after:.1f}/s")
        assert before <= 10 * 1.3
        assert after >= 0.75 * 200
    finally:
        stop_proxy(a)
        stop_proxy(b)
        run_o7s(migrated, "org", "set-tier", org.name, "free")


# ------------------------------------------------------------------------------------ throttled counts

SLOW_QUERIES = 5
SLOW_SECONDS = 2.3  # past the workers' idle_after (2 s): each query finds the local stock given back


def _org_metric(admin: str, name: str, org: str) -> float:
    text = httpx.get(f"http://{admin}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and s.labels.get("org") == org)


def _settled(admin: str, org: str, queries: int) -> float:
    """o7s_queries_throttled_total for `org` once the admin port has seen its `queries` queries."""
    deadline = time.monotonic() + 15
    while _org_metric(admin, "o7s_queries_total", org) < queries:
        assert time.monotonic() < deadline, "the admin port never saw the queries"
        time.sleep(0.2)
    return _org_metric(admin, "o7s_queries_throttled_total", org)


@pytest.mark.parametrize("with_redis", [False, True], ids=["node-local", "redis"])
def test_slow_sequential_queries_are_not_counted_throttled(migrated, make_org, tmp_path, request, with_redis):
    """Issue 14: a query that waits only for the worker's local stock to be topped up (the first one, or the
    first after the stock was given back while idle) did not wait for the org's rate: not throttled. A
    free org run past its 10 queries/s on the same proxy is counted, so the counter is not just stuck at 0."""
    url = request.getfixturevalue("redis_server").url if with_redis else None
    slow = make_org(f"lim_slow_{'r' if with_redis else 'l'}", "pro")
    fast = make_org(f"lim_fast_{'r' if with_redis else 'l'}", "free")
    admin = f"127.0.0.1:{free_port()}"
    p = serve(migrated, tmp_path, url, 1, "--admin", admin)
    try:
        with psycopg.connect(p.dsn(slow), autocommit=True) as conn:
            for _ in range(SLOW_QUERIES):
                conn.execute("SELECT pg_sleep(%s)", (SLOW_SECONDS,))
        assert _settled(admin, slow.name, SLOW_QUERIES) == 0
        with psycopg.connect(p.dsn(fast), autocommit=True) as conn:
            for _ in range(15):  # B = 1, then one token per 100 ms: at least 13 wait for the rate
                conn.execute("BEGIN")
                conn.execute("COMMIT")
        throttled = _settled(admin, fast.name, 30)
        print(f"\nslow pro queries throttled: 0 of {SLOW_QUERIES}; fast free queries throttled: {throttled:g} of 30")
        assert throttled >= 13
    finally:
        stop_proxy(p)
