"""The MongoDB sink: the `usageHistory`, `auditLogs` and `analyticsEvents` collections, one document per record.

`_id` is the record id, so a batch sent twice is a no-op: documents go in with an unordered insert and
duplicate-key errors (code 11000, "already there") count as success; any other write error fails the batch,
which the shipper retries. pymongo is blocking: every call runs in a worker thread. Indexes on
(orgId, period) (the seed's billing query: `$match: {orgId, period}`, `$sum: '$vcpuHours'`),
(period) and (periodStart) are created once per sink.

Document (field names follow the seed's usageHistory):
  {_id, orgId, orgName, databaseType, worker, tier, period: "YYYY-MM", periodStart, periodEnd,
   queryCount, errorCount, throttledCount, refusedCount, bytesIn, bytesOut, rowCount,
   querySeconds, backendSeconds, peakConnections, authFailures, vcpuHours, memoryGBHours}
  auditLogs: {_id, at, orgId, orgName, kind, actor, source, method, detail, count, worker, periodStart}
    (indexes (orgName, at), (at), (kind, at))
  analyticsEvents: {_id, at, kind, orgId, orgName, fromTier, suggestedTier, reason, counts, worker, periodStart}
    (indexes (orgName, at), (at))
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import trio

from o7s_cluster.usage.records import AnalyticsRecord, AnyRecord, AuditRecord, UsageRecord

COLLECTION = "usageHistory"
AUDIT_COLLECTION = "auditLogs"
ANALYTICS_COLLECTION = "analyticsEvents"
DUPLICATE_KEY = 11000


def to_document(r: UsageRecord) -> dict[str, Any]:
    return {
        "_id": r.id, "orgId": r.org_id, "orgName": r.org_name, "databaseType": r.database_type,
        "worker": r.worker, "tier": r.tier, "period": r.period_start.strftime("%Y-%m"),
        "periodStart": r.period_start, "periodEnd": r.period_end,
        "queryCount": r.queries, "errorCount": r.errors, "throttledCount": r.throttled,
        "refusedCount": r.refused, "bytesIn": r.bytes_in, "bytesOut": r.bytes_out, "rowCount": r.rows,
        "querySeconds": r.query_seconds, "backendSeconds": r.backend_seconds,
        "peakConnections": r.peak_connections, "authFailures": r.auth_failures,
        "vcpuHours": r.vcpu_hours, "memoryGBHours": r.memory_gb_hours,
    }


def audit_document(r: AuditRecord) -> dict[str, Any]:
    return {"_id": r.id, "at": r.at, "orgId": r.org_id, "orgName": r.org, "kind": r.kind, "actor": r.actor,
            "source": r.source, "method": r.method, "detail": r.detail, "count": r.count, "worker": r.worker,
            "periodStart": r.period_start}


def analytics_document(r: AnalyticsRecord) -> dict[str, Any]:
    return {"_id": r.id, "at": r.at, "kind": r.kind, "orgId": r.org_id, "orgName": r.org, "fromTier": r.from_tier,
            "suggestedTier": r.suggested_tier, "reason": r.reason, "counts": r.counts, "worker": r.worker,
            "periodStart": r.period_start}


def _indexes() -> dict[str, list[Any]]:
    import pymongo

    return {
        COLLECTION: [pymongo.IndexModel([("orgId", 1), ("period", 1)], name="orgId_period"),
                     pymongo.IndexModel([("period", 1)], name="period"),
                     pymongo.IndexModel([("periodStart", 1)], name="periodStart")],
        AUDIT_COLLECTION: [pymongo.IndexModel([("orgName", 1), ("at", 1)], name="orgName_at"),
                           pymongo.IndexModel([("at", 1)], name="at"),
                           pymongo.IndexModel([("kind", 1), ("at", 1)], name="kind_at")],
        ANALYTICS_COLLECTION: [pymongo.IndexModel([("orgName", 1), ("at", 1)], name="orgName_at"),
                               pymongo.IndexModel([("at", 1)], name="at")],
    }


def mongo_key(url: str, database: str | None = None) -> str:
    """The sink's identity without secrets: hosts and database."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    hosts = u.netloc.rpartition("@")[2]
    return f"mongodb:{hosts}/{database or u.path.lstrip('/') or 'o7s'}"


class MongoSink:
    name = "mongodb"

    def __init__(self, url: str, *, database: str | None = None, timeout_ms: int = 5000,
                 client_kwargs: dict[str, Any] | None = None) -> None:
        self.url = url
        self.database = database
        self.key = mongo_key(url, database)
        self.timeout_ms = timeout_ms
        self.client_kwargs = client_kwargs or {}
        self._client: Any = None
        self._db: Any = None
        self._indexed: set[str] = set()
        self._lock = threading.Lock()
        self.batches = 0

    def _collection(self, name: str = COLLECTION) -> Any:
        if self._db is None:
            import pymongo

            self._client = pymongo.MongoClient(
                self.url, serverSelectionTimeoutMS=self.timeout_ms, connectTimeoutMS=self.timeout_ms,
                socketTimeoutMS=max(self.timeout_ms * 4, 10000), appname="o7s-usage", tz_aware=True,
                **self.client_kwargs,
            )
            self._db = (self._client[self.database] if self.database
                        else self._client.get_default_database(default="o7s"))
        coll = self._db[name]
        if name not in self._indexed:
            coll.create_indexes(_indexes()[name])
            self._indexed.add(name)
        return coll

    def _insert(self, name: str, docs: list[dict[str, Any]]) -> None:
        from pymongo.errors import BulkWriteError

        try:
            self._collection(name).insert_many(docs, ordered=False)
        except BulkWriteError as e:
            others = [w for w in e.details.get("writeErrors", []) if w.get("code") != DUPLICATE_KEY]
            if others or e.details.get("writeConcernErrors"):
                raise

    def _send(self, records: Sequence[AnyRecord]) -> None:
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if isinstance(r, UsageRecord):
                by_kind.setdefault(COLLECTION, []).append(to_document(r))
            elif isinstance(r, AuditRecord):
                by_kind.setdefault(AUDIT_COLLECTION, []).append(audit_document(r))
            else:
                by_kind.setdefault(ANALYTICS_COLLECTION, []).append(analytics_document(r))
        with self._lock:
            for name, docs in by_kind.items():
                self._insert(name, docs)
            self.batches += 1

    def insert_now(self, records: Sequence[AnyRecord]) -> None:
        """Blocking: store these records now (the CLI's audit events)."""
        try:
            self._send(records)
        finally:
            self._close()

    async def send(self, records: Sequence[AnyRecord]) -> None:
        await trio.to_thread.run_sync(self._send, records, abandon_on_cancel=True)

    def _close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = self._db = None
            self._indexed = set()

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close, abandon_on_cancel=True)
