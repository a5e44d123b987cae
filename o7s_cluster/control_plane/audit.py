"""The audit log in the control plane: events the CLI writes itself (org, tier and API-key changes) and the
query behind `o7s audit`.

The data plane's events arrive through the usage shipper (usage/audit.py); a CLI command is one process that
changes one thing, so it writes its row directly: to platform.audit_log, and to MongoDB `auditLogs` when
O7S_MONGODB_URL (or MONGODB_URL) is set, with the same id (a retry can never make two).
"""

from __future__ import annotations

import getpass
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psycopg

from o7s_cluster.control_plane.db import CatalogError, connect, one_line
from o7s_cluster.usage.records import AuditRecord

MAX_ROWS = 10_000  # `o7s audit --limit` ceiling


@dataclass(frozen=True)
class AuditRow:
    at: datetime
    kind: str
    org: str | None
    actor: str | None
    source: str | None
    method: str | None
    count: int
    detail: dict[str, Any]


def cli_event(kind: str, org: str | None, detail: dict[str, Any] | None = None) -> AuditRecord:
    """An event of this CLI process: the OS user as actor, this host as source."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in a container without passwd entry
        user = str(os.getuid())
    return AuditRecord(id=str(uuid.uuid4()), at=datetime.now(timezone.utc), kind=kind, org=org, actor=user,
                       source=socket.gethostname(), method="cli", detail=detail or {})


def write_event(dsn: str, record: AuditRecord) -> str | None:
    """Store one CLI event; returns a warning (not an error: the change itself is done) when MongoDB failed."""
    from o7s_cluster.usage.sinks.postgres import INSERT_AUDIT, audit_params

    try:
        with connect(dsn) as conn:
            conn.execute(INSERT_AUDIT, audit_params(record))
    except (psycopg.Error, CatalogError) as e:
        return f"the audit row was not written ({one_line(e)})"
    url = os.environ.get("O7S_MONGODB_URL") or os.environ.get("MONGODB_URL")
    if url:
        from o7s_cluster.usage.sinks.mongo import MongoSink

        try:
            MongoSink(url, timeout_ms=3000).insert_now([record])
        except Exception as e:  # noqa: BLE001 - Postgres has the row; say what MongoDB said
            return f"the audit event was not written to MongoDB ({type(e).__name__})"
    return None


def query(dsn: str, org: str | None, since: datetime | None, until: datetime | None,
          kinds: list[str] | None, limit: int) -> list[AuditRow]:
    """Rows of platform.audit_log, oldest first (the newest `limit` of them)."""
    if not 1 <= limit <= MAX_ROWS:
        raise CatalogError(f"--limit must be 1..{MAX_ROWS}, got {limit}")
    where, params = [], []
    if org:
        where.append("org = %s")
        params.append(org)
    if since:
        where.append("at >= %s")
        params.append(since)
    if until:
        where.append("at < %s")
        params.append(until)
    if kinds:
        where.append("kind = ANY(%s)")
        params.append(kinds)
    sql = ("SELECT at, kind, org, actor, source, method, count, detail FROM platform.audit_log"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY at DESC, id LIMIT %s")
    with connect(dsn) as conn:
        try:
            rows = conn.execute(sql, (*params, limit)).fetchall()
        except psycopg.errors.UndefinedTable:
            raise CatalogError("platform.audit_log does not exist: run `o7s migrate`") from None
    return [AuditRow(*r) for r in reversed(rows)]


@dataclass(frozen=True)
class Advice:
    org: str
    tier: str
    suggested_tier: str | None
    reason: str
    windows: int  # upgrade_suggested events (one per window and worker over the threshold)
    counts: dict[str, int]  # summed
    first: datetime
    last: datetime


def advise(dsn: str, since: datetime) -> list[Advice]:
    """Orgs with upgrade suggestions since `since`, still on the tier the events were made for."""
    sql = ("SELECT e.org, o.tier, e.suggested_tier, e.reason, e.counts, e.at FROM platform.analytics_events e"
           " JOIN platform.organizations o ON o.id = e.org_id AND o.tier = e.from_tier"
           " WHERE e.kind = 'upgrade_suggested' AND e.at >= %s ORDER BY e.at")
    with connect(dsn) as conn:
        try:
            rows = conn.execute(sql, (since,)).fetchall()
        except psycopg.errors.UndefinedTable:
            raise CatalogError("platform.analytics_events does not exist: run `o7s migrate`") from None
    groups: dict[tuple[str, str], Advice] = {}
    for org, tier, suggested, reason, counts, at in rows:
        a = groups.get((org, reason))
        summed = dict(a.counts) if a else {}
        for k, v in counts.items():
            summed[k] = summed.get(k, 0) + int(v)
        groups[(org, reason)] = Advice(org, tier, suggested, reason, (a.windows if a else 0) + 1, summed,
                                       a.first if a else at, at)
    return sorted(groups.values(), key=lambda a: (-a.windows, a.org, a.reason))
