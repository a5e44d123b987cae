"""The audit log through a real `o7s serve` (issue 13.4): logins that succeed and fail, a login breaker trip, a
refused connection, rate refusals and admin-API calls each land in platform.audit_log and in MongoDB
`auditLogs` (over the wire test server) exactly as often as they happened, counted per window, never twice."""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from conftest import extra_tier, free_port, run_o7s, start_proxy, stop_proxy
from mongo_wire import FakeMongo

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

WINDOW = "0.5"
TOKEN = secrets.token_hex(16)
# the rate-refusal tier: 4 queries/s, 100 ms of patience (a free org's clients are throttled, not refused)
TINY = ("aud-tiny", 91, 5, 4, 1, 3, 100, 5000, "4MB", False, 0, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def tiny_tier(migrated) -> Iterator[str]:
    with extra_tier(migrated, TINY) as name:
        yield name


def audit_rows(dsn: str, orgs: list[str]) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT a.id::text, a.kind, a.org, o.name, a.actor, a.source, a.method, a.detail, a.count"
            " FROM platform.audit_log a LEFT JOIN platform.organizations o ON o.id = a.org_id"
            " WHERE a.org = ANY(%s) OR (a.kind = 'admin_call' AND a.worker LIKE %s) ORDER BY a.at",
            (orgs, "%-supervisor")).fetchall()


def sums(rows: list[tuple]) -> Counter:
    """(kind, org, method) -> summed count."""
    out: Counter = Counter()
    for _id, kind, org, _resolved, _actor, _source, method, _detail, count in rows:
        out[(kind, org, method)] += count
    return out


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def hammer(dsn: str, clients: int, seconds: float) -> int:
    """`clients` connections running SELECT 1 as fast as they can; returns how many were refused (53400)."""
    refused: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        n = 0
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    conn.execute("SELECT 1")
                except psycopg.errors.ConfigurationLimitExceeded:
                    n += 1
        with lock:
            refused.append(n)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(refused)


def test_each_kind_of_event_lands_exactly_once_in_postgres_and_mongodb(migrated, make_org, tiny_tier, tmp_path: Path):
    dsn = migrated["O7S_PLATFORM_DSN"]
    ok_org, bad_org, free_org, rate_org = (make_org("aud_ok", "pro"), make_org("aud_bad", "pro"),
                                           make_org("aud_free", "free"), make_org("aud_rate", "free"))
    run_o7s(migrated, "org", "set-tier", rate_org.name, tiny_tier)
    names = [ok_org.name, bad_org.name, free_org.name, rate_org.name, "aud_nosuch"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM platform.audit_log WHERE org = ANY(%s) OR worker LIKE '%%-supervisor'", (names,))
    fake = FakeMongo(port=free_port()).start()
    admin = free_port()
    env = dict(migrated, O7S_SPOOL_DIR=str(tmp_path / "spool"), O7S_USAGE_WINDOW=WINDOW, O7S_ADMIN_TOKEN=TOKEN,
               O7S_AUTH_BREAKER_FAILURES="3", O7S_MONGODB_URL=f"mongodb://127.0.0.1:{fake.port}/o7s_audit")
    proxy = start_proxy(env, tmp_path, "--workers", "1", "--admin", f"127.0.0.1:{admin}")
    try:
        # logins: 3 good ones, 2 wrong passwords (no trip), 3 wrong ones of an unknown org (a trip)
        for _ in range(3):
            psycopg.connect(proxy.dsn(ok_org), connect_timeout=10).close()
        for org, n in ((bad_org, 2), (None, 3)):
            for _ in range(n):
                with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                    psycopg.connect(proxy.dsn(org or ok_org, user=None if org else "aud_nosuch",
                                              password="wrong-password"), connect_timeout=10)
        with pytest.raises(psycopg.OperationalError, match="too many failed logins"):  # blocked: no new failure
            psycopg.connect(proxy.dsn(ok_org, user="aud_nosuch", password="x"), connect_timeout=10)
        # a free org's sixth connection is refused
        held = [psycopg.connect(proxy.dsn(free_org), connect_timeout=10) for _ in range(5)]
        with pytest.raises(psycopg.OperationalError, match="too many connections"):
            psycopg.connect(proxy.dsn(free_org), connect_timeout=10)
        for c in held:
            c.close()
        # rate refusals, counted by the clients that got them
        refused = hammer(proxy.dsn(rate_org), 4, 2.0)
        assert refused > 0
        # admin calls: two audited reads and writes, one refused write; probes and scrapes are not audited
        base = f"http://127.0.0.1:{admin}"
        assert httpx.get(f"{base}/v1/cluster", timeout=10).status_code == 200
        assert httpx.post(f"{base}/v1/workers", json={"count": 1}, timeout=30).status_code == 401
        assert httpx.post(f"{base}/v1/workers", json={"count": 1}, timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            httpx.get(f"{base}{path}", timeout=10)

        want = Counter({
            ("login_ok", ok_org.name, "password"): 3,
            ("login_failed", bad_org.name, "password"): 2,
            ("login_failed", "aud_nosuch", "password"): 3,
            ("breaker_trip", "aud_nosuch", None): 1,
            ("login_ok", free_org.name, "password"): 6,  # the sixth authenticated, then was refused
            ("connection_refused", free_org.name, None): 1,
            ("login_ok", rate_org.name, "password"): 4,
            ("rate_refused", rate_org.name, None): refused,
            ("admin_call", None, "GET"): 1,
            ("admin_call", None, "POST"): 2,
        })
        got: dict = {}

        def settled() -> bool:
            got["rows"] = audit_rows(dsn, names)
            return sums(got["rows"]) == want

        try:
            wait_for(settled, 30, "")
        except TimeoutError:
            raise AssertionError(f"audit_log never held {want}: {sums(got['rows'])}") from None
        time.sleep(4 * float(WINDOW))  # later windows add nothing
        rows = audit_rows(dsn, names)
        assert sums(rows) == want
        by_kind = {(r[1], r[2]): r for r in rows}
        # who, from where, how; the org resolved to its id when it exists (not for an unknown name)
        _id, _k, _o, resolved, actor, source, method, _d, _n = by_kind[("login_ok", ok_org.name)]
        assert (resolved, actor, source, method) == (ok_org.name, ok_org.name, "127.0.0.1", "password")
        assert by_kind[("login_failed", "aud_nosuch")][3] is None
        assert by_kind[("breaker_trip", "aud_nosuch")][7] == {"failures": 3, "block_seconds": 120.0}
        assert by_kind[("connection_refused", free_org.name)][7] == {"tier": "free"}
        rate_detail = [r[7] for r in rows if r[1] == "rate_refused"]
        assert all("throttled" in d for d in rate_detail)
        admin_paths = sorted((r[6], r[7]["path"], r[7]["status"], r[8]) for r in rows if r[1] == "admin_call")
        assert admin_paths == [("GET", "/v1/cluster", 200, 1), ("POST", "/v1/workers", 200, 1),
                               ("POST", "/v1/workers", 401, 1)]

        # MongoDB auditLogs: the same rows, same ids, same counts
        def mongo_ids() -> set[str]:
            return {d["_id"] for d in fake.docs("auditLogs")}

        wait_for(lambda: {r[0] for r in rows} <= mongo_ids(), 30, "auditLogs never got every row")
        docs = {d["_id"]: d for d in fake.docs("auditLogs")}
        for r in rows:
            d = docs[r[0]]
            assert (d["kind"], d["orgName"], d["method"], d["count"]) == (r[1], r[2], r[6], r[8])
    finally:
        stop_proxy(proxy)
        fake.stop()
