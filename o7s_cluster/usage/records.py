"""What the recorder ships: usage records (one (org, database type, worker, window), with its estimates),
audit records and analytics events, each with an id fixed when it is made.

The three kinds share one spool and one shipper: they are tagged structs (`rk` = usage/audit/analytics),
so a spool frame holds any mix (`AnyRecord`), and every sink files each kind where it belongs. Nothing here
does I/O.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime
from typing import Any, Union

import msgspec

# ------------------------------------------------------------------------------------------- estimates
# Seed 000 (week 2): vcpuHours = seconds x complexity x 0.1 / 3600; seed 001 section 3.2: x parallelism,
# 2 when a query returns more than 1,000 rows; seed 001 section 6.3: a query of a FREE tenant uses 0.1 vCPU
# and 20 MB, STARTER 0.15 vCPU and 30 MB, PRO 0.2 vCPU and 50 MB. O7s does not parse SQL: complexity is 1.
# Enterprise has no figure in the seeds; it is estimated like PRO.
TIER_ESTIMATES: dict[str, tuple[float, float]] = {  # tier -> (vCPU per running query, GB per running query)
    "free": (0.10, 0.020),
    "starter": (0.15, 0.030),
    "pro": (0.20, 0.050),
    "enterprise": (0.20, 0.050),
}
DEFAULT_ESTIMATE = TIER_ESTIMATES["free"]  # unknown tier: the seed 000 factor (0.1 vCPU)
HEAVY_ROWS = 1000  # a result above this many rows counts twice (seed 001 section 3.2 "parallelism")

USAGE_NAMESPACE = uuid.UUID("5b0d6f1e-4f7c-5d1e-9a47-0a7c5e0b5e11")
_NS_BYTES = USAGE_NAMESPACE.bytes


def estimate(query_seconds: float, heavy_seconds: float, tier: str | None) -> tuple[float, float]:
    """(vCPU-hours, memory-GB-hours) for `query_seconds` of queries, `heavy_seconds` of them with >1,000 rows."""
    vcpu, gb = TIER_ESTIMATES.get(tier or "", DEFAULT_ESTIMATE)
    weighted = query_seconds + heavy_seconds  # parallelism 2 for the heavy ones
    return weighted * vcpu / 3600.0, weighted * gb / 3600.0


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True, tag_field="rk", tag="usage"):
    """One (org, database type, worker, window). `id` is fixed at creation: the idempotency key in every sink."""

    id: str
    org_id: str | None  # None: an auth failure for a name the worker could not resolve (the sink looks it up)
    org_name: str
    database_type: str | None
    worker: str
    period_start: datetime  # UTC
    period_end: datetime
    queries: int = 0
    errors: int = 0
    throttled: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rows: int = 0
    query_seconds: float = 0.0
    backend_seconds: float = 0.0
    peak_connections: int = 0
    auth_failures: int = 0
    vcpu_hours: float = 0.0
    memory_gb_hours: float = 0.0
    tier: str | None = None


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True, tag_field="rk", tag="audit"):
    """One row of platform.audit_log / document of auditLogs.

    Events of the data plane are aggregated per window: `count` of the same (kind, org, actor, source, method,
    detail) between `period_start` and `at`. Events made one at a time (the CLI's) have count 1 and no period.
    """

    id: str
    at: datetime  # UTC: the window's end, or when the event happened
    kind: str  # login_ok, login_failed, connection_refused, rate_refused, breaker_trip, admin_call, org_*, tier_*...
    org: str | None = None  # the org as named (an unknown org of a failed login too)
    org_id: str | None = None  # None: resolved by name in the sink, when it exists
    actor: str | None = None  # the user of a login, the OS user of a CLI command
    source: str | None = None  # client address, admin client address, host of a CLI command
    method: str | None = None  # password, jwt, apikey (logins); GET/POST (admin calls); cli
    count: int = 1
    detail: dict[str, Any] = msgspec.field(default_factory=dict)
    worker: str | None = None
    period_start: datetime | None = None

    @property
    def period_end(self) -> datetime:
        return self.at


class AnalyticsRecord(msgspec.Struct, frozen=True, kw_only=True, tag_field="rk", tag="analytics"):
    """One row of platform.analytics_events / document of analyticsEvents: e.g. an upgrade suggestion."""

    id: str
    at: datetime
    kind: str  # upgrade_suggested
    org: str
    org_id: str | None = None
    from_tier: str | None = None
    suggested_tier: str | None = None  # None: already on the top tier for that limit
    reason: str = ""  # exceeded_qps_limit, exceeded_connection_limit
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    worker: str | None = None
    period_start: datetime | None = None

    @property
    def period_end(self) -> datetime:
        return self.at


AnyRecord = Union[UsageRecord, AuditRecord, AnalyticsRecord]


def record_id(worker: str, boot: str, seq: int, org_key: str, db_type: str | None) -> str:
    """Deterministic: the same window of the same recorder incarnation always gets the same id.

    uuid5(USAGE_NAMESPACE, "worker/boot/seq/org/db type"), computed without the uuid module's objects
    (3x faster; a window of 10,000 orgs makes 10,000 of them).
    """
    b = bytearray(hashlib.sha1(_NS_BYTES + f"{worker}/{boot}/{seq}/{org_key}/{db_type or ''}".encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50
    b[8] = (b[8] & 0x3F) | 0x80
    x = b.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
