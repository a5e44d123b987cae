"""The CLI's own audit events (org, tier and API-key changes) and `o7s audit` with its filters, through the real
`o7s` command: each change is one row in platform.audit_log and one document in MongoDB `auditLogs` (over the
wire test server), with the same id."""

from __future__ import annotations

import json
import secrets
from collections import Counter

import psycopg
import pytest

from conftest import create_backend_db, run_o7s
from mongo_wire import FakeMongo

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def test_cli_changes_are_audited_once_and_o7s_audit_filters(migrated, pg_server):
    dsn = migrated["O7S_PLATFORM_DSN"]
    fake = FakeMongo().start()
    env = dict(migrated, O7S_MONGODB_URL=f"mongodb://127.0.0.1:{fake.port}/o7s_cli")
    org, tier = "audcli_a", "audcli-tier"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM platform.audit_log WHERE org = %s OR detail->>'tier' = %s", (org, tier))
    try:
        backend = create_backend_db(pg_server, "audcli_a_db", "audcli_a_owner", secrets.token_urlsafe(12))
        run_o7s(env, "tier", "create", tier, "--like", "starter", "--max-qps", "77")
        run_o7s(env, "org", "create", org, "--tier", "free", "--backend", backend, "--password", "pw-audcli-1")
        run_o7s(env, "org", "set-tier", org, tier)
        run_o7s(env, "org", "passwd", org, "--password", "pw-audcli-2")
        run_o7s(env, "org", "apikey", "create", org, "--name", "ci")
        run_o7s(env, "org", "apikey", "revoke", org, "ci")
        assert run_o7s(env, "tier", "delete", tier, check=False).returncode == 1  # in use: refused, not audited
        run_o7s(env, "org", "delete", org)
        run_o7s(env, "tier", "delete", tier)
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                "SELECT id::text, kind, org, method, count, detail FROM platform.audit_log"
                " WHERE org = %s OR detail->>'tier' = %s ORDER BY at", (org, tier)).fetchall()
        kinds = Counter(r[1] for r in rows)
        assert kinds == Counter(["tier_created", "org_created", "org_tier_changed", "org_password_changed",
                                 "apikey_created", "apikey_revoked", "org_deleted", "tier_deleted"])
        assert all(r[3] == "cli" and r[4] == 1 for r in rows)
        by = {r[1]: r for r in rows}
        assert by["org_tier_changed"][5] == {"from_tier": "free", "to_tier": tier}
        assert by["apikey_created"][5]["name"] == "ci" and "secret" not in json.dumps(by["apikey_created"][5])
        assert by["tier_created"][5]["max_qps"] == "77"
        docs = {d["_id"]: d for d in fake.docs("auditLogs")}
        assert {r[0] for r in rows} == set(docs)
        assert all(docs[r[0]]["kind"] == r[1] for r in rows)

        # o7s audit: an org's events, filtered by kind, as a table and as JSON
        out = json.loads(run_o7s(env, "audit", org, "--json").stdout)
        assert [e["kind"] for e in out] == ["org_created", "org_tier_changed", "org_password_changed",
                                            "apikey_created", "apikey_revoked", "org_deleted"]
        out = json.loads(run_o7s(env, "audit", org, "--kind", "apikey_created,apikey_revoked", "--json").stdout)
        assert [e["kind"] for e in out] == ["apikey_created", "apikey_revoked"]
        table = run_o7s(env, "audit", org, "--kind", "org_tier_changed").stdout.splitlines()
        assert table[0].split()[:3] == ["AT", "KIND", "ORG"] and len(table) == 2
        assert "org_tier_changed" in table[1] and f"to_tier={tier}" in table[1]
        assert json.loads(run_o7s(env, "audit", org, "--since", "2h", "--json").stdout) == out_all(env, org)
        assert json.loads(run_o7s(env, "audit", org, "--until", "2000-01-01", "--json").stdout) == []
        bad = run_o7s(env, "audit", org, "--since", "yesterday", check=False)
        assert bad.returncode == 2 and "bad time 'yesterday'" in bad.stderr
    finally:
        fake.stop()


def out_all(env, org: str) -> list:
    return json.loads(run_o7s(env, "audit", org, "--json").stdout)
