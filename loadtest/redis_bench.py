"""`python -m loadtest.redis_bench`: redis-benchmark (GET and SET, 50 clients, pipelined -P 16 and not,
bounded -n) against a throwaway redis-server directly and through `o7s serve --redis-listen` in front of
it, in one run; throughput and p95 side by side, and O7s's CPU per command (utime + stime of its worker
processes, from /proc, before and after each run). Writes a JSON and a Markdown table; the written report
is loadtest/results/REDIS.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import infra

ORG = "rb_bench"
BENCH_TIER = "redis-bench"
TIER_CEILINGS = {"max_connections": 10_000, "max_qps": 100_000_000}
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 1.0


@dataclass
class Options:
    requests: int = 200_000  # -n per test
    clients: int = 50  # -c
    pipelines: list[int] = field(default_factory=lambda: [1, 16])  # -P
    tests: str = "get,set"
    workers: int = 1
    pool_size: int = 20
    out: str = str(Path(__file__).parent / "results")


class RedisServer:
    """A throwaway redis-server (no persistence) on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = infra.free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        infra.wait_port("127.0.0.1", self.port, proc=self.proc, what="redis-server")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (fields 14 and 15 of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def children(pid: int) -> list[int]:
    """The worker processes of an `o7s serve` supervisor."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


def run_benchmark(port: int, user: str | None, password: str | None, o: Options, pipeline: int) -> dict[str, dict]:
    """One redis-benchmark run (every test of o.tests); test name -> rps and latency percentiles (ms)."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(o.clients), "-n", str(o.requests),
           "-P", str(pipeline), "-t", o.tests, "-r", "10000", "--csv"]
    if password:
        cmd += ["--user", user or "default", "-a", password]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no results: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    out = {}
    for r in rows:
        out[r["test"]] = {"rps": float(r["rps"]), "avg_ms": float(r["avg_latency_ms"]),
                          "p50_ms": float(r["p50_latency_ms"]), "p95_ms": float(r["p95_latency_ms"]),
                          "p99_ms": float(r["p99_latency_ms"])}
    return out


def run(o: Options, workdir: Path, log=print) -> dict:
    """Start PostgreSQL (the control plane), redis-server and o7s serve; benchmark both targets."""
    if shutil.which("redis-benchmark") is None:
        raise RuntimeError("redis-benchmark is not installed (Debian's redis-tools; scripts/install)")
    infra.raise_fd_limit()
    pg = infra.Postgres(workdir / "pg", max_connections=50).start()
    redis = RedisServer(workdir / "redis").start()
    o7s = None
    try:
        org = infra.OrgSpec(ORG, secrets.token_urlsafe(12), BENCH_TIER, pool_size=o.pool_size)
        env = infra.provision_o7s(pg, [org], tiers={
            BENCH_TIER: {"like": "enterprise", "pool_size": o.pool_size, **TIER_CEILINGS}})
        infra.run_o7s(env, "org", "add-db", ORG, f"redis://127.0.0.1:{redis.port}/0", "--type", "redis")
        rport = infra.free_port()
        o7s = infra.O7s(workdir / "o7s", env, workers=o.workers,
                        extra_args=["--redis-listen", f"127.0.0.1:{rport}"]).start()
        infra.wait_port("127.0.0.1", rport, proc=o7s.proc, what="o7s --redis-listen")
        time.sleep(SETTLE_S)
        workers = children(o7s.proc.pid)
        results: dict = {"options": o.__dict__ | {"pipelines": o.pipelines}, "runs": []}
        for pipeline in o.pipelines:
            for target in ("direct", "o7s"):
                log(f"redis-benchmark -c {o.clients} -n {o.requests} -P {pipeline} -t {o.tests}: {target}")
                before = cpu_seconds(workers)
                if target == "direct":
                    figures = run_benchmark(redis.port, None, None, o, pipeline)
                else:
                    figures = run_benchmark(rport, ORG, org.password, o, pipeline)
                used = cpu_seconds(workers) - before
                commands = o.requests * len(figures)
                results["runs"].append({
                    "target": target, "pipeline": pipeline, "tests": figures,
                    "o7s_cpu_seconds": used if target == "o7s" else None,
                    "o7s_cpu_us_per_command": used / commands * 1e6 if target == "o7s" else None,
                })
                time.sleep(SETTLE_S)
        return results
    finally:
        if o7s is not None:
            o7s.stop()
        redis.stop()
        pg.stop()


def markdown(results: dict) -> str:
    """The side-by-side table of one run."""
    lines = ["| test | -P | direct rps | O7s rps | O7s / direct | direct p95 ms | O7s p95 ms | O7s CPU us/command |",
             "|---|---|---|---|---|---|---|---|"]
    runs = {(r["target"], r["pipeline"]): r for r in results["runs"]}
    for (target, pipeline), r in runs.items():
        if target != "o7s":
            continue
        d = runs[("direct", pipeline)]
        for test, f in r["tests"].items():
            g = d["tests"][test]
            lines.append(f"| {test} | {pipeline} | {g['rps']:,.0f} | {f['rps']:,.0f} | {f['rps'] / g['rps']:.2f} | "
                         f"{g['p95_ms']:.3f} | {f['p95_ms']:.3f} | {r['o7s_cpu_us_per_command']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.redis_bench", description=__doc__.split("\n\n")[0])
    d = Options()
    p.add_argument("-n", "--requests", type=int, default=d.requests, help="requests per test (%(default)s)")
    p.add_argument("-c", "--clients", type=int, default=d.clients, help="connections (%(default)s)")
    p.add_argument("--pipelines", default="1,16", help="comma-separated -P values (%(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="o7s serve --workers (%(default)s)")
    p.add_argument("--out", default=d.out, help="results directory (%(default)s)")
    p.add_argument("--workdir", default=None, help="parent of the throwaway servers' directory (default: $TMPDIR)")
    a = p.parse_args(argv)
    o = Options(requests=a.requests, clients=a.clients, workers=a.workers, out=a.out,
                pipelines=[int(x) for x in a.pipelines.split(",") if x.strip()])
    wd = infra.make_workdir(a.workdir)
    try:
        results = run(o, wd, log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True))
    finally:
        shutil.rmtree(wd, ignore_errors=True)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"redis-bench-{stamp}.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / f"redis-bench-{stamp}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
