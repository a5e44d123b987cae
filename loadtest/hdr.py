"""A small HDR-style latency histogram: integer microseconds in log-linear buckets.

Values below 128 µs get a bucket each; above, every power-of-two range is cut into 64 linear
sub-buckets, so any value is known to within 1/64 (1.6 %) and typically 0.8 %. Recording is a
`bit_length` and a dict increment; histograms are sparse dicts, so they serialise to JSON and merge
by adding counts (Locust worker processes each keep one; the harness adds them up).
Percentiles are reported as the highest value equivalent to the bucket (as HdrHistogram does), so
they never understate; min, max and the sum are exact.
"""

from __future__ import annotations

from collections.abc import Iterable

SUB_BITS = 6           # 64 linear sub-buckets per power of two
LINEAR = 2 << SUB_BITS  # values < 128 are exact


def bucket_of(v: int) -> int:
    if v < LINEAR:
        return v if v > 0 else 0
    shift = v.bit_length() - 1 - SUB_BITS
    return LINEAR + (shift - 1) * (1 << SUB_BITS) + ((v >> shift) - (1 << SUB_BITS))


def bucket_bounds(idx: int) -> tuple[int, int]:
    """[low, high] integer values that land in bucket idx."""
    if idx < LINEAR:
        return idx, idx
    shift = (idx - LINEAR) // (1 << SUB_BITS) + 1
    sub = (idx - LINEAR) % (1 << SUB_BITS) + (1 << SUB_BITS)
    low = sub << shift
    return low, low + (1 << shift) - 1


class Histogram:
    __slots__ = ("counts", "n", "total", "min", "max")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, us: int) -> None:
        if us < 0:
            us = 0
        if us < LINEAR:
            b = us
        else:
            shift = us.bit_length() - 1 - SUB_BITS
            b = LINEAR + (shift - 1) * 64 + ((us >> shift) - 64)
        c = self.counts
        c[b] = c.get(b, 0) + 1
        if self.n == 0 or us < self.min:
            self.min = us
        if us > self.max:
            self.max = us
        self.n += 1
        self.total += us

    def merge(self, other: "Histogram") -> "Histogram":
        if other.n == 0:
            return self
        for b, k in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + k
        self.min = other.min if self.n == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.n += other.n
        self.total += other.total
        return self

    def percentile(self, p: float) -> int:
        """Smallest recorded-equivalent value v such that at least p % of values are <= v."""
        if self.n == 0:
            return 0
        if p >= 100:
            return self.max
        need = max(1, -(-self.n * p // 100))  # ceil(n * p / 100)
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= need:
                return min(bucket_bounds(b)[1], self.max)
        return self.max

    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def cdf(self) -> list[tuple[int, float]]:
        """(upper bound µs, cumulative fraction) per non-empty bucket, for plots."""
        out, seen = [], 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            out.append((min(bucket_bounds(b)[1], self.max), seen / self.n))
        return out

    def to_json(self) -> dict:
        return {"counts": {str(b): k for b, k in self.counts.items()}, "n": self.n,
                "total": self.total, "min": self.min, "max": self.max}

    @classmethod
    def from_json(cls, d: dict) -> "Histogram":
        h = cls()
        h.counts = {int(b): k for b, k in d.get("counts", {}).items()}
        h.n, h.total, h.min, h.max = d.get("n", 0), d.get("total", 0), d.get("min", 0), d.get("max", 0)
        return h

    @classmethod
    def merged(cls, hs: Iterable["Histogram"]) -> "Histogram":
        out = cls()
        for h in hs:
            out.merge(h)
        return out

    def summary_ms(self) -> dict[str, float]:
        return {
            "n": self.n,
            "p50_ms": self.percentile(50) / 1000, "p95_ms": self.percentile(95) / 1000,
            "p99_ms": self.percentile(99) / 1000, "p999_ms": self.percentile(99.9) / 1000,
            "max_ms": self.max / 1000, "mean_ms": self.mean() / 1000,
        }
