"""The per-org counters one session feeds: one call per event, read by both metrics and usage."""

from __future__ import annotations

from o7s_cluster.admin.metrics import OrgMetrics
from o7s_cluster.usage.counters import UsageCounters


class SessionCounters:
    """What the session core counts (queries with their rows, time and outcome; bytes; throttled and
    refused queries) goes to the org's metrics and its usage counters from the same single event, so
    that a dashboard and a bill cannot disagree about how many queries ran."""

    __slots__ = ("metrics", "usage")

    def __init__(self, metrics: OrgMetrics, usage: UsageCounters) -> None:
        self.metrics = metrics
        self.usage = usage

    def query_done(self, seconds: float, rows: int, ok: bool) -> None:
        metrics = self.metrics
        metrics.queries += 1
        if not ok:
            metrics.errors += 1
        metrics.observe_latency(seconds)
        self.usage.query_done(seconds, rows, ok)

    @property
    def bytes_in(self) -> int:
        return self.metrics.bytes_in

    @bytes_in.setter
    def bytes_in(self, value: int) -> None:
        delta = value - self.metrics.bytes_in
        self.metrics.bytes_in = value
        self.usage.bytes_in += delta

    @property
    def bytes_out(self) -> int:
        return self.metrics.bytes_out

    @bytes_out.setter
    def bytes_out(self, value: int) -> None:
        delta = value - self.metrics.bytes_out
        self.metrics.bytes_out = value
        self.usage.bytes_out += delta

    @property
    def throttled(self) -> int:
        return self.metrics.throttled

    @throttled.setter
    def throttled(self, value: int) -> None:
        self.usage.throttled += value - self.metrics.throttled
        self.metrics.throttled = value

    @property
    def refused(self) -> int:
        return self.metrics.refused

    @refused.setter
    def refused(self, value: int) -> None:
        self.usage.refused += value - self.metrics.refused
        self.metrics.refused = value

    @property
    def errors(self) -> int:
        return self.metrics.errors

    @errors.setter
    def errors(self, value: int) -> None:
        """Errors O7s itself answered (no backend free, a refused message): not queries run."""
        self.metrics.errors = value
