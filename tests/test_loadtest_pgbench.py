"""Smoke run of `python -m loadtest pgbench --quick` (issue 10's benchmark) against PgBouncer, the
bare trio relay (plain and on the poller) and O7s with one worker, into a temporary directory: the
harness must produce a well-formed report and JSON with transactions for every target. No figure is asserted: tps and
CPU per transaction are benchmark results (loadtest/results/PGBENCH-*.md), never a timed test.
Plus the parsers it relies on, on fixed inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["pgbouncer", "bare-relay", "poll-relay", "o7s-w1"]


@pytest.mark.timeout(150)
def test_pgbench_quick_smoke(tmp_path):
    if shutil.which("pgbench") is None:
        pytest.skip("pgbench is not installed (scripts/install installs it)")
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        pytest.skip("pgbouncer is not installed (scripts/install installs it)")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "pgbench", "--quick", "--targets", ",".join(TARGETS),
         "--modes", "simple", "--tag", "smoke", "--out", str(out), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=140,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads((out / "pgbench-smoke.json").read_text())
    report = (out / "PGBENCH-smoke.md").read_text()
    assert [(r["target"], r["mode"]) for r in data["runs"]] == [(t, "simple") for t in TARGETS]
    for r in data["runs"]:
        assert not r.get("error"), r
        assert r["tps"] > 0 and r["transactions"] > 0, r
        assert r["proxy_cpu_s"] > 0 and r["proxy_cpu_us_per_tx"] > 0, r     # CPU was read from /proc
        assert 0 <= r["machine_idle_frac"] <= 1 and r["other_cores"] >= 0, r
        assert r["latency_sampled"]["n"] > 0, r                              # pgbench's -l log was read
    o7s = next(r for r in data["runs"] if r["target"] == "o7s-w1")
    assert {n for n, _, _ in o7s["proxy_cpu_per_process"]} <= {"supervisor", "worker"}
    assert "worker" in {n for n, _, _ in o7s["proxy_cpu_per_process"]}
    assert "## -M simple" in report and "## Issue 10's targets" in report
    for t in TARGETS:
        assert f"| {t} |" in report
    assert "CPU/tx ≤ 1.5× bare relay" in report and "CPU/tx ≤ 2.5× PgBouncer" in report
    assert "CPU/tx ≤ 1.5× relay on the poller" in report


PGBENCH_STDOUT = """pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: prepared
number of clients: 50
number of threads: 2
maximum number of tries: 1
duration: 3 s
number of transactions actually processed: 31796
number of failed transactions: 0 (0.000%)
latency average = 4.701 ms
latency stddev = 2.969 ms
initial connection time = 52.513 ms
tps = 10637.185436 (without initial connection time)
"""


def test_parse_pgbench_output():
    from loadtest.pgbench import parse_pgbench

    r = parse_pgbench(PGBENCH_STDOUT, "progress: 1.0 s, 10403.9 tps, lat 4.785 ms stddev 2.108, 0 failed\n"
                                      "progress: 2.0 s, 10811.0 tps, lat 4.620 ms stddev 3.001, 0 failed\n")
    assert r["transactions"] == 31796 and r["failed"] == 0
    assert r["tps"] == pytest.approx(10637.185436)
    assert r["latency_avg_ms"] == 4.701 and r["latency_stddev_ms"] == 2.969
    assert r["connection_ms"] == 52.513
    assert r["progress_tps"] == [10403.9, 10811.0]


def test_profile_summary_from_collapsed_stacks():
    from loadtest.pgbench_profile import summarize

    collapsed = (
        'process 7:"python -m o7s_cluster serve";run (trio/_core/_run.py:1);'
        "_forward (o7s_cluster/session.py:10);send_all (trio/_highlevel_socket.py:5) 6\n"
        'process 7:"python -m o7s_cluster serve";run (trio/_core/_run.py:1);'
        "get_events (trio/_core/_io_epoll.py:3) 3\n"
        'process 7:"python -m o7s_cluster serve";process 8:"/venv/bin/python -m o7s_cluster.worker 1 /tmp/run";'
        "_forward (o7s_cluster/session.py:12) 1\n"
    )
    s = summarize(collapsed)
    assert s["samples"] == 10 and s["per_process"] == {"7 o7s_cluster serve": 9, "8 o7s_cluster.worker 1": 1}
    assert s["self"][0] == ("send_all (trio/_highlevel_socket.py)", 6, 60.0)
    areas = {a: n for a, n, _ in s["self_by_area"]}
    assert areas == {"trio (streams, sockets, sync)": 6, "trio core (scheduler, epoll)": 3, "o7s: session.py": 1}
    incl = {f: n for f, n, _ in s["inclusive"]}
    assert incl["run (trio/_core/_run.py)"] == 9 and incl["_forward (o7s_cluster/session.py)"] == 7
