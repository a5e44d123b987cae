"""The one set of per-org counters of a worker: the session adds to them, metrics and usage read them.

A session holds one `OrgCounters` (per org, tier and database type) for its whole life and only adds to
its attributes. The counters are cumulative and never reset: the metrics snapshot reads them as they are,
and the usage recorder (recorder.py) diffs them against what it read at the previous window. So a
dashboard and a bill read the same numbers, fed once per event.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from o7s_cluster.usage.records import HEAVY_ROWS

_ROW_TAGS = (b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"MERGE", b"FETCH", b"MOVE", b"COPY")

# Upper bounds of the query latency histogram, in seconds: 1-2.5-5 steps from 0.25 ms to 10 s (the usual
# Prometheus shape, so dashboards can pick e.g. le="0.015"-ish neighbours 0.01 and 0.025 for the 15 ms goal).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
NBUCKETS = len(LATENCY_BUCKETS) + 1  # the last slot counts observations above the largest bound (+Inf)

# What a usage window is made of, in this order: cumulative fields the recorder diffs.
USAGE_FIELDS = (
    "queries", "errors", "throttled", "refused", "bytes_in", "bytes_out", "rows",
    "query_seconds", "backend_seconds", "heavy_seconds", "auth_failures",
)


def rows_from_tag(tag: bytes | bytearray | memoryview) -> int:
    """Rows of a CommandComplete tag (without its NUL): "SELECT 5" -> 5, "INSERT 0 3" -> 3, "CREATE TABLE" -> 0."""
    tag = bytes(tag)
    sp = tag.rfind(b" ")
    if sp <= 0:
        return 0
    last = tag[sp + 1:]
    if not last.isdigit() or not tag.startswith(_ROW_TAGS):
        return 0
    return int(last)


class OrgCounters:
    """One org, in one tier, on one database type, in one worker. The hot path only adds to these."""

    __slots__ = (
        "org", "org_id", "tier", "db_type",
        "client_connections", "backend_connections", "peak_connections",
        "queries", "errors", "throttled", "refused", "bytes_in", "bytes_out", "rows",
        "query_seconds", "backend_seconds", "heavy_seconds", "auth_failures",
        "pool_waits", "pool_wait_seconds", "handoffs_in", "latency_counts",
        "listener_connections", "notifications",
    )

    def __init__(self, org: str, tier: str | None, db_type: str = "postgres", org_id: str | None = None) -> None:
        self.org = org
        self.org_id = org_id
        self.tier = tier
        self.db_type = db_type
        self.client_connections = 0  # gauge: client sessions open now
        self.backend_connections = 0  # gauge: backend connections attached to this org's sessions now
        self.peak_connections = 0  # highest client_connections since the usage recorder last looked
        self.queries = 0  # queries run: simple Query messages and extended-protocol Executes
        self.errors = 0  # queries that ended in an ErrorResponse, from the backend or from O7s
        self.throttled = 0  # queries that waited for a rate-limit token
        self.refused = 0  # queries refused by the rate limiter
        self.bytes_in = 0  # bytes received from clients
        self.bytes_out = 0  # bytes sent to clients
        self.rows = 0
        self.query_seconds = 0.0  # summed query latency (the histogram's sum)
        self.backend_seconds = 0.0  # time sessions held a backend connection
        self.heavy_seconds = 0.0  # summed duration of queries that returned more than HEAVY_ROWS rows
        self.auth_failures = 0
        self.pool_waits = 0  # times a session had to wait for a backend connection
        self.pool_wait_seconds = 0.0  # total time spent in those waits
        self.handoffs_in = 0  # connections handed to this worker as the org's home
        self.listener_connections = 0  # gauge: LISTEN/NOTIFY listener connections open now (transaction mode)
        self.notifications = 0  # notifications the listener connections relayed to this org's clients
        self.latency_counts = [0] * NBUCKETS  # NOT cumulative over buckets; the last one is > 10 s

    def query_done(self, seconds: float, rows: int, ok: bool) -> None:
        """One query answered (O(log buckets), no allocation)."""
        self.queries += 1
        self.query_seconds += seconds
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if rows:
            self.rows += rows
            if rows > HEAVY_ROWS:
                self.heavy_seconds += seconds
        if not ok:
            self.errors += 1

    def connection_opened(self) -> None:
        self.client_connections += 1
        if self.client_connections > self.peak_connections:
            self.peak_connections = self.client_connections

    def connection_closed(self) -> None:
        if self.client_connections > 0:
            self.client_connections -= 1

    def usage_values(self) -> tuple:
        """The cumulative USAGE_FIELDS, in order (what the recorder diffs)."""
        return (self.queries, self.errors, self.throttled, self.refused, self.bytes_in, self.bytes_out,
                self.rows, self.query_seconds, self.backend_seconds, self.heavy_seconds, self.auth_failures)

    def take_peak(self) -> int:
        """The highest connection count since the last call; the next period starts from the current count."""
        peak = max(self.peak_connections, self.client_connections)
        self.peak_connections = self.client_connections
        return peak

    def __repr__(self) -> str:
        return (f"<OrgCounters {self.org}/{self.tier}/{self.db_type} conns={self.client_connections} "
                f"queries={self.queries}>")


class CounterBook:
    """Every `OrgCounters` of one worker, shared by its metrics and its usage recorder."""

    __slots__ = ("_by_key", "_by_org")

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str | None, str], OrgCounters] = {}
        self._by_org: dict[str, OrgCounters] = {}  # the most recently made entry of each org name

    def get(self, org: str, tier: str | None, db_type: str = "postgres", org_id: str | None = None) -> OrgCounters:
        """The counters of (org, tier, database type), made on first use (no allocation when they exist)."""
        key = (org, tier, db_type)
        c = self._by_key.get(key)
        if c is None:
            c = self._by_key[key] = OrgCounters(org, tier, db_type, org_id)
            self._by_org[org] = c
        elif org_id is not None and c.org_id is None:
            c.org_id = org_id
        return c

    def of_org(self, org: str) -> OrgCounters | None:
        """Some counters of this org name (the latest made), if it has any on this worker."""
        return self._by_org.get(org)

    def __iter__(self) -> Iterator[OrgCounters]:
        return iter(list(self._by_key.values()))

    def __len__(self) -> int:
        return len(self._by_key)
