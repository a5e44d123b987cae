"""What the session hot path adds to: plain counters of one (org, database type) in one worker.

The recorder (recorder.py) snapshots and resets them once per window.
"""

from __future__ import annotations

from o7s_cluster.usage.records import HEAVY_ROWS

_ROW_TAGS = (b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"MERGE", b"FETCH", b"MOVE", b"COPY")


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


class UsageCounters:
    """Plain counters of one (org, database type) in one worker. The hot path adds to the attributes."""

    __slots__ = (
        "org_id", "org_name", "db_type", "tier",
        "queries", "errors", "throttled", "refused", "bytes_in", "bytes_out", "rows",
        "query_seconds", "backend_seconds", "heavy_seconds", "connections", "peak_connections", "auth_failures",
    )

    def __init__(self, org_id: str | None, org_name: str, db_type: str, tier: str | None = None) -> None:
        self.org_id = org_id
        self.org_name = org_name
        self.db_type = db_type
        self.tier = tier
        self.queries = 0
        self.errors = 0
        self.throttled = 0
        self.refused = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.rows = 0
        self.query_seconds = 0.0
        self.backend_seconds = 0.0
        self.heavy_seconds = 0.0  # summed duration of queries that returned more than HEAVY_ROWS rows
        self.connections = 0  # open client connections now
        self.peak_connections = 0  # highest `connections` in the current window
        self.auth_failures = 0

    def query_done(self, seconds: float, rows: int, ok: bool) -> None:
        self.queries += 1
        self.query_seconds += seconds
        self.rows += rows
        if not ok:
            self.errors += 1
        if rows > HEAVY_ROWS:
            self.heavy_seconds += seconds

    def connection_opened(self) -> None:
        self.connections += 1
        if self.connections > self.peak_connections:
            self.peak_connections = self.connections

    def connection_closed(self) -> None:
        if self.connections > 0:
            self.connections -= 1

    def _idle(self) -> bool:
        return not (self.queries or self.errors or self.throttled or self.refused or self.bytes_in
                    or self.bytes_out or self.rows or self.query_seconds or self.backend_seconds
                    or self.peak_connections or self.connections or self.auth_failures)

    def _take(self) -> tuple:
        """Snapshot and reset (connections stay: they are still open; the next window's peak starts there)."""
        snap = (self.queries, self.errors, self.throttled, self.refused, self.bytes_in, self.bytes_out, self.rows,
                self.query_seconds, self.backend_seconds, self.heavy_seconds,
                max(self.peak_connections, self.connections), self.auth_failures)
        self.queries = self.errors = self.throttled = self.refused = 0
        self.bytes_in = self.bytes_out = self.rows = self.auth_failures = 0
        self.query_seconds = self.backend_seconds = self.heavy_seconds = 0.0
        self.peak_connections = self.connections
        return snap
