"""The control-plane Postgres sink: platform.usage_metrics, platform.audit_log and platform.analytics_events,
one row per record, idempotent by id (ON CONFLICT (id) DO NOTHING), one transaction per batch.

psycopg is blocking: every call runs in a worker thread (trio.to_thread). One connection is kept and
replaced after any error. The org is re-resolved at insert time, so a record of an org deleted meanwhile
is stored with org_id NULL (as ON DELETE SET NULL does) instead of failing the batch forever, and an auth
failure recorded by name only gets the org's id when the name exists.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import psycopg
import trio
from psycopg.types.json import Jsonb

from o7s_cluster.usage.records import AnalyticsRecord, AnyRecord, AuditRecord, UsageRecord

INSERT = """
INSERT INTO platform.usage_metrics (
  id, org_id, org_name, database_type, worker, tier, period_start, period_end,
  query_count, error_count, throttled_count, refused_count, bytes_in, bytes_out, row_count,
  query_seconds, backend_seconds, peak_connections, auth_failures, vcpu_hours, memory_gb_hours, storage_gb)
SELECT v.id,
  coalesce((SELECT o.id FROM platform.organizations o WHERE o.id = v.org_id),
           (SELECT o.id FROM platform.organizations o WHERE v.org_id IS NULL AND o.name = v.org_name)),
  v.org_name, v.database_type, v.worker, v.tier, v.period_start, v.period_end,
  v.q, v.e, v.t, v.r, v.bi, v.bo, v.rw, v.qs, v.bs, v.pc, v.af, v.vh, v.mh, 0
FROM (SELECT %(id)s::uuid AS id, %(org_id)s::uuid AS org_id, %(org_name)s::text AS org_name,
             %(database_type)s::text AS database_type, %(worker)s::text AS worker, %(tier)s::text AS tier,
             %(period_start)s::timestamptz AS period_start, %(period_end)s::timestamptz AS period_end,
             %(queries)s::bigint AS q, %(errors)s::bigint AS e, %(throttled)s::bigint AS t,
             %(refused)s::bigint AS r, %(bytes_in)s::bigint AS bi, %(bytes_out)s::bigint AS bo,
             %(rows)s::bigint AS rw, %(query_seconds)s::float8 AS qs, %(backend_seconds)s::float8 AS bs,
             %(peak_connections)s::int AS pc, %(auth_failures)s::bigint AS af,
             %(vcpu_hours)s::float8::numeric AS vh, %(memory_gb_hours)s::float8::numeric AS mh) v
ON CONFLICT (id) DO NOTHING
"""


# the org id as given when that org still exists, else the org of that name (or NULL)
_ORG = """coalesce((SELECT o.id FROM platform.organizations o WHERE o.id = %(org_id)s::uuid),
                (SELECT o.id FROM platform.organizations o WHERE o.name = %(org)s::text))"""

INSERT_AUDIT = f"""
INSERT INTO platform.audit_log (id, at, org, org_id, kind, actor, source, method, detail, count, worker, period_start)
VALUES (%(id)s::uuid, %(at)s, %(org)s, {_ORG}, %(kind)s, %(actor)s, %(source)s, %(method)s, %(detail)s,
        %(count)s, %(worker)s, %(period_start)s)
ON CONFLICT (id) DO NOTHING
"""

INSERT_ANALYTICS = f"""
INSERT INTO platform.analytics_events (id, at, kind, org, org_id, from_tier, suggested_tier, reason, counts,
                                       worker, period_start)
VALUES (%(id)s::uuid, %(at)s, %(kind)s, %(org)s, {_ORG}, %(from_tier)s, %(suggested_tier)s, %(reason)s,
        %(counts)s, %(worker)s, %(period_start)s)
ON CONFLICT (id) DO NOTHING
"""


def audit_params(r: AuditRecord) -> dict[str, Any]:
    return {"id": r.id, "at": r.at, "org": r.org, "org_id": r.org_id, "kind": r.kind, "actor": r.actor,
            "source": r.source, "method": r.method, "detail": Jsonb(r.detail), "count": r.count,
            "worker": r.worker, "period_start": r.period_start}


def _analytics_params(r: AnalyticsRecord) -> dict[str, Any]:
    return {"id": r.id, "at": r.at, "kind": r.kind, "org": r.org, "org_id": r.org_id, "from_tier": r.from_tier,
            "suggested_tier": r.suggested_tier, "reason": r.reason, "counts": Jsonb(r.counts),
            "worker": r.worker, "period_start": r.period_start}


def _params(r: UsageRecord) -> dict[str, Any]:
    return {
        "id": r.id, "org_id": r.org_id, "org_name": r.org_name, "database_type": r.database_type,
        "worker": r.worker, "tier": r.tier, "period_start": r.period_start, "period_end": r.period_end,
        "queries": r.queries, "errors": r.errors, "throttled": r.throttled, "refused": r.refused,
        "bytes_in": r.bytes_in, "bytes_out": r.bytes_out, "rows": r.rows, "query_seconds": r.query_seconds,
        "backend_seconds": r.backend_seconds, "peak_connections": r.peak_connections,
        "auth_failures": r.auth_failures, "vcpu_hours": r.vcpu_hours, "memory_gb_hours": r.memory_gb_hours,
    }


def postgres_key(dsn: str) -> str:
    """The sink's identity without secrets: where the rows go (host, port, database, user)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a malformed DSN fails at connect time with its own error
        return "postgres:?"
    return "postgres:" + " ".join(f"{k}={d.get(k, '')}" for k in ("host", "port", "dbname", "user"))


class PostgresSink:
    name = "postgres"

    def __init__(self, dsn: str, *, connect_timeout: int = 5) -> None:
        self.dsn = dsn
        self.key = postgres_key(dsn)
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self.batches = 0

    def _send(self, records: Sequence[AnyRecord]) -> None:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.dsn, connect_timeout=self.connect_timeout,
                                                 application_name="o7s-usage")
                usage = [_params(r) for r in records if isinstance(r, UsageRecord)]
                audit = [audit_params(r) for r in records if isinstance(r, AuditRecord)]
                analytics = [_analytics_params(r) for r in records if isinstance(r, AnalyticsRecord)]
                with self._conn.transaction():
                    with self._conn.cursor() as cur:
                        for sql, rows in ((INSERT, usage), (INSERT_AUDIT, audit), (INSERT_ANALYTICS, analytics)):
                            if rows:
                                cur.executemany(sql, rows)
                self.batches += 1
            except BaseException:
                self._close()
                raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    async def send(self, records: Sequence[AnyRecord]) -> None:
        # abandon_on_cancel: a hung server must not hold up cancellation; the lock keeps calls serial
        await trio.to_thread.run_sync(self._send, records, abandon_on_cancel=True)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_locked, abandon_on_cancel=True)

    def _close_locked(self) -> None:
        with self._lock:
            self._close()
