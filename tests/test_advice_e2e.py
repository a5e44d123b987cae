"""Upgrade advice through a real `o7s serve` (issue 13.5): a free-tier org hammered beyond its qps and connection
ceilings gets `upgrade_suggested` events (platform.analytics_events and MongoDB `analyticsEvents` over the wire
test server) naming the next tier up, and `o7s org advise` lists it with the evidence; a quiet org is absent."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest

from conftest import free_port, run_o7s, start_proxy, stop_proxy
from mongo_wire import FakeMongo
from test_audit_e2e import hammer, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def events(dsn: str, org: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id::text, reason, from_tier, suggested_tier, counts FROM platform.analytics_events"
                            " WHERE org = %s AND kind = 'upgrade_suggested' ORDER BY at", (org,)).fetchall()


def test_a_hammered_free_org_is_advised_to_upgrade(migrated, make_org, tmp_path: Path):
    dsn = migrated["O7S_PLATFORM_DSN"]
    busy, quiet = make_org("adv_busy", "free"), make_org("adv_quiet", "free")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM platform.analytics_events WHERE org = ANY(%s)", ([busy.name, quiet.name],))
    fake = FakeMongo(port=free_port()).start()
    env = dict(migrated, O7S_SPOOL_DIR=str(tmp_path / "spool"), O7S_USAGE_WINDOW="1",
               O7S_MONGODB_URL=f"mongodb://127.0.0.1:{fake.port}/o7s_advice")
    proxy = start_proxy(env, tmp_path, "--workers", "1")
    try:
        with psycopg.connect(proxy.dsn(quiet), autocommit=True) as conn:  # well within its limits
            for _ in range(3):
                conn.execute("SELECT 1")
        hammer(proxy.dsn(busy), 5, 2.5)  # 5 clients flat out against 10 queries/s: throttled
        held = [psycopg.connect(proxy.dsn(busy), connect_timeout=10) for _ in range(5)]
        refused = 0
        for _ in range(12):
            try:
                psycopg.connect(proxy.dsn(busy), connect_timeout=10).close()
            except psycopg.OperationalError as e:
                assert "too many connections" in str(e)
                refused += 1
        for c in held:
            c.close()
        assert refused == 12

        def both() -> bool:
            return {r[1] for r in events(dsn, busy.name)} == {"exceeded_qps_limit", "exceeded_connection_limit"}

        wait_for(both, 30, "no advice for both ceilings")
        time.sleep(2.5)
        rows = events(dsn, busy.name)
        assert all(r[2] == "free" and r[3] == "starter" for r in rows)  # starter: 50 q/s and 10 connections
        conn_refused = sum(r[4].get("refused_connections", 0) for r in rows)
        assert 5 <= conn_refused <= refused  # windows with fewer than 5 make no event
        assert sum(r[4].get("throttled_queries", 0) + r[4].get("refused_queries", 0) for r in rows) >= 5
        assert events(dsn, quiet.name) == []
        # the same events in MongoDB
        wait_for(lambda: {r[0] for r in rows} <= {d["_id"] for d in fake.docs("analyticsEvents")}, 30,
                 "analyticsEvents never got the events")
        docs = {d["_id"]: d for d in fake.docs("analyticsEvents")}
        assert all((docs[r[0]]["reason"], docs[r[0]]["suggestedTier"], docs[r[0]]["fromTier"]) == (r[1], r[3], r[2])
                   for r in rows)
        # o7s org advise: the busy org, both reasons, the evidence summed
        out = json.loads(run_o7s(migrated, "org", "advise", "--since", "1h", "--json").stdout)
        mine = {a["reason"]: a for a in out if a["org"] in (busy.name, quiet.name)}
        assert set(mine) == {"exceeded_qps_limit", "exceeded_connection_limit"}
        assert all(a["org"] == busy.name and a["tier"] == "free" and a["suggested_tier"] == "starter"
                   for a in mine.values())
        assert mine["exceeded_connection_limit"]["counts"] == {"refused_connections": conn_refused}
        assert mine["exceeded_connection_limit"]["windows"] == sum(r[1] == "exceeded_connection_limit" for r in rows)
        table = run_o7s(migrated, "org", "advise", "--since", "1h").stdout.splitlines()
        assert table[0].split()[:4] == ["ORG", "TIER", "SUGGESTED", "REASON"]
        lines = [line.split() for line in table if line.startswith(busy.name + " ")]
        assert sorted(line[3] for line in lines) == ["exceeded_connection_limit", "exceeded_qps_limit"]
        assert all(line[1:3] == ["free", "starter"] for line in lines)
        assert not any(line.startswith(quiet.name) for line in table)
        # once moved up, the org is no longer advised for its old tier
        run_o7s(migrated, "org", "set-tier", busy.name, "starter")
        out = json.loads(run_o7s(migrated, "org", "advise", "--since", "1h", "--json").stdout)
        assert busy.name not in {a["org"] for a in out}
    finally:
        stop_proxy(proxy)
        fake.stop()
        run_o7s(migrated, "org", "set-tier", busy.name, "free", check=False)


def test_the_suggested_tier_is_the_next_one_up_with_a_higher_limit():
    from o7s_cluster.control_plane.db import TierLimits
    from o7s_cluster.usage.advice import CONNECTIONS, QPS, suggest

    def t(name, conns, qps):
        return TierLimits(name, conns, qps, 1, 1, 1000, 1000, "4MB", False)

    tiers = [t("free", 5, 10), t("wide", 5, 100), t("big", 50, 100)]
    assert suggest(tiers, "free", QPS) == "wide"
    assert suggest(tiers, "free", CONNECTIONS) == "big"  # "wide" has no more connections
    assert suggest(tiers, "big", QPS) is None and suggest(tiers, "gone", QPS) is None
