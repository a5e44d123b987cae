"""Smoke run of the Locust harness (loadtest/): tens of users for a few seconds against direct
Postgres, PgBouncer and O7s, end to end through `python -m loadtest compare`, into a temporary
results directory. It checks that the harness works and that a report is produced; latency is a
benchmark result (loadtest/results/REPORT.md), never asserted here."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Never import locust here: importing it monkey-patches the whole pytest process with gevent.
if importlib.util.find_spec("locust") is None or importlib.util.find_spec("matplotlib") is None:
    pytest.skip("the loadtest extra is not installed (scripts/install installs it)", allow_module_level=True)


@pytest.mark.timeout(420)
def test_compare_smoke(tmp_path):
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        pytest.skip("pgbouncer is not installed (scripts/install installs it)")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "compare", "--users", "24", "--rate", "48",
         "--duration", "3", "--warmup", "0.5", "--orgs", "3", "--rows", "500",
         "--locust-processes", "2", "--out", str(out), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = (out / "REPORT.md").read_text()
    data = json.loads((out / "compare.json").read_text())
    targets = [r["target"] for r in data["results"]]
    assert targets == ["direct", "pgbouncer", "o7s"]
    for r in data["results"]:
        assert r["target"] in report
        assert r["connected"] == 24, r
        assert r["hist_files"] >= 2, r                 # merged over both Locust worker processes
        assert r["requests"] > 0 and r["errors"] == 0, r
        assert r["green_check"] and "error" not in r["green_check"][0], r
        assert r["latency"]["p95_ms"] > 0
    assert "proxy_cpu_s" in data["results"][1] and "proxy_cpu_s" in data["results"][2]
    assert (out / "latency.png").stat().st_size > 1000


def test_histogram_merges_and_bounds():
    from loadtest.hdr import Histogram, bucket_bounds, bucket_of

    for v in [0, 1, 127, 128, 129, 255, 256, 1000, 12345, 10**7]:
        lo, hi = bucket_bounds(bucket_of(v))
        assert lo <= v <= hi and (hi - lo) <= max(1, v // 64)
    a, b = Histogram(), Histogram()
    for v in range(1, 1001):
        (a if v % 2 else b).record(v)
    m = Histogram.from_json(json.loads(json.dumps(a.to_json()))).merge(b)
    assert m.n == 1000 and m.min == 1 and m.max == 1000
    assert 495 <= m.percentile(50) <= 510
    assert 985 <= m.percentile(99) <= 1000
