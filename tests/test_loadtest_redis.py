"""Smoke run of the Redis benchmark runner (loadtest/redis_bench.py): a short redis-benchmark against
redis-server directly and through o7s serve --redis-listen, so the runner cannot rot. Throughput and
latency are benchmark results (loadtest/results/REDIS.md), never asserted here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_redis_bench_smoke(tmp_path) -> None:
    if shutil.which("redis-benchmark") is None:
        pytest.skip("redis-benchmark is not installed (scripts/install installs redis-tools)")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "loadtest.redis_bench", "-n", "2000", "-c", "10", "--out", str(out),
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (js,) = out.glob("redis-bench-*.json")
    results = json.loads(js.read_text())
    runs = {(r["target"], r["pipeline"]): r for r in results["runs"]}
    assert set(runs) == {("direct", 1), ("direct", 16), ("o7s", 1), ("o7s", 16)}
    for (target, _), r in runs.items():
        assert set(r["tests"]) == {"GET", "SET"}, r
        assert all(f["rps"] > 0 and f["p95_ms"] >= f["p50_ms"] for f in r["tests"].values())
        if target == "o7s":
            assert r["o7s_cpu_seconds"] > 0  # read from the workers' /proc/PID/stat
    (md,) = out.glob("redis-bench-*.md")
    assert md.read_text().count("\n| ") == 4  # GET and SET at -P 1 and 16
