"""The MongoDB sink: the `usageHistory` collection, one document per usage record.

`_id` is the record id, so a batch sent twice is a no-op: documents go in with an unordered insert and
duplicate-key errors (code 11000, "already there") count as success; any other write error fails the batch,
which the shipper retries. pymongo is blocking: every call runs in a worker thread. Indexes on
(orgId, period) (the seed's billing query: `$match: {orgId, period}`, `$sum: '$vcpuHours'`),
(period) and (periodStart) are created once per sink.

Document (field names follow the seed's usageHistory):
  {_id, orgId, orgName, databaseType, worker, tier, period: "YYYY-MM", periodStart, periodEnd,
   queryCount, errorCount, throttledCount, refusedCount, bytesIn, bytesOut, rowCount,
   querySeconds, backendSeconds, peakConnections, authFailures, vcpuHours, memoryGBHours}
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import trio

from o7s_cluster.usage.records import UsageRecord

COLLECTION = "usageHistory"
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
        self._coll: Any = None
        self._indexed = False
        self._lock = threading.Lock()
        self.batches = 0

    def _collection(self) -> Any:
        if self._coll is None:
            import pymongo

            self._client = pymongo.MongoClient(
                self.url, serverSelectionTimeoutMS=self.timeout_ms, connectTimeoutMS=self.timeout_ms,
                socketTimeoutMS=max(self.timeout_ms * 4, 10000), appname="o7s-usage", tz_aware=True,
                **self.client_kwargs,
            )
            db = (self._client[self.database] if self.database
                  else self._client.get_default_database(default="o7s"))
            self._coll = db[COLLECTION]
        if not self._indexed:
            import pymongo

            self._coll.create_indexes([
                pymongo.IndexModel([("orgId", 1), ("period", 1)], name="orgId_period"),
                pymongo.IndexModel([("period", 1)], name="period"),
                pymongo.IndexModel([("periodStart", 1)], name="periodStart"),
            ])
            self._indexed = True
        return self._coll

    def _send(self, records: Sequence[UsageRecord]) -> None:
        from pymongo.errors import BulkWriteError

        with self._lock:
            coll = self._collection()
            try:
                coll.insert_many([to_document(r) for r in records], ordered=False)
            except BulkWriteError as e:
                others = [w for w in e.details.get("writeErrors", []) if w.get("code") != DUPLICATE_KEY]
                if others or e.details.get("writeConcernErrors"):
                    raise
            self.batches += 1

    async def send(self, records: Sequence[UsageRecord]) -> None:
        await trio.to_thread.run_sync(self._send, records, abandon_on_cancel=True)

    def _close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = self._coll = None
            self._indexed = False

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close, abandon_on_cancel=True)
